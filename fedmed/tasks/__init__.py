"""One module per CLI verb: ``run(cfg) -> results``. Wiring only; logic lives in the library."""

from fedmed.tasks import audit, data_check, explain, fit, serve

TASKS = {"fit": fit.run, "explain": explain.run, "data_check": data_check.run, "audit_privacy": audit.run,
         "serve": serve.run}
