"""A throwaway real systemd (252, cgroup v1: hybrid or legacy) booted in private namespaces.

``layout="hybrid"`` (default, the machine's own): every v1 hierarchy plus cgroup2 at
``unified/``. ``layout="legacy"``: no cgroup2 mount inside and PID 1 started with
LEGACY_ARGS, the all-v1 layout openEuler's systemd defaults to (in a container systemd reads
"kernel command line" options from its own argv, and without them it mounts cgroup2 itself).

Layout (see NOTES.md): the host gets its own cgroup ``th-…`` in every v1
hierarchy except cpuset and in the unified one, its own PID/mount/cgroup/UTS/IPC
namespaces, and a root that is an overlay of the machine's / on a tmpfs.  The
machine's /proc/sys, sysfs and devices are not writable from inside, kernel-
touching units are masked and generators are disabled, because an earlier
attempt to boot systemd on the machine's own root wiped /tmp.

Cleanup is layered so nothing outlives the test session:
  * stop() (context manager, pytest fixture) kills the host's PID 1, which ends
    every process in its PID namespace and with it the mount namespace;
  * atexit and SIGTERM/SIGHUP handlers call stop() for every live host;
  * the launcher runs with PDEATHSIG=KILL and ``unshare --kill-child``, so even a
    SIGKILLed test run takes the host down with it;
  * cleanup_stale() removes cgroups and state dirs left by crashed runs.
Only the standard library is used.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Sequence

PREFIX = "th-"
STATE_ROOT = Path("/var/tmp")  # real disk: the data dir must give real page cache
CGROUP_ROOT = Path("/sys/fs/cgroup")
SYSTEMD = "/lib/systemd/systemd"
TARGET = "th-host.target"
REPO_ROOT = Path(__file__).resolve().parents[2]
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LAYOUTS = ("hybrid", "legacy")
LEGACY_ARGS = ("systemd.unified_cgroup_hierarchy=0", "systemd.legacy_systemd_cgroup_controller=1")

# Units that would touch kernel or machine-wide state (sysctls, modules, udev,
# devices, clock, network, disks) or are pointless in a container.  They are
# masked even where ConditionVirtualization would skip them, to be safe.
MASKED_UNITS = (
    # kernel state
    "systemd-sysctl.service", "systemd-modules-load.service", "kmod-static-nodes.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    "systemd-random-seed.service", "systemd-pstore.service", "systemd-journald-audit.socket",
    "sys-kernel-config.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount",
    # devices and udev
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service", "systemd-hwdb-update.service",
    "systemd-tmpfiles-setup-dev.service", "systemd-rfkill.service", "systemd-rfkill.socket",
    "systemd-backlight@.service",
    # tmpfiles (what wiped /tmp before) -- harmless in the overlay, masked anyway
    "systemd-tmpfiles-setup.service", "systemd-tmpfiles-clean.service", "systemd-tmpfiles-clean.timer",
    # disks and filesystems
    "systemd-remount-fs.service", "systemd-fsck-root.service", "systemd-fsck@.service",
    "systemd-fsckd.service", "systemd-fsckd.socket", "systemd-growfs-root.service",
    "systemd-growfs@.service", "systemd-makefs@.service", "systemd-repart.service",
    "systemd-quotacheck.service", "quotaon.service", "systemd-sysext.service",
    "e2scrub_all.timer", "e2scrub_all.service", "e2scrub_reap.service",
    # clock, network, logins, bus-activatable daemons acting on the machine
    "systemd-timesyncd.service", "systemd-timedated.service", "systemd-networkd.service",
    "systemd-networkd.socket", "systemd-networkd-wait-online.service", "systemd-resolved.service",
    "systemd-logind.service", "systemd-hostnamed.service", "polkit.service", "packagekit.service",
    # first-boot / TPM / console bits that make no sense here
    "systemd-firstboot.service", "systemd-machine-id-commit.service", "systemd-sysusers.service",
    "systemd-pcrphase.service", "systemd-pcrphase-sysinit.service", "systemd-update-utmp.service",
    "systemd-ask-password-console.path", "systemd-ask-password-wall.path",
)

TARGET_UNIT = """\
[Unit]
Description=systemd-memory-exporter test host
Wants=dbus.socket dbus.service
After=dbus.service
"""

JOURNALD_CONF = """\
[Journal]
# keep the journal in the host's /run; never read the machine's kernel log
Storage=volatile
ReadKMsg=no
"""

# PID 1 logs and prints status by reopening /dev/console and insists on a tty.
# This makes /dev/console a pty of the host's own devpts and copies its output to
# stdout (console.log) from a background process that lives and dies with the host.
CONSOLE_READER = """\
import os, subprocess, tty
master, slave = os.openpty()
tty.setraw(slave)  # no \\r\\n translation in the log
subprocess.run(["mount", "--bind", os.ttyname(slave), "/dev/console"], check=True)
if os.fork() == 0:
    os.setsid()
    while True:  # keeping slave open means reads never fail with EIO between writers
        os.write(1, os.read(master, 65536))
"""

_live_hosts: set["TestHost"] = set()
_seq = itertools.count(1)
_handlers_installed = False


class HostError(RuntimeError):
    """The test host could not be booted or used."""


class HostUnavailable(HostError):
    """This machine cannot run a test host (not root, no cgroup v1 memory, ...)."""


class HostCommandError(subprocess.CalledProcessError):
    """A command inside the host failed; str() includes its output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


class HostProcess(subprocess.Popen):
    """Popen of ``nsenter … CMD``.

    nsenter forks CMD into the host's PID namespace and does not forward
    signals, so send_signal()/terminate()/kill() are aimed at CMD itself.
    """

    def inner_child(self, wait: float = 2.0) -> int | None:
        """PID (as seen from outside) of the command inside, None if gone."""
        deadline = time.monotonic() + wait
        while True:
            child = _child_of(self.pid)
            if child or self.poll() is not None or time.monotonic() > deadline:
                return child
            time.sleep(0.005)

    @property
    def inner_pid(self) -> int | None:
        """PID of the command as seen inside the host."""
        child = self.inner_child()
        return _ns_pid(child) if child else None

    def send_signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        child = self.inner_child()
        try:
            os.kill(child or self.pid, sig)
        except ProcessLookupError:
            pass


class TestHost:
    """A booted systemd in its own namespaces; use as a context manager.

    Paths bound into the host at the same path as outside: the checkout
    (``checkout``), a data dir on the real disk (``data_dir``, real page cache)
    and an exchange dir (``exchange_dir``); plus ``extra_binds`` given as
    ``path`` or ``(outside, inside)``.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, name: str = "host", extra_binds: Iterable[str | tuple[str, str]] = (),
                 checkout: str | Path = REPO_ROOT, layout: str = "hybrid"):
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise ValueError(f"host name must match [A-Za-z0-9_.]+: {name!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}: {layout!r}")
        self.layout = layout
        self.name = f"{PREFIX}{name}-{os.getpid()}-{next(_seq)}"
        self.checkout = Path(checkout).resolve()
        self.state_dir = STATE_ROOT / self.name
        self.data_dir = self.state_dir / "data"
        self.exchange_dir = self.state_dir / "exchange"
        self.console_log = self.state_dir / "console.log"
        self.python = sys.executable  # the lower layer has it, with pystemd etc.
        self.binds: list[tuple[str, str]] = [(str(self.checkout), str(self.checkout)),
                                             (str(self.data_dir), str(self.data_dir)),
                                             (str(self.exchange_dir), str(self.exchange_dir))]
        for b in extra_binds:
            src, dst = (b, b) if isinstance(b, (str, Path)) else b
            self.binds.append((os.path.realpath(src), str(dst)))
        self.pid: int | None = None  # the host's systemd (PID 1 inside), as seen outside
        self.boot_seconds: float | None = None
        self.hierarchies = _hierarchies()
        self._launcher: subprocess.Popen | None = None
        self._children: list[HostProcess] = []
        self._owned = True
        self._lock = threading.RLock()  # a signal handler may stop() while stop() runs

    # ---------------------------------------------------------------- checks
    @staticmethod
    def unavailable_reason() -> str | None:
        """Why a host cannot be booted here, or None if it can."""
        if os.geteuid() != 0:
            return "the test host needs root"
        for tool in ("unshare", "nsenter", "setpriv", "pivot_root", "mknod", "mount"):
            if not shutil.which(tool, path=INNER_PATH):
                return f"{tool} (util-linux) is not installed"
        if not os.access(SYSTEMD, os.X_OK):
            return f"{SYSTEMD} is missing"
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "overlayfs is not available"
        h = _hierarchies()
        if "memory" not in h:
            return "no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory (cgroup v2-only machine?)"
        if "systemd" not in h or "unified" not in h:
            return "cgroup layout is not the hybrid one (need name=systemd and unified at /sys/fs/cgroup)"
        return None

    @classmethod
    def available(cls) -> bool:
        return cls.unavailable_reason() is None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "TestHost":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> "TestHost":
        """Boot and wait until ``systemctl is-system-running`` is running/degraded."""
        reason = self.unavailable_reason()
        if reason:
            raise HostUnavailable(reason)
        _install_cleanup_hooks()
        _live_hosts.add(self)
        t0 = time.monotonic()
        try:
            self._prepare_state()
            self._create_cgroups()
            self._launch()
            self._wait_booted(t0 + timeout)
        except BaseException as e:
            diag = self.diagnostics()
            self.stop()
            if isinstance(e, HostError):
                raise HostError(f"{e}\n{diag}") from None
            raise
        self.boot_seconds = time.monotonic() - t0
        self._write_json("host.json", {"name": self.name, "pid": self.pid, "owner": _proc_identity(os.getpid()),
                                       "checkout": str(self.checkout), "data_dir": str(self.data_dir),
                                       "exchange_dir": str(self.exchange_dir), "python": self.python,
                                       "layout": self.layout})
        return self

    def stop(self) -> None:
        """Kill everything in the host and remove its cgroups and state dir. Idempotent."""
        if not self._owned:
            raise HostError("this host was attached to, not started here; stop it where it was started")
        with self._lock:
            # PID 1 of the namespace (systemd, or setup.sh if boot failed early): when it
            # dies the kernel kills the rest.  unshare then reaps it and exits; killing
            # unshare first would orphan PID 1 instead.
            init = self.pid or (self._launcher and _child_of(self._launcher.pid))
            if init:
                _kill(init, signal.SIGKILL)
            if self._launcher:
                _reap(self._launcher)
                _kill(self._launcher.pid, signal.SIGKILL)
                _reap(self._launcher)
            _wait_gone(init)
            for p in self._children:
                _reap(p)
            _destroy(self.name, self.hierarchies)
            self.pid = self._launcher = None
            self._children.clear()
            _live_hosts.discard(self)

    @classmethod
    def attach(cls, name: str) -> "TestHost":
        """A handle on a host booted by another process (e.g. ``python -m tests.testhost boot``)."""
        info = json.loads((STATE_ROOT / name / "host.json").read_text())
        host = cls(checkout=info["checkout"], layout=info.get("layout", "hybrid"))
        host.name, host.pid, host._owned = name, info["pid"], False
        host.state_dir = STATE_ROOT / name
        host.data_dir, host.exchange_dir = Path(info["data_dir"]), Path(info["exchange_dir"])
        host.console_log = host.state_dir / "console.log"
        if not _alive(host.pid):
            raise HostError(f"host {name} is not running")
        return host

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Remove hosts left by crashed runs: those whose owning process is gone.

        Hosts of live processes (another test session) are left alone.  Only
        processes inside the stale host's own cgroups are killed.
        """
        names = {p.name for p in STATE_ROOT.glob(PREFIX + "*") if _NAME_RE.fullmatch(p.name)}
        for hierarchy in _hierarchies().values():
            names |= {p.name for p in hierarchy.glob(PREFIX + "*") if _NAME_RE.fullmatch(p.name)}
        stale = sorted(n for n in names if not _owner_alive(n))
        for name in stale:
            _destroy(name, _hierarchies())
        return stale

    # ----------------------------------------------------------- run inside
    def popen(self, cmd: Sequence[str], *, cwd: str | Path | None = None, env: dict[str, str] | None = None,
              **popen_kw) -> HostProcess:
        """Start ``cmd`` inside the host (its cgroups and namespaces); returns a HostProcess.

        The environment is clean (PATH with this Python first, HOME, LANG) plus
        ``env``; cwd defaults to the checkout.  Extra keywords go to Popen.
        """
        if not self.pid or not _alive(self.pid):
            raise HostError(f"host {self.name} is not running")
        inner_env = {"PATH": f"{os.path.dirname(self.python)}:{INNER_PATH}", "HOME": "/root",
                     "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", **(env or {})}
        argv = ["/bin/sh", str(self.state_dir / "enter.sh"), "env", "-i", "-C", str(cwd or self.checkout),
                *(f"{k}={v}" for k, v in inner_env.items()), *cmd]
        proc = HostProcess(argv, **popen_kw)
        self._children = [p for p in self._children if p.poll() is None] + [proc]
        return proc

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float | None = 60, input: str | None = None,
            *, cwd: str | Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the host and capture its output (text).

        On timeout the command inside is killed and TimeoutExpired raised; with
        check, a non-zero exit raises HostCommandError.
        """
        proc = self.popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
        if check and proc.returncode:
            raise HostCommandError(proc.returncode, list(cmd), out, err)
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit as a dict."""
        out = self.systemctl("show", *(f"--property={p}" for p in props), "--", unit)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    # --------------------------------------------------- files and cgroups
    def path(self, inside: str | Path) -> Path:
        """Outside path of a file inside the host (through /proc/PID/root)."""
        return Path(f"/proc/{self.pid}/root") / str(inside).lstrip("/")

    def write_file(self, inside: str | Path, text: str) -> None:
        p = self.path(inside)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    @property
    def procs_hierarchy(self) -> str:
        """Where systemd tracks processes inside: cgroup2 on hybrid, name=systemd on legacy."""
        return "systemd" if self.layout == "legacy" else "unified"

    def cgroup_dir(self, controller: str = "memory") -> Path:
        """The host's root cgroup on the machine (= /sys/fs/cgroup/<controller> inside)."""
        return self.hierarchies[controller] / self.name

    def unit_cgroup(self, unit: str) -> str:
        """The unit's ControlGroup, relative to the host's root cgroup."""
        cg = self.show(unit, "ControlGroup").get("ControlGroup", "")
        if not cg:
            raise HostError(f"{unit} has no control group")
        return cg

    def cgroup_file(self, unit: str, name: str, controller: str = "memory") -> str:
        """Contents of a cgroup file of a unit, read inside the host."""
        return self.path(f"/sys/fs/cgroup/{controller}{self.unit_cgroup(unit)}/{name}").read_text()

    def memory_stat(self, unit: str) -> dict[str, int]:
        """The unit's v1 memory.stat as a dict (bytes)."""
        return {k: int(v) for k, v in (line.split() for line in self.cgroup_file(unit, "memory.stat").splitlines())}

    def console(self) -> str:
        """What the host's systemd wrote to its console (and setup errors); "" if none."""
        try:
            return self.console_log.read_text(errors="replace").replace("\r", "")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        """Console tail and, if the host is up, journal and failed units -- for error messages."""
        lines = self.console().splitlines()
        parts = [f"--- console ({self.console_log}), last 60 lines:\n" + "\n".join(lines[-60:])]
        if self.pid and _alive(self.pid):
            for cmd in (["systemctl", "--no-pager", "list-units", "--failed"],
                        ["systemctl", "--no-pager", "list-jobs"],
                        ["journalctl", "--no-pager", "-b", "-n", "80"]):
                try:
                    r = self.run(cmd, check=False, timeout=10)
                    parts.append(f"--- {' '.join(cmd)}:\n{r.stdout}{r.stderr}")
                except (OSError, subprocess.SubprocessError, HostError) as e:
                    parts.append(f"--- {' '.join(cmd)}: {e}")
        return "\n".join(parts)

    # ------------------------------------------------------------ internals
    def _prepare_state(self) -> None:
        self.state_dir.mkdir()
        self.data_dir.mkdir()
        self.exchange_dir.mkdir()
        self.exchange_dir.chmod(0o1777)  # sandboxed / DynamicUser units may leave results here
        (self.state_dir / "ovl").mkdir()
        self._write_json("owner.json", _proc_identity(os.getpid()))
        units = self.state_dir / "units"
        units.mkdir()
        (units / TARGET).write_text(TARGET_UNIT)
        for unit in MASKED_UNITS:
            (units / unit).symlink_to("/dev/null")
        rootfs = self.state_dir / "rootfs"
        (rootfs / "etc/systemd/journald.conf.d").mkdir(parents=True)
        (rootfs / "etc/systemd/journald.conf.d/th.conf").write_text(JOURNALD_CONF)
        (rootfs / "etc/fstab").write_text("# test host: nothing to mount\n")
        (rootfs / "etc/hostname").write_text(self.name + "\n")
        (rootfs / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        (self.state_dir / "setup.sh").write_text(self._setup_script())

    def _write_enter_script(self) -> None:
        """enter.sh CMD...: join the host's root cgroups (so CMD is accounted inside
        the host and dies with it), then enter its namespaces and root.  No forks
        before nsenter: HostProcess relies on nsenter's only child being CMD."""
        (self.state_dir / "enter.sh").write_text(
            f'for f in {self._procs_files()}; do echo $$ > "$f" || exit 125; done\n'
            f'exec nsenter -t {self.pid} -a -r -w -- "$@"\n')

    def _procs_files(self) -> str:
        return " ".join(shlex.quote(str(h / self.name / "cgroup.procs")) for h in self.hierarchies.values())

    def _create_cgroups(self) -> None:
        for h in self.hierarchies.values():
            cg = h / self.name
            cg.mkdir()
            for knob in ("cpuset.cpus", "cpuset.mems"):  # empty in a new cpuset: no task could join
                if (h / knob).exists():
                    (cg / knob).write_text((h / knob).read_text())

    def _launch(self) -> None:
        launcher = (f'for f in {self._procs_files()}; do echo $$ > "$f" || exit 125; done\n'
                    "exec unshare --fork --kill-child=SIGKILL --pid --mount --cgroup --uts --ipc "
                    f"/bin/sh -eu {shlex.quote(str(self.state_dir / 'setup.sh'))}\n")
        with open(self.console_log, "ab") as console:
            # PDEATHSIG: if this Python process (thread) dies, the launcher gets SIGKILL, and
            # --kill-child passes that on to the host's PID 1.  New session: terminal ^C stays out.
            self._launcher = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "/bin/sh", "-c", launcher],
                                              stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                              start_new_session=True)

    def _wait_booted(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            if self._launcher.poll() is not None:
                raise HostError(f"host {self.name} exited during boot (rc={self._launcher.returncode})")
            if not self.pid:
                self.pid = self._find_systemd()
                if self.pid:
                    self._write_enter_script()
            if self.pid:
                r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = r.stdout.strip()
                if state in ("running", "degraded"):
                    return
                if state in ("maintenance", "stopping"):
                    raise HostError(f"host {self.name} boot failed: is-system-running={state}")
            time.sleep(0.05)
        raise HostError(f"host {self.name} did not finish booting in time (is-system-running={state or '?'})")

    def _find_systemd(self) -> int | None:
        """The launcher's child once it has exec'd systemd (it runs setup.sh first)."""
        child = _child_of(self._launcher.pid)
        try:
            if child and Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                return child
        except OSError:
            pass
        return None

    def _setup_script(self) -> str:
        """Runs as PID 1 of the new namespaces; builds the root and execs systemd."""
        q = shlex.quote
        ovl = q(str(self.state_dir / "ovl"))
        lines = [
            "# Generated by tests/testhost/host.py. Runs inside fresh PID/mount/cgroup/UTS/IPC namespaces.",
            "mount --make-rprivate /",  # nothing we mount may propagate to the machine
            f"mount -t tmpfs -o mode=755 th-ovl {ovl}",
            f"mkdir {ovl}/upper {ovl}/work {ovl}/root",
            f"mount -t overlay -o lowerdir=/,upperdir={ovl}/upper,workdir={ovl}/work th-root {ovl}/root",
            f"cd {ovl}/root",
            f"cp -a {q(str(self.state_dir / 'rootfs'))}/. .",
            # our unit dir replaces the machine's /etc/systemd/system (no enabled services, masks)
            "mount -t tmpfs -o mode=755 th-units etc/systemd/system",
            f"cp -a {q(str(self.state_dir / 'units'))}/. etc/systemd/system/",
            # a private /dev: no disks, no kmsg, no machine /dev/shm
            "mount -t tmpfs -o mode=755,nosuid th-dev dev",
            "mknod -m 666 dev/null c 1 3; mknod -m 666 dev/zero c 1 5; mknod -m 666 dev/full c 1 7",
            "mknod -m 666 dev/random c 1 8; mknod -m 666 dev/urandom c 1 9; mknod -m 666 dev/tty c 5 0",
            "ln -s /proc/self/fd dev/fd; ln -s /proc/self/fd/0 dev/stdin",
            "ln -s /proc/self/fd/1 dev/stdout; ln -s /proc/self/fd/2 dev/stderr",
            "touch dev/console",  # mount point for the console pty, see CONSOLE_READER
            "mkdir dev/pts dev/shm dev/mqueue",
            "mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts dev/pts; ln -s pts/ptmx dev/ptmx",
            "mount -t tmpfs -o mode=1777,nosuid,nodev th-shm dev/shm",
            # proc of the new PID namespace; kernel tunables read-only
            "mount -t proc -o nosuid,nodev,noexec proc proc",
            "for p in sys sysrq-trigger irq bus fs acpi scsi; do",
            "  [ -e proc/$p ] || continue",
            "  mount --bind proc/$p proc/$p; mount -o remount,bind,ro proc/$p proc/$p",
            "done",
            "mount --bind dev/null proc/kmsg",  # reading /proc/kmsg would steal the machine's kernel log
            "mount -t sysfs -o ro,nosuid,nodev,noexec sysfs sys",
            # cgroups: thanks to the cgroup namespace each mount is rooted at our th-… cgroup
            "mount -t tmpfs -o mode=755,nosuid,nodev,noexec th-cgroup sys/fs/cgroup",
        ]
        for dirname, (fstype, opts) in _mount_specs().items():
            if self.layout == "legacy" and fstype == "cgroup2":
                continue  # legacy: v1 hierarchies only
            lines.append(f"mkdir sys/fs/cgroup/{dirname}; mount -t {fstype} -o {opts} cgroup sys/fs/cgroup/{dirname}")
        for link, target in _cgroup_symlinks().items():
            lines.append(f"ln -s {q(target)} sys/fs/cgroup/{q(link)}")
        lines += [
            "mount -t tmpfs -o mode=755,nosuid,nodev th-run run",
            "mount -t tmpfs -o mode=1777,nosuid,nodev th-tmp tmp",
        ]
        for src, dst in self.binds:
            lines.append(f"mkdir -p ./{q(dst)}; mount --rbind {q(src)} ./{q(dst)}")
        lines += [
            # switch root and drop every view of the machine's mounts
            "mkdir .th-oldroot; pivot_root . .th-oldroot; cd /",
            "umount -l /.th-oldroot; rmdir /.th-oldroot",
            f"/usr/bin/python3 -c {q(CONSOLE_READER)}",
            # empty generator path: no fstab/sysv/getty units from the machine's config
            f"exec env -i container={q(self.name)} SYSTEMD_COLORS=0 SYSTEMD_GENERATOR_PATH=/run/th-no-generators "
            f"{SYSTEMD} --system --unit={TARGET}" + "".join(
                f" {arg}" for arg in (LEGACY_ARGS if self.layout == "legacy" else ())),
        ]
        return "\n".join(lines) + "\n"

    def _write_json(self, name: str, data: dict) -> None:
        (self.state_dir / name).write_text(json.dumps(data, indent=1) + "\n")

    def __repr__(self) -> str:
        return f"<TestHost {self.name} pid={self.pid}>"


# ------------------------------------------------------------------ helpers
_NAME_RE = re.compile(re.escape(PREFIX) + r"[A-Za-z0-9_.]+-(\d+)-\d+")


def _cgroup_mounts() -> dict[str, tuple[Path, str, list[str]]]:
    """Cgroup hierarchies mounted at /sys/fs/cgroup/<name>: name -> (mount point, fstype, super options)."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        mountpoint, fstype = Path(fields[4]), fields[sep + 1]
        if mountpoint.parent == CGROUP_ROOT and fstype in ("cgroup", "cgroup2"):
            found[mountpoint.name] = (mountpoint, fstype, fields[sep + 3].split(","))
    return found


def _hierarchies() -> dict[str, Path]:
    """The hierarchies a host gets a cgroup in: all of them, cpuset included --
    systemd mounts every hierarchy listed in /proc/cgroups, and one without a
    host cgroup would show the machine's root cgroup inside."""
    return {name: mount[0] for name, mount in _cgroup_mounts().items()}


def _mount_specs() -> dict[str, tuple[str, str]]:
    """How to mount each hierarchy inside: (fstype, options) with the same controllers / name."""
    specs = {}
    for name, (_, fstype, superopts) in _cgroup_mounts().items():
        if fstype == "cgroup2":
            specs[name] = ("cgroup2", "nosuid,nodev,noexec")
            continue
        # controllers and name=; flags like xattr or release_agent= are the machine's business
        keep = [o for o in superopts if o.startswith("name=")
                or ("=" not in o and o not in ("rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode",
                                                "favordynmods"))]
        if all(o.startswith("name=") for o in keep):
            keep.insert(0, "none")  # a named hierarchy without controllers, like name=systemd
        specs[name] = ("cgroup", ",".join(["nosuid,nodev,noexec", *keep]))
    return specs


def _cgroup_symlinks() -> dict[str, str]:
    """Symlinks like cpu -> cpu,cpuacct in /sys/fs/cgroup, replicated inside."""
    return {p.name: os.readlink(p) for p in CGROUP_ROOT.iterdir() if p.is_symlink()}


def _proc_identity(pid: int) -> dict:
    """pid plus start time, so a reused pid is not mistaken for the owner."""
    return {"pid": pid, "start": Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]}


def _owner_alive(name: str) -> bool:
    try:
        owner = json.loads((STATE_ROOT / name / "owner.json").read_text())
    except (OSError, ValueError):
        owner = {"pid": int(_NAME_RE.fullmatch(name).group(1)), "start": None}
    try:
        identity = _proc_identity(owner["pid"])
    except OSError:
        return False
    return owner["start"] is None or identity["start"] == owner["start"]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _child_of(pid: int) -> int | None:
    """The (first) child of a single-threaded process, None if it has none or is gone."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _wait_gone(pid: int | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _ns_pid(pid: int) -> int | None:
    """The innermost PID of a process (its PID inside its PID namespace)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        pass
    return None


def _cgroup_pids(top: Path) -> set[int]:
    pids = set()
    for dirpath, _dirs, _files in os.walk(top):
        try:
            pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
        except OSError:
            pass
    return pids


def _destroy(name: str, hierarchies: dict[str, Path], timeout: float = 15.0) -> None:
    """Kill the processes in a host's cgroups, remove the cgroups depth-first, drop its state dir."""
    tops = [h / name for h in hierarchies.values() if (h / name).is_dir()]
    deadline = time.monotonic() + timeout
    # A host's PID 1 first: the kernel then ends its whole PID namespace.  Everything
    # else in these cgroups is ours too (launcher, nsenter) and gets SIGKILL as well.
    pids = set().union(*(_cgroup_pids(t) for t in tops)) if tops else set()
    for pid in sorted(pids, key=lambda p: _ns_pid(p) != 1):
        _kill(pid, signal.SIGKILL)
    for top in tops:
        while True:
            try:
                for dirpath, _dirs, _files in os.walk(top, topdown=False):
                    os.rmdir(dirpath)
                break
            except FileNotFoundError:
                continue  # a parallel walk step raced with rmdir; walk again
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise HostError(f"cannot remove cgroup {top}: {e}; processes: {sorted(_cgroup_pids(top))}")
                for pid in _cgroup_pids(top):
                    _kill(pid, signal.SIGKILL)  # e.g. an nsenter that raced with the kill above
                time.sleep(0.05)
    state = STATE_ROOT / name
    if state.is_dir() and not os.path.ismount(state):
        shutil.rmtree(state, ignore_errors=True)


def _stop_all() -> None:
    for host in list(_live_hosts):
        try:
            host.stop()
        except Exception as e:  # keep going: every host must get its chance
            print(f"testhost: cleanup of {host.name} failed: {e}", file=sys.stderr)


def _on_signal(signum, frame) -> None:
    _stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_cleanup_hooks() -> None:
    """atexit plus SIGTERM/SIGHUP (and SIGINT if nobody handles it) -> stop all hosts.

    Python's own SIGINT handler raises KeyboardInterrupt, which unwinds through
    the context managers and fixtures, so it is left in place.
    """
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _on_signal)
