"""systemd-memory-exporter: per-unit memory from systemd, both the cgroup and the /proc view."""

__version__ = "0.1.0"
