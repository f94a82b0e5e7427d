"""Grafana dashboards in grafana/dashboards/: structure, queries, names, and data on a synthetic host.

How the structure is validated, and why this way:
  * Grafana publishes no JSON Schema for dashboards. The schema lives as CUE "kinds" in
    grafana/grafana, and Grafana's own foundation SDK (PyPI `grafana-foundation-sdk`, generated from
    those kinds by cog) is the only offline, machine-readable form of it for Python. Its models know
    every key of the dashboard, panels, field config, each core panel plugin's options and the
    Prometheus query.
  * The SDK does not validate: `Dashboard.from_json` copies the keys it knows, silently drops the
    rest and checks no types. So test_grafana_schema_round_trip loads each dashboard into the SDK,
    serialises it back and reports every key or value that did not survive: a misspelt or misplaced
    key (`gridpos`, `options.legend.dispalyMode`, a target field at panel level) fails the test.
    A few keys Grafana itself writes are outside the core schema (datasource-specific annotation
    fields, a query variable's `definition`, the import-only `__requires`): they are listed in
    SCHEMA_EXTRAS.
  * Types, required fields and the rules of this project (ids, layout, datasource variable, units,
    variables) are checked explicitly by the other tests, which need nothing but the standard library.
The SDK is a test dependency; pin a Grafana 11 build, e.g.
`pip install 'grafana-foundation-sdk==1769699379!11.6.0'` (its versions carry an epoch: without the
pin pip picks an old 10.1 build). Without it only the round-trip test is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rules import metric_contract, promql_names, promtool, queries  # noqa: E402
from rules.fixtures import contract, need_promtool  # noqa: E402,F401 - pytest fixtures

REPO = queries.REPO_ROOT
GRAFANA = REPO / "grafana"
# The host dashboards; the fleet dashboard (reads the fleet rules, no host or unit variable) is
# checked by tests/test_fleet.py.
FLEET = "systemd-memory-fleet"
DASHBOARDS = {path: d for path, d in queries.load_dashboards().items() if d["uid"] != FLEET}
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
PANELS_WITHOUT_QUERIES = {"row", "text"}


def params():
    return pytest.mark.parametrize("path", list(DASHBOARDS), ids=[p.stem for p in DASHBOARDS])


def panels(dashboard: dict) -> list[dict]:
    return list(queries.iter_panels(dashboard))


def query_panels(dashboard: dict) -> list[dict]:
    return [p for p in panels(dashboard) if p["type"] not in PANELS_WITHOUT_QUERIES]


def variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


# --- the files -----------------------------------------------------------------------------------
def test_three_dashboards():
    assert sorted(p.name for p in DASHBOARDS) == [
        "systemd-memory-overview.json", "systemd-memory-unit.json", "systemd-memory-why.json",
    ]


def test_json_matches_the_generator():
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for name, make in build.DASHBOARDS.items():
        on_disk = (GRAFANA / "dashboards" / name).read_text(encoding="utf-8")
        assert on_disk == build.render(make), f"{name} is out of date: run python3 grafana/build_dashboards.py"


@params()
def test_identity_and_frame(path):
    d = DASHBOARDS[path]
    assert d["uid"] == path.stem and len(d["uid"]) <= 40
    assert d["title"].strip()
    assert d.get("id") is None, "an id ties the file to one Grafana database"
    assert 36 <= d["schemaVersion"] <= 41
    assert "systemd-memory" in d["tags"]
    assert d["time"]["from"].startswith("now-") and d["time"]["to"] == "now"
    assert d.get("description", "").strip()
    assert "__inputs" not in d and "${DS_" not in json.dumps(d), "datasource goes through the variable"


def test_unique_uids_and_titles():
    assert len({d["uid"] for d in DASHBOARDS.values()}) == len(DASHBOARDS)
    assert len({d["title"] for d in DASHBOARDS.values()}) == len(DASHBOARDS)


# --- panels --------------------------------------------------------------------------------------
@params()
def test_panel_ids_unique(path):
    ids = [p["id"] for p in panels(DASHBOARDS[path])]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids))


@params()
def test_grid_positions_valid_and_not_overlapping(path):
    boxes = []
    for p in panels(DASHBOARDS[path]):
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh"), p["title"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["y"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} is wider than the 24-column grid"
        boxes.append((p["title"], g))
    for (a, ga), (b, gb) in combinations(boxes, 2):
        apart = (ga["x"] + ga["w"] <= gb["x"] or gb["x"] + gb["w"] <= ga["x"]
                 or ga["y"] + ga["h"] <= gb["y"] or gb["y"] + gb["h"] <= ga["y"])
        assert apart, f"{a!r} and {b!r} overlap"


@params()
def test_every_query_panel_uses_the_datasource_variable(path):
    for p in query_panels(DASHBOARDS[path]):
        assert p.get("datasource") == DS_REF, p["title"]
        assert p.get("targets"), f"{p['title']}: no queries"
        ref_ids = [t.get("refId") for t in p["targets"]]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), f"{p['title']}: refIds {ref_ids}"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"{p['title']} {t.get('refId')}: no expr"
            assert t.get("datasource") == DS_REF, f"{p['title']} {t['refId']}"


@params()
def test_titles_and_descriptions(path):
    d = DASHBOARDS[path]
    titled = [p for p in panels(d) if p["type"] != "row"]
    titles = [p["title"] for p in titled]
    assert all(t.strip() for t in titles) and len(titles) == len(set(titles))
    for p in query_panels(d):
        assert len(p.get("description", "").split()) >= 8, f"{p['title']}: describe the numbers in plain words"


def _metrics(expr: str) -> set[str]:
    return promql_names.names(expr).metrics - {"systemd_unit_info"}


@params()
def test_units_set(path):
    """Byte panels in IEC bytes, ratios of bytes in percent; every query panel has a unit."""
    for p in query_panels(DASHBOARDS[path]):
        unit = p["fieldConfig"]["defaults"].get("unit")
        assert unit, f"{p['title']}: no unit"
        if p["fieldConfig"]["defaults"].get("mappings"):
            assert unit == "none", f"{p['title']}: a number mapped to text has no unit"
            continue
        exprs = [queries.substitute(t["expr"]) for t in p["targets"]]
        if all(_metrics(e) and all(m.endswith("_bytes") for m in _metrics(e)) for e in exprs):
            divides = any(re.search(r"\n\s*/ |\) / |\n/ ", e) for e in exprs)
            if p["type"] == "table":
                assert unit == "bytes", p["title"]
            else:
                assert unit == ("percentunit" if divides else "bytes"), f"{p['title']}: unit {unit}"


@params()
def test_legends_name_existing_labels(path, contract):
    for q in queries.dashboard_queries():
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", q.legend):
            found = promql_names.names(q.expr)
            assert label in contract.all_labels | found.defined_labels, f"{q.panel}: legend {{{{{label}}}}}"


def test_links_point_at_the_unit_dashboard():
    uids = {d["uid"] for d in DASHBOARDS.values()}
    text = json.dumps(list(DASHBOARDS.values()))
    for uid in re.findall(r"/d/([\w-]+)/", text):
        assert uid in uids
    for var in re.findall(r"\$\{(\w+):queryparam\}", text):
        assert all(var in variables(d) for d in DASHBOARDS.values())


# --- variables -----------------------------------------------------------------------------------
UNIT_DASHBOARD = GRAFANA / "dashboards" / "systemd-memory-unit.json"


@params()
def test_template_variables(path):
    d = DASHBOARDS[path]
    v = variables(d)
    assert list(v) == ["datasource", "job", "instance", "uid", "unit"]
    assert v["datasource"]["type"] == "datasource" and v["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "uid", "unit"):
        assert v[name]["type"] == "query" and v[name]["datasource"] == DS_REF
    # uid (issue 12): All matches the system's units too, which have no uid label.
    assert v["uid"]["multi"] is True and v["uid"]["includeAll"] is True and v["uid"]["allValue"] == ".*"
    flat = json.dumps(d)
    assert 'instance=\\"$instance\\"' in flat and 'uid=~\\"$uid\\"' in flat
    assert 'unit=\\"$unit\\"' not in flat
    if path == UNIT_DASHBOARD:
        # One unit: no All, no repeated rows. Grafana does not regex-escape a single-value variable,
        # so the queries escape it (${unit:regex}) in a raw string that keeps systemd's backslashes.
        assert v["unit"]["multi"] is False and v["unit"]["includeAll"] is False
        assert "unit=~`${unit:regex}`" in flat and 'unit=~\\"$unit\\"' not in flat
    else:
        assert v["unit"]["multi"] is True and v["unit"]["includeAll"] is True and v["unit"]["allValue"] == ".+"
        assert 'unit=~\\"$unit\\"' in flat


@params()
def test_variable_queries_list_a_label_of_their_metric(path, contract):
    for variable in DASHBOARDS[path]["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = queries.variable_expr(variable)
        assert selector and label, variable["name"]
        (metric,) = promql_names.names(selector).metrics
        assert label in contract.labels_of(metric), f"{variable['name']}: {metric} has no label {label}"


def test_unit_dashboard_is_one_unit_with_a_verdict_and_pss():
    d = DASHBOARDS[UNIT_DASHBOARD]
    assert not [p for p in panels(d) if p["type"] == "row" or p.get("repeat")]
    verdict = next(p for p in panels(d) if p["title"] == "Verdict")
    assert verdict["gridPos"]["y"] == 0 and verdict["gridPos"]["x"] == 0
    texts = {o["text"] for m in verdict["fieldConfig"]["defaults"]["mappings"] for o in (
        m["options"].values() if m["type"] == "value" else [m["options"]["result"]])}
    assert len(texts) == 6 and "No cgroup figure to compare" in texts
    lines = next(p for p in panels(d) if p["title"] == "systemctl vs top")
    assert any('type="pss"' in t["expr"] for t in lines["targets"])
    # memory.peak includes page cache: it belongs beside usage, not beside the unreclaimable figure.
    assert any("peak" in t["expr"] for t in lines["targets"])
    limits = next(p for p in panels(d) if "MemoryMax" in p["title"])
    assert not any("peak" in t["expr"] for t in limits["targets"])


def test_oom_kills_are_counted_exactly_on_their_own_axis():
    """No overlapping increase() windows (they counted one kill 2-4 times) and no max events beside them."""
    d = DASHBOARDS[UNIT_DASHBOARD]
    oom = next(p for p in panels(d) if p["title"] == "OOM kills")
    (target,) = oom["targets"]
    assert "offset $__interval" in target["expr"] and "increase" not in target["expr"]
    assert 'event=~"oom_kill"' in target["expr"]


def test_overview_first_screen_answers_which_unit_and_is_it_a_problem():
    """The first screen (top 15 rows): ranking by size and by gap, and the units in trouble."""
    d = DASHBOARDS[GRAFANA / "dashboards" / "systemd-memory-overview.json"]
    first = {p["title"] for p in panels(d) if p["gridPos"]["y"] + p["gridPos"]["h"] <= 15}
    assert {"Biggest units: systemctl's number", "Biggest gaps: systemctl − top", "Units in trouble"} <= first
    trouble = next(p for p in panels(d) if p["title"] == "Units in trouble")
    exprs = " ".join(t["expr"] for t in trouble["targets"])
    assert 'event="oom_kill"' in exprs and 'kind="full"' in exprs and 'limit=~"max"' in exprs
    # One ranking by systemctl's number, not a bar gauge and a time series of the same thing.
    assert "Top 10 units by systemctl's number" not in {p["title"] for p in panels(d)}


def test_why_view_leads_with_its_table_and_lists_only_units_with_memory():
    d = DASHBOARDS[GRAFANA / "dashboards" / "systemd-memory-why.json"]
    first = min(panels(d), key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    assert first["type"] == "table" and first["gridPos"]["y"] == 0
    assert all("> 0)" in t["expr"] for t in first["targets"])
    parts = next(p for p in panels(d) if p["title"].startswith("The gap over time"))
    stacked_negative = [o for o in parts["fieldConfig"]["overrides"] if o["matcher"]["options"] == "D"]
    assert stacked_negative and {"id": "custom.stacking", "value": {"mode": "none", "group": "A"}} in stacked_negative[0]["properties"]


def test_no_stale_references():
    text = (GRAFANA / "build_dashboards.py").read_text() + "".join(
        p.read_text() for p in (GRAFANA / "builder").glob("*.py")) + json.dumps(list(DASHBOARDS.values()))
    text += "".join(p.read_text() for p in queries.rule_files())
    for stale in ("NOTES.md", "METRICS_DRAFT.md"):
        assert stale not in text


def test_builder_parameters_job_selector_and_cluster(tmp_path):
    """Mixin-style selectors: a fixed job drops the Job variable; a cluster label adds one and filters every query."""
    result = subprocess.run([sys.executable, str(GRAFANA / "build_dashboards.py"), "--job-selector", 'job="sme"',
                             "--cluster-label", "k8s_cluster", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = {path: d for path, d in queries.load_dashboards(tmp_path).items() if d["uid"] != FLEET}
    assert len(built) == len(DASHBOARDS)
    for d in built.values():
        assert list(variables(d))[:3] == ["datasource", "cluster", "instance"]
        for p in query_panels(d):
            for t in p["targets"]:
                for selector in re.findall(r"\b(?:systemd_unit_[a-z_]+)\{([^}]*)\}", t["expr"]):
                    assert 'k8s_cluster="$cluster"' in selector and 'job="sme"' in selector, (p["title"], selector)
        assert "$job" not in json.dumps(d)


# --- queries -------------------------------------------------------------------------------------
ALL_QUERIES = [q for q in queries.dashboard_queries() if q.uid != FLEET]


def test_queries_are_found_and_fully_substituted():
    assert len(ALL_QUERIES) > 50
    for q in ALL_QUERIES:
        leftover = re.findall(r"\$(?!\d)\w+|\[\[", q.expr)
        assert not leftover, f"{q.dashboard} / {q.panel}: {leftover}"


def test_every_dashboard_query_parses(need_promtool):
    labelled = [(f"{q.dashboard} / {q.panel} / {q.ref_id}", q.expr) for q in ALL_QUERIES]
    errors = promtool.parse_errors(labelled)
    assert errors is None, errors


def test_dashboard_queries_use_only_contract_names(contract):
    problems = [
        f"{q.dashboard} / {q.panel} / {q.ref_id}: {problem}"
        for q in ALL_QUERIES
        for problem in contract.problems(q.expr)
    ]
    assert not problems, "\n".join(problems)


# A small host as the exporter would describe it (cgroup v2: the root slice has memory.stat but no
# usage), with a VM's and a container's scope in machine.slice and a user's own units (uid label,
# issue 12) inside user@1000.service, one of them named like a system unit. Every dashboard query
# must return something for it.
HOST_UNITS = {  # (unit, uid): (unit_type, control_group)
    ("-.slice", None): ("slice", "/"),
    ("system.slice", None): ("slice", "/system.slice"),
    ("user.slice", None): ("slice", "/user.slice"),
    ("machine.slice", None): ("slice", "/machine.slice"),
    ("init.scope", None): ("scope", "/init.scope"),
    ("systemd-journald.service", None): ("service", "/system.slice/systemd-journald.service"),
    ("foo\\x2dbar.service", None): ("service", "/system.slice/foo\\x2dbar.service"),
    ("dbus.service", None): ("service", "/system.slice/dbus.service"),
    ("machine-qemu\\x2d1\\x2dvm1.scope", None): ("scope", "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope"),
    ("libpod-0123abcd.scope", None): ("scope", "/machine.slice/libpod-0123abcd.scope"),
    ("user-1000.slice", None): ("slice", "/user.slice/user-1000.slice"),
    ("session-1.scope", None): ("scope", "/user.slice/user-1000.slice/session-1.scope"),
    ("user@1000.service", None): ("service", "/user.slice/user-1000.slice/user@1000.service"),
    ("app.slice", "1000"): ("slice", "/user.slice/user-1000.slice/user@1000.service/app.slice"),
    ("dbus.service", "1000"): ("service", "/user.slice/user-1000.slice/user@1000.service/app.slice/dbus.service"),
}
STAT_ITEMS = sorted(metric_contract.load_contract().values_of("systemd_unit_memory_stat_bytes", "item"))


def _series(instance: str, job: str, name: str, values: str, **labels) -> dict:
    pairs = {"instance": instance, "job": job, **{k: v for k, v in labels.items() if v is not None}}
    text = ", ".join(f'{k}="{v.replace(chr(92), chr(92) * 2)}"' for k, v in pairs.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def synthetic_series(instance: str, job: str) -> list[dict]:
    def series(name: str, values: str, **labels) -> dict:
        return _series(instance, job, name, values, **labels)

    out = [
        series("up", "1x80"),
        series("systemd_memory_exporter_build_info", "1x80", version="0.1.0", python_version="3.11.7"),
        series("systemd_memory_exporter_sample_interval_seconds", "15x80"),
    ]
    for number, ((unit, uid), (kind, cgroup)) in enumerate(HOST_UNITS.items(), start=1):
        mib = 1048576 * number
        out.append(series("systemd_unit_info", "1x80", unit=unit, uid=uid, unit_type=kind, active_state="active",
                          sub_state="running", control_group=cgroup))
        out += [series("systemd_unit_memory_stat_bytes", f"{mib * (i + 1)}x80", unit=unit, uid=uid, item=item)
                for i, item in enumerate(STAT_ITEMS)]
        if unit == "-.slice":
            continue
        for i, kind_ in enumerate(("cgroup_usage", "page_cache", "swap", "rss_anon", "rss_file", "rss_shmem", "pss")):
            out.append(series("systemd_unit_memory_bytes", f"{mib * (40 - i)}+{mib}x80", unit=unit, uid=uid, type=kind_))
        out += [
            series("systemd_unit_memory_working_set_bytes", f"{mib * 30}x80", unit=unit, uid=uid),
            series("systemd_unit_memory_limit_bytes", f"{mib * 32}x80", unit=unit, uid=uid, limit="max"),
            series("systemd_unit_memory_limit_bytes", f"{mib * 31}x80", unit=unit, uid=uid, limit="high"),
            series("systemd_unit_memory_peak_bytes", f"{mib * 45}x80", unit=unit, uid=uid),
            series("systemd_unit_processes", "3x80", unit=unit, uid=uid),
            series("systemd_unit_memory_pressure_seconds_total", "0+1x80", unit=unit, uid=uid, kind="some"),
            series("systemd_unit_memory_pressure_seconds_total", "0+0.5x80", unit=unit, uid=uid, kind="full"),
        ]
        out += [series("systemd_unit_memory_events_total", "0+1x80", unit=unit, uid=uid, event=event)
                for event in ("low", "max", "high", "oom", "oom_kill")]
    return out


# Grafana escapes a multi-value variable (prometheusSpecialRegexEscape): a backslash becomes four and
# "." becomes two backslashes and a dot in the query text, so the PromQL regex matches the name literally.
@pytest.mark.parametrize("unit_value", [".+", r"foo\\\\x2dbar\\.service"], ids=["all-units", "one-escaped-unit"])
def test_every_dashboard_query_returns_data_on_a_synthetic_host(need_promtool, tmp_path, unit_value):
    """Each query becomes an alert on count(query): promtool then says which ones return nothing.

    unit_value is what Grafana puts into unit=~"$unit": ".+" for All, or a selected unit with its
    regex characters escaped (systemd's own backslash escapes included). With one service selected,
    the panels about slices are rightly empty.
    """
    values = {"instance": "h1:10073", "job": "systemd-memory-exporter", "unit": unit_value, "__rate_interval": "1m",
              "__range": "10m",  # the series span 20 minutes
              "unit_name": "foo\\x2dbar.service" if unit_value != ".+" else "machine-qemu\\x2d1\\x2dvm1.scope"}
    selected = [q for q in queries.dashboard_queries(values) if q.uid != FLEET]
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"alert": f"Q{i}", "expr": f"count(\n{q.expr}\n)"} for i, q in enumerate(selected)
    ]}]}
    (tmp_path / "queries.rules.yml").write_text(yaml.safe_dump(rules, allow_unicode=True), encoding="utf-8")
    test = {
        "rule_files": ["queries.rules.yml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": synthetic_series("h1:10073", "systemd-memory-exporter"),
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": f"Q{i}", "exp_alerts": [{"exp_labels": {}}]}
                for i in range(len(selected))
            ],
        }],
    }
    (tmp_path / "queries.test.yml").write_text(yaml.safe_dump(test, allow_unicode=True), encoding="utf-8")
    result = promtool.run("test", "rules", tmp_path / "queries.test.yml")
    empty = {int(n) for n in re.findall(r"alertname: Q(\d+),", result.stdout + result.stderr)}
    slices_only = {i for i, q in enumerate(selected) if unit_value != ".+" and 'unit_type="slice"' in q.raw_expr}
    assert empty == slices_only, "no data for:\n" + "\n".join(
        f"{selected[i].dashboard} / {selected[i].panel} / {selected[i].ref_id}" for i in sorted(empty - slices_only))
    assert empty or result.returncode == 0, result.stdout + result.stderr


# --- against Grafana's schema (the foundation SDK) ----------------------------------------------------
# Keys Grafana writes that the core dashboard schema leaves out.
SCHEMA_EXTRAS = {
    "/__requires",  # import metadata: which Grafana, datasource and panel plugins the file needs
    "/id",  # null on purpose; the SDK drops nulls
    "/templating/list[]/definition",  # the query as text, shown in the variables list
    "/annotations/list[]/titleFormat",  # Prometheus annotation fields, owned by the datasource
    "/annotations/list[]/textFormat",
}


def lost_in_round_trip(original, back, path="") -> list[str]:
    if isinstance(original, dict):
        if not isinstance(back, dict):
            return [f"{path}: became {type(back).__name__}"]
        lost = []
        for key, value in original.items():
            if key not in back:
                lost.append(f"{path}/{key}")
            else:
                lost += lost_in_round_trip(value, back[key], f"{path}/{key}")
        return lost
    if isinstance(original, list):
        if not isinstance(back, list) or len(original) != len(back):
            return [f"{path}: list changed"]
        return [x for i, (a, b) in enumerate(zip(original, back)) for x in lost_in_round_trip(a, b, f"{path}[{i}]")]
    return [] if original == back else [f"{path}: {original!r} became {back!r}"]


def _sdk_round_trip(dashboard: dict) -> list[str]:
    sdk = pytest.importorskip("grafana_foundation_sdk", reason="pip install grafana-foundation-sdk (see module doc)")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    assert sdk
    register_default_plugins()  # typed options for core panels, typed Prometheus queries
    back = json.loads(json.dumps(Dashboard.from_json(dashboard), cls=JSONEncoder))
    return [p for p in lost_in_round_trip(dashboard, back) if re.sub(r"\[\d+\]", "[]", p) not in SCHEMA_EXTRAS]


@params()
def test_grafana_schema_round_trip(path):
    lost = _sdk_round_trip(DASHBOARDS[path])
    assert not lost, "not in Grafana's dashboard schema:\n" + "\n".join(lost)


def test_schema_round_trip_catches_a_misspelt_key():
    broken = json.loads(json.dumps(DASHBOARDS[GRAFANA / "dashboards" / "systemd-memory-overview.json"]))
    timeseries = next(p for p in broken["panels"] if p["type"] == "timeseries")
    timeseries["options"]["legend"]["dispalyMode"] = "table"
    timeseries["gridpos"] = timeseries["gridPos"]
    lost = _sdk_round_trip(broken)
    assert any(p.endswith("/options/legend/dispalyMode") for p in lost), lost
    assert any(p.endswith("/gridpos") for p in lost), lost


# --- provisioning ----------------------------------------------------------------------------------
def test_provisioning_examples():
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "systemd-memory.yml").read_text())
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"].startswith("/")
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]


# --- host totals: values pinned on v1- and v2-shaped hosts (promtool) ------------------------------
# Per cgroup, in MiB: usage, rss_anon, rss_file, rss_shmem, swap; memory.stat anon, file, file_mapped,
# shmem, file_dirty, file_writeback, kernel. a.service holds all of system.slice; user@1000.service
# all of user.slice; the user's own units (uid) are inside it, one named like the top-level
# init.scope. -.slice's figures (999) must not be used on v2, where the root has no usage.
FIGURES = ("cgroup_usage", "rss_anon", "rss_file", "rss_shmem", "swap",
           "anon", "file", "file_mapped", "shmem", "file_dirty", "file_writeback", "kernel")
SYSTEM = (100, 30, 8, 2, 4, 40, 50, 10, 5, 2, 1, 10)
USERS = (60, 20, 5, 1, 1, 30, 20, 5, 2, 0, 0, 10)
HOST_TOTAL_CGROUPS = {  # (unit, uid): (unit_type, control_group, figures)
    ("system.slice", None): ("slice", "/system.slice", SYSTEM),
    ("a.service", None): ("service", "/system.slice/a.service", SYSTEM),
    ("user.slice", None): ("slice", "/user.slice", USERS),
    ("user@1000.service", None): ("service", "/user.slice/user-1000.slice/user@1000.service", USERS),
    ("init.scope", "1000"): ("scope", "/user.slice/user-1000.slice/user@1000.service/init.scope", (7,) * 12),
    ("dbus.service", "1000"): ("service", "/user.slice/user-1000.slice/user@1000.service/app.slice/dbus.service", (9,) * 12),
    ("init.scope", None): ("scope", "/init.scope", (4, 2, 1, 0, 0, 2, 1, 1, 0, 0, 0, 1)),
}
V1_ROOT = (300, 100, 20, 5, 6, 120, 150, 20, 10, 3, 1, 25)
# Hand-computed: v2 sums system.slice + user.slice + init.scope; v1 takes -.slice.
HOST_TOTALS = {
    "v2": {"systemctl": 164, "top": 69, "gap": 95, "file": 71, "reclaimable": 61, "shmem": 7, "kernel": 21,
           "swap": 5, "anon": 72, "mapped": 16, "unmapped": 48},
    "v1": {"systemctl": 300, "top": 125, "gap": 175, "file": 150, "reclaimable": 136, "shmem": 10, "kernel": 25,
           "swap": 6, "anon": 120, "mapped": 20, "unmapped": 120},
}
HOST_PANELS = {  # (panel, legend) -> key of HOST_TOTALS
    ("systemctl's number", ""): "systemctl", ("top's number", ""): "top", ("Gap", ""): "gap",
    ("Page cache", ""): "file", ("Reclaimable cache", ""): "reclaimable", ("tmpfs / shm", ""): "shmem",
    ("Kernel", ""): "kernel", ("Swap", ""): "swap",
    ("Whole host: where the memory is", "anon"): "anon", ("Whole host: where the memory is", "mapped file"): "mapped",
    ("Whole host: where the memory is", "unmapped cache"): "unmapped",
    ("Whole host: where the memory is", "tmpfs / shm"): "shmem", ("Whole host: where the memory is", "kernel"): "kernel",
    ("Whole host: where the memory is", "systemctl's number (cgroup usage)"): "systemctl",
    ("Whole host: where the memory is", "top's number (Σ RSS of its processes)"): "top",
}


def host_total_series(layout: str) -> list[dict]:
    mib = 1048576
    cgroups = dict(HOST_TOTAL_CGROUPS)
    root = V1_ROOT if layout == "v1" else (999,) * 12
    cgroups[("-.slice", None)] = ("slice", "/", root)
    out = []
    for (unit, uid), (kind, cgroup, figures) in cgroups.items():
        out.append(_series("h1:10073", "sme", "systemd_unit_info", "1x10", unit=unit, uid=uid, unit_type=kind,
                           control_group=cgroup))
        for name, value in zip(FIGURES, figures):
            if layout == "v2" and unit == "-.slice" and name in ("cgroup_usage", "swap"):
                continue  # the v2 root cgroup has no memory.current, no memory.swap.current
            metric, label = (("systemd_unit_memory_bytes", "type") if name in FIGURES[:5]
                             else ("systemd_unit_memory_stat_bytes", "item"))
            out.append(_series("h1:10073", "sme", metric, f"{value * mib}x10", unit=unit, uid=uid, **{label: name}))
    return out


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_host_totals_have_the_right_values(need_promtool, tmp_path, layout):
    """Issue 15: `and` binds tighter than `or`, so the kernel tile used to sum every unit on v2 (a
    slice of 100 and its service of 100 gave 200). Each host-total query is pinned to its value."""
    values = {"instance": "h1:10073", "job": "sme"}
    selected = [q for q in queries.dashboard_queries(values)
                if q.uid == "systemd-memory-overview" and (q.panel, q.legend.replace("__auto", "")) in HOST_PANELS]
    assert len(selected) == len(HOST_PANELS)
    (tmp_path / "empty.rules.yml").write_text("groups: []\n")
    test = {"rule_files": ["empty.rules.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": host_total_series(layout),
        "promql_expr_test": [
            {"expr": q.expr, "eval_time": "5m", "exp_samples": [{
                "labels": '{instance="h1:10073"}',
                "value": HOST_TOTALS[layout][HOST_PANELS[(q.panel, q.legend.replace("__auto", ""))]] * 1048576}]}
            for q in selected
        ],
    }]}
    (tmp_path / "host.test.yml").write_text(yaml.safe_dump(test, allow_unicode=True), encoding="utf-8")
    result = promtool.run("test", "rules", tmp_path / "host.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@params()
def test_unit_variable_lists_every_kind_of_unit(path):
    """VM and container scopes (machine-*.scope, libpod-*.scope, docker-*.scope) are selected like
    services: the unit variable filters on no unit type or name; the synthetic host above has them."""
    selector, label = queries.variable_expr(variables(DASHBOARDS[path])["unit"])
    assert label == "unit" and "unit_type" not in selector and "unit=" not in selector
    assert {"machine-qemu\\x2d1\\x2dvm1.scope", "libpod-0123abcd.scope"} <= {unit for unit, _ in HOST_UNITS}


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_the_value_model_agrees_with_the_pinned_host_totals(layout):
    """tests/rules/dashboard_values.py, which the real-Prometheus tests compare the panels with,
    gives the hand-computed totals on the same v1- and v2-shaped hosts."""
    from rules import dashboard_values as model

    cgroups = dict(HOST_TOTAL_CGROUPS)
    cgroups[("-.slice", None)] = ("slice", "/", V1_ROOT if layout == "v1" else (999,) * 12)
    units = {}
    for key, (kind, cgroup, figures) in cgroups.items():
        names = [name if name in FIGURES[:5] else f"stat:{name}" for name in FIGURES]
        units[key] = {**{n: float(v) for n, v in zip(names, figures)}, "control_group": cgroup, "unit_type": kind}
    host = model.host_figures(units, layout)
    keys = {"systemctl's number": "systemctl", "top's number": "top", "Gap": "gap", "Page cache": "file",
            "Reclaimable cache": "reclaimable", "tmpfs / shm": "shmem", "Kernel": "kernel", "Swap": "swap"}
    for (panel, legend), compute in model.HOST_PANELS.items():
        key = keys.get(panel) if not legend else HOST_PANELS[(panel, legend)]
        assert compute(host) == HOST_TOTALS[layout][key] * 1.0, (panel, legend)
