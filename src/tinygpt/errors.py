"""Every error a user can cause, in one place.

Library code raises one of these; the `tinygpt` command prints it as one line and exits
non-zero, and the server answers it with a 4xx/5xx status. Anything else is a bug.
This module imports nothing, so any module (and the CLI before torch loads) can use it.
"""


class TinyGPTError(Exception):
    """An error the user can cause and fix. The CLI prints it as one line."""


class ConfigError(TinyGPTError):
    """An impossible or unknown configuration."""


class DataError(TinyGPTError):
    """Missing, empty or undecodable input, or a broken data directory."""


class UnknownCharacterError(TinyGPTError):
    """Text holds characters the vocabulary does not."""


class CheckpointError(TinyGPTError):
    """A missing, truncated, altered or foreign checkpoint."""


class TrainingDiverged(TinyGPTError):
    """The loss became NaN or infinite."""


class PeerLost(TinyGPTError):
    """Another process of a distributed job died, hung or never arrived."""


class ServerBusy(TinyGPTError):
    """The server's queue is full: the request was not admitted (HTTP 429)."""


class ServerOverloaded(TinyGPTError):
    """A request waited too long for a free generation slot (HTTP 503)."""


class ExportError(TinyGPTError):
    """A run cannot be exported as asked: an option the target lacks, or a folder in the way."""
