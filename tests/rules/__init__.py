"""Helpers for the rules and dashboard tests: the metric contract, PromQL names, promtool, and every shipped query."""
