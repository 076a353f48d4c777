"""fedmed: federated, explainable medical-image classification.

The package is laid out by concern:

- ``fedmed.data``: data sources (MedMNIST), partitioning into sites, manifests, DataModules.
- ``fedmed.models``: plain ``nn.Module`` networks in a registry, and the Lightning classifier.
- ``fedmed.federated``: site client, orchestrator (server round loop), aggregation functions.
- ``fedmed.tracking``: the MLflow run layout.
- ``fedmed.tasks``: one module per CLI verb; wiring only.
"""

__version__ = "0.1.0"
