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


class DistributedError(VaelabError):
    """A peer process of a distributed job died, froze past ``train.dist_timeout``, or could not be
    reached. The message names the rank where it can be known and the command to resume.
    ``announce``: whether this process is the one that prints it (one line per job, not per rank)."""

    def __init__(self, message: str, announce: bool = True) -> None:
        super().__init__(message)
        self.announce = announce


class Interrupted(VaelabError):
    """Training stopped on SIGTERM or SIGINT at a step boundary, after writing a checkpoint.
    ``exit_code``: 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, exit_code: int, announce: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.announce = announce


class VaelabWarning(UserWarning):
    """Something a user should know that does not stop the work (skipped files, fewer images than
    asked for). The command line prints it as one line, ``vaelab: warning: ...``."""
