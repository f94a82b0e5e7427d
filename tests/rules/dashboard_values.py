"""What each dashboard query must return, computed in Python from the exporter's own series.

The real-Prometheus tests (tests/test_prometheus.py on cgroup v1, tests/vm/test_v2_truth.py on v2)
read the raw series at one instant, compute each panel's figure here with the definitions of
README.md ("Reading the gap", the dashboards' descriptions), and compare with what the panel's
PromQL returns at the same instant. The PromQL and this code are written independently: a wrong
operator precedence, a unit summed twice or a join that loses the uid label shows as a difference.

    figures = unit_figures(prometheus, at, job, instance)     # {(unit, uid): {figure: value}}
    expected_unit_panels(figures[("foo.service", None)])      # {(panel, legend): value}
    expected_host_panels(host_figures(figures, layout="v1"))
"""

from __future__ import annotations

from typing import Callable

from .queries import DashboardQuery

Figures = dict  # figure name ("cgroup_usage", "stat:anon", "limit:max", ...) -> value
MiB = 1 << 20

# (panel, legend) of per-unit panels that depend on time (rates, per-step increases): checked for
# data, and the OOM kill count separately, not here.
TIME_BASED = ("OOM kills", "Limit events", "Memory pressure (cgroup v2 only)")


def _key(metric: dict) -> tuple[str, str | None]:
    return metric["unit"], metric.get("uid")


def unit_figures(prometheus, at: float, job: str, instance: str) -> dict[tuple[str, str | None], Figures]:
    """Every figure of every unit the exporter reported at `at`, straight from its series."""
    selector = f'job="{job}", instance="{instance}"'
    found: dict[tuple[str, str | None], Figures] = {}
    sources = {
        "systemd_unit_memory_bytes": ("type", ""),
        "systemd_unit_memory_stat_bytes": ("item", "stat:"),
        "systemd_unit_memory_limit_bytes": ("limit", "limit:"),
        "systemd_unit_memory_working_set_bytes": (None, "working_set"),
        "systemd_unit_memory_peak_bytes": (None, "peak"),
        "systemd_unit_processes": (None, "processes"),
        "systemd_unit_info": (None, "info"),
    }
    for metric, (label, prefix) in sources.items():
        for series in prometheus.query(f"{metric}{{{selector}}}", at=at):
            name = prefix + series["metric"][label] if label else prefix
            figures = found.setdefault(_key(series["metric"]), {})
            figures[name] = float(series["value"][1])
            if metric == "systemd_unit_info":
                figures["control_group"] = series["metric"]["control_group"]
                figures["unit_type"] = series["metric"]["unit_type"]
    return found


def _get(f: Figures, name: str) -> float | None:
    return f.get(name)


def _minus(*values: float | None) -> float | None:
    """first - the others; None if any is absent (PromQL's vector arithmetic drops the series)."""
    if any(v is None for v in values):
        return None
    return values[0] - sum(values[1:])


def _floor0(value: float | None) -> float | None:
    return None if value is None else max(value, 0.0)


def rss(f: Figures) -> float | None:
    parts = [f.get(k) for k in ("rss_anon", "rss_file", "rss_shmem") if f.get(k) is not None]
    return sum(parts) if parts else None


def kernel(f: Figures) -> float | None:
    return f.get("stat:kernel")  # on v2 before 5.18 the exporter sums the parts into it


def reclaimable(f: Figures) -> float | None:
    return _floor0(_minus(*(f.get(f"stat:{k}") for k in ("file", "shmem", "file_dirty", "file_writeback"))))


def unmapped_cache(f: Figures) -> float | None:
    return _floor0(_minus(*(f.get(f"stat:{k}") for k in ("file", "file_mapped", "shmem"))))


def anon_mapped_minus_top(f: Figures) -> float | None:
    anon, mapped, top = f.get("stat:anon"), f.get("stat:file_mapped"), rss(f)
    return None if None in (anon, mapped, top) else anon + mapped - top


def verdict(f: Figures) -> float | None:
    """exporter/explain.py's verdict(), as the number the dashboard maps to its text."""
    usage, gap, cache, shmem = f.get("cgroup_usage"), _minus(f.get("cgroup_usage"), rss(f)), unmapped_cache(f), f.get("stat:shmem")
    if usage is None or gap is None:
        return None
    if cache is not None and cache >= 0.5 * usage:
        return 1
    if shmem is not None and shmem >= 0.3 * usage:
        return 2
    if abs(gap) <= max(usage / 10, 16 * MiB):
        return 3
    return 4 if gap < 0 else 5


UNIT_PANELS: dict[tuple[str, str], Callable[[Figures], float | None]] = {
    ("Verdict", ""): verdict,
    ("systemctl's number", ""): lambda f: f.get("cgroup_usage"),
    ("top's number", ""): rss,
    ("Gap", ""): lambda f: _minus(f.get("cgroup_usage"), rss(f)),
    ("Reclaimable cache", ""): reclaimable,
    ("Swap", ""): lambda f: f.get("swap"),
    ("Processes", ""): lambda f: f.get("processes"),
    ("Where the memory is", "anon"): lambda f: f.get("stat:anon"),
    ("Where the memory is", "mapped file"): lambda f: f.get("stat:file_mapped"),
    ("Where the memory is", "unmapped cache"): unmapped_cache,
    ("Where the memory is", "tmpfs / shm"): lambda f: f.get("stat:shmem"),
    ("Where the memory is", "kernel"): kernel,
    ("Where the memory is", "swap"): lambda f: f.get("swap"),
    ("Where the memory is", "systemctl's number (cgroup usage)"): lambda f: f.get("cgroup_usage"),
    ("systemctl vs top", "systemctl's number (cgroup usage)"): lambda f: f.get("cgroup_usage"),
    ("systemctl vs top", "top's number (Σ RSS of its processes)"): rss,
    ("systemctl vs top", "PSS (shared pages split)"): lambda f: f.get("pss"),
    ("systemctl vs top", "peak usage"): lambda f: f.get("peak"),
    ("Unreclaimable memory vs MemoryMax / MemoryHigh", "unreclaimable"):
        lambda f: _floor0(_minus(f.get("cgroup_usage"), reclaimable(f))),
    ("Unreclaimable memory vs MemoryMax / MemoryHigh", "working set"): lambda f: f.get("working_set"),
    ("Unreclaimable memory vs MemoryMax / MemoryHigh", "MemoryMax"): lambda f: f.get("limit:max"),
    ("Unreclaimable memory vs MemoryMax / MemoryHigh", "MemoryHigh"): lambda f: f.get("limit:high"),
}
# Panels with one series per memory.stat item ({{item}}): each item's series is the raw item.
ITEM_PANELS = ("Page cache in detail", "Kernel memory in detail")


def expected_unit_panels(f: Figures) -> dict[tuple[str, str], float | None]:
    return {key: compute(f) for key, compute in UNIT_PANELS.items()}


# The "why" table's columns, per unit.
WHY_COLUMNS: dict[str, Callable[[Figures], float | None]] = {
    "A": lambda f: f.get("cgroup_usage"),
    "B": rss,
    "C": lambda f: _minus(f.get("cgroup_usage"), rss(f)),
    "D": unmapped_cache,
    "E": lambda f: f.get("stat:shmem"),
    "F": kernel,
    "G": lambda f: anon_mapped_minus_top(f),
    "H": reclaimable,
    "I": lambda f: None if not f.get("cgroup_usage") or reclaimable(f) is None else reclaimable(f) / f["cgroup_usage"],
    "J": lambda f: f.get("swap"),
}


def host_figures(units: dict[tuple[str, str | None], Figures], layout: str) -> Figures:
    """The whole host: -.slice's own figures on v1; on v2 (no root usage) every figure summed over
    the cgroups directly under the root, each counted once (users' units are inside user.slice)."""
    if layout == "v1":
        return units[("-.slice", None)]
    total: Figures = {}
    for (unit, uid), f in units.items():
        group = f.get("control_group", "")
        if uid is None and group.count("/") == 1 and len(group) > 1:
            for name, value in f.items():
                if isinstance(value, float) and name not in ("info", "processes"):
                    total[name] = total.get(name, 0.0) + value
    return total


HOST_PANELS: dict[tuple[str, str], Callable[[Figures], float | None]] = {
    ("systemctl's number", ""): lambda f: f.get("cgroup_usage"),
    ("top's number", ""): rss,
    ("Gap", ""): lambda f: _minus(f.get("cgroup_usage"), rss(f)),
    ("Page cache", ""): lambda f: f.get("stat:file"),
    ("Reclaimable cache", ""): reclaimable,
    ("tmpfs / shm", ""): lambda f: f.get("stat:shmem"),
    ("Kernel", ""): kernel,
    ("Swap", ""): lambda f: f.get("swap"),
    ("Whole host: where the memory is", "anon"): lambda f: f.get("stat:anon"),
    ("Whole host: where the memory is", "mapped file"): lambda f: f.get("stat:file_mapped"),
    ("Whole host: where the memory is", "unmapped cache"): unmapped_cache,
    ("Whole host: where the memory is", "tmpfs / shm"): lambda f: f.get("stat:shmem"),
    ("Whole host: where the memory is", "kernel"): kernel,
    ("Whole host: where the memory is", "systemctl's number (cgroup usage)"): lambda f: f.get("cgroup_usage"),
    ("Whole host: where the memory is", "top's number (Σ RSS of its processes)"): rss,
}


def legend(q: DashboardQuery) -> str:
    return "" if q.legend == "__auto" else q.legend


def single_value(result: list[dict]) -> float | None:
    """The value of a query that must return at most one series."""
    assert len(result) <= 1, f"expected one series, got {[r['metric'] for r in result]}"
    return float(result[0]["value"][1]) if result else None


def compare(got: float | None, expected: float | None, rel: float = 1e-9) -> bool:
    if got is None or expected is None:
        return got is None and expected is None
    return abs(got - expected) <= rel * max(abs(expected), 1.0)
