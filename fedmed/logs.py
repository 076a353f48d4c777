"""fedmed's log lines on stderr, and the third-party chatter a federation would repeat per site and round."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Lightning prints device banners for every Trainer (a federation makes one per site per round);
    Opacus logs every layer it changes (fedmed logs the changes itself). Silence those and a few
    harmless warnings."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric",
                 "opacus", "mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*",
                    ".*number of training batches.*smaller than the logging interval.*",
                    ".*defined a `validation_step` but have no `val_dataloader`.*",
                    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*", ".*Full backward hook is firing.*",
                    ".*Secure RNG turned off.*", ".*Optimal order is the (largest|smallest) alpha.*"):
        warnings.filterwarnings("ignore", pattern)


def setup_logging() -> None:
    """fedmed's INFO lines with a time stamp on stderr, and :func:`quiet_libraries`."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download floods logs
    quiet_libraries()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log = logging.getLogger("fedmed")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
