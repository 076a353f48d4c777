"""Privacy: DP-SGD with an accountant per site (dp), secure aggregation (secagg),
membership-inference audits (audit), and the run's privacy record (record)."""
