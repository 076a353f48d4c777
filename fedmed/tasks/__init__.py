"""One module per CLI verb: ``run(cfg) -> results``. Wiring only; logic lives in the library."""

from fedmed.tasks import explain, fit

TASKS = {"fit": fit.run, "explain": explain.run}
