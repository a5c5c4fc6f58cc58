"""The error a user's mistake raises.

``train.py`` prints a :class:`UserError` as one line on stderr and exits with
status 2; any other exception is a bug and keeps its traceback. ``UserError``
subclasses ``ValueError`` so that code written against earlier versions, which
caught ``ValueError``, still catches it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (config, options, data, workdir): the message
    names the problem and what to do."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A dataset that is not prepared (or cannot be found) where the config points."""


class DataCorruptError(UserError):
    """A damaged data file: an archive to prepare a dataset from (an image or a
    tar inside it), or a prepared file that is cut short, damaged or missing.
    The message names the file and how to replace it or prepare again."""


class NonFiniteError(UserError, FloatingPointError):
    """A non-finite loss or gradient: the message names the step and the last
    good checkpoint (nothing is saved after a bad step)."""


class CheckpointSaveError(UserError, OSError):
    """A checkpoint that could not be written (e.g. the disk is full): the
    message names the step, the last good checkpoint and what to do."""


class WorkdirInUseError(UserError):
    """Another live process is training in the same workdir."""


def one_line(message: str) -> str:
    """``message`` on one line (train.py prints a UserError as one line)."""
    return " ".join(str(message).split())


# What absl's flag parsing and ml_collections' config loading raise for a
# user's mistake (with absl's ``flags.Error``): resnet_jax.evaluate and
# train.py (which lists them itself, before importing resnet_jax) print them
# as one line.
FLAG_PARSE_ERRORS = (LookupError, AttributeError, TypeError, ValueError, OSError, SyntaxError)


def flag_error_message(e: BaseException) -> str:
    """One line for a mistake in the flags or the ``--config`` file."""
    while e.args and isinstance(e.args[0], BaseException):  # ml_collections wraps its errors
        e = e.args[0]
    message = str(e.args[0]) if e.args and isinstance(e, KeyError) else str(e)
    if isinstance(e, LookupError | AttributeError):
        message = (
            f"unknown config key {message} Every key a recipe accepts is set in configs/common.py."
        )
    elif isinstance(e, OSError) and "config file" in message:
        message = f"cannot load the config file of --config: {message.splitlines()[-1].strip()}."
    elif isinstance(e, SyntaxError):
        message = f"the config file of --config does not parse: {e}."
    return one_line(message)
