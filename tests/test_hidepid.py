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
