"""The part of the benchmark that runs inside the test host: python3 tests/bench/inner.py MODE ...

Run as a script (not -m) so that ``import exporter`` finds whatever PYTHONPATH points at: the
checkout, or a baseline revision extracted by bench.py for a side-by-side run.

Modes (each prints one JSON object on stdout):
  cycle --cycles K
                       K sample cycles of the real Sampler with the real D-Bus discovery, in
                       this thread, each followed by service.publish (render + gzip). CPU
                       (thread_time) and wall time per phase: discovery, cgroup, procfs, build,
                       render. The first cycle (ControlGroup fetched for every unit) is reported
                       apart from the median of the others (steady state).
  record               two warm cycles, then one cycle between marker stats: run under
                       strace, the syscalls between the markers are exactly one cycle's reads,
                       with the procfs phase marked off too.
  gil --cycles K [--scrapes-first]
                       K cycles (as in cycle) on a second thread while this one plays scrapes:
                       every 5 ms a burst of three 0.5 ms sleeps, each timed for how long past
                       its end it waits for the GIL, attributed to the phase the cycle was in
                       (render and gzip apart, and the garbage collector's passes, seen through
                       gc.callbacks). --scrapes-first: each burst inside ScrapesFirst.scrape()
                       with the sampler pausing at its pause points, as the exporter runs.
  pss --cycles K       K cycles of exporter.pss.PssCollector over the discovered units.
  count                processes, and how many have statm shared == 0 (where status could be
                       skipped if only statm were read).
  replay OPS-FILE [--repeat N]
                       floor.c's kept mode in Python: the same operations, the same descriptors
                       kept, each file read by os.pread from offset 0, nothing parsed. Set
                       beside floor.c's figure it shows what the interpreter's calls alone cost,
                       and so how much of the cycle over the floor is the exporter's own work.

cycle, record and gil take --kept-files N (the exporter's --sample.kept-files; default its
default), with the descriptor limit raised as the exporter raises it; a revision from before
exporter/keptfiles.py ignores it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import threading
import time

import exporter
from exporter import sampler as sampler_module
from exporter.cgroupfs import detect_layout
from exporter.sampler import Sampler, SamplerConfig
from exporter import service as service_module
from exporter.service import publish
from exporter.systemd import Discovery, DiscoveryResult, UnitFilter

PHASES = ("discovery", "cgroup", "procfs", "build", "render")
# Which phase a mark begins (gil mode): render is split into the text and its gzip.
PHASE_AFTER = {"start": "discovery", "discovery_end": "cgroup", "procfs_start": "procfs", "procfs_end": "build",
               "built": "render", "render_text_end": "gzip", "rendered": "idle"}
MARK_BEGIN = "/BENCH-MARK-begin"
MARK_END = "/BENCH-MARK-end"
MARK_PROCFS = "/BENCH-MARK-procfs"
MARK_PROCFS_END = "/BENCH-MARK-procfs-end"


try:
    from exporter.keptfiles import DEFAULT_KEPT_FILES, raise_descriptor_limit
except ImportError:  # a --baseline revision from before kept descriptors
    DEFAULT_KEPT_FILES, raise_descriptor_limit = None, None


def sampler_config(args) -> SamplerConfig:
    """The exporter's defaults, with --kept-files and the descriptor limit raised as cli does."""
    if DEFAULT_KEPT_FILES is None:
        return SamplerConfig(interval=15)
    raise_descriptor_limit()
    kept = DEFAULT_KEPT_FILES if getattr(args, "kept_files", None) is None else args.kept_files
    return SamplerConfig(interval=15, kept_files=kept)


class Clock:
    """(thread CPU, wall) stamps at the phase boundaries of Sampler.sample()."""

    def __init__(self):
        self.marks: dict[str, tuple[float, float]] = {}
        self.current = "idle"  # the phase now under way, for the gil mode's probe

    def mark(self, name: str) -> None:
        self.marks[name] = (time.thread_time(), time.perf_counter())
        self.current = PHASE_AFTER.get(name, self.current)

    def span(self, start: str, end: str) -> tuple[float, float]:
        (c0, w0), (c1, w1) = self.marks[start], self.marks[end]
        return c1 - c0, w1 - w0


def timed_sampler(clock: Clock, discovery: Discovery, config: SamplerConfig | None = None, pause=None) -> Sampler:
    """The real Sampler, with stamps taken where its phases change.

    Sampler.sample() builds a ProcessWalker right after the cgroup phase and calls totals()
    for the procfs phase; a subclass put in its module's namespace stamps both edges. The
    exporter's own sample_cpu_seconds counts the sampler thread only; here discovery runs on
    the same thread, so its CPU (the D-Bus client side) is counted too.
    """
    base = sampler_module.ProcessWalker

    class StampingWalker(base):
        def __init__(self, *args, **kwargs):
            clock.mark("procfs_start")
            super().__init__(*args, **kwargs)

        def totals(self, cgroups):
            result = super().totals(cgroups)
            clock.mark("procfs_end")
            return result

    sampler_module.ProcessWalker = StampingWalker

    def discover() -> DiscoveryResult:
        clock.mark("discovery_start")
        units = discovery.refresh()
        clock.mark("discovery_end")
        return DiscoveryResult(units, True, "", time.time(), discovery.transport)

    # publish() compresses each family as it is rendered (render_families): the mark falls
    # where the last family is out, so "gzip" is the final flush and the join.
    render_families = getattr(service_module, "render_families", None)
    if render_families is not None:
        def stamped_families(snapshot, *args):
            yield from render_families(snapshot, *args)
            clock.mark("render_text_end")

        service_module.render_families = stamped_families
    else:  # a --baseline revision from before render_families
        render = service_module.render

        def stamped_render(snapshot, *pause):
            text = render(snapshot, *pause)
            clock.mark("render_text_end")
            return text

        service_module.render = stamped_render
    if pause is not None:
        return Sampler(config or SamplerConfig(interval=15), discover, pause)
    return Sampler(config or SamplerConfig(interval=15), discover)


def one_cycle(sampler: Sampler, clock: Clock, pause=None) -> dict:
    clock.mark("start")
    snapshot = sampler.sample()
    clock.mark("built")
    published = publish(snapshot) if pause is None else publish(snapshot, pause=pause)
    clock.mark("rendered")
    spans = {
        "discovery": clock.span("start", "discovery_end"),
        "cgroup": clock.span("discovery_end", "procfs_start"),
        "procfs": clock.span("procfs_start", "procfs_end"),
        "build": clock.span("procfs_end", "built"),
        "render": clock.span("built", "rendered"),
    }
    root = snapshot.unit("-.slice")
    result = {
        "cpu": {k: v[0] for k, v in spans.items()},
        "wall": {k: v[1] for k, v in spans.items()},
        "units": len(snapshot.units),
        "processes": root.processes.processes if root else sum(u.processes.processes for u in snapshot.units),
        # body_size since the plain text is no longer kept; a --baseline revision may predate it.
        "body_bytes": getattr(published, "body_size", None) or len(published.body),
        "body_gzip_bytes": len(getattr(published, "body_gzip_open", None) or published.body_gzip),  # a --baseline before 0e8fd30
        "snapshot_cpu_seconds": snapshot.cpu_seconds,
        "errors": sum(snapshot.errors.values()),
    }
    let_go = getattr(service_module, "let_go", None)
    if pause is not None and let_go is not None:  # as SampleLoop frees a replaced snapshot
        units = list(snapshot.units)
        del snapshot, published, root
        let_go(units, pause)
    return result


def cmd_cycle(args) -> dict:
    discovery = Discovery(UnitFilter.build())
    clock = Clock()
    sampler = timed_sampler(clock, discovery, sampler_config(args))
    cycles = [one_cycle(sampler, clock) for _ in range(args.cycles)]
    steady = cycles[1:] or cycles
    median = {
        kind: {phase: statistics.median(c[kind][phase] for c in steady) for phase in PHASES} for kind in ("cpu", "wall")
    }
    for kind in ("cpu", "wall"):
        median[kind]["sample"] = statistics.median(sum(c[kind][p] for p in PHASES if p != "render") for c in steady)
        median[kind]["cycle"] = statistics.median(sum(c[kind].values()) for c in steady)
        median[kind]["files"] = statistics.median(c[kind]["cgroup"] + c[kind]["procfs"] for c in steady)
    last = cycles[-1]
    out = {
        "exporter_path": os.path.dirname(exporter.__file__),
        "cycles": len(cycles),
        "first": {"cpu": cycles[0]["cpu"], "wall": cycles[0]["wall"]},
        "median": median,
        "samples_cpu_cycle": [sum(c["cpu"].values()) for c in steady],
        **{k: last[k] for k in ("units", "processes", "body_bytes", "body_gzip_bytes", "errors")},
        "driver_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kept_files": len(sampler.files) if hasattr(sampler, "files") else 0,
        "kernel_mib": own_kernel_memory_mib(),
    }
    return out


def own_kernel_memory_mib() -> float | None:
    """This process's cgroup's kernel memory (v1 memory.kmem.usage_in_bytes): what the kept
    descriptors hold, as the exporter's unit would show it."""
    try:
        for line in open("/proc/self/cgroup"):
            _id, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                with open(f"/sys/fs/cgroup/memory{path}/memory.kmem.usage_in_bytes") as f:
                    return int(f.read()) / 2**20
    except (OSError, ValueError):
        pass
    return None


def cmd_gil(args) -> dict:
    """Where a scrape would wait: this thread sleeps PROBE_SLEEP and measures how late it gets
    the GIL back while the cycle runs on another thread, with the exporter's switch interval."""
    sys.setswitchinterval(0.0005)  # as exporter/cli.py sets it
    import contextlib

    discovery = Discovery(UnitFilter.build())
    clock = Clock()
    gate = service_module.ScrapesFirst() if args.scrapes_first else None
    pause = gate.pause_point if gate else None
    sampler = timed_sampler(clock, discovery, sampler_config(args), pause)
    one_cycle(sampler, clock, pause)  # warm: discovery fetched, descriptors opened
    gc_started: list[float] = []
    gc_passes: list[tuple[int, float]] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started.append(time.perf_counter())
        elif gc_started:
            gc_passes.append((info["generation"], time.perf_counter() - gc_started.pop()))

    gc.callbacks.append(on_gc)
    done = threading.Event()
    waits: dict[str, list[float]] = {}

    def cycles() -> None:
        for _ in range(args.cycles):
            if gate:
                gate.new_cycle()
            one_cycle(sampler, clock, pause)
            time.sleep(0.05)  # idle between cycles: probes there show the floor of the probe itself
        done.set()

    worker = threading.Thread(target=cycles)
    cycle_started = time.perf_counter()
    worker.start()
    while not done.is_set():
        with gate.scrape() if gate else contextlib.nullcontext():
            for _ in range(3):
                phase = "gc" if gc_started else clock.current
                started = time.perf_counter()
                time.sleep(PROBE_SLEEP)
                waits.setdefault(phase, []).append(time.perf_counter() - started - PROBE_SLEEP)
        time.sleep(0.005)
    worker.join()
    seconds = time.perf_counter() - cycle_started
    gc.callbacks.remove(on_gc)

    def summary(values: list[float]) -> dict:
        ordered = sorted(values)
        return {"n": len(values), "p50_ms": ordered[len(ordered) // 2] * 1e3,
                "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, "max_ms": ordered[-1] * 1e3,
                "over_1ms": sum(v > 1e-3 for v in values), "over_3ms": sum(v > 3e-3 for v in values)}

    return {"probe_sleep_ms": PROBE_SLEEP * 1e3, "cycles": args.cycles, "scrapes_first": bool(gate),
            "wall_seconds": seconds, "paused_seconds": gate.paused_seconds if gate else 0.0,
            "all": summary([v for values in waits.values() for v in values]),
            "waits": {phase: summary(values) for phase, values in waits.items()},
            "gc_passes": {str(g): {"n": sum(1 for gen, _ in gc_passes if gen == g),
                                   "max_ms": max((s for gen, s in gc_passes if gen == g), default=0) * 1e3}
                          for g in (0, 1, 2)}}


PROBE_SLEEP = 0.0005


def cmd_record(args) -> dict:
    """Markers: a stat of a path that does not exist shows in strace and costs nothing. They
    bracket one cycle, and the procfs phase inside it, so the floor can be split by phase."""
    discovery = Discovery(UnitFilter.build())
    units = discovery.refresh()
    base = sampler_module.ProcessWalker

    class MarkingWalker(base):
        def __init__(self, *args, **kwargs):
            os.path.exists(MARK_PROCFS)
            super().__init__(*args, **kwargs)

        def totals(self, cgroups):
            result = super().totals(cgroups)
            os.path.exists(MARK_PROCFS_END)
            return result

    sampler_module.ProcessWalker = MarkingWalker
    sampler = Sampler(sampler_config(args), lambda: DiscoveryResult(units, True, "", time.time(), "system_bus"))
    sampler.sample()
    sampler.sample()
    os.path.exists(MARK_BEGIN)
    snapshot = sampler.sample()
    os.path.exists(MARK_END)
    return {"units": len(snapshot.units)}


def cmd_pss(args) -> dict:
    from exporter.pss import PssCollector

    discovery = Discovery(UnitFilter.build())
    units = discovery.refresh()
    layout = detect_layout("/sys/fs/cgroup")
    collector = PssCollector("/proc", budget=args.budget, max_rss=args.max_rss)
    runs = []
    for _ in range(args.cycles):
        c0, w0 = time.thread_time(), time.perf_counter()
        result = collector.collect(units, layout.procs_root)
        runs.append({"cpu": time.thread_time() - c0, "wall": time.perf_counter() - w0,
                     "units_with_pss": sum(1 for v in result.values.values() if v is not None),
                     "read": result.read, "skipped": dict(result.skipped)})
    return {
        "units": len(units),
        "cpu": statistics.median(r["cpu"] for r in runs),
        "wall": statistics.median(r["wall"] for r in runs),
        "runs": runs,
    }


def cmd_count(args) -> dict:
    processes = shared_zero = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/statm", "rb") as f:
                fields = f.read().split()
        except OSError:
            continue
        processes += 1
        if int(fields[2]) == 0:
            shared_zero += 1
    return {"processes": processes, "statm_shared_zero": shared_zero}


def cmd_replay(args) -> dict:
    """Mirrors floor.c "kept" (see its header): F and D opened once, untimed, as many as the
    descriptor limit allows less 64; each repeat reads every kept F by pread from 0 and lists
    every kept D, opens, reads and closes the rest, and stats every S. A directory is listed
    through os.listdir(fd), which dups the descriptor: two syscalls more than floor.c's lseek."""
    ops = []
    with open(args.ops) as f:
        for line in f:
            if len(line) > 2 and line[1] == " ":
                ops.append((line[0], line[2:].rstrip("\n")))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pread, chunk = os.pread, 65536

    def read_kept(fd: int) -> None:
        at = 0
        while len(pread(fd, chunk, at)) == chunk:
            at += chunk

    kept: list[int | None] = []
    count = 0
    for op, path in ops:
        fd = None
        if op != "S" and count + 64 < hard:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if op == "D" else 0))
            except OSError:
                fd = None
            else:
                count += 1
                if op == "F":
                    try:
                        read_kept(fd)  # the first read allocates the seq_file buffer, as in floor.c
                    except OSError:
                        pass  # kept all the same, as floor.c keeps it
        kept.append(fd)
    cpu = []
    for _ in range(args.repeat):
        c0 = time.process_time()
        for (op, path), fd in zip(ops, kept):
            try:
                if op == "S":
                    os.stat(path)
                elif fd is not None:
                    if op == "F":
                        read_kept(fd)
                    else:
                        os.listdir(fd)
                elif op == "F":
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        while len(os.read(fd, chunk)) == chunk:
                            pass
                    finally:
                        os.close(fd)
                else:
                    os.listdir(path)
            except OSError:
                pass  # as floor.c: a missing file costs its failed open
        cpu.append(time.process_time() - c0)
    return {"ops": len(ops), "kept": count, "cpu_seconds": cpu, "cpu": statistics.median(cpu)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/bench/inner.py")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("cycle")
    p.add_argument("--cycles", type=int, default=8)
    p.add_argument("--kept-files", type=int)
    p.set_defaults(func=cmd_cycle)
    p = sub.add_parser("gil")
    p.add_argument("--cycles", type=int, default=6)
    p.add_argument("--scrapes-first", action="store_true")
    p.add_argument("--kept-files", type=int)
    p.set_defaults(func=cmd_gil)
    p = sub.add_parser("record")
    p.add_argument("--kept-files", type=int)
    p.set_defaults(func=cmd_record)
    p = sub.add_parser("pss")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--max-rss", type=int, default=4 << 30)
    p.set_defaults(func=cmd_pss)
    sub.add_parser("count").set_defaults(func=cmd_count)
    p = sub.add_parser("replay")
    p.add_argument("ops")
    p.add_argument("--repeat", type=int, default=9)
    p.set_defaults(func=cmd_replay)
    args = parser.parse_args(argv)
    json.dump(args.func(args), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
