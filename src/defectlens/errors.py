"""defectlens's own error types: problems with what the user gave (files, options, model files).

The command line prints these as one line and exits with ``exit_code``; anything else that
escapes is a bug in defectlens and is reported as an internal error (see ``cli.main``).
Each class also derives from the built-in type that Python callers would expect to catch
(``ValueError``, ``OSError``), so code written against earlier versions keeps working.
"""

from __future__ import annotations


class DefectlensError(Exception):
    """Base of every error that names a user-fixable problem."""

    #: Process exit status when this error ends a command (2: usage or configuration).
    exit_code = 2


class UsageError(DefectlensError, ValueError):
    """Options or arguments that cannot work together, or that name something that is not there."""


class DatasetError(DefectlensError, ValueError):
    """A dataset or training folder does not have the layout or content a command needs."""


class OutputError(DefectlensError, OSError):
    """An output file or folder cannot be written (not writable, not a folder, disk full)."""


class OutputExistsError(OutputError, FileExistsError):
    """An output is already there and replacing it was not asked for (``--overwrite``)."""
