"""fedmed: federated, explainable medical-image classification.

The package reads top to bottom (docs/architecture.md has one line per module):

- ``fedmed.cli`` and ``fedmed.tasks``: the verbs; wiring only.
- ``fedmed.flower``: everything that talks to Flower (the App, ``fedmed serve``, a hospital's site, what may run).
- ``fedmed.federate``, ``fedmed.outcome``, ``fedmed.build``: one federation on every path, the end-of-run
  report, and the builders from config to objects.
- ``fedmed.federated``: the orchestrator (round loop), the site client and its parts, strategies, transports.
- ``fedmed.explain``, ``fedmed.privacy``: explanations and their faithfulness; DP, secure aggregation, audits.
- ``fedmed.data``, ``fedmed.models``, ``fedmed.aggregation``: data sources and partitions, networks and the
  Lightning classifier, aggregation as pure functions.
- ``fedmed.config``, ``fedmed.tracking``, ``fedmed.errors``: composition, the MLflow run layout, errors.
"""

__version__ = "0.1.0"
