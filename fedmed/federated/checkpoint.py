"""The server's checkpoint after every round: written atomically, read without running any code."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmed.errors import FedmedError
from fedmed.federated.messages import EvalResult, RoundRecord

CHECKPOINT = "server.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill or a failed write leaves the previous checkpoint intact.

    Raises:
        FedmedError: the folder cannot be written (read-only, no permission, no space left); the
            temporary file is removed.
    """
    buf = io.BytesIO()  # serialised first: torch's writer turns a short write into an unexplained RuntimeError
    torch.save(state, buf)
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        why, todo = _FAULTS.get(exc.errno or 0, (exc.strerror or str(exc), _WRITABLE))
        raise FedmedError(f"federation.checkpoint_dir: cannot write the server checkpoint {path}: {why}; "
                          f"{todo}") from None


_WRITABLE = "make the folder writable or set federation.checkpoint_dir to a writable folder"
_ELSEWHERE = "set federation.checkpoint_dir to another disk"
#: errno -> (what went wrong, what to do), in words a user acts on
_FAULTS = {
    errno.ENOSPC: ("no space left on the disk", f"free space there or {_ELSEWHERE}"),
    errno.EDQUOT: ("the disk quota is used up", f"free space within the quota or {_ELSEWHERE}"),
    errno.EFBIG: ("the file grew past the file size limit", f"raise the limit (ulimit -f) or {_ELSEWHERE}"),
    errno.EROFS: ("the file system is read-only", _WRITABLE),
    errno.EACCES: ("the folder is read-only for this user (permission denied)", _WRITABLE),
    errno.EPERM: ("the folder is read-only for this user (operation not permitted)", _WRITABLE),
}


def disk_fault(exc: OSError) -> str:
    """What a failed write means, in words a user acts on (no space, read-only, quota...)."""
    return _FAULTS.get(exc.errno or 0, (exc.strerror or str(exc), _WRITABLE))[0]


def _safe_globals() -> list[Any]:
    """What a server checkpoint holds besides tensors and plain containers: the records of its
    rounds and sites, and numpy's RNG state. Nothing else may be unpickled."""
    reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct
    return [RoundRecord, (RoundRecord, "fedmed.federated.orchestrator.RoundRecord"),  # where older releases kept it
            EvalResult, np.ndarray, np.dtype, reconstruct, type(np.dtype(np.uint32))]


def unsafe_reason(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds {found.group(1)}, which loading would run or build (only tensors and plain values are read)"
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", text, re.S)
    if detail:
        return f"it is not a PyTorch file of tensors and plain values ({' '.join(detail.group(1).split())[:120]})"
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    if "weights_only" in first:  # torch's own advice would be to run the file's code: never repeat it
        return "it is not a PyTorch file of tensors and plain values"
    return first[:200]


def load_checkpoint(path: Path) -> dict:
    """Read a server checkpoint with ``torch.load(weights_only=True)`` and an allow-list: a file
    from elsewhere cannot run code here."""
    if not path.exists():
        raise FedmedError(f"no federation checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a foreign or damaged file
        raise FedmedError(f"{path} is not a fedmed server checkpoint that can be read safely: {unsafe_reason(exc)}"
                          ) from None
    if not isinstance(state, dict) or "round" not in state:
        raise FedmedError(f"{path} is not a fedmed server checkpoint (no 'round')")
    return state
