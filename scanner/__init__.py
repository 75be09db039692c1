"""certmon's scanner role: `certmon-scan`, probing TLS endpoints and judging their chains.

A program of its own (entry point, unit, users without a collector) beside `agent/`
and `collector/`. What it shares with the collector's scheduled scans lives in the
core: probing (`certmon.tlsprobe`), running a scan (`certmon.scan`), the verdict
(`certmon.scanverdict`) and the scan keys of collector.toml (`certmon.scanconfig`).
It imports no other role.
"""
