"""The errors a user's input can cause: each message names the file and line, the config key or the
path, and what to change. `jsft.main` prints them as one `jsft: error: ...` line."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class DataError(ValueError):
    """A problem with input data; the message names the source, the file and the line or row."""
