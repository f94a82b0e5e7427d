"""The parent side of the discovery child (exporter/discovery_process.py) against children that
misbehave: one that dies mid-answer, one that never answers; and the real child on a bus whose
calls fail, so each failure is counted under the right reason."""

from __future__ import annotations

import errno
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from exporter.discovery_process import DiscoveryProcess
from exporter.sampler import SamplerConfig
from exporter.service import SampleLoop


def client_with_child(code: str) -> DiscoveryProcess:
    client = DiscoveryProcess(".+", "", ["service"], "/nonexistent/private", timeout=0.2)
    client._argv = [sys.executable, "-c", code]  # a stand-in child speaking the same pipes
    return client


def sample_loop(client: DiscoveryProcess, dbus_timeout: float) -> SampleLoop:
    """The exporter's sample loop on the hybrid fixture tree, every 50 ms, with `client`."""
    fixtures = Path(__file__).parent / "fixtures" / "hybrid"
    config = SamplerConfig(str(fixtures / "proc"), str(fixtures / "sys/fs/cgroup"), 0.05)
    return SampleLoop(config, client, dbus_timeout)


def test_a_child_that_dies_mid_answer_is_an_unavailable_source_not_a_crash():
    client = client_with_child("import sys; sys.stdin.readline(); sys.stdout.write('{\"ok\": tr'); sys.exit(3)")
    try:
        result = client.request(wait=5)
        assert (result.ok, result.failure) == (False, "unavailable")
        assert "exited" in result.message
        again = client.request(wait=5)  # a new child is started and fails the same way
        assert again.failure == "unavailable"
    finally:
        client.stop()


def test_a_child_that_never_answers_is_a_timeout_and_is_not_waited_for_twice():
    client = client_with_child("import sys, time; sys.stdin.readline(); time.sleep(60)")
    try:
        first = client.request(wait=0.3)
        assert (first.ok, first.failure) == (False, "timeout")
        second = client.request(wait=30)  # still pending: looked at, not waited for
        assert second.failure == "timeout" and "not answered" in second.message
    finally:
        client._kill()


ANSWERING_CHILD = """
import sys, time
for _ in sys.stdin.buffer:
    sys.stdout.write('{"ok":true,"transport":"system_bus","units":[]}\\n')
    sys.stdout.flush()
time.sleep(5)  # slow to exit at EOF, so a closed pipe is seen before the child is gone
"""


def test_stopping_as_a_cycle_begins_closes_the_child_without_a_failed_cycle(caplog):
    """Shutdown used to close the child's pipe from the main thread just as the sampler thread
    began a cycle: "ValueError: write to closed file" and a traceback (seen in CI). The stop
    now lands exactly there: between the cycle's start and its request to the child."""
    client = client_with_child(ANSWERING_CHILD)
    loop = sample_loop(client, dbus_timeout=0.2)
    cycle_began = threading.Event()

    def discover_a_little_late():
        cycle_began.set()
        time.sleep(0.3)
        return client.request(wait=1.2)

    loop._sampler.discover = discover_a_little_late
    loop.start()
    try:
        assert loop.latest(wait=5) is not None
        cycle_began.clear()
        assert cycle_began.wait(5)
        child = client._proc
    finally:
        loop.stop()  # mid-cycle, before its request
    assert child is not None and child.poll() is not None, "the discovery child outlived stop()"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


def test_stopping_while_d_bus_hangs_is_prompt_and_ends_the_child():
    """A cycle waits up to dbus_timeout + 1 s for the child; shutdown must not (systemd's
    TimeoutStopSec is 15 s, and --dbus.timeout may be larger)."""
    client = client_with_child("import sys, time; sys.stdin.readline(); time.sleep(120)")
    loop = sample_loop(client, dbus_timeout=60)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while client._pending_since is None:  # the request went out and hangs
            assert time.monotonic() < deadline, "no request reached the child"
            time.sleep(0.05)
        child = client._proc
    finally:
        started = time.monotonic()
        loop.stop()
        took = time.monotonic() - started
    assert not loop._thread.is_alive() and child.poll() is not None
    assert took < 5, f"stop() took {took:.1f}s with D-Bus hanging"


# The real child (serve() and Discovery.refresh) on a bus whose every call fails as sd-bus fails
# it: sd_bus_call's own timeout (systemd frozen while the bus is up) is the error reply
# "[err -110]: b'Connection timed out'", not a child that stays silent. argv: the error name
# ("" for none: pystemd then raises DBusBaseError by errno), the errno, the config.
FAILING_BUS_CHILD = """
import json, sys
sys.path.insert(0, %r)
from pystemd.dbusexc import DBusError
from exporter import systemd
from exporter.discovery_process import serve

class FailingBus:
    def call_method(self, *args):
        raise DBusError(int(sys.argv[2]), sys.argv[1].encode() or None, b"Connection timed out")

    def close(self):
        pass

systemd.Discovery._connect = lambda self: FailingBus()
serve(json.loads(sys.argv[3]))
""" % str(Path(__file__).resolve().parents[1])


def client_with_failing_bus(error_name: str, error_number: int) -> DiscoveryProcess:
    client = DiscoveryProcess(".+", "", ["service"], "/nonexistent/private", timeout=0.2)
    client._argv = [sys.executable, "-c", FAILING_BUS_CHILD, error_name, str(error_number), json.dumps(client._config)]
    return client


@pytest.mark.parametrize("error_name", ["org.freedesktop.DBus.Error.Timeout", ""], ids=["timeout-error", "errno-only"])
def test_a_d_bus_call_timed_out_in_the_child_is_a_timeout(error_name):
    """errors_total{reason="timeout"} is "no answer within --dbus.timeout": sd-bus's timeout comes
    back from the child as an error reply, which the parent counted as unavailable."""
    client = client_with_failing_bus(error_name, -errno.ETIMEDOUT)
    try:
        result = client.request(wait=10)
        assert (result.ok, result.failure) == (False, "timeout"), result.message
        assert "Connection timed out" in result.message
    finally:
        client.stop()


def test_any_other_d_bus_error_reply_stays_unavailable():
    client = client_with_failing_bus("org.freedesktop.DBus.Error.AccessDenied", -errno.EACCES)
    try:
        result = client.request(wait=10)
        assert (result.ok, result.failure) == (False, "unavailable"), result.message
    finally:
        client.stop()


def test_a_closed_pipe_is_a_failed_refresh_not_an_exception():
    client = client_with_child(ANSWERING_CHILD)
    try:
        assert client.request(wait=2).ok
        client._proc.stdin.close()  # what the old shutdown did behind the sampler's back
        result = client.request(wait=2)
        assert (result.ok, result.failure) == (False, "unavailable")
        assert "gone" in result.message
    finally:
        client._kill()


def test_hang_limit_grows_with_the_d_bus_timeout():
    assert DiscoveryProcess(".+", "", ["service"], "/nonexistent/private", timeout=0.2).hang_limit == 30
    assert DiscoveryProcess(".+", "", ["service"], "/nonexistent/private", timeout=5).hang_limit == 50


def test_a_child_stuck_past_the_hang_limit_is_killed_and_replaced():
    client = client_with_child("import sys, time; sys.stdin.readline(); time.sleep(60)")
    client.hang_limit = 0.5  # instead of 30 s, so the test is short
    try:
        assert client.request(wait=0.2).failure == "timeout"
        stuck = client._proc
        assert client.request(wait=0).failure == "timeout" and stuck.poll() is None  # not yet past the limit
        time.sleep(0.6)
        past = client.request(wait=0)
        assert past.failure == "timeout" and "not answered" in past.message
        assert stuck.poll() is not None, "the stuck child must be killed"
        assert client.request(wait=0.2).failure == "timeout"  # a fresh child got the request
        assert client._proc is not None and client._proc.pid != stuck.pid
    finally:
        client._kill()


def test_a_child_that_cannot_be_started_is_an_unavailable_source_not_a_lost_cycle():
    """Popen failing (EAGAIN at the unit's TasksMax, ENOMEM at MemoryMax; here: no such program)
    used to raise out of the sampler, so the whole cycle was lost and the old snapshot stayed,
    its sources still up. Now dbus is down and the cgroup figures are fresh."""
    from exporter.sampler import Sampler

    client = DiscoveryProcess(".+", "", ["service"], "/nonexistent/private", timeout=0.2)
    client._argv = ["/nonexistent/python3"]
    fixtures = Path(__file__).parent / "fixtures" / "hybrid"
    sampler = Sampler(SamplerConfig(str(fixtures / "proc"), str(fixtures / "sys/fs/cgroup"), 0),
                      lambda: client.request(wait=1))
    try:
        snapshot = sampler.sample()
        assert snapshot.sources["dbus"].up is False and "cannot start the discovery process" in snapshot.sources["dbus"].message
        assert snapshot.sources["cgroup"].up and snapshot.samples_total == 1
        assert sampler.sample().samples_total == 2  # and again, not once only
    finally:
        client.stop()
