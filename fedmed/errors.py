"""Exceptions that the CLI turns into one clear message (no stack trace)."""


class FedmedError(Exception):
    """A user-facing error: bad config, missing or corrupt data, a manifest that does not match."""


class DataNotFoundError(FedmedError, FileNotFoundError):
    """A data file the run needs is absent and could not be fetched."""


class ManifestError(FedmedError, ValueError):
    """A manifest is unreadable, or names samples/labels that the site's data does not have."""


class FederationError(FedmedError):
    """A round could not complete (too few sites succeeded); the last round's checkpoint is intact."""


class BudgetSpent(FederationError):
    """Too few sites have privacy budget left for another round: the federation ends after the last one."""


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM): runs end as KILLED and the exit status is 143."""


def stop_request(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The interrupt (Ctrl+C) or SIGTERM behind ``exc``, if any: Lightning turns one raised during
    ``trainer.fit`` into ``SystemExit(1)``, with the interrupt as its context."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None
