"""The harness itself: source parsing, cache keys, and that QEMU never outlives us."""
import subprocess
import sys
from pathlib import Path

import pytest

from . import image
from .guest import REPO, Guest, wait_until

pytestmark = pytest.mark.vm

# Launches a guest that can't boot (blank disk), prints QEMU's pid, then waits.
LAUNCHER = """\
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.vm.guest import Guest
from tests.vm.image import find_kernel
guest = Guest(sys.argv[2], find_kernel(), sys.argv[3])
guest.launch()
print(guest.proc.pid, flush=True)
time.sleep(600)
"""


def running(pid):
    """True while pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def blank_disk(tmp_path):
    path = tmp_path / "blank.img"
    path.write_bytes(bytes(1 << 20))
    return path


def test_parse_apt_sources():
    one_line = ("deb [arch=amd64] http://mirror.example/debian bookworm main contrib\n"
                "deb http://mirror.example/debian-security bookworm-security main\n"
                "# deb http://old.example/debian bookworm main\n")
    deb822 = ("Types: deb\nURIs: http://a.example/debian\nSuites: bookworm bookworm-updates\n"
              "Components: main\n\n"
              "Types: deb\nURIs: https://b.example/node\nSuites: nodistro\nComponents: main\n")
    assert image.parse_apt_sources([one_line, deb822]) == [
        "http://mirror.example/debian", "http://a.example/debian"]


def test_guest_requirements_follow_each_suites_python(tmp_path):
    """pyproject.toml's markers, evaluated for the guest's python3: pystemd 0.15 needs 3.11."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["psutil>=5.9", '
                         '"pystemd>=0.13,<0.15; python_version < \'3.11\'", '
                         '"pystemd>=0.11,<1; python_version >= \'3.11\'"]\n')
    pick = {name: image.guest_requirements(suite, pyproject) for name, suite in image.SUITES.items()}
    assert pick["bullseye"] == ["psutil>=5.9", "pystemd<0.15,>=0.13"]
    assert pick["bookworm"] == pick["trixie"] == ["psutil>=5.9", "pystemd<1,>=0.11"]
    # and the real file gives every suite exactly one pystemd line
    for suite in image.SUITES.values():
        assert len([r for r in image.guest_requirements(suite) if r.startswith("pystemd")]) == 1


def test_manylinux_platforms_stop_at_the_guests_glibc():
    tags = image.manylinux_platforms((2, 31))
    assert tags[0] == "manylinux_2_31_x86_64" and "manylinux_2_17_x86_64" in tags
    assert "manylinux_2_34_x86_64" not in tags and "manylinux2014_x86_64" in tags


def test_layouts_boot_with_their_kernel_arguments(tmp_path):
    from .guest import LAYOUT_ARGS
    argv = Guest(tmp_path / "img", image.Kernel("6.1", Path("vmlinuz"), Path("initrd"), Path("m")),
                 tmp_path, layout="legacy").qemu_argv()
    append = argv[argv.index("-append") + 1].split()
    assert {"systemd.unified_cgroup_hierarchy=0", "systemd.legacy_systemd_cgroup_controller=1"} <= set(append)
    assert LAYOUT_ARGS["hybrid"] == ["systemd.unified_cgroup_hierarchy=0"]
    assert "trixie" in image.SUITES and image.SUITES["trixie"].layouts == ("unified",)
    with pytest.raises(ValueError):
        Guest(tmp_path / "img", None, tmp_path, layout="v3")
    # A layout with "+argument": that layout, and the argument on the kernel's command line too.
    psi_off = Guest(tmp_path / "img", image.Kernel("6.1", Path("vmlinuz"), Path("initrd"), Path("m")),
                    tmp_path, layout="unified+psi=0")
    append = psi_off.qemu_argv()[psi_off.qemu_argv().index("-append") + 1].split()
    assert psi_off.layout == "unified" and {"systemd.unified_cgroup_hierarchy=1", "psi=0"} <= set(append)


@pytest.mark.e2e
def test_cache_key_follows_inputs(kernel, monkeypatch):
    key = image.cache_key(kernel)
    assert image.cache_key(kernel) == key
    assert len({image.cache_key(kernel, suite) for suite in image.SUITES.values()}) == len(image.SUITES)
    own = image.SUITES["bullseye510"]
    own_key = image.cache_key(kernel, own)
    monkeypatch.setattr(image, "PACKAGES", image.PACKAGES + ["curl"])
    assert image.cache_key(kernel) != key
    assert image.cache_key(kernel, own) != own_key


def test_own_kernel_suite_keys_on_its_kernel_package_not_the_hosts(tmp_path):
    """bullseye510's image holds bullseye's 5.10, whatever the host boots; a new pin rebuilds it."""
    import dataclasses
    own = image.SUITES["bullseye510"]
    assert own.codename == "bullseye" and own.own_kernel[0].startswith("linux-image-5.10.")
    assert image.packages(own) == image.PACKAGES + [own.own_kernel[0]]
    assert image.packages(image.SUITES["bullseye"]) == image.PACKAGES
    hosts = [image.Kernel(v, tmp_path / v, tmp_path, tmp_path) for v in ("6.1.0-1-amd64", "6.1.0-2-amd64")]
    for k, data in zip(hosts, (b"one", b"two")):
        k.vmlinuz.write_bytes(data)
    assert len({image.cache_key(k, own) for k in hosts}) == 1
    repinned = dataclasses.replace(own, own_kernel=(own.own_kernel[0], "5.10.999-1"))
    assert image.cache_key(hosts[0], repinned) != image.cache_key(hosts[0], own)
    # its cache entries are apart from bullseye's, whose stale ones build() deletes by prefix
    assert not own.name.startswith("bullseye-")


@pytest.mark.e2e
def test_image_build_leaves_no_mounts(vm_image):
    assert vm_image.exists()
    assert image.mounts_below(image.CACHE_DIR) == []


@pytest.mark.e2e
def test_close_stops_qemu(kernel, blank_disk, tmp_path):
    guest = Guest(blank_disk, kernel, tmp_path)
    try:
        guest.launch()
        assert running(guest.proc.pid)
    finally:
        guest.close()
    assert guest.proc.returncode is not None
    assert not running(guest.proc.pid)
    assert not guest.socket_path.exists() and not guest.swap_path.exists()


@pytest.mark.e2e
def test_qemu_dies_with_the_test_process(kernel, blank_disk, tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(REPO), str(blank_disk), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        qemu = int(parent.stdout.readline())
        assert running(qemu)
        parent.kill()  # no chance to clean up: only PR_SET_PDEATHSIG saves us
        parent.wait()
        wait_until(lambda: not running(qemu), 10, 0.1, "QEMU exiting")
    finally:
        parent.kill()
        parent.wait()
