"""Exceptions that the CLI turns into one clear message (no stack trace)."""


class FedmedError(Exception):
    """A user-facing error: bad config, missing or corrupt data, a manifest that does not match."""


class DataNotFoundError(FedmedError, FileNotFoundError):
    """A data file the run needs is absent and could not be fetched."""


class ManifestError(FedmedError, ValueError):
    """A manifest is unreadable, or names samples/labels that the site's data does not have."""
