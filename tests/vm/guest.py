"""Boot the guest image under QEMU (TCG) and run commands in it via the agent.

    with Guest(image, kernel, workdir) as vm:
        vm.run(["systemctl", "--version"]).stdout

The guest has no network (-nic none); the host talks to the agent through a
virtio-serial port backed by a unix socket in workdir.  The checkout is
shared read-only over 9p at /project, swap is a scratch virtio disk, and the
root disk is opened with snapshot=on so the cached image is never written.
`layout` picks the cgroup layout systemd boots (LAYOUT_ARGS); install_exporter()
pip-installs the checkout's wheel into the image's venv (image.VENV).
"""
import base64
import ctypes
import json
import re
import shlex
import signal
import socket
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .image import GUEST_PROJECT, PROJECT_TAG, VENV
from tests.processes import end

REPO = Path(__file__).resolve().parents[2]
KERNEL_ARGS = [
    "console=ttyS0", "root=/dev/vda", "rootfstype=ext4", "rw",
    "systemd.firstboot=off",  # never prompt on the console
    "panic=-1",  # with -no-reboot a kernel panic ends QEMU instead of hanging
]
# unified: cgroup v2 only; hybrid: v1 controllers plus cgroup2 at unified/ for tracking;
# legacy: all v1, systemd tracking in name=systemd (openEuler's -Ddefault-hierarchy=legacy).
LAYOUT_ARGS = {
    "unified": ["systemd.unified_cgroup_hierarchy=1"],
    "hybrid": ["systemd.unified_cgroup_hierarchy=0"],
    "legacy": ["systemd.unified_cgroup_hierarchy=0", "systemd.legacy_systemd_cgroup_controller=1"],
}
CGROUP_ROOT = "/sys/fs/cgroup"
EXPORTER = f"{VENV}/bin/systemd-memory-exporter"
VENV_PYTHON = f"{VENV}/bin/python"
# What the wheel is built from (pyproject.toml's packages and data-files), copied out of the
# checkout so the build leaves no build/ or egg-info behind in it.
WHEEL_INPUTS = ("pyproject.toml", "README.md", "exporter", "grafana", "deploy")
_FETCH = """\
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
    sys.stdout.buffer.write(r.read())
"""


class GuestError(RuntimeError):
    pass


def build_exporter_wheel(dest, repo=REPO):
    """The checkout as a wheel, built on the host (pure Python): what the guests pip-install."""
    dest = Path(dest)
    source = dest / "source"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for name in WHEEL_INPUTS:
        path = Path(repo) / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    # Build isolation: pyproject.toml's license string needs a newer setuptools than Debian's.
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--wheel-dir", str(dest), str(source)], capture_output=True, text=True)
    if built.returncode:
        raise GuestError(f"building the exporter's wheel failed:\n{built.stdout[-3000:]}{built.stderr[-3000:]}")
    shutil.rmtree(source)
    return next(dest.glob("systemd_memory_exporter-*.whl"))


def _die_with_parent():
    # QEMU gets SIGKILL if the test process dies without tearing down.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def wait_until(predicate, timeout, interval=0.5, what="condition"):
    """Poll predicate until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout} s")
        time.sleep(interval)


class Guest:
    def __init__(self, image, kernel, workdir, project_dir=REPO,
                 memory_mib=2048, cpus=2, swap_mib=1024, layout="unified", suite=None):
        # "unified+psi=0": a cgroup layout and one more kernel argument, for a guest only the
        # tests that name it run on (tests/vm/conftest.py).
        layout, _, extra_arg = layout.partition("+")
        if layout not in LAYOUT_ARGS:
            raise ValueError(f"layout must be one of {sorted(LAYOUT_ARGS)}: {layout!r}")
        self.layout = layout
        self.extra_kernel_args = [extra_arg] if extra_arg else []
        self.suite = suite  # image.Suite or None: what the tests expect of the guest
        self.image = Path(image)
        self.kernel = kernel
        self.workdir = Path(workdir)
        self.project_dir = Path(project_dir)
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.swap_mib = swap_mib
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.socket_path = self.workdir / "agent.sock"
        self.swap_path = self.workdir / "swap.img"
        self.proc = None
        self.boot_seconds = None
        self._conn = None
        self._buffer = bytearray()
        self._next_id = 0
        # One request in flight at a time: the scrape relay (tests/vm/relay.py) calls run()
        # from its own thread while a test calls it from the main one.
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------

    def qemu_argv(self):
        return [
            "qemu-system-x86_64", "-accel", "tcg",
            "-m", str(self.memory_mib), "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-nic", "none", "-no-reboot",
            "-kernel", str(self.kernel.vmlinuz), "-initrd", str(self.kernel.initrd),
            "-append", " ".join(KERNEL_ARGS + LAYOUT_ARGS[self.layout] + self.extra_kernel_args),
            "-serial", f"file:{self.console_log}",
            "-drive", f"file={self.image},format=raw,if=virtio,snapshot=on",
            "-drive", f"file={self.swap_path},format=raw,if=virtio",
            "-virtfs", f"local,path={self.project_dir},mount_tag={PROJECT_TAG},"
                       "security_model=none,readonly=on",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={self.socket_path}",
            "-device", "virtserialport,chardev=agent,name=smx.agent",
        ]

    def launch(self):
        """Start QEMU and take the agent connection; the guest is still booting."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.swap_path, "wb") as f:
            f.truncate(self.swap_mib << 20)
        subprocess.run(["mkswap", "-q", str(self.swap_path)], check=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            listener.listen(1)
            with open(self.qemu_log, "wb") as qemu_log:
                self.proc = subprocess.Popen(
                    self.qemu_argv(), stdin=subprocess.DEVNULL, stdout=qemu_log,
                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            # QEMU connects to us as soon as it has parsed its options.
            listener.settimeout(1)
            deadline = time.monotonic() + 60
            while self._conn is None:
                self._check_alive()
                try:
                    self._conn = listener.accept()[0]
                except socket.timeout:
                    if time.monotonic() > deadline:
                        raise GuestError("QEMU did not connect to the agent socket")
        finally:
            listener.close()

    def start(self, boot_timeout=900):
        """Boot and wait until the agent answers and systemd finished starting up."""
        started = time.monotonic()
        self.launch()
        hello = self._receive(lambda m: m.get("ready"), started + boot_timeout)
        if hello.get("kernel") != self.kernel.version:
            raise GuestError(f"guest runs kernel {hello.get('kernel')}, "
                             f"expected {self.kernel.version}")
        # "degraded" is fine: it only means some unit failed, tests check what they need.
        state = self.run(["systemctl", "is-system-running", "--wait"],
                         timeout=max(60, started + boot_timeout - time.monotonic()))
        if state.stdout.strip() not in ("running", "degraded"):
            raise GuestError(f"guest did not finish booting: {state.stdout!r}"
                             f"\n{self.console_tail()}")
        self.boot_seconds = round(time.monotonic() - started, 1)
        return self

    def close(self):
        """Stop QEMU (the guest disk is a throw-away snapshot, so no clean shutdown)."""
        if self._conn:
            self._conn.close()
            self._conn = None
        if self.proc and self.proc.poll() is None:
            end(self.proc, timeout=15)
        for path in (self.swap_path, self.socket_path):
            path.unlink(missing_ok=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc):
        self.close()

    def console_tail(self, chars=4000):
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        return f"--- last of {self.console_log} ---\n{text[-chars:]}"

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise GuestError(f"QEMU exited with {self.proc.returncode}: "
                             f"{self.qemu_log.read_text(errors='replace')[-2000:]}"
                             f"\n{self.console_tail()}")

    # -- agent protocol ------------------------------------------------------

    def _receive(self, wanted, deadline):
        """Read agent messages until wanted(message) is true."""
        while True:
            message = json.loads(self._read_line(deadline))
            if wanted(message):
                return message

    def _read_line(self, deadline):
        scanned = 0  # search only new data: replies can be megabytes long
        while (end := self._buffer.find(b"\n", scanned)) < 0:
            scanned = len(self._buffer)
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"no answer from the guest agent\n{self.console_tail()}")
            self._conn.settimeout(min(left, 5))
            try:
                chunk = self._conn.recv(1 << 16)
            except socket.timeout:
                continue
            if not chunk:
                raise GuestError(f"agent connection closed\n{self.console_tail()}")
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        return line

    def run(self, argv, *, timeout=60, input=None, check=False, cwd=None, env=None,
            text=True):
        """Run argv in the guest as root; returns subprocess.CompletedProcess.

        Raises subprocess.TimeoutExpired after timeout seconds (the guest kills
        the command's process group) and CalledProcessError with check=True.
        """
        with self._lock:
            self._next_id += 1
            request = {"id": self._next_id, "argv": [str(a) for a in argv],
                       "timeout": timeout, "cwd": cwd, "env": env}
            if input is not None:
                data = input.encode() if isinstance(input, str) else input
                request["input"] = base64.b64encode(data).decode()
            self._conn.sendall((json.dumps(request) + "\n").encode())
            # Allow for the agent's own latency under TCG on top of the command's timeout.
            reply = self._receive(lambda m: m.get("id") == request["id"],
                                  time.monotonic() + timeout + 60)
        if "error" in reply:
            raise GuestError(f"{shlex.join(request['argv'])}: {reply['error']}")
        out, err = (base64.b64decode(reply[k]) for k in ("stdout", "stderr"))
        if text:
            out, err = out.decode(errors="replace"), err.decode(errors="replace")
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(request["argv"], timeout, out, err)
        result = subprocess.CompletedProcess(request["argv"], reply["returncode"], out, err)
        if check:
            result.check_returncode()
        return result

    # -- conveniences for tests ------------------------------------------------

    def sh(self, script, **kwargs):
        """Run a shell snippet; check=True unless told otherwise."""
        kwargs.setdefault("check", True)
        return self.run(["sh", "-c", script], **kwargs)

    def read_text(self, path):
        return self.run(["cat", path], check=True).stdout

    def exists(self, path):
        return self.run(["test", "-e", path]).returncode == 0

    def fetch(self, url, timeout=30):
        """HTTP GET from inside the guest (e.g. the exporter's /metrics)."""
        return self.run(["python3", "-c", _FETCH, url, timeout],
                        timeout=timeout + 10, check=True).stdout

    def wait_for_url(self, url, timeout=60):
        """Body of the first successful GET of url, polling while nothing listens yet."""
        def attempt():
            try:
                return self.fetch(url, timeout=5)
            except subprocess.CalledProcessError:
                return None
        return wait_until(attempt, timeout, what=f"{url} answering")

    def start_unit(self, unit, argv, properties=(), cwd=GUEST_PROJECT, env=None):
        """Start argv as transient service `unit` (long-running; see stop_unit)."""
        options = [f"--unit={unit}", f"--working-directory={cwd}"]
        options += [f"--property={p}" for p in properties]
        options += [f"--setenv={k}={v}" for k, v in (env or {}).items()]
        self.run(["systemd-run", "--quiet", *options, "--", *argv], check=True)

    def stop_unit(self, unit):
        self.run(["systemctl", "stop", unit])
        self.run(["systemctl", "reset-failed", unit])

    def unit_property(self, unit, name):
        return self.run(["systemctl", "show", "--value", f"--property={name}", unit],
                        check=True).stdout.strip()

    def kernel_at_least(self, major, minor):
        """The guest's kernel is major.minor or newer: which v2 files and keys it has (memory.peak
        came in 5.19, memory.stat's "kernel" in 5.18; bullseye510 boots 5.10)."""
        return tuple(int(n) for n in re.findall(r"\d+", self.kernel.version)[:2]) >= (major, minor)

    @property
    def memory_root(self):
        """Where the memory controller's files are: the v2 root, or the v1 memory hierarchy."""
        return CGROUP_ROOT if self.layout == "unified" else CGROUP_ROOT + "/memory"

    @property
    def procs_root(self):
        """The hierarchy systemd tracks processes in (cgroup.procs of every unit)."""
        return {"unified": CGROUP_ROOT, "hybrid": CGROUP_ROOT + "/unified",
                "legacy": CGROUP_ROOT + "/systemd"}[self.layout]

    def cgroup_dir(self, unit, root=None):
        """The unit's cgroup directory in the guest under root (default: where its processes
        are listed), e.g. /sys/fs/cgroup/system.slice/x.service."""
        group = self.unit_property(unit, "ControlGroup")
        if not group:
            raise GuestError(f"{unit} has no cgroup (not running?)")
        return (root or self.procs_root) + group

    def memory_dir(self, unit):
        return self.cgroup_dir(unit, self.memory_root)

    def install_exporter(self, wheel, timeout=600):
        """pip install the wheel into the image's venv, offline: its dependencies (pystemd
        built against the guest's libsystemd) are there already, and pip checks they fit."""
        wheel = Path(wheel)
        target = f"/var/tmp/{wheel.name}"
        self.run(["sh", "-c", f"cat > {target}"], input=wheel.read_bytes(), check=True)
        return self.run([f"{VENV}/bin/pip", "install", "--no-index", "--no-cache-dir",
                         "--disable-pip-version-check", "--no-warn-script-location", target],
                        timeout=timeout, check=True)

    def journal(self, unit, lines=50):
        return self.run(["journalctl", "--no-pager", "-n", str(lines), "-u", unit]).stdout
