"""Real-systemd test host: see host.py (the harness), workloads.py and NOTES.md."""

from __future__ import annotations

import os

from .host import HostCommandError, HostError, HostProcess, HostUnavailable, TestHost

__all__ = ["HostCommandError", "HostError", "HostProcess", "HostUnavailable", "TestHost", "require_available"]


def require_available() -> None:
    """In a pytest test or fixture: skip when no test host can be booted here,
    but fail under CI=true, where we never skip."""
    import pytest

    reason = TestHost.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"test host unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"test host unavailable: {reason}")
