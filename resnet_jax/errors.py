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
