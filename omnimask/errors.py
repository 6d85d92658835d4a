"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class OmnimaskError(Exception):
    """Bad user input (a file, key or setting); the message names what is wrong."""


class ConfigError(OmnimaskError):
    """A configuration key is unknown, has the wrong type, or a config file is unreadable."""


class DataError(OmnimaskError):
    """Input data cannot be used at all (missing shards, empty shard list, unreadable file)."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """A run stopped by SIGTERM/SIGUSR2 after saving a checkpoint; the same command resumes
    it. A BaseException, like KeyboardInterrupt, so that ``except Exception`` (the demo's
    per-stage reports) lets it through; the CLI exits with ``EXIT_INTERRUPTED``."""
