"""One module per CLI verb: ``run(cfg) -> results``. Wiring only; no verb imports another verb.

The CLI imports the verb it runs (``fedmed.tasks.<name>``) and nothing else of this package.
"""

#: CLI verb (its config's name) -> the module that runs it
TASKS = {"fit": "fit", "serve": "serve", "explain": "explain", "data_check": "data_check", "audit_privacy": "audit",
         "evaluate": "evaluate"}
