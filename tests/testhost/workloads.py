"""Workloads for the test host: units started inside it with systemd-run.

Every function takes a started TestHost, returns the unit name(s) exactly as
systemd spells them, and returns only once the workload has reached its steady
state (the payload signals READY=1 with Type=notify, so systemd-run waits).
Payloads use only python3 and coreutils.  Stop units with stop_units().
"""

from __future__ import annotations

import itertools
import mmap
import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .host import HostCommandError, HostError, TestHost

MiB = 1 << 20
_seq = itertools.count(1)

# Run as `python3 -c PAYLOAD MODE ARGS...`.  Kept free of "$" and "%", which
# systemd would expand in ExecStart=.
PAYLOAD = r'''
import mmap, os, signal, socket, sys, time

MiB = 1 << 20

def notify_ready():
    if "READY_FILE" in os.environ:  # a scope (systemd-run --scope) has no notify socket
        open(os.environ["READY_FILE"], "w").close()
        return
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(b"READY=1")

def hold_anon(mib):
    buf = bytearray(mib * MiB)
    for i in range(0, len(buf), 4096):  # touch every page so it is really allocated
        buf[i] = 1
    return buf

def read_file(path):
    # drop whatever is cached (and charged to other cgroups) so our reads charge us
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    while os.read(fd, MiB):
        pass
    os.close(fd)

def keep_warm(path):
    # This machine's kernel runs a DAMON pageout scheme (kdamond: regions idle for 12 x 5 s
    # aggregation intervals are paged out), which drops page cache nobody touches for a
    # minute. Re-read the cached file well within that, so its pages stay charged to us.
    while True:
        time.sleep(15)
        with open(path, "rb", buffering=0) as f:
            while f.read(MiB):
                pass

def write_shm(path, mib, mapped):
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(b"\xa5" * MiB)
    if mapped:  # map and fault in every page: then it shows as RssShmem too
        f = open(path, "r+b")
        m = mmap.mmap(f.fileno(), 0)
        sum(m[i] for i in range(0, len(m), 4096))
        return f, m
    return None

def fork_holders(children, mib):
    r, w = os.pipe()
    for _ in range(children):
        if os.fork() == 0:
            keep = hold_anon(mib)
            os.write(w, b"x")
            while True:
                signal.pause()
    for _ in range(children):
        os.read(r, 1)

mode, args = sys.argv[1], sys.argv[2:]
if mode == "anon":
    keep = hold_anon(int(args[0]))
elif mode == "read":
    read_file(args[0])
elif mode == "shm":
    keep = write_shm(args[0], int(args[1]), args[2] == "mapped")
elif mode == "multi":
    fork_holders(int(args[0]), int(args[1]))
notify_ready()
if mode == "read":
    keep_warm(args[0])
while True:
    signal.pause()
'''


# ------------------------------------------------------------------ basics
def start_unit(host: TestHost, unit: str, cmd: Sequence[str], *, properties: Iterable[str] = (),
               slice: str | None = None, notify: bool = False, description: str | None = None,
               timeout: float = 60) -> str:
    """systemd-run a transient service with MemoryAccounting=yes; waits for it to be started
    (with notify, until the payload sent READY=1).  Returns the unit name."""
    args = ["systemd-run", "--quiet", "--collect", f"--unit={unit}", "-p", "MemoryAccounting=yes",
            f"--description={description or 'test host workload: ' + ' '.join(cmd)}",
            "-p", f"TimeoutStartSec={int(timeout)}", "-p", f"Type={'notify' if notify else 'exec'}"]
    if slice:
        args.append(f"--slice={slice}")
    for prop in properties:
        args += ["-p", prop]
    try:
        host.run([*args, "--", *cmd], timeout=timeout + 10)
    except HostCommandError as e:
        journal = host.run(["journalctl", "--no-pager", "-b", "-n", "40", "-u", unit], check=False).stdout
        raise HostError(f"starting {unit} failed: {e.stderr.strip()}\n{journal}") from None
    return unit


def payload(host: TestHost, unit: str, mode: str, *args: object, **kw) -> str:
    """Start the PAYLOAD in the given mode as a Type=notify unit."""
    args = [str(a) for a in args]
    return start_unit(host, unit, [host.python, "-c", PAYLOAD, mode, *args], notify=True,
                      description=f"test host workload: {mode} {' '.join(args)}", **kw)


def stop_units(host: TestHost, units: Iterable[str], timeout: float = 300) -> None:
    """Stop units and forget failed ones.  Units already gone are fine (systemctl
    fails on those, so success is judged by is-active afterwards)."""
    units = list(units)
    for i in range(0, len(units), 500):
        chunk = units[i:i + 500]
        host.systemctl("stop", "--", *chunk, check=False, timeout=timeout)
        host.systemctl("reset-failed", "--", *chunk, check=False, timeout=timeout)
        states = host.systemctl("is-active", "--", *chunk, check=False, timeout=timeout).split()
        still = [u for u, s in zip(chunk, states) if s not in ("inactive", "failed", "unknown")]
        if still:
            raise HostError(f"units still running after stop: {still[:10]}")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise HostError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _name(kind: str) -> str:
    return f"th-{kind}-{next(_seq)}.service"


# --------------------------------------------------------------- workloads
def anon_hog(host: TestHost, mib: int = 150, unit: str | None = None) -> str:
    """Holds `mib` MiB of touched anonymous memory (memory.stat rss), then sleeps."""
    return payload(host, unit or _name("anon"), "anon", mib)


def make_data_file(host: TestHost, name: str, mib: int) -> Path:
    """A file of `mib` MiB in the host's data dir (real disk), written with O_DIRECT
    so that none of it is cached or charged to the writer's cgroup."""
    path = host.data_dir / name
    buf = mmap.mmap(-1, MiB)  # page aligned, as O_DIRECT wants
    buf.write(b"\xa5" * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, buf)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path


def page_cache_reader(host: TestHost, mib: int = 200, unit: str | None = None) -> str:
    """Reads a `mib` MiB file from the real disk once, so the unit's cgroup is
    charged ~mib of clean page cache (memory.stat cache) while its RSS stays small."""
    unit = unit or _name("cache")
    path = make_data_file(host, unit.removesuffix(".service") + ".dat", mib)
    return payload(host, unit, "read", path)


def shm_writer(host: TestHost, mib: int = 100, unit: str | None = None, mapped: bool = False) -> str:
    """Writes `mib` MiB into a /dev/shm file (shmem, counted as cache in v1) and sleeps.
    With mapped, the file is also mapped and faulted in (RssShmem).  The file is
    removed when the unit stops."""
    unit = unit or _name("shm")
    path = f"/dev/shm/{unit}"
    return payload(host, unit, "shm", path, mib, "mapped" if mapped else "unmapped",
                   properties=[f"ExecStopPost=/bin/rm -f {path}"])


def multi_process(host: TestHost, children: int = 4, mib: int = 20, unit: str | None = None) -> str:
    """A parent forking `children` processes that each hold `mib` MiB anonymous memory."""
    return payload(host, unit or _name("multi"), "multi", children, mib)


def nested_slice(host: TestHost, slice: str = "th-outer-inner.slice", mib: int = 10, unit: str | None = None) -> str:
    """An anon hog in a nested slice: th-outer-inner.slice lives in th-outer.slice in
    th.slice, i.e. cgroup /th.slice/th-outer.slice/th-outer-inner.slice/<unit>."""
    return payload(host, unit or _name("nested"), "anon", mib, slice=slice)


def escaped_name(host: TestHost, raw: str | None = None, mib: int = 10) -> str:
    """An anon hog whose unit name needs escaping: systemd-escape turns "th-escaped-demo-N"
    into "th\\x2descaped\\x2ddemo\\x2dN"; returns that name plus ".service"."""
    raw = raw or f"th-escaped-demo-{next(_seq)}"
    escaped = host.run(["systemd-escape", "--", raw]).stdout.strip()
    return payload(host, f"{escaped}.service", "anon", mib)


def truth_workloads(host: TestHost) -> dict[str, str]:
    """One of each kind, by role: what the truth suite checks and the README's picture shows."""
    return {
        "anon": anon_hog(host, 150),
        "cache": page_cache_reader(host, 200),
        "shm": shm_writer(host, 100),
        "multi": multi_process(host, children=4, mib=20),
        "nested": nested_slice(host),
        "escaped": escaped_name(host),
    }


def short_lived(host: TestHost, count: int = 3, lifetime: float = 0.5, prefix: str = "th-short") -> list[str]:
    """Starts `count` units, lets them live `lifetime` seconds, stops them; returns
    their (now gone) names."""
    units = [start_unit(host, f"{prefix}-{next(_seq)}.service", ["sleep", "infinity"]) for _ in range(count)]
    time.sleep(lifetime)
    stop_units(host, units)
    return units


def churn(host: TestHost, period: float = 0.2, lifetime: float = 1.0, unit: str | None = None) -> str:
    """A unit that keeps starting short units (<unit stem>-N.service, each living
    `lifetime` seconds) every `period` seconds until it is stopped: units come
    and go while an exporter samples.  The children are PartOf= the churn unit, so
    stopping it stops them too."""
    unit = unit or _name("churn")
    stem = unit.removesuffix(".service")
    script = (f"i=0; while :; do i=$((i+1)); systemd-run --quiet --no-block --collect --unit={stem}-$i.service "
              f"-p MemoryAccounting=yes -p PartOf={unit} sleep {lifetime}; sleep {period}; done")
    return start_unit(host, unit, ["/bin/sh", "-c", script.replace("$", "$$")])


def batch(host: TestHost, count: int, procs: int = 10, prefix: str = "th-bench", slice: str | None = None,
          timeout: float = 600) -> list[str]:
    """Starts `count` units with `procs` processes each, as fast as possible, for benchmarks.

    They are instances of a runtime template (/run/systemd/system/<prefix>@.service)
    started by one `systemctl start --no-block` per 500 units, which is much cheaper
    than one systemd-run per unit.  Returns once every unit has all its processes.
    Instances live in system-<prefix>.slice (escaped) unless `slice` is given.
    """
    template = f"{prefix}@.service"
    loop = f"i=1; while [ $i -lt {procs} ]; do sleep infinity & i=$((i+1)); done; exec sleep infinity"
    text = ("[Unit]\nDescription=benchmark unit\n\n[Service]\nMemoryAccounting=yes\n"
            + (f"Slice={slice}\n" if slice else "")
            + f"ExecStart=/bin/sh -c '{loop.replace('$', '$$')}'\n")
    path = f"/run/systemd/system/{template}"
    if not host.path(path).exists() or host.path(path).read_text() != text:
        host.write_file(path, text)
        host.systemctl("daemon-reload")
    units = [f"{prefix}@{i}.service" for i in range(1, count + 1)]
    for i in range(0, count, 500):
        host.systemctl("start", "--no-block", "--", *units[i:i + 500], timeout=timeout)
    wait_until(lambda: host.show(units[0], "ControlGroup").get("ControlGroup"), timeout, f"{units[0]} to start")
    slice_dir = (host.path("/sys/fs/cgroup/systemd") / host.unit_cgroup(units[0]).lstrip("/")).parent
    pending = set(units)

    def all_running() -> bool:
        for unit in list(pending):
            try:
                if len((slice_dir / unit / "cgroup.procs").read_text().split()) == procs:
                    pending.discard(unit)
            except FileNotFoundError:
                pass
        return not pending

    wait_until(all_running, timeout, f"{len(pending)} of {count} {prefix} units to run {procs} processes",
               interval=0.2)
    return units


# ------------------------------------------------------- scopes (containers)
def container_scope(host: TestHost, unit: str, slice: str, mib: int = 30, timeout: float = 30) -> str:
    """A transient scope named like a container runtime's (podman: machine.slice/libpod-<id>.scope,
    docker: system.slice/docker-<id>.scope), made with `systemd-run --scope` as those runtimes'
    systemd cgroup drivers do, holding `mib` MiB of anonymous memory. Returns once the memory
    is touched; stop it with stop_units()."""
    ready = host.exchange_dir / f"{unit}.ready"
    ready.unlink(missing_ok=True)
    # systemd-run --scope execs the command itself, in the new scope: the HostProcess is it.
    proc = host.popen(["systemd-run", "--quiet", "--scope", f"--unit={unit}", f"--slice={slice}",
                       "-p", "MemoryAccounting=yes", "--", host.python, "-c", PAYLOAD, "anon", str(mib)],
                      env={"READY_FILE": str(ready)}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, timeout, f"{unit} to hold {mib} MiB")
    except HostError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise HostError(f"starting {unit} failed: {proc.stderr.read()}")
    return unit


def container_id() -> str:
    """64 hex digits, the shape of podman's and docker's container ids."""
    return os.urandom(32).hex()


# ------------------------------------------------------------------ libvirt
VM_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 rootdelay=3600</cmdline>
  </os>
  <devices>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
  </devices>
</domain>
"""


def virsh(host: TestHost, *args: str, timeout: float = 120) -> str:
    return host.run(["virsh", "--connect", "qemu:///system", "--quiet", *args], timeout=timeout).stdout


def libvirtd(host: TestHost) -> str:
    """Debian's libvirtd.service started in the host (socket-activated units and all)."""
    host.systemctl("start", "libvirtd.service")
    return "libvirtd.service"


def stop_libvirtd(host: TestHost) -> None:
    """Stop libvirtd and the sockets that would start it again."""
    host.systemctl("stop", "libvirtd.service", "libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket",
                   "virtlogd.service", "virtlogd.socket", "virtlogd-admin.socket", check=False)


def libvirt_vm(host: TestHost, name: str = "vm1", mib: int = 192, timeout: float = 120) -> str:
    """A TCG VM (type='qemu': no KVM needed) that boots the machine's Debian kernel and initrd
    and then waits for a root device that never comes (rootdelay=3600), so it keeps running
    with a steady footprint. Its serial console goes to a file: a pty serial fails in the
    host ("Failed to create PTY"). Returns its scope, e.g. machine-qemu\\x2d1\\x2dvm1.scope,
    once the guest kernel has started /init. Destroy it with destroy_vm()."""
    boot = Path("/boot")
    kernel = sorted(boot.glob("vmlinuz-6.1*"))[-1]
    initrd = boot / kernel.name.replace("vmlinuz", "initrd.img")
    console = host.data_dir / f"{name}.console"
    xml = host.data_dir / f"{name}.xml"
    xml.write_text(VM_XML.format(name=name, mib=mib, kernel=kernel, initrd=initrd, console=console))
    virsh(host, "create", str(xml))
    wait_until(lambda: console.exists() and "Run /init as init process" in console.read_text(errors="replace"),
               timeout, f"VM {name} to start /init", interval=0.5)
    domain_id = virsh(host, "domid", name).strip()
    scope = host.run(["systemd-escape", "--", f"qemu-{domain_id}-{name}"]).stdout.strip()
    return f"machine-{scope}.scope"


def destroy_vm(host: TestHost, name: str = "vm1") -> None:
    host.run(["virsh", "--connect", "qemu:///system", "destroy", name], check=False, timeout=60)


def libvirt_volume_io(host: TestHost, pool: str = "th", mib: int = 400) -> None:
    """File work the way libvirtd does it in production: a dir pool on the real disk (the
    host's overlay root would make the image tmpfs shmem, not page cache), a volume of `mib`
    MiB created, uploaded into and downloaded from. libvirtd's I/O helper does the reads and
    writes inside libvirtd.service, so its cgroup is charged page cache no process maps."""
    pool_dir = host.data_dir / f"pool-{pool}"
    pool_dir.mkdir(exist_ok=True)
    virsh(host, "pool-create-as", pool, "dir", "--target", str(pool_dir))
    source = make_data_file(host, f"{pool}-upload.img", mib)  # O_DIRECT: not cached anywhere
    virsh(host, "vol-create-as", pool, "big.img", f"{mib}M")
    virsh(host, "vol-upload", "--pool", pool, "big.img", str(source), timeout=300)
    virsh(host, "vol-download", "--pool", pool, "big.img", str(host.data_dir / f"{pool}-download.img"), timeout=300)


def destroy_pool(host: TestHost, pool: str = "th") -> None:
    host.run(["virsh", "--connect", "qemu:///system", "vol-delete", "--pool", pool, "big.img"], check=False)
    host.run(["virsh", "--connect", "qemu:///system", "pool-destroy", pool], check=False)


# ------------------------------------------------------------ user managers
# logind is masked in the host, so pam_systemd sets no XDG_RUNTIME_DIR: the user manager
# refuses to start without it, and `systemctl --user -M USER@` (which runs systemd-stdio-bridge
# as the user in a transient system unit run-uN.service) cannot find the user's bus. Drop-ins
# give both what logind would (run-.service.d applies to every run-*.service).
USER_MANAGER_DROPIN = "[Service]\nEnvironment=XDG_RUNTIME_DIR=/run/user/%i\n"
BRIDGE_DROPIN = "[Service]\nEnvironment=XDG_RUNTIME_DIR=/run/user/{uid}\n"


def user_manager(host: TestHost, user: str = "u", uid: int = 1500) -> str:
    """A real user (useradd -m) and its systemd --user manager, user@UID.service, started the
    way logind starts it at login. Returns the manager's unit name."""
    if host.run(["id", "-u", user], check=False).stdout.strip() != str(uid):
        host.run(["useradd", "-m", "-u", str(uid), user])
    changed = False
    for path, text in (("/run/systemd/system/user@.service.d/th-xdg.conf", USER_MANAGER_DROPIN),
                       ("/run/systemd/system/run-.service.d/th-xdg.conf", BRIDGE_DROPIN.format(uid=uid))):
        if not host.path(path).exists() or host.path(path).read_text() != text:
            host.write_file(path, text)
            changed = True
    if changed:
        host.systemctl("daemon-reload")
    host.systemctl("start", f"user@{uid}.service")
    return f"user@{uid}.service"


def user_systemctl(host: TestHost, user: str, *args: str, check: bool = True) -> str:
    """`systemctl --user -M USER@ ...`: the user's own manager, asked from root."""
    return host.run(["systemctl", "--user", f"--machine={user}@", "--no-pager", *args], check=check).stdout


def user_show(host: TestHost, user: str, unit: str, *props: str) -> dict[str, str]:
    out = user_systemctl(host, user, "show", *(f"--property={p}" for p in props), "--", unit)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def user_payload(host: TestHost, user: str, unit: str, mode: str, *args: object, timeout: float = 60) -> str:
    """The PAYLOAD as a Type=notify unit of USER's own manager (systemd-run --user -M USER@):
    it lands in /user.slice/user-UID.slice/user@UID.service/app.slice/UNIT. The machine's
    /usr/bin/python3, not host.python: that one may live under /root, closed to the user."""
    argv = ["systemd-run", "--user", f"--machine={user}@", "--quiet", "--collect", f"--unit={unit}",
            "-p", "Type=notify", "-p", f"TimeoutStartSec={int(timeout)}",
            "--", "/usr/bin/python3", "-c", PAYLOAD, mode, *(str(a) for a in args)]
    try:
        host.run(argv, timeout=timeout + 10)
    except HostCommandError as e:
        raise HostError(f"starting {user}'s {unit} failed: {e.stderr.strip()}") from None
    return unit


def user_scope(host: TestHost, user: str, uid: int, unit: str, slice: str = "user.slice", mib: int = 20,
               timeout: float = 30) -> str:
    """A transient scope in USER's own manager, the way rootless podman makes one
    (user@UID.service/user.slice/libpod-<id>.scope): `systemd-run --user --scope` run as the
    user (a scope cannot be made through -M's bridge: its process must be the caller)."""
    ready = host.exchange_dir / f"{unit}.ready"
    ready.unlink(missing_ok=True)
    proc = host.popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--init-groups",
                       "systemd-run", "--user", "--quiet", "--scope", f"--unit={unit}", f"--slice={slice}",
                       "--", "/usr/bin/python3", "-c", PAYLOAD, "anon", str(mib)],
                      env={"READY_FILE": str(ready), "XDG_RUNTIME_DIR": f"/run/user/{uid}"},
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, timeout, f"{user}'s {unit} to hold {mib} MiB")
    except HostError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise HostError(f"starting {user}'s {unit} failed: {proc.stderr.read()}")
    return unit


def stop_user_units(host: TestHost, user: str, units: Iterable[str]) -> None:
    units = list(units)
    if units:
        user_systemctl(host, user, "stop", "--", *units, check=False)


def sample_workloads(host: TestHost) -> list[str]:
    """One of each kind, for demos: anon, page cache, shm, multi-process, nested, escaped."""
    return [anon_hog(host), page_cache_reader(host), shm_writer(host, mapped=True), multi_process(host),
            nested_slice(host), escaped_name(host)]
