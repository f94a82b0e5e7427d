"""PromQL building blocks, parameterised by the selectors (job, optional cluster), as a mixin's config.

Metric names and labels: the contract in README.md ("## Metrics"); tests/test_dashboards.py rejects
any other name.
"""

from __future__ import annotations

from dataclasses import dataclass

RSS_TYPES = "rss_anon|rss_file|rss_shmem"
UNMAPPED_CACHE = ("file", "file_mapped", "shmem")  # the first minus the others
RECLAIMABLE = ("file", "shmem", "file_dirty", "file_writeback")


@dataclass(frozen=True)
class Selectors:
    """What every query is filtered by.

    job: a label matcher for the exporter's job. The default goes through the dashboard's $job
    variable; any other matcher (e.g. 'job="sme"') fixes the job and drops the variable.
    cluster_label: when set, a cluster variable over this label is added and every query filters on it.
    """

    job: str = 'job="$job"'
    cluster_label: str | None = None

    @property
    def job_variable(self) -> bool:
        return self.job == 'job="$job"'

    @property
    def scope(self) -> str:
        """The job (and cluster): everything the instance variable is chosen from."""
        if self.cluster_label:
            return f'{self.cluster_label}="$cluster", {self.job}'
        return self.job

    @property
    def host(self) -> str:
        # job and instance are single-valued variables (exact match: an IPv6 instance would be a
        # broken regex); unit is multi-valued, so a regex. Its "All" value is ".+".
        return f'{self.scope}, instance="$instance"'

    @property
    def units(self) -> str:
        # uid: the user a unit belongs to (issue 12; system units have none, which "" matches).
        return self.host + ', unit=~"$unit", uid=~"$uid"'

    @property
    def one_unit(self) -> str:
        """For a single-select unit variable: Grafana regex-escapes only multi-value variables, so the
        value is escaped explicitly (${unit:regex}) inside a raw string, where systemd's backslash
        escapes (foo\\x2dbar.service) stay literal."""
        return self.host + ', unit=~`${unit:regex}`, uid=~"$uid"'

    @property
    def root(self) -> str:
        return self.host + ', unit="-.slice"'


class Queries:
    """The queries of every dashboard; sel arguments default to the selected units of the host."""

    def __init__(self, selectors: Selectors = Selectors(), single_unit: bool = False):
        self.sel = selectors
        self.single_unit = single_unit
        self.host = selectors.host
        self.units = selectors.one_unit if single_unit else selectors.units
        self.root = selectors.root
        # Slices contain their services and scopes: "top units" and sums over units leave them out.
        self.not_slice_info = f'systemd_unit_info{{unit_type!="slice", {self.host}}}'
        # Sums over units also leave out users' own units (uid="..."): user@UID.service holds them.
        self.summable_info = f'systemd_unit_info{{unit_type!="slice", uid="", {self.host}}}'
        # Cgroups directly under the root (system.slice, user.slice, machine.slice, init.scope, ...).
        self.top_level_info = f'systemd_unit_info{{control_group=~"/[^/]+", {self.host}}}'
        self.slice_info = f'systemd_unit_info{{unit_type="slice", {self.host}}}'

    def mem(self, kind: str, sel: str | None = None) -> str:
        return f'systemd_unit_memory_bytes{{type="{kind}", {sel or self.units}}}'

    def stat(self, item: str, sel: str | None = None) -> str:
        op = "=~" if "|" in item else "="
        return f'systemd_unit_memory_stat_bytes{{item{op}"{item}", {sel or self.units}}}'

    def metric(self, name: str, matchers: str = "") -> str:
        """Any other series of the selected units; matchers go before the selectors."""
        return f"{name}{{{matchers + ', ' if matchers else ''}{self.units}}}"

    def usage(self, sel: str | None = None) -> str:
        """systemctl's number: the cgroup's memory usage (MemoryCurrent)."""
        return self.mem("cgroup_usage", sel)

    def rss_parts(self, sel: str | None = None) -> str:
        """RssAnon, RssFile and RssShmem of the unit's processes, one series each."""
        return f'systemd_unit_memory_bytes{{type=~"{RSS_TYPES}", {sel or self.units}}}'

    def rss(self, sel: str | None = None) -> str:
        """top's number: RES of every process in the unit, summed."""
        return f"sum without (type) ({self.rss_parts(sel)})"

    def gap(self, sel: str | None = None) -> str:
        return f"{self.usage(sel)}\n- ignoring (type)\n{self.rss(sel)}"

    def unmapped_cache(self, sel: str | None = None) -> str:
        """Page cache no process maps; floored because mapped tmpfs pages are in file_mapped and shmem."""
        return _floored_difference([self.stat(item, sel) for item in UNMAPPED_CACHE], per_unit=True)

    def reclaimable(self, sel: str | None = None) -> str:
        """Cache the kernel can drop: file minus tmpfs/shm minus dirty and writeback pages."""
        return _floored_difference([self.stat(item, sel) for item in RECLAIMABLE], per_unit=True)

    def reclaimable_share(self) -> str:
        return f"{self.reclaimable()}\n/ ignoring (item, type) ({self.usage()} > 0)"

    def kernel(self, sel: str | None = None) -> str:
        """memory.stat kernel: v2 5.18+ prints it, the exporter sums its parts on older v2
        kernels (exporter/memory.py summed_kernel), v1 takes memory.kmem.usage_in_bytes."""
        return self.stat("kernel", sel)

    def mapped_and_anon_minus_top(self, sel: str | None = None) -> str:
        """What is left of the gap: pages the cgroup counts once and top counts per process (or not)."""
        return (
            f'{self.stat("anon", sel)}\n+ ignoring (item) {self.stat("file_mapped", sel)}\n- ignoring (item)\n'
            f"{self.rss(sel)}"
        )

    def not_slice(self, expr: str) -> str:
        return f"(\n{expr}\n)\nand on (instance, job, unit, uid) {self.not_slice_info}"

    def per_unit(self, expr: str, nonzero: bool = False) -> str:
        """One series per unit with the same labels, so a table can merge several queries.

        nonzero: only units with a usage above 0 (a table of every idle unit hides the ones that matter).
        """
        rows = f"sum by (instance, job, unit, uid) (\n{self.not_slice(expr)}\n)"
        return f"{rows}\nand on (instance, job, unit, uid) ({self.usage()} > 0)" if nonzero else rows

    def per_unit_any(self, expr: str) -> str:
        """One series per unit, slices included (limits and OOM kills of slices are their own)."""
        return f"sum by (instance, job, unit, uid) (\n{expr}\n)"

    def rate_of(self, name: str, matchers: str, window: str = "$__rate_interval", at: str = "") -> str:
        """``at``: an @ modifier for the range selector ("end()": the rate over the whole range)."""
        return f"rate({self.metric(name, matchers)}[{window}]{' @ ' + at if at else ''})"

    def sum_units(self, expr: str) -> str:
        """expr summed over the selected units, each page once: no slices, no users' own units."""
        return f"sum(\n(\n{expr}\n)\nand on (instance, job, unit, uid) {self.summable_info}\n)"

    def unreclaimable(self, sel: str | None = None) -> str:
        """What reclaim cannot free: usage minus reclaimable cache (the recording rule's definition)."""
        return f"clamp_min(\n{self.usage(sel)}\n- ignoring (type)\n{self.reclaimable(sel)},\n0\n)"

    def to_limit(self, expr: str, limits: str = "max|high") -> str:
        """expr as a share of each configured limit (the limit label tells which)."""
        limit = self.metric("systemd_unit_memory_limit_bytes", 'limit=~"' + limits + '"')
        return f"{expr}\n/ ignoring (limit) group_right\n{limit}"

    def counted(self, event: str) -> str:
        """memory.events increments per graph step, exact: no overlapping windows, no extrapolation."""
        events = self.metric("systemd_unit_memory_events_total", 'event=~"' + event + '"')
        return f"clamp_min(\n{events}\n- {events} offset $__interval,\n0\n)"

    def counted_in_range(self, event: str) -> str:
        """memory.events increments over the dashboard's time range, exact unless the counter restarted."""
        events = self.metric("systemd_unit_memory_events_total", 'event="' + event + '"')
        return f"max_over_time({events}[$__range])\n- min_over_time({events}[$__range])"

    def verdict(self) -> str:
        """explain's verdict as a number (the panel maps it to text), first match wins:
        1 mostly unmapped page cache, 2 tmpfs/shm, 3 systemctl and top close, 4 top counts shared
        pages more than once, 5 systemctl counts more than top. No cgroup figure: no value."""
        usage, cache, shmem, gap = (
            f"sum by (instance, job, unit, uid) ({expr})"
            for expr in (self.usage(), self.unmapped_cache(), self.stat("shmem"), self.gap())
        )
        return (
            f"(0 * {usage} + 1) and ({cache} >= 0.5 * {usage})\n"
            f"or (0 * {usage} + 2) and ({shmem} >= 0.3 * {usage})\n"
            f"or (0 * {usage} + 3) and (abs({gap}) <= clamp_min({usage} / 10, 16 * 1024 * 1024))\n"
            f"or (0 * {usage} + 4) and ({gap} < 0)\n"
            f"or (0 * {usage} + 5)"
        )

    def host_total(self, part) -> str:
        """Whole-host figure: the root slice if the exporter reports a usage for it, else the top-level cgroups.

        cgroup v1 has a usage for the root cgroup (-.slice); cgroup v2 has no memory.current there, and
        then every part comes from the top-level cgroups too, so the host figures add up. Summing all
        units instead would count each service again in every slice above it.
        """
        # Parentheses around part: `and` binds tighter than `or`, and kernel() is an `or` (issue 15:
        # without them the top-level filter applied only to its fallback, summing every unit).
        return (
            f"sum by (instance) (\n{part(self.root)}\n)\nand on (instance) sum by (instance) ({self.usage(self.root)})\nor\n"
            f"sum by (instance) (\n(\n{part(self.host)}\n)\nand on (instance, job, unit, uid) {self.top_level_info}\n)"
        )

    def host_stat(self, item: str) -> str:
        return self.host_total(lambda s: self.stat(item, s))

    def host_unmapped_cache(self) -> str:
        return _floored_difference([self.host_stat(item) for item in UNMAPPED_CACHE], per_unit=False)

    def host_reclaimable(self) -> str:
        return _floored_difference([self.host_stat(item) for item in RECLAIMABLE], per_unit=False)

    def layers(self, of_host: bool = False) -> list[tuple[str, str]]:
        """(expr, legend) of the parts that stack up to systemctl's number, for the unit or the host."""
        stat = self.host_stat if of_host else self.stat
        unmapped = self.host_unmapped_cache() if of_host else self.unmapped_cache()
        kernel = self.host_total(self.kernel) if of_host else self.kernel()
        return [(stat("anon"), "anon"), (stat("file_mapped"), "mapped file"), (unmapped, "unmapped cache"),
                (stat("shmem"), "tmpfs / shm"), (kernel, "kernel")]

    def host_gap(self) -> str:
        return f"(\n{self.host_total(self.usage)}\n)\n-\n(\n{self.host_total(self.rss_parts)}\n)"

    @staticmethod
    def top(n: int, expr: str) -> str:
        return f"sort_desc(topk({n}, {expr}))"


def _floored_difference(terms: list[str], per_unit: bool) -> str:
    """The first term minus the others, at least 0 (per-unit terms differ in their item label)."""
    head, minus, tail = ("\n  ", "\n  - ignoring (item) ", ",\n  0\n)") if per_unit else ("\n(", ")\n- (", "),\n0\n)")
    return "clamp_min(" + head + minus.join(terms) + tail
