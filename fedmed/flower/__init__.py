"""Everything that talks to Flower, and nothing else does (an import-linter contract keeps it so).

The trust boundary of a deployment is this folder: what crosses between the aggregator and a
hospital is built and checked here.

- ``app``: fedmed as a Flower App, the ServerApp and the ClientApp (imports only Flower at load).
- ``serve``: ``fedmed serve`` and the ServerApp's body; ``site``: a hospital's ``fedmed fit site=...``;
  ``parallel``: ``federation.parallel``, every site in its own worker on this machine.
- ``grid``: the server's end (a site per SuperNode, admission, the end); ``node``: the site's end.
- ``protocol``: message types, hellos, error replies; ``records``: fedmed's messages as Flower records.
- ``gate``: fedmed as the task executor of Flower's process isolation: only the federation's own run
  executes on the aggregator, and a site answers its messages itself; ``runtime``: Flower's processes
  (SuperLink, SuperNode, the flwr CLI); ``keys``: TLS files, SuperNode keys, the signing roster.
"""
