"""Helpers for the truth tests on real systems (tests/test_e2e.py on the v1 test host,
tests/vm on the cgroup v2 guest): scrape and query the exporter, sum /proc independently."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Scrape:
    samples: list[Sample]

    @classmethod
    def parse(cls, text: str) -> "Scrape":
        return cls([s for family in text_string_to_metric_families(text) for s in family.samples])

    def _matching(self, name: str, labels: dict[str, str | None]) -> list[Sample]:
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def series(self, name: str, **labels: str | None) -> list[Sample]:
        """The samples of ``name`` with these labels; a label given as None must be absent
        (uid=None: a system unit, whose series have no uid label)."""
        return self._matching(name, labels)

    def get(self, name: str, **labels: str | None) -> float | None:
        found = self._matching(name, labels)
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
        return found[0].value if found else None

    def value(self, name: str, **labels: str | None) -> float:
        value = self.get(name, **labels)
        assert value is not None, f"no series {name}{labels}"
        return value

    def labels_of(self, name: str, **labels: str) -> dict[str, str]:
        found = self._matching(name, labels)
        assert len(found) == 1, f"{name}{labels} matches {len(found)} series"
        return found[0].labels

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}

    def total(self, name: str) -> float:
        return sum(s.value for s in self.samples if s.name == name)


class ExporterClient:
    def __init__(self, url: str, interval: float):
        self.url = url
        self.interval = interval
        self.ready_seconds: float | None = None

    def scrape_text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            return response.read().decode()

    def scrape(self) -> Scrape:
        return Scrape.parse(self.scrape_text())

    def wait_ready(self, timeout: float) -> None:
        """Until a scrape shows units discovered over D-Bus."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                m = self.scrape()
                if m.get("systemd_memory_exporter_source_up", source="dbus") == 1 and m.label_values(
                    "systemd_unit_info", "unit"
                ):
                    return
            except OSError as e:
                last_error = e
            time.sleep(0.1)
        raise TimeoutError(f"exporter at {self.url} not ready after {timeout}s (last error: {last_error})")

    def next_sample(self, timeout: float | None = None) -> None:
        """Wait for a sample that started after this call: what happened before is in it."""
        called = time.time()
        deadline = time.monotonic() + (timeout or 5 * self.interval + 5)
        while time.monotonic() < deadline:
            if self.scrape().value("systemd_memory_exporter_last_sample_timestamp_seconds") > called:
                return
            time.sleep(self.interval / 10)
        raise TimeoutError("no new sample")


def proc_sums_script(cgroup_dir: str) -> str:
    """Python source that prints processes=N rss_anon=B rss_file=B rss_shmem=B for every
    process in ``cgroup_dir``'s subtree, straight from /proc (run it inside the host)."""
    return f"""
import errno, os
pids = set()
for d, _, files in os.walk({cgroup_dir!r}):
    try:
        pids.update(int(p) for p in open(os.path.join(d, "cgroup.procs")).read().split() if p != "0")
    except OSError as e:  # a threaded cgroup (v2): its threaded domain lists its processes
        if e.errno != errno.EOPNOTSUPP:
            raise
sums = dict(processes=0, rss_anon=0, rss_file=0, rss_shmem=0)
for pid in pids:
    try:
        fields = dict(l.split(":", 1) for l in open(f"/proc/{{pid}}/status") if ":" in l)
    except FileNotFoundError:
        continue
    sums["processes"] += 1
    for key, name in (("RssAnon", "rss_anon"), ("RssFile", "rss_file"), ("RssShmem", "rss_shmem")):
        if key in fields:
            sums[name] += int(fields[key].split()[0]) * 1024
print(" ".join(f"{{k}}={{v}}" for k, v in sums.items()))
"""


def proc_sums(system, cgroup_dir: str) -> dict[str, int]:
    """proc_sums_script's figures for ``cgroup_dir``, run inside ``system`` (a test host or a
    guest: anything whose run(cmd, check=True) returns the command's output)."""
    out = system.run(["python3", "-c", proc_sums_script(cgroup_dir)], check=True).stdout
    return {k: int(v) for k, v in (x.split("=") for x in out.split())}


def check_rss_is_proc_sums(m: Scrape, unit: str, expected: dict[str, int], slack: int = 256 * 1024,
                           **labels: str | None) -> None:
    """The unit's process count is /proc's, and each rss_* within 2 % or ``slack`` bytes of it:
    the processes' pages move between the exporter's read and the script's. ``labels``: uid=
    for a user unit (uid=None: the series has no uid label)."""
    print(f"{unit} {labels}: /proc {expected}, exporter "
          + str({s.labels["type"]: int(s.value) for s in m.series("systemd_unit_memory_bytes", unit=unit, **labels)}))
    assert m.value("systemd_unit_processes", unit=unit, **labels) == expected["processes"]
    for kind in ("rss_anon", "rss_file", "rss_shmem"):
        assert m.value("systemd_unit_memory_bytes", unit=unit, type=kind, **labels) == pytest.approx(
            expected[kind], rel=0.02, abs=slack), (unit, kind)


# The checks both truth suites make (tests/test_e2e.py on cgroup v1, tests/vm on v2), each on
# one scrape `m` and the unit name of one of the sample workloads.
def check_anon_hog(m: Scrape, unit: str) -> None:
    """150 MiB of touched anonymous memory."""
    assert m.value("systemd_unit_memory_bytes", unit=unit, type="rss_anon") >= 140 * MiB
    assert m.value("systemd_unit_memory_stat_bytes", unit=unit, item="anon") >= 140 * MiB


def check_page_cache_reader(m: Scrape, unit: str) -> None:
    """Read a 200 MiB file from disk: systemctl's figure is cache, top's is small."""
    assert m.value("systemd_unit_memory_bytes", unit=unit, type="page_cache") >= 180 * MiB
    rss = m.value("systemd_unit_memory_bytes", unit=unit, type="rss_anon") + m.value(
        "systemd_unit_memory_bytes", unit=unit, type="rss_file"
    )
    assert rss < 40 * MiB


def check_tmpfs_writer(m: Scrape, unit: str) -> None:
    """100 MiB written to /dev/shm: shmem, counted inside page_cache."""
    shmem = m.value("systemd_unit_memory_stat_bytes", unit=unit, item="shmem")
    assert shmem >= 95 * MiB
    assert m.value("systemd_unit_memory_bytes", unit=unit, type="page_cache") >= shmem


def check_multi_process(m: Scrape, unit: str) -> None:
    """A parent and 4 forked children holding 20 MiB each."""
    assert m.value("systemd_unit_processes", unit=unit) == 5
    # Forked children share their parent's pages: summed RSS exceeds what the cgroup holds.
    assert m.value("systemd_unit_memory_bytes", unit=unit, type="rss_anon") >= 80 * MiB


def check_accounting_off(m: Scrape, unit: str, mib: int, own_usage: int | None) -> None:
    """A unit with MemoryAccounting=no holding `mib` MiB (systemctl: MemoryCurrent [not set]).
    Top's view stays; its cgroup figures are its own cgroup's when it has memory files
    (`own_usage`: what they say) and absent when it has none, never its parent's."""
    assert m.value("systemd_unit_memory_bytes", unit=unit, type="rss_anon") >= (mib - 5) * MiB
    assert m.value("systemd_unit_processes", unit=unit) == 1
    usage = m.get("systemd_unit_memory_bytes", unit=unit, type="cgroup_usage")
    if own_usage is None:
        assert usage is None, f"{unit} has no memory cgroup, yet cgroup_usage={usage} (its parent's?)"
        cgroup_families = ("systemd_unit_memory_stat_bytes", "systemd_unit_memory_limit_bytes",
                           "systemd_unit_memory_events_total", "systemd_unit_memory_working_set_bytes")
        assert not [s for s in m.samples if s.name in cgroup_families and s.labels.get("unit") == unit]
        kinds = {s.labels["type"] for s in m.samples
                 if s.name == "systemd_unit_memory_bytes" and s.labels["unit"] == unit}
        assert kinds == {"rss_anon", "rss_file", "rss_shmem"}, kinds
    else:
        assert usage == pytest.approx(own_usage, rel=0.02), (unit, usage, own_usage)
        assert m.value("systemd_unit_memory_stat_bytes", unit=unit, item="anon") >= (mib - 5) * MiB


def check_explain_usage(section: str, before: int, after: int, cpus: int) -> None:
    """explain's "systemctl says" figure against MemoryCurrent read just `before` and `after` it.
    Each reads usage_in_bytes (memory.current) at its own moment, and a charge moves that by a
    whole per-CPU batch (64 pages, MEMCG_CHARGE_BATCH): so the figure must lie between the two
    reads, give or take one batch per CPU and the 0.05 MiB of rounding. (Comparing with one read
    after failed in CI once: 208.5 MiB shown, 208.7 MiB read a moment later.)"""
    found = re.search(r"systemctl says \(cgroup usage\)\s+([\d.]+) MiB", section)
    assert found, section
    shown = float(found.group(1))
    slack = 0.05 + cpus * 64 * 4096 / MiB
    assert min(before, after) / MiB - slack <= shown <= max(before, after) / MiB + slack, (before, shown, after)


@contextlib.contextmanager
def exporter_in_host(host, interval: float, *flags: str) -> Iterator[ExporterClient]:
    """The exporter as a real process inside a test host, serving on the loopback the host
    shares with the machine; on exit it is stopped and its output checked for tracebacks."""
    port = free_port()
    started = time.monotonic()
    proc = host.popen(
        ["python3", "-m", "exporter", f"--web.listen-address=127.0.0.1:{port}", f"--sample.interval={interval:g}", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    client = ExporterClient(f"http://127.0.0.1:{port}/metrics", interval)
    client.port = port
    client.process = proc  # a tests.testhost HostProcess: .inner_child() is its PID outside
    try:
        client.wait_ready(timeout=10)
        client.ready_seconds = time.monotonic() - started
        yield client
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        assert "Traceback" not in out, out
