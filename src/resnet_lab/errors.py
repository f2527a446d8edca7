"""Errors a user can fix by changing a config value, a path or a file: the CLI prints them without a traceback."""


class UserError(Exception):
    """Base of every error whose message alone tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range or unknown (a depth, a shortcut option, a split size...)."""


class DataError(UserError, ValueError):
    """A dataset file holds the wrong shapes or labels."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset folder or file is missing."""


class DiskFullError(UserError, OSError):
    """A file could not be written for lack of space; the previous version of it is intact."""
