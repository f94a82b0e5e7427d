"""A real Prometheus (Debian's `prometheus`, on loopback, its own config and data dir) scrapes
the exporter inside the test host (cgroup v1) and evaluates the shipped rules. Every dashboard query
returns data and the right value (tests/rules/dashboard_values.py computes each from the exporter's
own series), the host totals equal the root cgroup's, the OOM panel counts a kill exactly, and the
alert expressions tell the risky workload from its healthy look-alike."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.rules import dashboard_values as model
from tests.rules import prometheus as prom
from tests.rules import queries
from tests.testhost import workloads
from tests.truth import MiB, exporter_in_host, free_port

pytestmark = pytest.mark.e2e

JOB = prom.JOB
# What cgroup v1 cannot have: MemoryHigh (systemd maps only MemoryMax onto memory.limit_in_bytes) and
# PSI (memory.pressure needs a cgroup2 tree). tests/vm/test_v2_truth.py runs every query on v2.
V1_CANNOT_HAVE = ('limit="high"', "pressure_seconds_total")
# Opt-in series (issue 14's series budget: --collector.peak): a query reading one has data only where
# the exporter serves it.
OPT_IN = ("systemd_unit_memory_peak_bytes",)


def not_served(prometheus) -> tuple[str, ...]:
    served = {s["metric"]["__name__"] for s in prometheus.query(f'count by (__name__) ({{job="{JOB}"}})')}
    return tuple(name for name in OPT_IN if name not in served)
SHM_MIB = 160


@pytest.fixture(scope="module")
def setup(testhost, tmp_path_factory):
    units = {
        "cache": workloads.page_cache_reader(testhost, 320),
        "anon": workloads.anon_hog(testhost, 300),
        "limited": workloads.payload(testhost, "th-limited.service", "anon", 60, properties=["MemoryMax=400M"]),
        # At 85 % of its limit with anon memory: the overview's "Units in trouble" lists it.
        "tight": workloads.payload(testhost, "th-tight.service", "anon", 60, properties=["MemoryMax=80M"]),
        # tmpfs files nobody maps, and the same amount mapped by the unit's process (a database's
        # shared segment): LargeTmpfs tells them apart.
        "shm": workloads.shm_writer(testhost, SHM_MIB),
        "shm_mapped": workloads.shm_writer(testhost, SHM_MIB, mapped=True),
        "escaped": workloads.escaped_name(testhost),
    }
    try:
        with exporter_in_host(testhost, 1.0, "--collector.pss") as exporter, \
                prom.running([f"127.0.0.1:{exporter.port}"], tmp_path_factory.mktemp("prometheus"), free_port()) as (prometheus, proc):
            prometheus.wait_for_scrapes(5, timeout=60, proc=proc)
            deadline = time.monotonic() + 60
            # A child allocates past MemoryMax and is OOM-killed once Prometheus has seen the unit; the
            # unit lives on (OOMPolicy=continue: systemd would stop it otherwise), so the
            # increase of its oom_kill count is there to see.
            units["oom"] = workloads.start_unit(
                testhost, "th-oom.service",
                ["/bin/sh", "-c", "sleep 3; python3 -c 'bytearray(200 << 20)'; exec sleep infinity"],
                properties=["MemoryMax=64M", "OOMPolicy=continue"],
            )
            oom_seen = f'increase(systemd_unit_memory_events_total{{unit="{units["oom"]}", event="oom_kill"}}[1m]) > 0'
            while not prometheus.query(oom_seen):
                if time.monotonic() > deadline:
                    pytest.fail("the OOM kill in th-oom.service never showed in Prometheus")
                time.sleep(0.5)
            # The per-step panels subtract the count one step (5 s here) back: wait until th-oom's
            # series is older than that.
            aged = f'systemd_unit_memory_events_total{{unit="{units["oom"]}", event="oom_kill"}} offset 10s'
            while not prometheus.query(aged):
                assert time.monotonic() < deadline + 30, "th-oom.service's series never aged"
                time.sleep(0.5)
            yield prometheus, exporter, units
    finally:
        workloads.stop_units(testhost, units.values())


def values_for(exporter, unit: str) -> dict[str, str]:
    # A short __range and step: Prometheus has scraped for about a minute, th-oom is seconds old.
    return {"instance": f"127.0.0.1:{exporter.port}", "job": JOB, "unit_name": unit, "__range": "1m", "__interval": "5s"}


def test_prometheus_returns_per_unit_values(setup):
    prometheus, _, units = setup
    result = prometheus.query(f'systemd_unit_memory_bytes{{job="{JOB}", unit="{units["anon"]}", type="rss_anon"}}')
    assert len(result) == 1 and float(result[0]["value"][1]) >= 290 * MiB
    result = prometheus.query(f'systemd_unit_memory_bytes{{job="{JOB}", unit="{units["cache"]}", type="page_cache"}}')
    assert len(result) == 1 and float(result[0]["value"][1]) >= 300 * MiB


def test_every_dashboard_query_returns_data(setup):
    prometheus, exporter, units = setup
    cannot = V1_CANNOT_HAVE + not_served(prometheus)
    empty = [f"{q.dashboard} / {q.panel} / {q.ref_id}: {q.expr}"
             for q in queries.dashboard_queries(values_for(exporter, units["oom"]))
             # The fleet dashboard reads fleet-rules.yml (not loaded here): tests/test_fleet.py runs it.
             if q.uid != "systemd-memory-fleet"
             and not any(marker in q.expr for marker in cannot) and not prometheus.query(q.expr)]
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_host_totals_equal_the_root_cgroup(setup):
    """cgroup v1 has a usage for the root cgroup: every host figure is -.slice's own, none a sum of units."""
    prometheus, exporter, units = setup
    at = time.time() - 1
    figures = model.unit_figures(prometheus, at, JOB, f"127.0.0.1:{exporter.port}")
    host = model.host_figures(figures, "v1")
    assert host["cgroup_usage"] > 300 * MiB
    checked = wrong = 0
    for q in queries.dashboard_queries(values_for(exporter, units["anon"])):
        key = (q.panel, model.legend(q))
        if q.uid != "systemd-memory-overview" or key not in model.HOST_PANELS:
            continue
        got, expected = model.single_value(prometheus.query(q.expr, at=at)), model.HOST_PANELS[key](host)
        checked += 1
        if not model.compare(got, expected):
            wrong += 1
            print(f"{key}: panel {got}, -.slice {expected}")
    assert checked == len(model.HOST_PANELS) and not wrong


@pytest.mark.parametrize("kind", ["anon", "cache", "shm", "shm_mapped", "tight", "oom", "escaped"])
def test_unit_dashboard_shows_the_units_own_series(setup, kind):
    """Every panel of the unit dashboard, for one unit, against the exporter's series of that unit."""
    prometheus, exporter, units = setup
    at = time.time() - 1
    unit = units[kind]
    figures = model.unit_figures(prometheus, at, JOB, f"127.0.0.1:{exporter.port}")[(unit, None)]
    expected = model.expected_unit_panels(figures)
    seen = set()
    for q in queries.dashboard_queries(values_for(exporter, unit)):
        if q.uid != "systemd-memory-unit" or q.kind != "panel" or q.panel in model.TIME_BASED:
            continue
        result = prometheus.query(q.expr, at=at)
        if q.panel in model.ITEM_PANELS:
            got = {s["metric"]["item"]: float(s["value"][1]) for s in result}
            assert got == {item[5:]: v for item, v in figures.items() if item[5:] in got and item.startswith("stat:")}
            assert got, q.panel
            continue
        key = (q.panel, model.legend(q))
        seen.add(key)
        assert model.compare(model.single_value(result), expected[key]), (key, result, expected[key])
    assert seen == set(model.UNIT_PANELS)
    assert expected[("systemctl vs top", "PSS (shared pages split)")] is not None  # --collector.pss


def test_verdicts_name_the_workloads(setup):
    """The verdict tile says what `explain` says: cache for the reader, tmpfs for the writer."""
    prometheus, exporter, units = setup
    verdict = next(q for q in queries.dashboard_queries(values_for(exporter, units["cache"])) if q.panel == "Verdict")
    assert model.single_value(prometheus.query(verdict.expr)) == 1
    verdict = next(q for q in queries.dashboard_queries(values_for(exporter, units["shm"])) if q.panel == "Verdict")
    assert model.single_value(prometheus.query(verdict.expr)) == 2


def test_why_table_rows_are_each_units_own_figures_once(setup):
    prometheus, exporter, units = setup
    at = time.time() - 1
    figures = model.unit_figures(prometheus, at, JOB, f"127.0.0.1:{exporter.port}")
    table = [q for q in queries.dashboard_queries(values_for(exporter, units["anon"]))
             if q.panel.startswith("Per unit: systemctl's number")]
    assert [q.ref_id for q in table] == list(model.WHY_COLUMNS)
    for q in table:
        rows = [(s["metric"]["unit"], s["metric"].get("uid")) for s in prometheus.query(q.expr, at=at)]
        assert len(rows) == len(set(rows)), f"{q.ref_id}: a unit twice"
        for series in prometheus.query(q.expr, at=at):
            key = (series["metric"]["unit"], series["metric"].get("uid"))
            assert figures[key]["unit_type"] != "slice" and figures[key]["cgroup_usage"] > 0
            expected = model.WHY_COLUMNS[q.ref_id](figures[key])
            assert model.compare(float(series["value"][1]), expected), (q.ref_id, key)
        if q.ref_id == "A":
            assert {units[k] for k in ("anon", "cache", "shm")} <= {unit for unit, _ in rows}


def test_oom_panel_counts_the_kill_exactly(setup):
    """Summed over the time range, the per-step bars give the counter's increase: 1, not 2-4."""
    prometheus, exporter, units = setup
    end = time.time()
    step = 5.0
    start = end - 600  # before the OOM unit started: the whole count
    oom = next(q for q in queries.dashboard_queries({**values_for(exporter, units["oom"]), "__interval": f"{step:g}s"})
               if q.panel == "OOM kills")
    bars = prometheus.query_range(oom.expr, start, end, step)
    total = sum(float(v) for series in bars for _, v in series["values"])
    counter = f'systemd_unit_memory_events_total{{unit="{units["oom"]}", event="oom_kill"}}'
    before = prometheus.query(counter, at=start - step)
    after = prometheus.query(counter, at=end)
    expected = float(after[0]["value"][1]) - (float(before[0]["value"][1]) if before else 0.0)
    assert expected == 1 and total == expected
    # "Units in trouble" on the overview: the same one kill over the time range, for th-oom.
    trouble = next(q for q in queries.dashboard_queries({**values_for(exporter, units["oom"]), "__range": "10m"})
                   if q.panel == "Units in trouble" and q.ref_id == "A")
    kills = {s["metric"]["unit"]: float(s["value"][1]) for s in prometheus.query(trouble.expr, at=end)}
    assert kills.get(units["oom"]) == 1, kills


RECORDED = {  # per-unit recording rule -> its value from the unit's own series
    "unit:systemd_unit_memory_rss_bytes:sum": model.rss,
    "unit:systemd_unit_memory_gap_bytes": lambda f: f["cgroup_usage"] - model.rss(f),
    "unit:systemd_unit_memory_reclaimable_cache_bytes": model.reclaimable,
    "unit:systemd_unit_memory_reclaimable_cache_share:ratio": lambda f: model.reclaimable(f) / f["cgroup_usage"],
    "unit:systemd_unit_memory_unreclaimable_bytes": lambda f: max(f["cgroup_usage"] - model.reclaimable(f), 0),
    "unit:systemd_unit_memory_unmapped_cache_bytes": model.unmapped_cache,
    "unit:systemd_unit_memory_unmapped_shmem_bytes": lambda f: max(f["stat:shmem"] - f["rss_shmem"], 0),
}
LIMITED = {  # the same for rules that need a MemoryMax
    'unit:systemd_unit_memory_working_set_to_limit:ratio{limit="max"}': lambda f: f["working_set"] / f["limit:max"],
    "unit:systemd_unit_memory_unreclaimable_to_max:ratio":
        lambda f: max(f["cgroup_usage"] - model.reclaimable(f), 0) / f["limit:max"],
}


def recorded_at(prometheus, selector: str, deadline: float) -> tuple[float, float]:
    """(value, evaluation time) of the latest sample of a recorded series, waiting for its first."""
    while not (found := prometheus.query(f"timestamp({selector})")):
        assert time.monotonic() < deadline, f"{selector}: never recorded"
        time.sleep(0.5)
    at = float(found[0]["value"][1])
    return model.single_value(prometheus.query(selector, at=at)), at


def test_recording_rules_equal_the_exporters_series(setup):
    """Every recorded series against the exporter's own series at the instant it was recorded."""
    prometheus, exporter, units = setup
    instance = f"127.0.0.1:{exporter.port}"
    deadline = time.monotonic() + 30
    wrong = []
    cases = [(rule, compute, kind) for rule, compute in RECORDED.items() for kind in ("anon", "cache", "shm", "shm_mapped")]
    cases += [(rule, compute, kind) for rule, compute in LIMITED.items() for kind in ("limited", "tight")]
    for rule, compute, kind in cases:
        unit = units[kind]
        selector = rule.replace("}", f', unit="{unit}"}}') if "{" in rule else f'{rule}{{unit="{unit}"}}'
        got, at = recorded_at(prometheus, selector, deadline)
        expected = compute(model.unit_figures(prometheus, at, JOB, instance)[(unit, None)])
        if not model.compare(got, expected):
            wrong.append(f"{rule} {kind}: recorded {got}, from its series {expected}")
    for rule, figure in (('instance:systemd_unit_memory_bytes:sum{type="cgroup_usage"}', "cgroup_usage"),
                         ('instance:systemd_unit_memory_stat_bytes:sum{item="anon"}', "stat:anon"),
                         ('instance:systemd_unit_memory_stat_bytes:sum{item="file"}', "stat:file")):
        got, at = recorded_at(prometheus, rule, deadline)
        expected = model.host_figures(model.unit_figures(prometheus, at, JOB, instance), "v1")[figure]
        if not model.compare(got, expected):
            wrong.append(f"{rule}: recorded {got}, -.slice {expected}")
    assert not wrong, "\n".join(wrong)
    # The OOM kill: counted for th-oom, and th-oom accounts for it in system.slice (no slice alert).
    kills, _ = recorded_at(prometheus, f'unit:systemd_unit_memory_oom_kills:increase10m{{unit="{units["oom"]}"}}', deadline)
    assert 1 <= kills < 2
    unaccounted, _ = recorded_at(prometheus, 'unit:systemd_unit_memory_oom_kills_unaccounted:increase10m{unit="system.slice"}',
                                 deadline)
    assert unaccounted < 0.5
    share = {kind: float(prometheus.query(
        f'unit:systemd_unit_memory_reclaimable_cache_share:ratio{{unit="{units[kind]}"}}')[0]["value"][1])
        for kind in ("cache", "anon")}
    assert share["cache"] > 0.8 and share["anon"] < 0.2


def test_large_tmpfs_alert_fires_on_unmapped_tmpfs_only(setup):
    """The alert's expression with its byte threshold lowered to the test's size (the logic is
    unchanged): the writer whose files nobody maps fires, the one that maps them (like a database's
    shared memory) does not."""
    prometheus, _, units = setup
    expr = queries.alert_expr("SystemdUnitLargeTmpfs")
    assert "1024 * 1024 * 1024  # threshold: bytes" in expr
    expr = expr.replace("1024 * 1024 * 1024  # threshold: bytes", f"{SHM_MIB // 2} * 1024 * 1024")
    deadline = time.monotonic() + 30
    while not (firing := {s["metric"]["unit"] for s in prometheus.query(expr)}):
        assert time.monotonic() < deadline, "the tmpfs rules produced nothing"
        time.sleep(0.5)
    assert units["shm"] in firing
    assert units["shm_mapped"] not in firing
    assert firing <= {units["shm"]}, firing


def test_near_memory_max_reads_unreclaimable_memory(setup):
    """The anon unit at 85 % of its MemoryMax is over the alert's line; the page-cache reader, whose
    usage is mostly cache, is not (it has no limit here: its unreclaimable share of anything is low)."""
    prometheus, _, units = setup
    ratio = {s["metric"]["unit"]: float(s["value"][1])
             for s in prometheus.query("unit:systemd_unit_memory_unreclaimable_to_max:ratio")}
    assert ratio[units["tight"]] >= 0.7
    assert ratio[units["limited"]] < 0.3


# --- cgroup v2 without a guest: the captured v2 /metrics, served as it is --------------------------
V2_GOLDEN = queries.REPO_ROOT / "tests" / "fixtures" / "v2" / "metrics.golden"


@pytest.fixture(scope="module")
def v2_capture(tmp_path_factory):
    """A real Prometheus scraping tests/fixtures/v2/metrics.golden (the exporter's output rendered
    from the tree captured in the v2 guest, tests/fixtures/v2/SOURCE.md) from a loopback server:
    the v2 branches of every query (no root usage, so host totals sum the top-level cgroups) in a few
    seconds. tests/vm/test_v2_truth.py runs the same checks against the live guest."""
    import http.server
    import threading

    body = V2_GOLDEN.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    target = f"127.0.0.1:{server.server_port}"
    try:
        with prom.running([target], tmp_path_factory.mktemp("prometheus-v2"), free_port()) as (prometheus, proc):
            prometheus.wait_for_scrapes(3, timeout=60, proc=proc)
            yield prometheus, target
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def test_v2_capture_host_totals_are_the_top_level_cgroups(v2_capture):
    prometheus, target = v2_capture
    at = time.time() - 1
    figures = model.unit_figures(prometheus, at, JOB, target)
    assert "cgroup_usage" not in figures[("-.slice", None)], "the v2 root has no memory.current"
    host = model.host_figures(figures, "v2")
    wrong = []
    for q in queries.dashboard_queries({"instance": target, "job": JOB}):
        key = (q.panel, model.legend(q))
        if q.uid == "systemd-memory-overview" and key in model.HOST_PANELS:
            got, expected = model.single_value(prometheus.query(q.expr, at=at)), model.HOST_PANELS[key](host)
            if not model.compare(got, expected):
                wrong.append(f"{key}: panel {got}, top-level cgroups summed {expected}")
    assert host["cgroup_usage"] > 300 * MiB and not wrong, wrong


def test_v2_capture_unit_panels_are_the_units_own_series(v2_capture):
    prometheus, target = v2_capture
    at = time.time() - 1
    figures = model.unit_figures(prometheus, at, JOB, target)
    wrong, checked = [], 0
    for (unit, uid), f in figures.items():
        if "cgroup_usage" not in f:
            continue
        expected = model.expected_unit_panels(f)
        for q in queries.dashboard_queries({"instance": target, "job": JOB, "unit_name": unit}):
            key = (q.panel, model.legend(q))
            if q.uid == "systemd-memory-unit" and key in expected:
                checked += 1
                got = model.single_value(prometheus.query(q.expr, at=at))
                if not model.compare(got, expected[key]):
                    wrong.append(f"{unit} {key}: panel {got}, its series {expected[key]}")
    assert checked > 200 and not wrong, wrong
    # The verdicts of the captured workloads, as explain gives them.
    verdicts = {unit: model.verdict(f) for (unit, _), f in figures.items()}
    assert verdicts["smx-cache-2.service"] == 1 and verdicts["smx-shm-3.service"] == 2


def test_v2_capture_recording_rules(v2_capture):
    prometheus, target = v2_capture
    deadline = time.monotonic() + 30
    got, at = recorded_at(prometheus, 'instance:systemd_unit_memory_stat_bytes:sum{item="kernel"}', deadline)
    host = model.host_figures(model.unit_figures(prometheus, at, JOB, target), "v2")
    assert model.compare(got, host["stat:kernel"])
    got, at = recorded_at(prometheus, 'instance:systemd_unit_memory_bytes:sum{type="cgroup_usage"}', deadline)
    assert model.compare(got, host["cgroup_usage"])
    # The captured shm writer's 100 MiB are unmapped; LargeTmpfs (threshold lowered) names it.
    expr = queries.alert_expr("SystemdUnitLargeTmpfs").replace("1024 * 1024 * 1024  # threshold: bytes", "50 * 1024 * 1024")
    while not (firing := {s["metric"]["unit"] for s in prometheus.query(expr)}):
        assert time.monotonic() < deadline, "the tmpfs rules produced nothing"
        time.sleep(0.5)
    assert firing == {"smx-shm-3.service"}


def test_most_stalled_panel_keeps_one_set_of_ten_over_the_range(tmp_path):
    """The overview's "most stalled units" picks its 10 once, over the whole range (@ end() on
    the range selector). Backfilled into a real Prometheus: burst.service stalls hard for 4
    minutes and then not at all (11th over the hour, but top at its minutes); late.service stalls
    only in the second half (in the 10). Chosen per step, burst.service shows and late.service
    comes and goes; chosen once, the lines are exactly the hour's top 10, non-slices only."""
    start = (int(time.time()) // 3600 - 3) * 3600  # three hours back: backfilled blocks, not the head
    step, minutes = 15, 60
    per_minute = {f"s{i:02d}.service": [3.0] * minutes for i in range(1, 10)}  # 5 % of the time
    per_minute["s10.service"] = [2.4] * minutes  # 4 %
    per_minute["burst.service"] = [30.0] * 4 + [0.0] * (minutes - 4)  # 50 % for 4 minutes
    per_minute["late.service"] = [0.0] * 30 + [6.0] * 30  # 10 % in the second half
    per_minute["system.slice"] = [40.0] * minutes  # a slice: never listed
    labels = 'instance="h1:9558",job="systemd-memory-exporter"'  # OpenMetrics: no space after a comma
    lines = []
    for unit, rates in per_minute.items():
        kind = "slice" if unit.endswith(".slice") else "service"
        total = 0.0
        for n in range(minutes * 60 // step + 1):
            at = start + n * step
            lines.append(f'systemd_unit_info{{{labels},unit="{unit}",unit_type="{kind}"}} 1 {at}')
            lines.append(f'systemd_unit_memory_pressure_seconds_total{{{labels},unit="{unit}",kind="full"}} {total:.3f} {at}')
            if n * step < minutes * 60:
                total += rates[n * step // 60] * step / 60
    lines.sort(key=lambda line: (line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])))
    (tmp_path / "series.om").write_text("\n".join(lines) + "\n# EOF\n")
    data = tmp_path / "data"
    made = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(tmp_path / "series.om"), str(data)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    hour = {unit: sum(rates) for unit, rates in per_minute.items() if unit.endswith(".service")}
    expected = set(sorted(hour, key=hour.get, reverse=True)[:10])
    assert "late.service" in expected and not {"burst.service", "s10.service"} & expected  # the data does its job
    panel = next(q for q in queries.dashboard_queries({"instance": "h1:9558", "job": JOB, "unit_name": "x",
                                                      "__range": "1h", "__interval": "1m"})
                 if q.panel == "Memory pressure: most stalled units")
    with prom.running([], tmp_path, free_port()) as (prometheus, proc):
        deadline = time.monotonic() + 60
        while True:
            try:
                if prometheus.query(f"count(systemd_unit_info @ {start + 1800})"):
                    break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline and proc.poll() is None, "Prometheus never served the blocks"
            time.sleep(0.5)
        lines_drawn = prometheus.query_range(panel.expr, start + 60, start + 3600, 60)
    shown = {series["metric"]["unit"] for series in lines_drawn}
    assert shown == expected, shown ^ expected
    late = next(s for s in lines_drawn if s["metric"]["unit"] == "late.service")
    # late.service's line: 0 % in the first half, 10 % once its stalls began.
    assert float(dict(late["values"])[start + 3000]) == pytest.approx(0.1)
    assert float(dict(late["values"])[start + 600]) == 0
