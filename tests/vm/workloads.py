"""Workloads for the cgroup-v2 guest: tests/testhost/workloads.py's payload, run in a Guest.

The payload (PAYLOAD: anon, read, shm, multi) is the one the v1 test host uses, imported
from there and passed to the guest's python3 on the command line; only the way units are
started differs (a Guest instead of a TestHost). Every function returns the unit name
exactly as systemd spells it, once the workload is in its steady state (Type=notify, the
payload sends READY=1), like its test host counterpart. Stop units with stop_units().

v2-only workloads: swapping (a hog squeezed under MemoryMax with swap allowed), oom_victim
(a unit whose child is OOM-killed, kept alive by OOMPolicy=continue) and limited (every
memory limit systemd can set).
"""
import itertools
import shlex

from tests.testhost.workloads import MiB, PAYLOAD

from .guest import GuestError, wait_until

__all__ = ["MiB", "PAYLOAD", "anon_hog", "page_cache_reader", "shm_writer", "multi_process",
           "nested_slice", "escaped_name", "swapping", "oom_victim", "limited", "short_lived",
           "sample_workloads", "start_unit", "stop_units"]

_seq = itertools.count(1)
# Touches argv[1] MiB of anonymous memory at once (no READY=1): the OOM victim's child.
HOLD = ("import sys, time; blob = b'x' * (int(sys.argv[1]) << 20); "
        "print('holding', flush=True); time.sleep(3600)")


def _name(kind):
    return f"smx-{kind}-{next(_seq)}.service"


def start_unit(vm, unit, cmd, *, properties=(), slice=None, notify=False, timeout=120):
    """systemd-run a transient service with MemoryAccounting=yes; returns once it started
    (with notify: once the payload sent READY=1)."""
    args = ["systemd-run", "--quiet", "--collect", f"--unit={unit}", "-p", "MemoryAccounting=yes",
            "-p", f"TimeoutStartSec={int(timeout)}", "-p", f"Type={'notify' if notify else 'exec'}"]
    if slice:
        args.append(f"--slice={slice}")
    for prop in properties:
        args += ["-p", prop]
    result = vm.run([*args, "--", *cmd], timeout=timeout + 10)
    if result.returncode:
        raise GuestError(f"starting {unit} failed: {result.stderr.strip()}\n{vm.journal(unit)}")
    return unit


def payload(vm, unit, mode, *args, **kw):
    return start_unit(vm, unit, ["python3", "-c", PAYLOAD, mode, *map(str, args)], notify=True, **kw)


def stop_units(vm, units):
    """Stop units and forget failed ones; units already gone are fine."""
    units = list(units)
    if not units:
        return
    vm.run(["systemctl", "stop", "--", *units], timeout=120)
    vm.run(["systemctl", "reset-failed", "--", *units])
    states = vm.run(["systemctl", "is-active", "--", *units]).stdout.split()
    still = [u for u, s in zip(units, states) if s not in ("inactive", "failed", "unknown")]
    if still:
        raise GuestError(f"units still running after stop: {still}")


def anon_hog(vm, mib=150, unit=None, properties=()):
    """Holds `mib` MiB of touched anonymous memory, then sleeps."""
    return payload(vm, unit or _name("anon"), "anon", mib, properties=properties)


def page_cache_reader(vm, mib=200, unit=None):
    """Reads a `mib` MiB file on the guest's root disk (ext4 on virtio; its writes land in a
    throw-away overlay on the host, the page cache is the guest's own) once, so the unit is
    charged ~mib of clean page cache while its RSS stays small. The file is written with
    O_DIRECT, so none of it is cached or charged to the writer, and the payload drops any
    cached pages again before reading. It is deleted when the unit stops."""
    unit = unit or _name("cache")
    path = f"/var/tmp/{unit.removesuffix('.service')}.dat"
    vm.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "oflag=direct",
            "conv=fsync", "status=none"], check=True, timeout=120)
    return payload(vm, unit, "read", path, properties=[f"ExecStopPost=/bin/rm -f {path}"])


def shm_writer(vm, mib=100, unit=None, mapped=False):
    """Writes `mib` MiB into a /dev/shm file (memory.stat shmem, inside file) and sleeps."""
    unit = unit or _name("shm")
    path = f"/dev/shm/{unit}"
    return payload(vm, unit, "shm", path, mib, "mapped" if mapped else "unmapped",
                   properties=[f"ExecStopPost=/bin/rm -f {path}"])


def multi_process(vm, children=4, mib=20, unit=None):
    """A parent forking `children` processes that each hold `mib` MiB."""
    return payload(vm, unit or _name("multi"), "multi", children, mib)


def nested_slice(vm, slice="smx-outer-inner.slice", mib=10, unit=None):
    """An anon hog in /smx.slice/smx-outer.slice/smx-outer-inner.slice/<unit>."""
    return payload(vm, unit or _name("nested"), "anon", mib, slice=slice)


def escaped_name(vm, raw=None, mib=10):
    """An anon hog named smx\\x2descaped\\x2ddemo\\x2dN.service (systemd-escape of smx-escaped-demo-N)."""
    raw = raw or f"smx-escaped-demo-{next(_seq)}"
    escaped = vm.run(["systemd-escape", "--", raw], check=True).stdout.strip()
    return payload(vm, f"{escaped}.service", "anon", mib)


def swapping(vm, mib=150, memory_max="64M", unit=None):
    """Holds `mib` MiB under MemoryMax=memory_max with swap unlimited: the rest goes to swap
    (memory.swap.current), and reclaiming it stalls the unit (memory.pressure). READY=1 comes
    once every page was touched, i.e. swapped out as needed (about 12 s under TCG)."""
    return anon_hog(vm, mib, unit or _name("swap"),
                    properties=[f"MemoryMax={memory_max}", "MemorySwapMax=infinity"])


def oom_victim(vm, mib=100, memory_max="32M", unit=None, timeout=60, trigger=None):
    """A shell whose child allocates `mib` MiB under MemoryMax=memory_max without swap and
    is OOM-killed; the shell lives on (OOMPolicy=continue keeps the unit and its cgroup).
    Returns once memory.events counts the kill. With `trigger` (a path in the guest), the
    child waits for that file and this returns at once: see wait_for_oom_kill."""
    unit = unit or _name("oom")
    wait = f"while [ ! -e {shlex.quote(trigger)} ]; do sleep 0.2; done; " if trigger else ""
    # v1 has no MemorySwapMax: the victim caps memory+swap itself (memory.memsw.limit_in_bytes,
    # there with swap accounting), or it would swap instead of being killed.
    nosw = ("cg=$(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup); "
            f"echo {memory_max} > /sys/fs/cgroup/memory$cg/memory.memsw.limit_in_bytes; "
            if vm.layout != "unified" else "")
    script = f"{nosw}{wait}python3 -c {shlex.quote(HOLD)} {mib}; exec sleep 3600"
    start_unit(vm, unit, ["sh", "-c", script],
               properties=[f"MemoryMax={memory_max}", "MemorySwapMax=0", "OOMPolicy=continue"])
    if not trigger:
        wait_for_oom_kill(vm, unit, timeout)
    return unit


def wait_for_oom_kill(vm, unit, timeout=60):
    # v1 counts the kill in memory.oom_control (oom_kill, kernel 4.13+).
    events = vm.memory_dir(unit) + ("/memory.events" if vm.layout == "unified" else "/memory.oom_control")

    def killed():
        return dict(line.split() for line in vm.read_text(events).splitlines())["oom_kill"] != "0"
    wait_until(killed, timeout, what=f"an oom_kill in {unit}")


# Every limit systemd sets on v2 (memory.max/high/low/min/swap.max), in bytes.
LIMITS = {"MemoryMax": 200 * MiB, "MemoryHigh": 150 * MiB, "MemoryLow": 16 * MiB,
          "MemoryMin": 8 * MiB, "MemorySwapMax": 100 * MiB}


def limited(vm, mib=10, unit=None):
    """A small anon hog with every memory limit set (LIMITS)."""
    return anon_hog(vm, mib, unit or _name("limited"),
                    properties=[f"{k}={v}" for k, v in LIMITS.items()])


def short_lived(vm, count=3, lifetime=0.5, prefix="smx-short"):
    """Starts `count` units, lets them live `lifetime` seconds, stops them; returns the names."""
    units = [start_unit(vm, f"{prefix}-{next(_seq)}.service", ["sleep", "infinity"]) for _ in range(count)]
    vm.run(["sleep", str(lifetime)])
    stop_units(vm, units)
    return units


def sample_workloads(vm):
    """One of each kind, as tests/test_e2e.py and the v2 fixture use them (name -> unit)."""
    started = {}
    try:
        for key, start in (("anon", lambda: anon_hog(vm, 150)),
                           ("cache", lambda: page_cache_reader(vm, 200)),
                           ("shm", lambda: shm_writer(vm, 100)),
                           ("multi", lambda: multi_process(vm, children=4, mib=20)),
                           ("nested", lambda: nested_slice(vm)),
                           ("escaped", lambda: escaped_name(vm)),
                           ("swap", lambda: swapping(vm)),
                           ("oom", lambda: oom_victim(vm)),
                           ("limited", lambda: limited(vm))):
            started[key] = start()
    except BaseException:
        stop_units(vm, started.values())
        raise
    return started
