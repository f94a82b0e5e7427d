"""The exporter as a fleet: 52 exporter instances, one real Prometheus scraping them all with the
shipped rules (their group intervals shortened to the test's 5 s), a second federating the fleet
aggregates from it, a third receiving them by remote write (Debian 12's prometheus 2.42,
--web.enable-remote-write-receiver).

The hosts are the two captured fixture trees (tests/fixtures/hybrid: cgroup v1 hybrid;
tests/fixtures/v2: unified), copied once per instance and made different from each other: every
byte figure of the memory files and of /proc/PID/status scaled by a per-instance factor, one
service left out per instance, and OOM kills added to a few hosts while Prometheus watches. Units
come from each tree's units.json through tests/fleet_exporter.py (why not a real systemd: see
there). Two clusters (a target label) make sure aggregates keep the labels they should.

Checked: every query of the fleet dashboard returns data in the first Prometheus; the fleet host
totals equal sums made here from the trees' own files; OOM kills reach the per-host and
per-cluster aggregates; the host dashboards keep their data under the default series budget;
the remote-written series equal the originals sample for sample and the federated ones are
original samples (those the federation's scrapes saw), labels included. Without Prometheus: the
series budget per unit, the budget flags, and that every rule reads only default series.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from exporter import cli
from exporter.render import DEFAULT_BUDGET, EVERY_SERIES, SeriesBudget
from tests.bench import series as series_bench
from tests.fleet_exporter import EVERY_SERIES_FLAGS
from tests.processes import end
from tests.rules import promql_names, queries

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
JOB = "systemd-memory-exporter"
# Two more exporters on the trees of the first two hosts, with every --collector.* series on, in a
# job of their own: the host dashboards compared under both budgets.
ALL_JOB = "systemd-memory-exporter-all-series"
INSTANCES = 52
INTERVAL = 5  # seconds: --sample.interval, scrape, evaluation, federation
FLEET_DASHBOARD = "systemd-memory-fleet"
# What the second and third Prometheus take: every per-host, per-unit-name and per-job aggregate
# (README, "Running it on a fleet").
FLEET_SERIES = r"(instance|job_unit|job):systemd_.+"
# Units whose OOM kills the test adds (a non-slice unit in each capture).
OOM_UNIT = {"hybrid": "hog.service", "v2": "smx-oom-8.service"}

# Never left out of a host: the OOM units, and the v2 capture's unit with every limit set.
KEPT_UNITS = {*OOM_UNIT.values(), "smx-limited-9.service"}
# Byte figures: cgroup memory files, and the sizes in /proc/PID/status. Values of 2**60 and more
# are v1's "unlimited" and stay as they are.
_SCALED_CGROUP_FILES = re.compile(
    r"memory\.(current|usage_in_bytes|stat|peak|max_usage_in_bytes|swap\.current|kmem\.usage_in_bytes|max|high|limit_in_bytes)"
)
_STATUS_SIZE = re.compile(r"^((?:Rss\w+|VmRSS|VmSwap):\s+)(\d+)", re.M)


def _scale_integers(text: str, factor: float) -> str:
    return re.sub(r"\b\d+\b", lambda m: m.group() if int(m.group()) >= 1 << 60 else str(int(int(m.group()) * factor)), text)


def _rewrite(path: Path, text: str) -> None:
    """Atomically, as the exporter may be reading it."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_host(index: int, workdir: Path) -> tuple[Path, str]:
    """A copy of one capture, different from every other instance's. Returns (tree, capture name)."""
    capture = ("hybrid", "v2")[index % 2]
    tree = workdir / f"host{index:02d}"
    shutil.copytree(FIXTURES / capture, tree, symlinks=True)
    factor = 0.5 + index * 0.03125
    for path in (tree / "sys/fs/cgroup").rglob("memory.*"):
        if path.is_file() and _SCALED_CGROUP_FILES.fullmatch(path.name):
            path.write_text(_scale_integers(path.read_text(), factor))
    for path in (tree / "proc").glob("[0-9]*/status"):
        path.write_text(_STATUS_SIZE.sub(lambda m: m.group(1) + str(int(int(m.group(2)) * factor)), path.read_text()))
    units = json.loads((tree / "units.json").read_text())
    services = [u["name"] for u in units if u["type"] == "service" and u["name"] not in KEPT_UNITS]
    left_out = services[index % len(services)]
    (tree / "units.json").write_text(json.dumps([u for u in units if u["name"] != left_out], indent=1))
    return tree, capture


def memory_dir(tree: Path, capture: str, control_group: str) -> Path:
    return tree / "sys/fs/cgroup" / ("memory" if capture == "hybrid" else "") / control_group.lstrip("/")


def add_oom_kills(tree: Path, capture: str, kills: int) -> None:
    unit = next(u for u in json.loads((tree / "units.json").read_text()) if u["name"] == OOM_UNIT[capture])
    path = memory_dir(tree, capture, unit["control_group"]) / ("memory.oom_control" if capture == "hybrid" else "memory.events")
    text = path.read_text()
    assert re.search(r"^oom_kill \d+$", text, re.M), f"{path} has no oom_kill line"
    _rewrite(path, re.sub(r"^oom_kill (\d+)$", lambda m: f"oom_kill {int(m.group(1)) + kills}", text, flags=re.M))


def top_level_usage(tree: Path, capture: str) -> int:
    """What instance:systemd_unit_memory_cgroup_usage_bytes:sum must be, from the files."""
    total = 0
    for unit in json.loads((tree / "units.json").read_text()):
        if re.fullmatch(r"/[^/]+", unit["control_group"]):
            usage = memory_dir(tree, capture, unit["control_group"]) / ("memory.usage_in_bytes" if capture == "hybrid" else "memory.current")
            if usage.exists():
                total += int(usage.read_text())
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1)) / 1024


class Prom:
    def __init__(self, name: str, port: int, workdir: Path, config: dict, flags: tuple[str, ...] = ()):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        directory = workdir / name
        directory.mkdir()
        (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = directory / "prometheus.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", *flags],
                stdout=subprocess.DEVNULL, stderr=log,
            )

    def api(self, path: str, **params) -> dict:
        data = urllib.parse.urlencode(params).encode()
        with urllib.request.urlopen(self.url + path, data=data if params else None, timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        return self.api("/api/v1/query", query=expr, **({"time": f"{at:.3f}"} if at else {}))["result"]

    def wait(self, what: str, condition, timeout: float):
        """Polls condition() until it returns something truthy; fails with `what` and the log."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log.read_text()[-3000:]}"
            try:
                last = condition()
                if last:
                    return last
            except OSError as e:  # not listening yet
                last = e
            time.sleep(1)
        raise AssertionError(f"{self.name}: {what} within {timeout:.0f}s (last: {last!r})\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        end(self.proc, timeout=30)


def raw_samples(prom: Prom, at: float, drop: tuple[str, ...] = ()) -> dict:
    """Every fleet series' raw samples in the 30 s before `at`: {labels: ((t, v), ...)}."""
    found = {}
    for series in prom.query(f'{{__name__=~"{FLEET_SERIES}"}}[30s]', at):
        labels = tuple(sorted((k, v) for k, v in series["metric"].items() if k not in drop))
        found[labels] = tuple((round(float(t), 3), v) for t, v in series["values"])
    return found


# --- the series budget, without Prometheus ------------------------------------------------------
def test_default_budget_holds_per_unit_and_every_flag_gives_everything_back(tmp_path):
    """tests/bench/series.py's count on the captured trees grown to 30 units: at most 20 series
    per unit on v1 and 24 on v2 with the default flags, limits included."""
    results = series_bench.measure(tmp_path, sizes=(30,))
    for (version, template, _, budget), figures in results.items():
        if budget == "default":
            assert figures["series per unit"] <= series_bench.BUDGET[version], (version, template, figures)
    for version in series_bench.CAPTURES:
        for template in ("plain", "limited"):
            default, everything = (results[(version, template, 30, b)] for b in ("default", "all"))
            assert everything["series per unit"] > default["series per unit"]
    # Every flag on is what the exporter served before the budget: the capture's v1 27 and v2 39.
    assert results[("v1", "plain", 30, "all")]["series per unit"] == 27
    assert results[("v2", "plain", 30, "all")]["series per unit"] == 39


def _serve_args(*flags: str):
    serve, _ = cli.build_parsers()
    return serve.parse_args(list(flags))


def test_budget_flags():
    assert cli.series_budget(_serve_args()) == DEFAULT_BUDGET
    assert cli.series_budget(_serve_args(*EVERY_SERIES_FLAGS)) == EVERY_SERIES
    trimmed = cli.series_budget(_serve_args("--collector.stat.fields=anon|file", "--collector.events.fields=",
                                            "--no-collector.peak"))
    assert trimmed.stat_items == {"anon", "file"} and trimmed.events == frozenset() and not trimmed.peak


@pytest.mark.parametrize("flag", ["--collector.stat.fields=anonn", "--collector.events.fields=(",
                                  "--collector.limits.fields=MemoryMax", "--collector.pressure.fields=partial"])
def test_bad_budget_flags_exit_2_with_a_message(flag):
    result = subprocess.run([sys.executable, "-m", "exporter", flag], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result
    assert flag.split("=")[0] in result.stderr and "Traceback" not in result.stderr


# Which family's label a budget field filters, and the budget's set for it.
_BUDGET_LABELS = {
    ("systemd_unit_memory_stat_bytes", "item"): "stat_items",
    ("systemd_unit_memory_events_total", "event"): "events",
    ("systemd_unit_memory_limit_bytes", "limit"): "limits",
    ("systemd_unit_memory_pressure_seconds_total", "kind"): "pressure",
}


def opt_in_reads(expr: str, budget: SeriesBudget = DEFAULT_BUDGET) -> set[str]:
    """What an expression selects that the budget leaves out: 'item=active_file', 'peak', ..."""
    found = promql_names.names(expr)
    reads = {"peak"} if "systemd_unit_memory_peak_bytes" in found.metrics and not budget.peak else set()
    for m in found.matchers:
        field = _BUDGET_LABELS.get((m.metric, m.label))
        if field and m.op in ("=", "=~"):
            values = promql_names.literal_values(m)
            assert values is not None, f"{expr}: {m} is a pattern, not a list of names"
            reads |= {f"{m.label}={v}" for v in values - getattr(budget, field)}
    return reads


def test_rules_and_the_fleet_dashboard_read_only_default_series():
    """Every alert, recording rule (and the queries in alert annotations) and every fleet
    dashboard query works with the default flags."""
    reads = {f"{r.file.name} {r.name}": opt_in_reads(r.expr) for r in queries.rule_expressions()}
    reads.update({f"fleet dashboard {q.panel}": opt_in_reads(q.expr) for q in queries.dashboard_queries() if q.uid == FLEET_DASHBOARD})
    assert not {k: v for k, v in reads.items() if v}
    assert opt_in_reads('systemd_unit_memory_stat_bytes{item=~"anon|active_file"} + systemd_unit_memory_peak_bytes') == {
        "item=active_file", "peak"}  # the check itself can fail


# --- the fleet dashboard, without Prometheus -----------------------------------------------------
def fleet_dashboard(directory: Path = queries.DASHBOARD_DIR) -> dict:
    return next(d for d in queries.load_dashboards(directory).values() if d["uid"] == FLEET_DASHBOARD)


def test_fleet_dashboard_frame_variables_and_links():
    d = fleet_dashboard()
    assert d["title"] == "systemd memory: fleet" and "systemd-memory" in d["tags"] and d.get("id") is None
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "job"]
    panels = d["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [(x, y) for p in panels for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)), "panels overlap"
    text = json.dumps(d)
    uids = {other["uid"] for other in queries.load_dashboards().values()}
    links = re.findall(r"/d/([\w-]+)/", text)
    assert set(links) == {"systemd-memory-overview", "systemd-memory-unit"} and set(links) <= uids
    assert set(re.findall(r"\$\{(\w+):queryparam\}", text)) == {"datasource", "job"}
    for p in panels:
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert 'job="$job"' in t["expr"], (p["title"], t["expr"])


def test_fleet_dashboard_queries_parse_and_use_known_names():
    from tests.rules import metric_contract, promtool

    found = [q for q in queries.dashboard_queries() if q.uid == FLEET_DASHBOARD]
    assert promtool.parse_errors([(f"{q.panel} {q.ref_id}", q.expr) for q in found]) is None
    contract, recorded = metric_contract.load_contract(), queries.recorded_names()
    problems = [f"{q.panel}: {problem}" for q in found for problem in contract.problems(q.expr, recorded)]
    assert not problems
    fleet_rules = {r.name for r in queries.rule_expressions() if r.file.name == "fleet-rules.yml"}
    used = {name for q in found for name in promql_names.names(q.expr).metrics}
    assert not fleet_rules - used, f"fleet rules the fleet dashboard does not show: {fleet_rules - used}"


def test_fleet_dashboard_takes_the_builder_selectors(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "grafana/build_dashboards.py"), "--job-selector", 'job="sme"',
                             "--cluster-label", "k8s_cluster", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    d = fleet_dashboard(tmp_path)
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "cluster"]
    for p in d["panels"]:
        for t in p.get("targets", []):
            assert 'k8s_cluster="$cluster", job="sme"' in t["expr"], t["expr"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (tests/prerequisites.sh installs it)")
    workdir = tmp_path_factory.mktemp("fleet")
    started = time.monotonic()
    hosts, exporters, targets, all_targets = [], [], [], []
    with contextlib.ExitStack() as stack:

        def exporter(tree: Path, name: str, *flags: str) -> str:
            port = free_port()
            log = stack.enter_context(open(workdir / f"{name}.log", "w"))
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fleet_exporter", str(tree), f"--web.listen-address=127.0.0.1:{port}",
                 f"--sample.interval={INTERVAL}", *flags],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
            )
            stack.callback(_end, proc)
            exporters.append(proc)
            return f"127.0.0.1:{port}"

        for index in range(INSTANCES):
            tree, capture = make_host(index, workdir)
            hosts.append((tree, capture))
            targets.append(exporter(tree, f"exporter{index:02d}"))
        all_targets = [exporter(hosts[i][0], f"exporter{i:02d}-all", *EVERY_SERIES_FLAGS) for i in (0, 1)]
        ports = [free_port() for _ in range(3)]
        receiver = Prom("p3-remote-write", ports[2], workdir, {"global": {"scrape_interval": f"{INTERVAL}s"}},
                        ("--web.enable-remote-write-receiver",))
        stack.callback(receiver.stop)
        federating = Prom("p2-federating", ports[1], workdir, {
            "global": {"scrape_interval": f"{INTERVAL}s", "evaluation_interval": f"{INTERVAL}s"},
            "scrape_configs": [federation_job(f"127.0.0.1:{ports[0]}")],
        })
        stack.callback(federating.stop)
        half = INSTANCES // 2
        first = Prom("p1-fleet", ports[0], workdir, {
            "global": {"scrape_interval": f"{INTERVAL}s", "evaluation_interval": f"{INTERVAL}s",
                       "external_labels": {"prometheus": "p1"}},
            "rule_files": [str(path) for path in fast_rules(workdir)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [
                {"targets": targets[:half], "labels": {"cluster": "c1"}},
                {"targets": targets[half:], "labels": {"cluster": "c2"}},
            ]}, {"job_name": ALL_JOB, "static_configs": [{"targets": all_targets, "labels": {"cluster": "c1"}}]}],
            "remote_write": [remote_write(f"http://127.0.0.1:{ports[2]}/api/v1/write")],
        })
        stack.callback(first.stop)
        first.wait(f"all {INSTANCES} + 2 exporters up",
                   lambda: first.query(f'count(up{{job=~"{JOB}|{ALL_JOB}"}} == 1) == {INSTANCES + 2}'), 90)
        yield {"first": first, "federating": federating, "receiver": receiver, "hosts": hosts, "targets": targets,
               "all_targets": all_targets,
               "exporters": exporters, "started": started, "workdir": workdir}


def fast_rules(workdir: Path) -> list[Path]:
    """The shipped rule files as they are, but every group evaluated each INTERVAL instead of its
    1m or 5m: a test of minutes cannot wait for 5-minute groups."""
    import yaml

    directory = workdir / "rules"
    directory.mkdir()
    copies = []
    for path in queries.rule_files():
        rules = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in rules["groups"]:
            group["interval"] = f"{INTERVAL}s"
        copies.append(directory / path.name)
        copies[-1].write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    return copies


def federation_job(source: str) -> dict:
    """As README "Running it on a fleet" gives it."""
    return {
        "job_name": "federate",
        "honor_labels": True,
        "metrics_path": "/federate",
        "params": {"match[]": [f'{{__name__=~"{FLEET_SERIES}"}}']},
        "static_configs": [{"targets": [source]}],
        # Per-job and per-unit-name aggregates have no instance: without this, honor_labels
        # would give them the federated Prometheus' address as one.
        "metric_relabel_configs": [{"source_labels": ["__name__"], "regex": "(job|job_unit):.+",
                                    "target_label": "instance", "replacement": ""}],
    }


def remote_write(url: str) -> dict:
    return {
        "url": url,
        "write_relabel_configs": [{"source_labels": ["__name__"], "regex": FLEET_SERIES, "action": "keep"}],
        "queue_config": {"batch_send_deadline": "1s"},
    }


def _end(proc: subprocess.Popen) -> None:
    end(proc, timeout=10)


def test_fleet_dashboard_queries_return_data(fleet):
    first = fleet["first"]
    found = [q for q in queries.dashboard_queries({"job": JOB, "cluster": ".*"}) if q.uid == FLEET_DASHBOARD]
    assert len(found) >= 5, f"the fleet dashboard ({FLEET_DASHBOARD}) has {len(found)} queries"
    add_kills_once(fleet)  # for the OOM panel
    # Rules over [1h] windows and the per-host tables need a few evaluations first.
    first.wait("fleet aggregates recorded",
               lambda: first.query(f'count(instance:systemd_unit_memory_gap_bytes:max{{job="{JOB}"}}) == {INSTANCES}'), 60)
    empty = {}
    for q in found:
        try:
            first.wait("", lambda: first.query(q.expr), 30)
        except AssertionError:
            empty[f"{q.panel} ({q.ref_id})"] = q.expr
    assert not empty, f"fleet dashboard queries without data: {json.dumps(empty, indent=1)}"


def test_host_totals_equal_the_trees_files(fleet):
    first = fleet["first"]
    expected = {target: top_level_usage(tree, capture) for target, (tree, capture) in zip(fleet["targets"], fleet["hosts"])}
    assert len(set(expected.values())) == INSTANCES, "the hosts should differ"

    def every_host():
        got = {s["metric"]["instance"]: float(s["value"][1]) for s in first.query(f'instance:systemd_unit_memory_cgroup_usage_bytes:sum{{job="{JOB}"}}')}
        return got if len(got) == INSTANCES else None

    got = first.wait("a host total per instance", every_host, 60)
    assert got == {target: float(value) for target, value in expected.items()}
    clusters = {s["metric"]["cluster"]: float(s["value"][1]) for s in first.query(f'job:systemd_unit_memory_cgroup_usage_bytes:sum{{job="{JOB}"}}')}
    half = INSTANCES // 2
    assert clusters == {"c1": float(sum(list(expected.values())[:half])), "c2": float(sum(list(expected.values())[half:]))}


KILLS = {0: 1, 1: 2, 30: 3}  # instance index -> OOM kills added; 0 and 1 in cluster c1, 30 in c2


def add_kills_once(fleet) -> dict[str, int]:
    """Adds KILLS to the trees once Prometheus has seen the counters at their start value."""
    first = fleet["first"]
    if not fleet.get("kills"):
        first.wait("oom_kill seen by a first scrape", lambda: first.query(
            f'count(systemd_unit_memory_events_total{{event="oom_kill", job="{JOB}", unit=~"{"|".join(OOM_UNIT.values())}"}}) == {INSTANCES}'), 30)
        for index, count in KILLS.items():
            add_oom_kills(*fleet["hosts"][index], count)
        fleet["kills"] = {fleet["targets"][index]: count for index, count in KILLS.items()}
    return fleet["kills"]


def test_oom_kills_reach_the_fleet_aggregates(fleet):
    first = fleet["first"]
    expected = add_kills_once(fleet)

    # increase() extrapolates past the samples it has by up to an interval at each end: with a
    # minute of data that adds up to ~30 %; over the hour the rule is made for, under 1 %.
    def close(got: dict, want: dict) -> bool:
        return got.keys() == want.keys() and all(want[k] <= got[k] <= want[k] * 1.5 for k in want)

    def counted():
        got = {s["metric"]["instance"]: float(s["value"][1]) for s in first.query(f'instance:systemd_unit_memory_oom_kills:increase1h{{job="{JOB}"}} > 0')}
        return got if close(got, expected) else None

    first.wait("OOM kills counted per host", counted, 60)
    # The per-cluster figure is the sum of its hosts' figures of the same evaluation.
    time.sleep(INTERVAL + 1)
    at = time.time()
    per_host = first.query(f'instance:systemd_unit_memory_oom_kills:increase1h{{job="{JOB}"}}', at)
    per_cluster = {s["metric"]["cluster"]: float(s["value"][1]) for s in first.query(f'job:systemd_unit_memory_oom_kills:increase1h{{job="{JOB}"}}', at)}
    sums = {}
    for s in per_host:
        sums[s["metric"]["cluster"]] = sums.get(s["metric"]["cluster"], 0.0) + float(s["value"][1])
    assert per_cluster == pytest.approx(sums) and per_cluster["c1"] >= 3 and per_cluster["c2"] >= 3, (per_cluster, sums)
    healthy = first.query(f'instance:systemd_unit_memory_oom_kills:increase1h{{instance="{fleet["targets"][2]}"}}')
    assert [float(s["value"][1]) for s in healthy] == [0.0], "a host without kills reports 0"


def test_host_dashboards_have_data_with_the_default_budget(fleet):
    """The overview, unit and why dashboards on the first two hosts (v1, v2), each served twice: with
    the default flags and with every series on. A query that has data with every series on must
    have data with the defaults, except the peak panel, which needs --collector.peak (tests/
    test_prometheus.py and the v2 guest test run the dashboards with every flag on)."""
    first = fleet["first"]
    add_kills_once(fleet)
    both = "|".join(re.escape(t) for t in fleet["targets"][:2] + fleet["all_targets"])
    first.wait("the kills scraped from both jobs", lambda: first.query(
        f'count(increase(systemd_unit_memory_events_total{{event="oom_kill", instance=~`{both}`}}[2m]) > 0) == 4'), 30)
    lost, compared = [], 0
    for q in queries.dashboard_queries():
        if q.uid == FLEET_DASHBOARD:
            continue
        for index in (0, 1):
            def has_data(job: str, instance: str) -> bool:
                return bool(first.query(queries.substitute(q.raw_expr, {"job": job, "instance": instance})))

            if has_data(ALL_JOB, fleet["all_targets"][index]):
                compared += 1
                if not has_data(JOB, fleet["targets"][index]):
                    lost.append((q, opt_in_reads(q.expr)))
    assert compared > 50
    assert lost, "the peak panel should be empty without --collector.peak"
    assert all(reads == {"peak"} for _, reads in lost), [f"{q.dashboard} / {q.panel}: {q.expr}" for q, reads in lost if reads != {"peak"}]


@pytest.mark.parametrize("downstream", ["federating", "receiver"])
def test_downstream_series_equal_the_originals(fleet, downstream):
    first, other = fleet["first"], fleet[downstream]
    first.wait("fleet aggregates recorded for 30 s", lambda: first.query(
        f"min(count_over_time(job_unit:systemd_unit_info:count[{6 * INTERVAL}s])) >= 5"), 120)
    at = time.time() - 3 * INTERVAL
    original = raw_samples(first, at)
    assert len({dict(k)["__name__"] for k in original}) >= 15, sorted({dict(k)["__name__"] for k in original})
    assert sum(1 for k in original if dict(k)["__name__"].startswith("job_unit:")) > 20

    def copied():
        got = raw_samples(other, at, drop=("prometheus",))
        if downstream == "receiver":  # remote write sends every sample
            return got if got == original else None
        # /federate hands out each series' latest sample when scraped: a federating Prometheus
        # keeps a subset of the samples (those its scrapes saw), with their original timestamps.
        same = got.keys() == original.keys() and all(got[k] and set(got[k]) <= set(original[k]) for k in got)
        return got if same else None

    other.wait(f"the same fleet series as {first.name}", copied, 60)
    # P1's external label marks every copy, so replicas' aggregates never collide downstream.
    labels = other.query(f'count by (prometheus) ({{__name__=~"{FLEET_SERIES}"}})')
    assert [s["metric"] for s in labels] == [{"prometheus": "p1"}]


def test_figures(fleet):
    """Not an assertion of speed: the figures the README and the report quote, printed."""
    first = fleet["first"]
    series = [float(s["value"][1]) for s in first.query(f'instance:systemd_memory_exporter_series:scraped{{job="{JOB}"}}')]
    figures = {
        "instances": INSTANCES,
        "exporter RSS MiB (sum)": round(sum(rss_mib(p.pid) for p in fleet["exporters"]), 1),
        "exporter RSS MiB (max)": round(max(rss_mib(p.pid) for p in fleet["exporters"]), 1),
        "series per host (min/max)": (min(series), max(series)),
        "head series p1/p2/p3": tuple(fleet[name].api("/api/v1/status/tsdb")["headStats"]["numSeries"]
                                      for name in ("first", "federating", "receiver")),
        "prometheus RSS MiB p1/p2/p3": tuple(round(rss_mib(fleet[name].proc.pid), 1) for name in ("first", "federating", "receiver")),
        "seconds since start": round(time.monotonic() - fleet["started"], 1),
    }
    print("\nfleet figures:", json.dumps(figures))
    assert len(series) == INSTANCES
