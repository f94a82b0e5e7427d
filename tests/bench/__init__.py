"""Benchmark of the exporter on the real-systemd test host: python3 -m tests.bench (see bench.py)."""
