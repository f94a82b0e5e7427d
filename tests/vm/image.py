"""Build and cache a Debian guest image (bullseye, bookworm or trixie) for the guest tests.

The image is a raw ext4 file made from a debootstrap tree plus the host's
Debian kernel modules (or, for a suite with its own kernel, that kernel installed in
the tree, its vmlinuz and initrd copied out beside the image), the guest agent and a
few config files, and a venv of
the guest's own python3 at VENV holding the exporter's dependencies, pystemd
compiled there against the guest's libsystemd (pip, offline, from wheels and
sdists downloaded on the host; the exporter itself is pip-installed into it at
boot, see guest.install_exporter).  It is cached under CACHE_DIR/<suite>-<key>/
where <key> hashes everything that goes into it, so a change to this file, the
agent, the package list, the dependencies or the kernel rebuilds it.
"""
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement


@dataclass(frozen=True)
class Suite:
    name: str      # the guest's name: SMX_VM_GUESTS, test ids, the cache directory
    systemd: int   # major version it ships
    python: str    # its python3, "3.9"
    glibc: tuple   # for the manylinux tags its pip accepts
    layouts: tuple  # cgroup layouts its systemd boots
    release: str = ""  # the Debian codename to debootstrap, when it is not the name
    # (package, version) of the release's own kernel, installed in the tree and booted; the
    # version is pinned so the cache key names it (build() checks the mirror still has it).
    # Empty: boot the host's 6.1 kernel.
    own_kernel: tuple = ()

    @property
    def codename(self):
        return self.release or self.name


SUITES = {s.name: s for s in (
    Suite("bullseye", 247, "3.9", (2, 31), ("legacy", "hybrid", "unified")),
    Suite("bookworm", 252, "3.11", (2, 36), ("legacy", "hybrid", "unified")),
    # systemd 256+ refuses cgroup v1 unless forced: trixie is v2 only.
    Suite("trixie", 257, "3.13", (2, 41), ("unified",)),
    # bullseye booting its own 5.10 (Debian 11 and openEuler 22.03 run 5.10): cgroup v2 before
    # 5.18 (no memory.stat "kernel") and 5.19 (no memory.peak). Not "bullseye-...": that prefix
    # is bullseye's in the cache, whose stale entries build() deletes. bullseye is closed (11.11,
    # the last point release), so the archive's package stays put.
    Suite("bullseye510", 247, "3.9", (2, 31), ("legacy", "hybrid", "unified"), release="bullseye",
          own_kernel=("linux-image-5.10.0-32-amd64", "5.10.223-1")),
)}
DEFAULT_SUITE = "bookworm"
HOST_SUITE = "bookworm"  # the host's apt sources name it; the same archive serves the others
PACKAGES = [
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "procps", "python3",
    # What a user of the distribution needs to pip-install the exporter into a venv of its
    # python3: pystemd is built from its sdist against the guest's libsystemd.
    "python3-venv", "python3-dev", "gcc", "libc6-dev", "libsystemd-dev", "pkg-config",
]
VENV = "/opt/systemd-memory-exporter"  # the guest's venv, as README's deployment section has it
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# Build requirements of pystemd's sdist (its pyproject.toml), installed by pip's build isolation.
BUILD_REQUIREMENTS = ["setuptools>=64", "wheel", "cython"]
IMAGE_SIZE = "2G"
# One image per suite, side by side. Not the single-image directory of before
# (/var/cache/systemd-memory-exporter-vm): that code deleted every entry but its own.
CACHE_DIR = Path(os.environ.get("SMX_VM_CACHE", "/var/cache/systemd-memory-exporter-guests"))
HERE = Path(__file__).resolve().parent
AGENT = HERE / "agent.py"
GUEST_PROJECT = "/project"  # where the checkout is mounted in the guest
PROJECT_TAG = "project"     # 9p mount tag
HOST_TOOLS = ["qemu-system-x86_64", "debootstrap", "mkfs.ext4", "mkswap", "unshare"]
# Debian package names for the tools above and the kernel (see NOTES.md).
APT_PACKAGES = "qemu-system-x86 linux-image-amd64 debootstrap"

FSTAB = f"""\
/dev/vda / ext4 rw,errors=remount-ro 0 1
/dev/vdb none swap sw 0 0
{PROJECT_TAG} {GUEST_PROJECT} 9p trans=virtio,version=9p2000.L,msize=262144,ro,nofail,x-systemd.requires=systemd-modules-load.service 0 0
"""
# Loaded early by systemd-modules-load so the 9p mount and agent port work.
MODULES_LOAD = "virtio_console\n9pnet_virtio\n9p\n"
AGENT_UNIT = """\
[Unit]
Description=systemd-memory-exporter test agent (virtio-serial)

[Service]
ExecStart=/usr/local/sbin/smx-agent
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""
# Periodic maintenance only adds noise and CPU time under TCG.
MASKED_UNITS = [
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "getty@tty1.service",
]


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    initrd: Path
    modules: Path


def find_kernel():
    """Newest Debian 6.1 kernel installed on the host (linux-image-amd64)."""
    found = []
    for vmlinuz in glob.glob("/boot/vmlinuz-6.1.*"):
        version = vmlinuz.removeprefix("/boot/vmlinuz-")
        initrd = Path(f"/boot/initrd.img-{version}")
        modules = Path(f"/lib/modules/{version}")
        if initrd.exists() and (modules / "modules.dep").exists():
            found.append(Kernel(version, Path(vmlinuz), initrd, modules))
    key = lambda k: [int(n) for n in re.findall(r"\d+", k.version)]
    return max(found, key=key, default=None)


def missing_prerequisites():
    """Human-readable list of what stops us from building and booting."""
    missing = [f"command {tool}" for tool in HOST_TOOLS if not shutil.which(tool)]
    if os.geteuid() != 0:
        missing.append("root (debootstrap needs it)")
    if find_kernel() is None:
        missing.append("a Debian 6.1 kernel in /boot with its modules")
    return missing


def parse_apt_sources(texts, suite=HOST_SUITE):
    """Archive URIs serving suite/main from one-line and deb822 source files."""
    uris = []
    for text in texts:
        for line in text.splitlines():
            fields = line.split("#", 1)[0].split()
            if fields[:1] == ["deb"]:
                fields = [f for f in fields[1:] if not f.startswith("[")]
                if len(fields) >= 3 and fields[1] == suite and "main" in fields[2:]:
                    uris.append(fields[0])
        for stanza in re.split(r"\n\s*\n", text):
            entry = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    name, value = line.split(":", 1)
                    entry[name.strip().lower()] = value.split()
            if ("deb" in entry.get("types", []) and suite in entry.get("suites", [])
                    and "main" in entry.get("components", [])):
                uris.extend(entry.get("uris", []))
    return [u for u in uris if u.startswith(("http://", "https://"))]


def apt_mirror():
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
    texts = [Path(f).read_text() for f in files if f.endswith((".list", ".sources"))
             and os.path.isfile(f)]
    uris = parse_apt_sources(texts)
    if not uris:
        raise BuildError(f"no apt source for {HOST_SUITE} main in {files}")
    return uris[0]


def guest_requirements(suite, pyproject=PYPROJECT):
    """The project's dependencies whose markers hold on the suite's python3, as pip lines."""
    import tomllib
    deps = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
    env = {"python_version": suite.python, "python_full_version": suite.python + ".0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "os_name": "posix"}
    lines = []
    for dep in deps:
        req = Requirement(dep)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            lines.append(str(req))
    return lines


def manylinux_platforms(glibc):
    """pip --platform tags a glibc of that version accepts (pip takes no ranges)."""
    major, top = glibc
    tags = [f"manylinux_{major}_{minor}_x86_64" for minor in range(top, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def download_wheels(suite, dest, log):
    """Wheels (and pystemd's sdist) for the suite's python3, into dest, on the host."""
    reqs = guest_requirements(suite)
    pystemd = [r for r in reqs if Requirement(r).name == "pystemd"]
    binary = [r for r in reqs if Requirement(r).name != "pystemd"]
    target = ["--python-version", suite.python, "--implementation", "cp",
              "--abi", "cp" + suite.python.replace(".", "")]
    for tag in manylinux_platforms(suite.glibc):
        target += ["--platform", tag]
    pip = ["python3", "-m", "pip", "download", "--quiet", "--dest", str(dest)]
    # lxml and psutil are pystemd's own dependencies: binary wheels as well.
    _run([*pip, "--only-binary=:all:", *target, *binary, *BUILD_REQUIREMENTS, "lxml", "psutil"], log)
    _run([*pip, "--no-deps", "--no-binary=:all:", *pystemd], log)
    (Path(dest) / "requirements.txt").write_text("\n".join(reqs) + "\n")


# Inside the debootstrap tree: a venv of the guest's python3 and pip install offline. Far
# faster than under TCG, and pystemd still compiles against the guest's own libsystemd.
VENV_SCRIPT = """\
set -eu
root=$1 wheels=$2 venv=$3
mount -t proc proc "$root/proc"
mkdir -p "$root/tmp/wheels"
mount --bind "$wheels" "$root/tmp/wheels"
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root sh -euc "
python3 -m venv $venv
$venv/bin/pip install --no-index --find-links /tmp/wheels --no-cache-dir --no-warn-script-location -r /tmp/wheels/requirements.txt
$venv/bin/pip list --format=freeze > $venv/smx-requirements.txt
"
"""


def packages(suite):
    return PACKAGES + ([suite.own_kernel[0]] if suite.own_kernel else [])


def cache_key(kernel, suite=None):
    suite = suite or SUITES[DEFAULT_SUITE]
    if suite.own_kernel:  # the host's kernel goes nowhere near the image
        kernel_parts = ("=".join(suite.own_kernel), suite.codename)
    else:
        kernel_parts = (kernel.version, kernel.vmlinuz.read_bytes())
    h = hashlib.sha256()
    for part in (suite.name, " ".join(packages(suite)), " ".join(guest_requirements(suite)), kernel_parts[0],
                 Path(__file__).read_bytes(), AGENT.read_bytes(), kernel_parts[1]):
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def mounts_below(path):
    """Mount points at or under path, from this process's mount table."""
    prefix = str(Path(path).resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points


def _run(argv, log):
    with open(log, "ab") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = Path(log).read_text(errors="replace")[-3000:]
        raise BuildError(f"{argv[0]} exited {proc.returncode}; log {log}:\n{tail}")


def _write(root, relpath, text, mode=0o644):
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _customize(root, kernel):
    """kernel: the host's, whose modules are copied in; None when the tree has its own."""
    _write(root, "etc/fstab", FSTAB)
    _write(root, "etc/hostname", "smx-guest\n")
    _write(root, "etc/modules-load.d/smx.conf", MODULES_LOAD)
    _write(root, "etc/systemd/system/smx-agent.service", AGENT_UNIT)
    _write(root, "usr/local/sbin/smx-agent", AGENT.read_text(), 0o755)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "smx-agent.service").symlink_to("/etc/systemd/system/smx-agent.service")
    for unit in MASKED_UNITS:
        (root / "etc/systemd/system" / unit).symlink_to("/dev/null")
    (root / GUEST_PROJECT.lstrip("/")).mkdir()
    if kernel is not None:
        # On a merged-/usr tree write below usr/ rather than through the root/lib symlink.
        lib = "usr/lib" if (root / "lib").is_symlink() else "lib"
        shutil.copytree(kernel.modules, root / lib / "modules" / kernel.version, symlinks=True)


# What the own kernel's initrd must hold to mount root=/dev/vda (ext4 on virtio-blk over PCI);
# 9p and virtio_console load later, from the tree's /lib/modules (MODULES_LOAD).
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
TREE_MODULES = ("virtio_console", "9pnet_virtio", "9p")


def _take_own_kernel(suite, root, dest, log):
    """Check the tree's kernel is the pinned one and can boot the guest; copy its vmlinuz and
    initrd to dest (beside the image). Returns its version (uname -r)."""
    package, version = suite.own_kernel
    installed = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f=${Version}", package],
                               capture_output=True, text=True).stdout
    if installed != version:
        raise BuildError(f"{suite.codename} installed {package} {installed!r}, not the pinned {version!r}: "
                         f"update Suite({suite.name!r}).own_kernel")
    release = package.removeprefix("linux-image-")
    vmlinuz, initrd = root / f"boot/vmlinuz-{release}", root / f"boot/initrd.img-{release}"
    if not initrd.exists():
        raise BuildError(f"{package} left no {initrd} (initramfs-tools not run?); log {log}")
    listed = subprocess.run(["chroot", str(root), "lsinitramfs", f"/boot/initrd.img-{release}"],
                            capture_output=True, text=True, check=True).stdout
    # lib/modules/... or usr/lib/modules/...: name.ko, possibly compressed
    in_initrd = {Path(line).name.split(".ko")[0] for line in listed.splitlines() if ".ko" in line}
    missing = [m for m in INITRD_MODULES if m not in in_initrd]
    lib = root / ("usr/lib" if (root / "lib").is_symlink() else "lib") / "modules" / release
    missing += [f"{m} in {lib}" for m in TREE_MODULES if not list(lib.rglob(f"{m}.ko*"))]
    if missing:
        raise BuildError(f"{package} cannot boot the guest: missing {missing}")
    shutil.copy2(vmlinuz, dest / "vmlinuz")
    shutil.copy2(initrd, dest / "initrd.img")
    return release


def boot_kernel(suite, image):
    """The kernel a guest of suite boots: the host's, or the suite's own copied beside image."""
    suite = SUITES[suite] if isinstance(suite, str) else suite
    if not suite.own_kernel:
        return find_kernel()
    entry = Path(image).parent
    version = json.loads((entry / "meta.json").read_text())["kernel"]
    # modules: None, they are in the image
    return Kernel(version, entry / "vmlinuz", entry / "initrd.img", None)


def build(suite=DEFAULT_SUITE, cache_dir=CACHE_DIR, log=print):
    """Return the path of a cached image of suite for the current inputs, building it if needed."""
    suite = SUITES[suite]
    kernel = find_kernel()
    if kernel is None and not suite.own_kernel:
        raise BuildError("no Debian 6.1 kernel in /boot (apt-get install linux-image-amd64)")
    key = cache_key(kernel, suite)
    entry = cache_dir / f"{suite.name}-{key}"
    image = entry / "rootfs.img"
    if image.exists():  # complete entries are renamed into place, never written again
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{suite.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per suite at a time per machine
        if image.exists():
            return image
        work = cache_dir / f"{suite.name}-{key}.building"
        if mounts_below(work):
            raise BuildError(f"mounts left below {work}: {mounts_below(work)}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        root = work / "root"
        timings = {}
        mirror = apt_mirror()
        log(f"vm image: debootstrap {suite.codename} from {mirror} into {root}")
        start = time.monotonic()
        try:
            # A private mount namespace drops debootstrap's proc/sys mounts
            # even if it dies half way.
            _run(["unshare", "--mount", "--propagation", "private",
                  "debootstrap", "--variant=minbase", "--include=" + ",".join(packages(suite)),
                  suite.codename, str(root), mirror], work / "build.log")
        finally:
            if mounts_below(root):
                raise BuildError(f"mounts left below {root}: {mounts_below(root)}")
        timings["debootstrap_s"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        wheels = work / "wheels"
        wheels.mkdir()
        download_wheels(suite, wheels, work / "build.log")
        timings["download_s"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        try:
            _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", VENV_SCRIPT, "sh",
                  str(root), str(wheels), VENV], work / "build.log")
        finally:
            if mounts_below(root):
                raise BuildError(f"mounts left below {root}: {mounts_below(root)}")
        (root / "tmp/wheels").rmdir()
        installed = (root / VENV.lstrip("/") / "smx-requirements.txt").read_text().split()
        timings["venv_s"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        if suite.own_kernel:
            booted = _take_own_kernel(suite, root, work, work / "build.log")
            _customize(root, None)
        else:
            booted = kernel.version
            _customize(root, kernel)
        _run(["mkfs.ext4", "-q", "-F", "-L", "smx-root", "-d", str(root),
              str(work / "rootfs.img"), IMAGE_SIZE], work / "build.log")
        shutil.rmtree(root)
        timings["customize_mkfs_s"] = round(time.monotonic() - start, 1)
        meta = {"key": key, "suite": suite.name, "release": suite.codename, "packages": packages(suite),
                "mirror": mirror, "venv": VENV, "requirements": guest_requirements(suite),
                "installed": installed, "kernel": booted, "kernel_package": "=".join(suite.own_kernel),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S"), **timings}
        (work / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        work.rename(entry)
        for stale in cache_dir.iterdir():  # one image per suite: each is ~1 GiB
            if (stale.is_dir() and stale != entry and stale.name.startswith(suite.name + "-")
                    and not mounts_below(stale)):
                shutil.rmtree(stale)
        log(f"vm image: built {image} {timings}")
        return image
