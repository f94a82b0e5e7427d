"""Reliability on the real test host: D-Bus restarted, systemd re-executed, dbus-daemon frozen.
The exporter must keep serving, say what is wrong in its self-metrics, and recover.

Short versions run in CI; RELIABILITY_LONG=1 runs them at the issue's full length (a 30 s
freeze) — see the README's Reliability section for the figures."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.testhost import workloads
from tests.truth import exporter_in_host

pytestmark = pytest.mark.e2e

INTERVAL = 1.0
LONG = bool(os.environ.get("RELIABILITY_LONG"))
FREEZE_SECONDS = 30 if LONG else 8


@pytest.fixture
def exporter(testhost):
    with exporter_in_host(testhost, INTERVAL, "--dbus.timeout=1") as client:
        yield client


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    pytest.fail(f"not within {timeout}s: {what}")


def recovered_with(exporter, unit: str):
    m = exporter.scrape()
    return (
        m.get("systemd_memory_exporter_source_up", source="dbus") == 1
        and m.get("systemd_unit_memory_bytes", unit=unit, type="rss_anon")
    )


@pytest.mark.parametrize("action", [["restart", "dbus.service"], ["daemon-reexec"]], ids=["dbus-restart", "daemon-reexec"])
def test_recovers_after(testhost, exporter, action):
    testhost.systemctl(*action)
    unit = workloads.anon_hog(testhost, 5)
    try:
        wait_for(lambda: recovered_with(exporter, unit), 2 * INTERVAL + 2, f"recovery after systemctl {' '.join(action)}")
    finally:
        workloads.stop_units(testhost, [unit])


def test_frozen_dbus_daemon(testhost, exporter):
    """SIGSTOP dbus-daemon: scrapes stay fast, samples keep coming with the last known units,
    the dbus source is marked down (or systemd is reached over its private socket), and after
    SIGCONT a unit started meanwhile appears within two intervals."""
    hog = workloads.anon_hog(testhost, 20)
    exporter.next_sample()
    pid = testhost.show("dbus.service", "MainPID")["MainPID"]
    slowest = 0.0
    scrapes = 0
    stop = threading.Event()
    marked = {"down": False, "private": False}
    # What the watcher saw go wrong; asserted below, in the test's own thread.
    problems: list[str] = []

    def watch():
        nonlocal slowest, scrapes
        while not stop.is_set():
            started = time.monotonic()
            try:
                m = exporter.scrape()
            except Exception as e:  # noqa: BLE001 - a failed scrape is what this test looks for
                problems.append(f"scrape failed: {e!r}")
            else:
                scrapes += 1
                marked["down"] |= m.get("systemd_memory_exporter_source_up", source="dbus") == 0
                marked["private"] |= m.get("systemd_memory_exporter_dbus_transport_info", transport="private_socket") == 1
                if not (m.get("systemd_unit_memory_bytes", unit=hog, type="rss_anon") or 0) > 0:
                    problems.append(f"{hog} not reported during the freeze")  # the last known units stay
            slowest = max(slowest, time.monotonic() - started)
            stop.wait(0.2)

    testhost.run(["kill", "-STOP", pid])
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        time.sleep(FREEZE_SECONDS / 2)
        frozen_sample = exporter.scrape().value("systemd_memory_exporter_last_sample_timestamp_seconds")
        time.sleep(FREEZE_SECONDS / 2)
        later_sample = exporter.scrape().value("systemd_memory_exporter_last_sample_timestamp_seconds")
    finally:
        testhost.run(["kill", "-CONT", pid])
        stop.set()
        watcher.join(timeout=15)  # one scrape times out after 10 s
    assert not watcher.is_alive(), "the watcher's scrape hung"
    resumed = time.monotonic()
    unit = workloads.anon_hog(testhost, 5)
    try:
        wait_for(lambda: recovered_with(exporter, unit), 2 * INTERVAL + 5, "recovery after SIGCONT")
        recovery = time.monotonic() - resumed
    finally:
        workloads.stop_units(testhost, [unit, hog])
    assert not problems, problems[:5]
    assert scrapes >= FREEZE_SECONDS, f"only {scrapes} scrapes during a {FREEZE_SECONDS}s freeze"
    assert later_sample > frozen_sample, "sampling must go on while D-Bus is frozen"
    # The figure is printed below; only a scrape stuck behind D-Bus (sd-bus waits up to 90 s)
    # breaks this bound. Typical: a few ms.
    assert slowest < 5.0, f"a scrape took {slowest:.2f}s during the freeze"
    assert marked["down"] or marked["private"], "the freeze must show in the self-metrics"
    if marked["down"]:
        assert exporter.scrape().value("systemd_memory_exporter_errors_total", source="dbus", reason="timeout") > 0
    print(f"freeze {FREEZE_SECONDS}s: slowest scrape {slowest * 1000:.0f} ms, recovered {recovery:.1f}s after SIGCONT, "
          f"dbus marked down: {marked['down']}, fell back to the private socket: {marked['private']}")
