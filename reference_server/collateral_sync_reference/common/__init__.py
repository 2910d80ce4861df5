"""What every reference role builds on.

- ``runner`` — the role registry and the process lifecycle (TLS, health,
  reflection, signals, the time-driven loop);
- ``config`` — the server configuration file and its checks;
- ``storage`` — the SQLite database every role writes through, its replay
  guard and its sync logs;
- ``clock`` — the system clock, and the test clock that tests move forward;
- ``test_control`` — ``TestControlService``, served in ``--test-mode`` only;
- ``errors`` — the refusals every role raises the same way;
- ``emergency`` — the 2-of-3 emergency-release co-signer (every role holds a key);
- ``reconciliation`` — a party's side of reconciliation: signed statements at
  each cut-off and ``GetPositionTreeNodes`` (custodian and exchange);
- ``metrics`` — Prometheus metrics on ``metrics.listen``: one registry per
  server, the RPC interceptor, and the readings of state at scrape time.
"""
