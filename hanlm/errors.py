"""Errors users can catch. Each message names the file, key or field and says how to fix it."""


class HanlmError(Exception):
    """Base class of every error hanlm raises on purpose; the CLI prints these without a traceback."""


class ConfigError(HanlmError):
    """A configuration key is unknown, has the wrong type, is out of range or conflicts with another."""


class DataError(HanlmError):
    """A data source is missing, unreadable, badly encoded or empty after filtering."""


class CheckpointError(HanlmError):
    """A checkpoint is missing, truncated or corrupt."""
