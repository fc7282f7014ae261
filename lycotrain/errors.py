"""User-facing errors. Every message names the file or field at fault and says how to fix it."""


class LycotrainError(Exception):
    """Base class for errors shown to users (CLI prints the message, the GUI shows it; no traceback)."""


class ConfigError(LycotrainError):
    """A config field is missing, unknown or out of range."""


class DatasetError(LycotrainError):
    """The dataset cannot be used as given."""


class ModelError(LycotrainError):
    """A base model cannot be found, read or recognised."""


class FormatError(LycotrainError):
    """An adapter file cannot be read, or does not match the model."""


class AdapterError(LycotrainError):
    """An adapter cannot be built with the requested parameters on this layer."""
