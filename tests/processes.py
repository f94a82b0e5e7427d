"""Ending the processes tests start (Prometheus, exporters, QEMU): one place for the pattern."""

from __future__ import annotations

import subprocess


def end(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, up to ``timeout`` seconds to exit, then SIGKILL; always reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
