"""A cgroup's memory figures in one vocabulary for v1 and v2 (pure: file texts in, values out).

v2 names are the vocabulary; v1's hierarchical ``total_*`` keys map onto them. Every figure is
optional: a kernel that lacks a file or key leaves it absent, never 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from .cgroupfs import MemoryVersion, Pressure, SelectedKeys, parse_limit, parse_pressure, parse_single_value, parse_v1_limit
from .kernelfiles import ParseError
from .records import record

# Files read per cgroup, each once per cycle. Order is the order they are read in.
V1_FILES = (
    "memory.usage_in_bytes",
    "memory.stat",
    "memory.limit_in_bytes",
    "memory.max_usage_in_bytes",
    "memory.failcnt",
    "memory.oom_control",
    "memory.kmem.usage_in_bytes",
)
V2_FILES = (
    "memory.current",
    "memory.stat",
    "memory.max",
    "memory.high",
    "memory.low",
    "memory.min",
    "memory.swap.current",
    "memory.swap.max",
    "memory.peak",
    "memory.events",
)
PRESSURE_FILE = "memory.pressure"

# v1 memory.stat hierarchical key -> v2 name (cgroup-v1/memory.rst section 5.2). v1 "rss" is
# anonymous memory plus swap cache: the closest v1 has to v2 "anon".
V1_STAT_NAMES = {
    "total_rss": "anon",
    "total_cache": "file",
    "total_shmem": "shmem",
    "total_mapped_file": "file_mapped",
    "total_dirty": "file_dirty",
    "total_writeback": "file_writeback",
    "total_active_anon": "active_anon",
    "total_inactive_anon": "inactive_anon",
    "total_active_file": "active_file",
    "total_inactive_file": "inactive_file",
    "total_unevictable": "unevictable",
    "total_swapcached": "swapcached",
}

# v2 memory.stat keys exported as systemd_unit_memory_stat_bytes items (cgroup-v2.rst,
# "memory.stat"). The workingset_*/pg* event counters are left out to bound cardinality.
V2_STAT_ITEMS = (
    "anon",
    "file",
    "shmem",
    "file_mapped",
    "file_dirty",
    "file_writeback",
    "active_anon",
    "inactive_anon",
    "active_file",
    "inactive_file",
    "unevictable",
    "kernel",
    "kernel_stack",
    "pagetables",
    "percpu",
    "sock",
    "vmalloc",
    "slab",
    "slab_reclaimable",
    "slab_unreclaimable",
    "swapcached",
)
STAT_ITEMS = V2_STAT_ITEMS  # v1 items are a subset, plus "kernel" from memory.kmem.usage_in_bytes

V2_EVENTS = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")
LIMITS = ("max", "high", "low", "min", "swap_max")


@record
class CgroupMemory:
    version: MemoryVersion
    usage: int | None
    stat: Mapping[str, int]  # v2 vocabulary, STAT_ITEMS keys only
    swap: int | None
    limits: Mapping[str, int]  # only limits that are set
    events: Mapping[str, int]
    peak: int | None
    pressure: Pressure | None = None
    # v2 before 5.18 prints no "kernel" total: stat["kernel"] is then the sum of KERNEL_PARTS.
    kernel_summed: bool = False

    @property
    def page_cache(self) -> int | None:
        return self.stat.get("file")

    @property
    def working_set(self) -> int | None:
        """cAdvisor's and the kubelet's definition: usage - inactive_file, floored at 0."""
        inactive_file = self.stat.get("inactive_file")
        if self.usage is None or inactive_file is None:
            return None
        return max(self.usage - inactive_file, 0)


# Parse problems met while building one CgroupMemory: (file name, message) pairs. A bad file
# leaves its figures absent; the other files of the cgroup are still used.
Problems = list[tuple[str, str]]


def _parse(files: Mapping[str, str], name: str, parser: Callable, problems: Problems):
    text = files.get(name)
    if text is None:
        return None
    try:
        return parser(text)
    except ParseError as e:
        problems.append((name, str(e)))
        return None


# The memory.stat keys each version's CgroupMemory holds, and the oom_control/events keys: the
# layouts these learn keep the per-unit parse of a cycle short (exporter/cgroupfs.py).
_V1_SWAP = "total_swap"
_V1_STAT = SelectedKeys({**V1_STAT_NAMES, _V1_SWAP: _V1_SWAP})
_V1_OOM_CONTROL = SelectedKeys({"oom_kill": "oom_kill"})
_V2_STAT = SelectedKeys({item: item for item in V2_STAT_ITEMS})
_V2_EVENTS = SelectedKeys({event: event for event in V2_EVENTS})


def _parse_keyed(files: Mapping[str, str], name: str, keys: SelectedKeys, problems: Problems) -> dict[str, int]:
    """A flat keyed file's chosen keys; malformed lines are reported and skipped, the good ones kept."""
    text = files.get(name)
    if text is None:
        return {}
    skipped: list[str] = []
    values = keys.parse(text, skipped)
    if skipped:
        problems.extend((name, f"skipped malformed line {line!r}") for line in skipped)
    return values


# Keys every kernel's memory.stat has (v1 since 2.6.29, v2 since 4.5). Without them the file is
# empty or cut short: an error to count, not a cgroup with nothing in it. Other keys come and go
# with kernel versions, so their absence is only absence.
_STAT_CORE = ("anon", "file")


def _check_stat_core(files: Mapping[str, str], stat: Mapping[str, int], problems: Problems, keys: str) -> None:
    if "memory.stat" in files and not all(name in stat for name in _STAT_CORE):
        if not any(name == "memory.stat" for name, _ in problems):  # a bad line already says why
            problems.append(("memory.stat", f"lacks {keys}"))


def memory_from_v1(files: Mapping[str, str], problems: Problems, pressure: Pressure | None = None) -> CgroupMemory:
    """``files``: file name -> text for the V1_FILES that could be read."""
    stat = _parse_keyed(files, "memory.stat", _V1_STAT, problems)
    _check_stat_core(files, stat, problems, "total_rss or total_cache")
    # total_swap exists only with swap accounting (memory.memsw.* files): absent otherwise.
    swap = stat.pop(_V1_SWAP, None)
    kernel = _parse(files, "memory.kmem.usage_in_bytes", parse_single_value, problems)
    if kernel is not None:
        stat["kernel"] = kernel
    limit = _parse(files, "memory.limit_in_bytes", parse_v1_limit, problems)
    events = {}
    failcnt = _parse(files, "memory.failcnt", parse_single_value, problems)
    if failcnt is not None:
        events["max"] = failcnt  # times usage hit the limit: v2's "max" event
    events.update(_parse_keyed(files, "memory.oom_control", _V1_OOM_CONTROL, problems))  # oom_kill: 4.13+
    return CgroupMemory(
        version=MemoryVersion.V1,
        usage=_parse(files, "memory.usage_in_bytes", parse_single_value, problems),
        stat=MappingProxyType(stat),
        swap=swap,
        limits=MappingProxyType({} if limit is None else {"max": limit}),
        events=MappingProxyType(events),
        peak=_parse(files, "memory.max_usage_in_bytes", parse_single_value, problems),
        pressure=pressure,
    )


# What v2's "kernel" total (5.18+, MEMCG_KMEM) holds, as the kernel itemises it: cgroup-v2.rst
# lists kernel_stack, pagetables, percpu, vmalloc and slab "in addition to other kernel memory
# use cases". sock is charged to memory.current but not to kernel. The sum is a floor of the
# total: on 6.1 (tests/fixtures/v2) the total is 5-17 % above it, and 5.10 has no pagetables key.
KERNEL_PARTS = ("kernel_stack", "pagetables", "percpu", "vmalloc", "slab")
_SLAB_BEFORE_5_9 = ("slab_reclaimable", "slab_unreclaimable")  # "slab", their sum, came in 5.9


def summed_kernel(stat: Mapping[str, int]) -> int | None:
    """The kernel total of a v2 memory.stat that lacks one (before 5.18), from its parts."""
    parts = [stat[name] for name in KERNEL_PARTS if name in stat]
    if "slab" not in stat:
        parts += [stat[name] for name in _SLAB_BEFORE_5_9 if name in stat]
    return sum(parts) if parts else None


def memory_from_v2(files: Mapping[str, str], problems: Problems, pressure: Pressure | None = None) -> CgroupMemory:
    stat = _parse_keyed(files, "memory.stat", _V2_STAT, problems)
    _check_stat_core(files, stat, problems, "anon or file")
    # One kernel figure on every kernel, so the reconciliation, the dashboards' kernel layer and
    # alerts read the same item on Ubuntu 22.04's 5.15 as on 6.x (v1 takes memory.kmem.*).
    kernel_summed = False
    if "kernel" not in stat:
        kernel = summed_kernel(stat)
        if kernel is not None:
            stat["kernel"], kernel_summed = kernel, True
    limits = {}
    for limit in LIMITS:
        value = _parse(files, "memory." + limit.replace("_", "."), parse_limit, problems)
        # "max" parses to None (no limit); 0 is the unset value of the protections low/min.
        if value is not None and not (limit in ("low", "min") and value == 0):
            limits[limit] = value
    return CgroupMemory(
        version=MemoryVersion.V2,
        usage=_parse(files, "memory.current", parse_single_value, problems),
        stat=MappingProxyType(stat),
        swap=_parse(files, "memory.swap.current", parse_single_value, problems),
        limits=MappingProxyType(limits),
        events=MappingProxyType(_parse_keyed(files, "memory.events", _V2_EVENTS, problems)),
        peak=_parse(files, "memory.peak", parse_single_value, problems),
        pressure=pressure,
        kernel_summed=kernel_summed,
    )


def parse_pressure_file(files: Mapping[str, str], problems: Problems) -> Pressure | None:
    return _parse(files, PRESSURE_FILE, parse_pressure, problems)
