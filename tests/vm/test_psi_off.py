"""PSI compiled in but off: Debian 11's 5.10 (bullseye510) booted with psi=0, as openEuler's 5.10
boots unless given psi=1 (CONFIG_PSI_DEFAULT_DISABLED). Every cgroup's memory.pressure file is
still there, and each read is refused with EOPNOTSUPP (kernel/sched/psi.c, psi_show); 6.1 makes
no such files then (tried: bookworm with psi=0), which always read as absent. The exporter must give no
pressure series, count no error, and keep source_up{cgroup} at 1 (it counted one io error per
unit per cycle and held the source down). The same files' answer, injected into the v2
fixture's reads, is tests/test_sampler.py's test.
"""
from __future__ import annotations

import pytest

from .guest import EXPORTER
from .test_v2_truth import INTERVAL, GuestExporter

pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.layouts("unified+psi=0")]

PORT = 10075
URL = f"http://127.0.0.1:{PORT}/metrics"
EXPORTER_UNIT = "smx-exporter-psi-off.service"


def test_the_kernel_keeps_the_cgroup_pressure_files_and_refuses_every_read(vm):
    assert "psi=0" in vm.run(["cat", "/proc/cmdline"], check=True).stdout
    assert vm.run(["test", "-e", "/proc/pressure/memory"]).returncode != 0  # the system-wide file is not made
    for path in ("/sys/fs/cgroup/system.slice/memory.pressure", "/sys/fs/cgroup/init.scope/memory.pressure"):
        assert vm.run(["test", "-f", path]).returncode == 0, path
        read = vm.run(["cat", path])
        assert read.returncode != 0 and "Operation not supported" in read.stderr, (path, read)


def test_psi_off_gives_no_pressure_series_and_no_error(vm):
    # Pressure series on, so their absence is the kernel's doing, not the series budget's.
    vm.start_unit(EXPORTER_UNIT, [EXPORTER, f"--web.listen-address=127.0.0.1:{PORT}",
                                  f"--sample.interval={INTERVAL:g}", "--collector.pressure.fields=.+"], cwd="/")
    try:
        exporter = GuestExporter(vm, URL, INTERVAL)
        exporter.wait_ready(timeout=30)
        exporter.next_sample()
        m = exporter.next_sample()  # two cycles in, so one error per cycle would show
    finally:
        journal = vm.run(["journalctl", "--no-pager", "-o", "cat", "-u", EXPORTER_UNIT]).stdout
        vm.stop_unit(EXPORTER_UNIT)
    assert "Traceback" not in journal, journal[-4000:]
    assert m.value("systemd_memory_exporter_source_up", source="cgroup") == 1
    errors = [s for s in m.samples if s.name == "systemd_memory_exporter_errors_total" and s.value]
    assert not errors, errors
    assert m.value("systemd_unit_memory_bytes", unit="systemd-journald.service", type="cgroup_usage") > 0
    assert not [s for s in m.samples if "pressure" in s.name and s.name.startswith("systemd_unit_")]
