"""Capture tests/fixtures/v2 from the cgroup-v2 guest, with the sample workloads running.

    python3 -m tests.vm capture tests/fixtures/v2
    UPDATE_GOLDEN=1 python3 -m pytest tests/test_sampler.py -k v2    # then read the diff

Boots a guest, starts tests/vm/workloads.sample_workloads (anon hog, page-cache reader, shm
writer, multi-process, nested slice, escaped name, a unit pushed into swap, one with an OOM
kill, one with every memory limit), runs tests/fixtures/capture.py inside the guest into
/var/tmp/v2 and copies the tree back (tar over the agent). UNITS keeps the fixture small
but keeps -.slice, so the whole cgroup tree and every process (kernel threads included: on
v2 they are in the root's cgroup.procs) are in it, as the exporter reads them.
"""
import io
import shutil
import tarfile
from pathlib import Path

from . import workloads
from .guest import VENV_PYTHON
from .image import GUEST_PROJECT

GUEST_OUT = "/var/tmp/v2"
# The root, a slice, a scope, services, a socket (listed with a ControlGroup whose directory
# v2 has removed, as for every idle socket), a mount, a swap unit, and all the workloads
# (smx-*.service, smx.slice and its nested slices, the escaped name); not the guest agent.
UNITS = (r"-\.slice|system\.slice|init\.scope|dbus\.service|dbus\.socket|systemd-journald\.service"
         r"|dev-mqueue\.mount|dev-vdb\.swap|smx(?!-agent\.service)[-.\\].*")


def capture(vm, out):
    """Start the workloads in a booted guest, capture, stop them; write the tree to out."""
    out = Path(out)
    started = workloads.sample_workloads(vm)
    try:
        vm.run(["rm", "-rf", GUEST_OUT], check=True)
        vm.run([VENV_PYTHON, "-m", "tests.fixtures.capture", GUEST_OUT, UNITS], cwd=GUEST_PROJECT,
               check=True, timeout=120)
        archive = vm.run(["tar", "-C", GUEST_OUT, "-cz", "."], check=True, text=False).stdout
    finally:
        workloads.stop_units(vm, started.values())
    for name in ("units.json", "SOURCE.md", "sys", "proc"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(out, filter="data")
    with open(out / "SOURCE.md", "a") as f:
        f.write(
            "\nThe host was the tests/vm QEMU guest (Debian 12, systemd.unified_cgroup_hierarchy=1, "
            "2 vCPUs, 2 GiB, swap on /dev/vdb), captured with `python3 -m tests.vm capture "
            "tests/fixtures/v2` while tests/vm/workloads.sample_workloads ran: "
            + ", ".join(f"{key} {unit}" for key, unit in started.items()) + ".\n")
    return started
