"""Calling sites: with a time limit, and at the same time where each site runs elsewhere."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
TIMED = "fedmed-timed-call"  # the name of a site call's thread under federation.site_timeout


class SiteTimeout(TimeoutError):
    """A site gave no answer in time; ``thread`` is still running its call (an in-process site
    cannot be killed, only ignored until it returns)."""

    def __init__(self, message: str, thread: threading.Thread):
        super().__init__(message)
        self.thread = thread


def call_with_timeout(fn: Callable[[], T], timeout: float | None) -> T:
    """Run ``fn()``; with a timeout, in a daemon thread, so a hung site cannot block the federation."""
    if not timeout:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=TIMED)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise SiteTimeout(f"no answer within federation.site_timeout={timeout:g}s", thread)
    if "error" in box:
        raise box["error"]
    return box["value"]


def timed_out_calls() -> list[threading.Thread]:
    """Site calls that outlived their time limit and are still running (in this process)."""
    return [t for t in threading.enumerate() if t.name == TIMED and t.is_alive()]


def concurrently(fn: Callable[[Any], T], sites: Sequence[Any]) -> list[tuple[T | None, Exception | None]]:
    """``fn(site)`` for every site: at the same time where every site runs elsewhere (``site.parallel``,
    e.g. Flower nodes), one after another otherwise (in-process sites share this process' RNG).

    Returns (value, None) or (None, exception) per site, in the sites' order.
    """
    def safe(site: Any) -> tuple[T | None, Exception | None]:
        try:
            return fn(site), None
        except Exception as exc:  # noqa: BLE001 - reported per site
            return None, exc

    if len(sites) > 1 and all(s.parallel for s in sites):
        with ThreadPoolExecutor(max_workers=len(sites), thread_name_prefix="site") as pool:
            return list(pool.map(safe, sites))
    return [safe(s) for s in sites]
