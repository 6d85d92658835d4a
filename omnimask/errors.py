"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class OmnimaskError(Exception):
    """Bad user input (a file, key or setting); the message names what is wrong."""


class ConfigError(OmnimaskError):
    """A configuration key is unknown, has the wrong type, or a config file is unreadable."""


class DataError(OmnimaskError):
    """Input data cannot be used at all (missing shards, empty shard list, unreadable file)."""
