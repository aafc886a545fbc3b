"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class StataError(Exception):
    """An error caused by the user's input (bad path, shape, option, file). Never a bug."""


class ConfigError(StataError):
    """A configuration value is out of range or unknown."""


class CheckpointError(StataError):
    """A checkpoint is missing, corrupted, or does not match its config."""


class DataError(StataError):
    """A dataset is missing, empty, or has the wrong shape."""


class UnsupportedOpError(StataError):
    """An op has no lowering for the requested target."""
