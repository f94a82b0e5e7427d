"""/proc mounted with hidepid inside the test host, the exporter running as an unprivileged
user: other users' processes cannot be read. That must not crash or silently shrink the
figures: a clear log line, a counter, and every unit's cgroup figures still reported."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.testhost import workloads
from tests.truth import ExporterClient, free_port

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("hidepid", ["invisible", "noaccess"])
def test_hidden_processes_are_counted_not_lost(testhost, hidepid):
    mount_point = f"/run/proc-{hidepid}"
    testhost.run(["mkdir", "-p", mount_point])
    testhost.run(["mount", "-t", "proc", "-o", f"hidepid={hidepid}", "proc", mount_point])
    hog = workloads.anon_hog(testhost, 30)  # root's process: hidden from user nobody
    # The test Python lives under /root (pyenv): let nobody traverse it. The host's root is an
    # overlay on a tmpfs, so this changes the host only, never the machine.
    testhost.run(["chmod", "o+x", "/root"])
    port = free_port()
    proc = testhost.popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", testhost.python, "-m", "exporter",
         f"--web.listen-address=127.0.0.1:{port}", "--sample.interval=1", f"--path.procfs={mount_point}",
         "--collector.pss"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    client = ExporterClient(f"http://127.0.0.1:{port}/metrics", 1.0)
    try:
        client.wait_ready(timeout=15)
        client.next_sample()
        m = client.scrape()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
        workloads.stop_units(testhost, [hog])
        testhost.run(["umount", mount_point])
    assert "Traceback" not in out, out
    assert m.value("systemd_memory_exporter_errors_total", source="procfs", reason="permission") > 0
    assert m.value("systemd_memory_exporter_source_up", source="procfs") == 0
    assert "hidepid" in out, "the log must say why processes are missing"
    # The cgroup view is untouched: the hog's usage is there although its process is hidden.
    assert m.value("systemd_unit_memory_bytes", unit=hog, type="cgroup_usage") >= 25 << 20
    assert m.value("systemd_memory_exporter_source_up", source="dbus") == 1
    # PSS: the hidden process is skipped, so the unit has no PSS rather than one without it
    # (under invisible its smaps_rollup looked like an exited process's, summed as 0).
    assert m.get("systemd_unit_memory_bytes", unit=hog, type="pss") is None
    assert m.value("systemd_memory_exporter_pss_skipped_processes_total", reason="error") > 0



# Touches 50 MiB, starts a thread, and ends its main thread (ctypes lets the GIL go for the call).
LEADER_EXITS = """
import ctypes, threading, time
held = bytearray(50 << 20)
for i in range(0, len(held), 4096):
    held[i] = 1
threading.Thread(target=time.sleep, args=(1e6,)).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_whose_main_thread_exited_is_measured_through_a_live_thread(testhost):
    """Its leader is a zombie: /proc/PID/status has no Rss lines and smaps_rollup reads ESRCH,
    yet cgroup.procs lists it and its 50 MiB are held by the thread that runs. RSS and PSS now
    come from /proc/PID/task/TID (RSS read 0 before, as ps shows). And as deploy/systemd/
    README.md runs PSS, unprivileged with CAP_SYS_PTRACE on a /proc without hidepid, the ESRCH
    was taken for hidepid (kill(pid, 0) is refused for another user's process) and the unit
    lost its PSS; only an entry missing at open (ENOENT) can be a hidden one."""
    unit = workloads.start_unit(testhost, "th-leader-exits.service", [testhost.python, "-c", LEADER_EXITS])
    testhost.run(["chmod", "o+x", "/root"])  # the test Python lives under /root (see above)
    port = free_port()
    proc = None
    try:
        pid = testhost.show(unit, "MainPID")["MainPID"]
        workloads.wait_until(lambda: "Z" in testhost.run(["ps", "-o", "stat=", "-p", pid], check=False).stdout, 15,
                             "the main thread to exit")
        proc = testhost.popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=+sys_ptrace",
             "--ambient-caps=+sys_ptrace", testhost.python, "-m", "exporter", f"--web.listen-address=127.0.0.1:{port}",
             "--sample.interval=1", "--collector.pss"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        client = ExporterClient(f"http://127.0.0.1:{port}/metrics", 1.0)
        client.wait_ready(timeout=15)
        client.next_sample()
        m = client.scrape()
    finally:
        out = ""
        if proc is not None:
            proc.terminate()
            out = proc.communicate(timeout=10)[0]
        workloads.stop_units(testhost, [unit])
    assert "Traceback" not in out, out
    assert m.value("systemd_unit_processes", unit=unit) == 1
    assert m.value("systemd_unit_memory_bytes", unit=unit, type="rss_anon") >= 45 << 20
    assert m.value("systemd_unit_memory_bytes", unit=unit, type="pss") >= 45 << 20
    assert (m.get("systemd_memory_exporter_pss_skipped_processes_total", reason="error") or 0) == 0
    assert "hidepid" not in out, out
