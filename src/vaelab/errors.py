"""vaelab's own exception types: every error a user can cause is one of these, with a message
that names the file (or option) and the problem."""

from __future__ import annotations


class VaelabError(Exception):
    """Base class of all errors raised on purpose by vaelab."""


class DataError(VaelabError):
    """A data file is missing, truncated, corrupted, of the wrong format or out of range."""


class DatasetNotFoundError(DataError):
    """A data set could be found in none of the places searched (and could not be downloaded)."""


class ConfigError(VaelabError):
    """A configuration value or option is invalid."""


class CheckpointError(VaelabError):
    """A checkpoint is missing, unsafe (pickle), corrupted, or does not match its config."""


class RunLockedError(VaelabError):
    """Another live process is writing to the same run directory."""


class NonFiniteError(VaelabError):
    """Training produced too many consecutive non-finite losses or gradients."""


class VaelabWarning(UserWarning):
    """Something a user should know that does not stop the work (skipped files, fewer images than
    asked for). The command line prints it as one line, ``vaelab: warning: ...``."""
