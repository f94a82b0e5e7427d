"""The command line and the HTTP shell, as a user meets them: a real process, real sockets.

These run without systemd (as on this development machine outside the test host): the
exporter must say so, keep serving its own health, and retry."""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from exporter.cli import build_parsers
from exporter.systemd import UnitFilter
from tests.truth import Scrape, free_port

NO_SYSTEMD = {
    # Point both transports at nothing, whatever the machine has.
    "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/system_bus_socket",
}


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **NO_SYSTEMD})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sample.interval=-1"], "must be >= 0"),
        (["--sample.interval=soon"], "not a number of seconds"),
        (["--unit.include=("], "invalid regular expression"),
        (["--unit.types=service,target"], "unknown unit type(s) target"),
        (["--web.listen-address=localhost"], "invalid listen address"),
        (["--web.listen-address=:99999"], "invalid listen address"),
        (["--web.telemetry-path=metrics"], "--web.telemetry-path must start with /"),
        (["--dbus.timeout=0"], "must be > 0"),
        (["--dbus.timeout=-3"], "must be > 0"),
        (["--sample.interval=1e10"], "must be at most 86400 seconds"),  # past threading.TIMEOUT_MAX
        (["--collector.pss.budget=nan"], "must be > 0"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["explain", "--top=0"], "--top must be at least 1"),
        (["--collector.pss.max-rss=" + "9" * 400], "too large a size"),  # float() gives inf
        (["--collector.pss.max-rss=4 parsecs"], "not a size in bytes"),
        (["--path.cgroupfs=/etc/passwd"], "--path.cgroupfs=/etc/passwd: cannot read it: Not a directory"),
        (["explain", "--path.cgroupfs=/etc/passwd", "x.service"], "cannot read it: Not a directory"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_flag():
    out = run_cli("--help").stdout
    for flag in ("--web.listen-address", "--web.telemetry-path", "--sample.interval", "--path.procfs",
                 "--path.cgroupfs", "--unit.include", "--unit.exclude", "--unit.types", "--log.level",
                 "--dbus.timeout", "--systemd.private-socket"):
        assert flag in out


def test_explain_takes_the_root_slice_and_mount_by_name():
    """-.slice (the host's root cgroup) and -.mount start with "-": argparse took them for
    options and exited 2 with "unrecognized arguments"."""
    from exporter.cli import build_parsers, parse_explain

    parser = build_parsers()[1]
    assert parse_explain(parser, ["a.service", "-.slice", "--top", "3", "-.mount"]).units == ["a.service", "-.slice", "-.mount"]
    result = run_cli("explain", "-.slice", "--systemd.private-socket=/nonexistent/private")
    assert result.returncode == 1 and "cannot reach systemd" in result.stderr, result.stderr
    bad = run_cli("explain", "-.slice", "--no-such-flag")
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr


def test_explain_without_systemd_fails_clearly():
    result = run_cli("explain", "--systemd.private-socket=/nonexistent/private")
    assert result.returncode == 1
    assert "cannot reach systemd" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def server(request):
    """A real exporter process on a loopback port; extra flags from the test's parametrization."""
    port = free_port()
    flags = getattr(request, "param", ["--sample.interval=0.5"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{port}",
         "--systemd.private-socket=/nonexistent/private", "--dbus.timeout=1", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **NO_SYSTEMD},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(base + "/metrics", timeout=5).read()
            break
        except (OSError, urllib.error.HTTPError):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("exporter did not start: " + proc.communicate()[0])
            time.sleep(0.1)
    yield base
    proc.terminate()
    out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out


def get(url: str, headers: dict[str, str] | None = None):
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10)


def test_without_systemd_it_serves_health_and_says_why(server):
    m = Scrape.parse(get(server + "/metrics").read().decode())
    assert m.value("systemd_memory_exporter_source_up", source="dbus") == 0
    assert m.value("systemd_memory_exporter_dbus_transport_info", transport="none") == 1
    assert m.value("systemd_memory_exporter_units") == 0
    assert m.get("process_resident_memory_bytes") > 0
    samples = m.value("systemd_memory_exporter_samples_total")
    # Still sampling (and retrying D-Bus) on its interval: a newer sample within a few intervals.
    deadline = time.monotonic() + 10
    while Scrape.parse(get(server + "/metrics").read().decode()).value("systemd_memory_exporter_samples_total") <= samples:
        assert time.monotonic() < deadline, "no new sample in 10 s without systemd"
        time.sleep(0.1)


def test_gzip_scrape_is_one_member_holding_the_snapshot_and_the_scrapes_own_lines(server):
    """One gzip member: curl --compressed and wget read only the first of several (Go and
    Python read all), and the scrape's own lines (process_*) came in a second one."""
    response = get(server + "/metrics", {"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    body = response.read()
    first_member = zlib.decompressobj(wbits=31)
    text = first_member.decompress(body).decode()
    assert first_member.eof and first_member.unused_data == b"", "more than one gzip member"
    assert "systemd_memory_exporter_source_up" in text and "process_resident_memory_bytes" in text
    Scrape.parse(text)
    curl = subprocess.run(["curl", "-sS", "--compressed", "--max-time", "10", server + "/metrics"],
                          capture_output=True, text=True, timeout=20)
    assert curl.returncode == 0, curl.stderr
    assert "process_resident_memory_bytes" in curl.stdout and "systemd_memory_exporter_units" in curl.stdout


def test_plain_and_gzip_scrapes_carry_the_same_series(server):
    """Only the gzip body is kept per snapshot; a plain scrape gets it decompressed."""
    def series(headers):
        response = get(server + "/metrics", headers)
        body = response.read()
        text = gzip.decompress(body).decode() if response.headers["Content-Encoding"] == "gzip" else body.decode()
        return {(s.name, tuple(sorted(s.labels.items()))) for s in Scrape.parse(text).samples}

    plain, zipped = series({}), series({"Accept-Encoding": "gzip"})
    assert plain == zipped and any(name == "systemd_memory_exporter_source_up" for name, _ in plain)


def test_landing_page_links_the_metrics(server):
    page = get(server + "/").read().decode()
    assert 'href="/metrics"' in page and "dbus DOWN" in page


def test_unknown_path_is_404(server):
    with pytest.raises(urllib.error.HTTPError) as e:
        get(server + "/nope")
    assert e.value.code == 404


def exchange(server: str, request: bytes) -> list[bytes]:
    """The status lines the exporter answers a raw ``request`` with, read until it closes the
    connection or 5 s pass without a byte."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(request)
        received = b""
        with contextlib.suppress(socket.timeout):  # TimeoutError from 3.10
            while chunk := connection.recv(65536):
                received += chunk
    return re.findall(rb"^HTTP/1\.[01] \d{3}[^\r]*", received, re.MULTILINE)


def test_a_request_with_a_body_is_answered_once_and_the_body_never_read_as_a_request(server):
    """A small body is read and dropped, and the connection goes on with the next request; a
    chunked one (or a large one) ends the connection after the answer."""
    smuggled = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    then = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    lines = exchange(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s%s"
                     % (len(smuggled), smuggled, then))
    assert lines == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"], lines  # not a 404 for the body's request
    chunked = b"1a\r\n" + smuggled[:26] + b"\r\n0\r\n\r\n"
    lines = exchange(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert lines == [b"HTTP/1.1 200 OK"], lines


def test_an_absolute_form_target_is_served_as_its_path(server):
    """RFC 9112 3.2.2: a server must accept "GET http://host/path" (what a forward proxy sends)."""
    host = server.removeprefix("http://")
    lines = exchange(server, f"GET {server}/metrics?x=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert lines == [b"HTTP/1.1 200 OK"], lines
    lines = exchange(server, f"GET {server}/nope HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert lines == [b"HTTP/1.1 404 Not Found"], lines


def test_a_scrape_that_waits_for_the_first_sample_is_answered_in_full():
    """The response's time limit starts at its first byte, not when the request came: a scrape
    may first wait for a sample (up to twice --dbus.timeout). Here the first sample comes 3 s
    after start and the request timeout is 1 s; the limit used to count from the request, and
    the scrape got an empty reply."""
    port = free_port()
    tree = Path(__file__).parent / "fixtures" / "v2"
    proc = subprocess.Popen([sys.executable, "-m", "tests.late_start_exporter", str(tree), "3", "1",
                             f"--web.listen-address=127.0.0.1:{port}", "--dbus.timeout=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 10
        while True:  # listening, without asking for /metrics (that would wait for the sample)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the exporter did not start listening"
                time.sleep(0.05)
        started = time.monotonic()
        lines = exchange(f"http://127.0.0.1:{port}", b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert lines == [b"HTTP/1.1 200 OK"], (lines, f"after {time.monotonic() - started:.1f} s")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0]
    assert "Traceback" not in out, out


@pytest.mark.parametrize("server", [["--sample.interval=0"]], indirect=True)
def test_interval_zero_samples_on_each_scrape(server):
    """Each scrape gets a sample taken after it arrived. Exactly one more per scrape is not the
    claim: the fixture's start-up poll may have retried a scrape under load (client timeout), and
    that request's cycle can land between two of these (seen on a loaded CI machine)."""
    counts = [Scrape.parse(get(server + "/metrics").read().decode()).value("systemd_memory_exporter_samples_total")
              for _ in range(3)]
    assert counts[0] < counts[1] < counts[2], counts


@pytest.mark.parametrize("server", [["--sample.interval=0"]], indirect=True)
def test_interval_zero_page_views_start_no_cycle(server):
    """Pages show the latest snapshot; only scrapes ask for a fresh one."""
    def samples():
        return Scrape.parse(get(server + "/metrics").read().decode()).value("systemd_memory_exporter_samples_total")

    samples()
    time.sleep(0.5)  # a cycle the fixture's start-up poll may have left asked for ends meanwhile
    before = samples()
    for _ in range(5):
        assert "dbus DOWN" in get(server + "/").read().decode()
        time.sleep(0.05)  # a cycle a view would have started ends meanwhile (no systemd: quick)
    # The scrape's own cycle, and at most one that an earlier request had asked for (the start-up
    # poll's, on a loaded machine); five views that each started one would make it 6 or more.
    assert before + 1 <= samples() <= before + 2


def test_unit_filter_is_anchored_and_typed():
    f = UnitFilter.build(include=r"foo.*", exclude=r".*\.socket", types=["service", "socket", "slice"])
    assert f.wants("foo.service")
    assert not f.wants("xfoo.service")  # anchored: the whole name must match
    assert not f.wants("foo.socket")  # excluded
    assert not f.wants("foo.timer")  # type not wanted
    assert UnitFilter.build().wants("foo\\x2dbar.service")
    assert not UnitFilter.build().wants("multi-user.target")
    # An alternation is anchored as a whole, not only its first and last branch.
    either = UnitFilter.build(include=r"a\.service|b.*")
    assert either.wants("a.service") and either.wants("b.service") and not either.wants("xa.service")
    assert not UnitFilter.build(exclude=r"a.*|b.*").wants("ab.service")


def test_a_regex_the_flag_accepts_is_one_discovery_can_use():
    """--unit.include's check compiles what discovery compiles: a leading (?i) once passed the
    check and then failed in UnitFilter.build, in the discovery child, at every cycle."""
    args = build_parsers()[0].parse_args(["--unit.include=(?i)FOO.*", "--unit.exclude=(?i).*\\.SOCKET"])
    f = UnitFilter.build(args.include, args.exclude)
    assert f.wants("foo.service") and not f.wants("foo.socket") and not f.wants("bar.service")


def test_a_listen_address_of_port_alone_takes_ipv4_and_ipv6():
    """":PORT" (the default, :10073) is every address, as node_exporter's: one dual-stack
    socket, so Prometheus can scrape over IPv6 too. It used to listen on 0.0.0.0 only."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", f"--web.listen-address=:{port}", "--sample.interval=0.5",
         "--systemd.private-socket=/nonexistent/private", "--dbus.timeout=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **NO_SYSTEMD},
    )
    try:
        for url in (f"http://127.0.0.1:{port}/metrics", f"http://[::1]:{port}/metrics"):
            deadline = time.monotonic() + 10
            while True:
                try:
                    body = urllib.request.urlopen(url, timeout=5).read()
                    break
                except OSError as e:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        pytest.fail(f"{url}: {e}")
                    time.sleep(0.1)
            assert b"systemd_memory_exporter_build_info" in body, url
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
