"""Descriptors kept across cycles (exporter/keptfiles.py) on real kernel files: a process that
exits, a cgroup removed and made again under the same path, the cap, the end of a cycle, and
running out of descriptors. What a kept read gives must be what a fresh open gives."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from exporter.kernelfiles import read_bytes
from exporter.keptfiles import KeptFiles, default_limit
from tests.testhost import workloads


def test_a_kept_status_of_a_process_that_exited_reads_as_gone_not_as_stale_data():
    child = subprocess.Popen(["sleep", "60"])
    path = f"/proc/{child.pid}/status"
    files = KeptFiles(10)
    try:
        assert b"\nState:" in files.read_bytes(path)
        files.end_cycle()
        assert len(files) == 1
        assert b"\nState:" in files.read_bytes(path)  # through the kept descriptor
        child.kill()
        child.wait()
        with pytest.raises(OSError) as gone:
            files.read_bytes(path)
        assert gone.value.errno in (errno.ENOENT, errno.ESRCH)
        assert len(files) == 0, "the dead process's descriptor is closed, not kept"
    finally:
        child.kill()
        child.wait()
        files.close()


def test_kept_reads_give_what_a_fresh_open_gives():
    files = KeptFiles(10)
    path = "/proc/self/limits"  # the same from one read to the next
    first = files.read_bytes(path)
    assert files.read_bytes(path) == first == read_bytes(path)
    assert files.read_text(path) == first.decode()
    files.close()


def test_a_path_not_read_in_a_cycle_is_closed_at_its_end_and_the_cap_holds():
    files = KeptFiles(2)
    for name in ("stat", "statm", "status"):
        files.read_bytes(f"/proc/self/{name}")
    assert len(files) == 2, "the third file is read through open/read/close"
    files.end_cycle()
    files.read_bytes("/proc/self/stat")
    files.end_cycle()  # statm was not read in this cycle: closed
    assert len(files) == 1
    files.close()
    assert len(files) == 0


def test_regular_files_are_never_kept(tmp_path):
    """A kept descriptor of a deleted regular file would go on reading its old content."""
    path = tmp_path / "memory.current"
    path.write_text("42\n")
    files = KeptFiles(10)
    assert files.read_text(str(path)) == "42\n"
    assert len(files) == 0
    path.unlink()
    with pytest.raises(FileNotFoundError):
        files.read_text(str(path))


def test_the_cap_stays_within_the_descriptor_limit():
    assert default_limit(4096, 1024) == 0
    assert default_limit(4096, 65536) == 4096
    assert default_limit(100_000, 65536) == 65536 - 1024


def test_running_out_of_descriptors_falls_back_to_open_read_close():
    """A soft limit of 64 and a cap far above it: every read still succeeds; the cap shrinks."""
    code = textwrap.dedent("""
        import os, resource
        from exporter.keptfiles import KeptFiles
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        files = KeptFiles(1000)
        tasks = ["/proc/self/stat", "/proc/self/statm", "/proc/self/status", "/proc/self/limits", "/proc/self/io"]
        paths = [f"/proc/{pid}/stat" for pid in os.listdir("/proc") if pid.isdigit()][:200] + tasks
        read = 0
        for path in paths:
            try:
                files.read_bytes(path)
                read += 1
            except OSError as e:
                assert e.errno in (2, 3), e  # a process that exited meanwhile: nothing else
        assert read >= 5 and files.limit < 64 and len(files) <= 64, (read, files.limit, len(files))
        for path in tasks:
            files.read_bytes(path)  # still readable once the cap came down
        print("ok", files.limit)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


RESTART_CHECK = """
import sys
from exporter.keptfiles import KeptFiles
from exporter.kernelfiles import read_text
files = KeptFiles(10)
path = sys.argv[1]
print(files.read_text(path).strip(), flush=True)
files.end_cycle()
sys.stdin.readline()  # the unit is restarted with another limit meanwhile
print(files.read_text(path).strip(), read_text(path).strip(), flush=True)
"""


def test_a_kept_file_of_a_cgroup_made_again_reads_the_new_cgroup(testhost):
    """A unit restarted with another MemoryMax: its cgroup is removed and made again under the
    same path. The kept descriptor of the old one must not be what the next cycle reads."""
    unit = "th-kept-restart.service"
    script = testhost.exchange_dir / "kept_restart.py"
    script.write_text(RESTART_CHECK)

    def start(limit: str) -> str:
        testhost.run(["systemd-run", "--quiet", f"--unit={unit}", "-p", "MemoryAccounting=yes", "-p",
                      f"MemoryMax={limit}", "sleep", "600"])
        return f"/sys/fs/cgroup/memory{testhost.unit_cgroup(unit)}/memory.limit_in_bytes"

    path = start("100M")
    checker = testhost.popen([testhost.python, str(script), path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={"PYTHONPATH": str(testhost.checkout)})
    try:
        assert checker.stdout.readline().strip() == str(100 << 20)
        workloads.stop_units(testhost, [unit], timeout=60)
        assert start("200M") == path
        checker.stdin.write("\n")
        checker.stdin.flush()
        kept, fresh = checker.stdout.readline().split()
        assert kept == fresh == str(200 << 20)
        assert checker.wait(timeout=30) == 0
    finally:
        checker.kill()
        workloads.stop_units(testhost, [unit], timeout=60)


def test_the_open_descriptor_count_includes_the_kept_ones():
    files = KeptFiles(10)
    for name in ("stat", "statm", "status"):
        files.read_bytes(f"/proc/self/{name}")
    files.end_cycle()
    listed = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own descriptor
    assert files.open_descriptors == listed
    files.close()
