"""User errors: what the ``genrec`` CLI prints as one line (no traceback unless ``--debug`` / ``GENREC_DEBUG=1``).

Anything else that escapes a command is a bug and keeps its traceback. Every message names the file, row or
field, what was expected and what was found.
"""

from __future__ import annotations


class GenrecError(Exception):
    """Base of every error caused by the user's input, config, files or machine (not by a bug)."""


class DataError(GenrecError, ValueError):
    """Bad input data; the message names the file, row and field and what was expected."""


class ConfigError(GenrecError, ValueError):
    """A config field with an invalid value or an invalid combination of fields."""


class CheckpointError(GenrecError, ValueError):
    """A checkpoint that cannot be read, is of the wrong kind, or belongs to other data."""


class OutputError(GenrecError, OSError):
    """An output path the command must not write (user files, the data root, the current directory)."""


class DiskFullError(OutputError):
    """No space left while writing a file; the partial file has been removed."""


class RunMismatchError(GenrecError, ValueError):
    """A run folder (or cached prepared folder) was made with another config or other data."""
