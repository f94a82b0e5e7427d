"""Shared pytest fixtures: the real-systemd test host (tests/testhost/) and workloads in it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# `tests` is a namespace package; make it importable however pytest was started.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.testhost import TestHost, require_available, workloads  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: needs the real-systemd test host (root, cgroup v1 memory); "
                                       "skipped where unavailable, but fails under CI=true")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # anything using the host is e2e, marked or not, so `-m "not e2e"` is reliable
    for item in items:
        if "testhost" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def testhost() -> Iterator[TestHost]:
    """One booted host for the whole session, torn down at the end (also on ^C/failure)."""
    require_available()
    TestHost.cleanup_stale()
    with TestHost(name="session") as host:
        yield host


@pytest.fixture
def workload(testhost: TestHost) -> Iterator[Callable]:
    """Start workloads that are stopped when the test ends:

        unit = workload(workloads.anon_hog, mib=100)
        units = workload(workloads.batch, 20, procs=3)
    """
    started: list[str] = []

    def start(fn, *args, **kwargs):
        result = fn(testhost, *args, **kwargs)
        started.extend([result] if isinstance(result, str) else result)
        return result

    yield start
    workloads.stop_units(testhost, started)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No test may be skipped in CI: a skip there is a missing prerequisite, so fail the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if _in_ci() and skipped:
        reporter.write_line(f"CI=true: {len(skipped)} test(s) skipped; in CI every test must run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
