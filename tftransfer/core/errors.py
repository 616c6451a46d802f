"""Errors a user can act on: the CLI prints their message without a traceback."""


class TfTransferError(Exception):
    """Base class for every user-facing error of tftransfer."""


class ConfigError(TfTransferError):
    """A config file, key or value is wrong; the message names the key."""


class DataError(TfTransferError):
    """A data source is missing, empty or malformed; the message names the path."""


class BackboneError(TfTransferError):
    """An unknown backbone, unusable weights or an input size the backbone cannot take."""


class RunDirError(TfTransferError):
    """A run directory or export path is in the way, missing or incomplete."""


class StorageError(TfTransferError):
    """A write failed for want of space or permission (a full, read-only or foreign disk); the message names the
    path."""
