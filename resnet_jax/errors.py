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
