"""User-facing errors. The CLI prints each as one line (``sdft: error: ...``) and exits with code 2."""


class SdftError(Exception):
    """Base class: a problem with the user's input or run directory, not a bug."""


class ConfigError(SdftError):
    """A config key or value is wrong; the message names the key."""


class DataError(SdftError):
    """A dataset file or row is wrong; the message names the task, file and row."""


class RunDirError(SdftError):
    """The run directory cannot be used (in use by another process, or holds a different config)."""
