"""The error boundary (exporter/kernelfiles.py) and what is made of its answers
(exporter/errorlog.py): each failed read classified once, counted, logged once per kind per 10
minutes, and a cycle's own failures deciding its sources' health."""

from __future__ import annotations

import errno
import logging
import shutil

import pytest

from exporter.errorlog import HIDEPID_HINT, CycleErrors, ErrorLog
from exporter.kernelfiles import IO, PARSE, PERMISSION, VANISHED, ParseError, failure_reason, parse_uint, read_bytes
from exporter.sampler import Sampler, SamplerConfig
from exporter.systemd import DiscoveryResult
from tests.test_sampler import FIXTURES, load_units, sample_tree


def error_of(action) -> Exception:
    with pytest.raises((OSError, ParseError)) as caught:
        action()
    return caught.value


def test_failure_reasons_of_real_reads(tmp_path):
    assert failure_reason(error_of(lambda: read_bytes(str(tmp_path / "gone")))) == VANISHED  # ENOENT
    assert failure_reason(error_of(lambda: read_bytes(str(tmp_path)))) == IO  # EISDIR: a directory for a file
    assert failure_reason(error_of(lambda: parse_uint("-1"))) == PARSE


@pytest.mark.parametrize(
    "code, reason",
    [(errno.ENOENT, VANISHED), (errno.ENODEV, VANISHED), (errno.ESRCH, VANISHED),
     (errno.EACCES, PERMISSION), (errno.EPERM, PERMISSION), (errno.EIO, IO), (errno.EISDIR, IO)],
)
def test_failure_reason_of_every_errno_the_readers_meet(code, reason):
    # EACCES/EPERM cannot be provoked as root on a plain file, so the errors are built here.
    assert failure_reason(OSError(code, "x")) == reason


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "exporter.errorlog"]


def test_each_kind_is_logged_once_per_ten_minutes_and_counted_every_time(caplog):
    caplog.set_level(logging.WARNING, logger="exporter.errorlog")
    clock = Clock()
    log = ErrorLog(clock=clock)
    for cgroup in ("a.service", "b.service"):  # same file name, another cgroup: the same kind
        log.error("cgroup", "parse", f"/sys/fs/cgroup/memory/{cgroup}/memory.stat", "bad")
    log.error("cgroup", "parse", "/sys/fs/cgroup/memory/a.service/memory.failcnt", "bad")  # another kind
    assert len(warnings(caplog)) == 2
    clock.now += 599
    log.error("cgroup", "parse", "/sys/fs/cgroup/memory/a.service/memory.stat", "bad")
    assert len(warnings(caplog)) == 2
    clock.now += 1
    log.error("cgroup", "parse", "/sys/fs/cgroup/memory/a.service/memory.stat", "bad")
    assert len(warnings(caplog)) == 3 and "memory.stat" in warnings(caplog)[-1]
    assert log.counts == {("cgroup", "parse"): 5}


def test_warn_logs_without_counting(caplog):
    caplog.set_level(logging.WARNING, logger="exporter.errorlog")
    log = ErrorLog(clock=Clock())
    log.warn("pss", "permission", "/proc/PID/smaps_rollup", "Permission denied")
    assert warnings(caplog) and not log.counts


def test_a_cycle_counts_errors_but_not_vanished_files(caplog):
    caplog.set_level(logging.WARNING, logger="exporter.errorlog")
    log = ErrorLog(clock=Clock())
    cycle = CycleErrors(log)
    assert cycle.read_failed("cgroup", "/x/memory.stat", FileNotFoundError(errno.ENOENT, "gone")) == VANISHED
    assert not cycle.failed and not log.counts and not warnings(caplog)
    assert cycle.read_failed("procfs", "/proc/PID/status", PermissionError(errno.EACCES, "Permission denied")) == PERMISSION
    assert cycle.failed == {"procfs": 1} and log.counts == {("procfs", "permission"): 1}
    assert HIDEPID_HINT in warnings(caplog)[0]  # /proc permission errors say where to look
    cycle.vanished("process")
    assert log.vanished == {"process": 1}
    assert CycleErrors(log).failed == {}  # the next cycle starts clean; the counters go on


def test_health_is_the_cycles_own(tmp_path):
    """A cgroup file that fails in one cycle marks the source down in that cycle only, though
    errors_total keeps the count."""
    tree = tmp_path / "tree"
    shutil.copytree(FIXTURES / "hybrid", tree)
    units = load_units(tree)
    unit = next(u for u in units if u.name == "hog.service")
    usage = tree / "sys/fs/cgroup/memory" / unit.control_group.lstrip("/") / "memory.usage_in_bytes"
    good = usage.read_text()
    config = SamplerConfig(procfs=str(tree / "proc"), cgroupfs=str(tree / "sys/fs/cgroup"))
    sampler = Sampler(config, lambda: DiscoveryResult(units, True, "", 1.0, "system_bus"))
    usage.write_text("garbage\n")
    bad = sampler.sample()
    usage.write_text(good)
    fixed = sampler.sample()
    assert not bad.sources["cgroup"].up and bad.sources["procfs"].up
    assert fixed.sources["cgroup"].up
    assert fixed.errors[("cgroup", "parse")] == 1  # counted since start, not per cycle
    assert fixed.sources["cgroup"].last_success == fixed.taken_at


def test_bad_tree_marks_both_file_sources_down():
    """tests/fixtures/bad has broken cgroup files and two broken status files."""
    snapshot = sample_tree(FIXTURES / "bad")
    assert not snapshot.sources["cgroup"].up and not snapshot.sources["procfs"].up
    assert snapshot.sources["dbus"].up
