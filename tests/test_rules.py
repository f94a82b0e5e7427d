"""Prometheus rules in deploy/prometheus/: valid, tested by promtool, and built on the metric contract.

Needs promtool (Debian package `prometheus`). Without it these tests are skipped, except under CI
(CI=true) where a missing promtool is a failure.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rules import metric_contract, promql_names, promtool, queries  # noqa: E402
from rules.fixtures import contract, need_promtool  # noqa: E402,F401 - pytest fixtures

REPO = queries.REPO_ROOT
RULE_TESTS = sorted((REPO / "tests" / "rules").glob("*.test.yml"))
README = REPO / "README.md"
EXAMPLE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.example.yml"
SEVERITIES = {"info", "warning", "critical"}
# Alerts on a state whose value says nothing (up == 0 is always 0).
NO_NUMBER = {"SystemdMemoryExporterDown"}


def alerts() -> list[dict]:
    return [r.rule for r in queries.rule_expressions(with_annotations=False) if r.kind == "alert"]


def alert_ids() -> list[str]:
    """Alert names, once each (a name has one rule per severity tier, as in node-mixin)."""
    return list(dict.fromkeys(rule["alert"] for rule in alerts()))


def rules_named(alert: str) -> list[dict]:
    return [rule for rule in alerts() if rule["alert"] == alert]


# --- promtool ------------------------------------------------------------------------------------
def test_rule_files_exist():
    names = [path.name for path in queries.rule_files()]
    assert names == ["alerting-rules.yml", "fleet-rules.yml", "recording-rules.yml"]


def test_promtool_check_rules(need_promtool):
    result = promtool.run("check", "rules", *queries.rule_files())
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests(need_promtool):
    assert RULE_TESTS, "no tests/rules/*.test.yml"
    result = promtool.run("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_expression_parses_including_annotation_queries(need_promtool):
    expressions = [(f"{r.file.name} {r.kind} {r.name}", r.expr) for r in queries.rule_expressions()]
    assert any(kind.split()[1] == "annotation" for kind, _ in expressions)
    assert promtool.parse_errors(expressions) is None


def test_example_prometheus_config(need_promtool):
    result = promtool.run("check", "config", EXAMPLE_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


# --- every alert is tested both ways ---------------------------------------------------------------
def _duration(text: str) -> float:
    seconds = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|[smhdwy])", str(text))
    assert parts, f"not a duration: {text!r}"
    return sum(float(number) * seconds[unit] for number, unit in parts)


def _series_labels(series: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)\s*=\s*"((?:[^"\\]|\\.)*)"', series))


def _cases(alert: str) -> tuple[list, list]:
    """(firing checks, not-firing checks) for an alert, over all promtool test files.

    A not-firing check is an evaluation after the alert's `for:` that expects nothing, or one that
    expects the alert for some units (or sources, or hosts) while the input has others too: promtool
    compares the whole list, so those others are checked not to fire.
    """
    hold = min(_duration(rule.get("for", "0s")) for rule in rules_named(alert))
    firing, quiet = [], []
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            inputs = [_series_labels(s["series"]) for s in test.get("input_series", [])]
            for check in test.get("alert_rule_test", []):
                if check["alertname"] != alert or _duration(check["eval_time"]) < hold:
                    continue
                expected = check.get("exp_alerts") or []
                if not expected:
                    quiet.append((path.name, check["eval_time"]))
                    continue
                firing.append((path.name, check["eval_time"]))
                key = next(k for k in ("unit", "source", "instance") if all(k in e["exp_labels"] for e in expected))
                fired = {e["exp_labels"][key].replace("\\\\", "\\") for e in expected}
                others = {labels[key].replace("\\\\", "\\") for labels in inputs if key in labels} - fired
                if others:
                    quiet.append((path.name, check["eval_time"], sorted(others)))
    return firing, quiet


@pytest.mark.parametrize("alert", alert_ids())
def test_alert_has_firing_and_quiet_cases(alert):
    firing, quiet = _cases(alert)
    assert firing, f"{alert}: no promtool test where it fires"
    assert quiet, f"{alert}: no promtool test where it must stay quiet"


# --- what every alert must carry ------------------------------------------------------------------
RUNBOOKS = "https://example.com/systemd-memory-exporter/runbooks#"
UNIT_DASHBOARD = "https://grafana.example.com/d/systemd-memory-unit/systemd-unit-memory?"


def readme_section(heading: str) -> str:
    return README.read_text(encoding="utf-8").split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("alert", alert_ids())
def test_alert_labels_and_annotations(alert):
    for rule in rules_named(alert):
        assert rule.get("labels", {}).get("severity") in SEVERITIES
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{alert}: no {key}"
        text = annotations["summary"] + annotations["description"]
        if alert not in NO_NUMBER:
            assert "$value" in text or "query" in text, f"{alert}: the annotations show no number"
        assert annotations["runbook_url"] == RUNBOOKS + alert.lower()


@pytest.mark.parametrize("alert", alert_ids())
def test_every_alert_has_a_runbook_in_the_readme(alert):
    """runbook_url points at README's Runbooks section: a heading per alert (its anchor) and a paragraph."""
    runbooks = readme_section("### Runbooks")
    assert f"\n#### {alert}\n" in runbooks, f"README has no runbook for {alert}"
    text = runbooks.split(f"\n#### {alert}\n", 1)[1].split("\n#### ", 1)[0]
    assert len(text.split()) >= 25, f"{alert}: the runbook should be a paragraph"


def test_unit_alerts_link_the_unit_dashboard_with_url_escaped_labels():
    for rule in alerts():
        if rule["alert"].startswith("SystemdUnit"):
            url = rule["annotations"].get("dashboard_url", "")
            assert url.startswith(UNIT_DASHBOARD), rule["alert"]
            for label in ("job", "instance", "unit"):
                assert f"var-{label}={{{{ $labels.{label} | urlquery }}}}" in url, (rule["alert"], label)
            assert "var-uid={{ . | urlquery }}" in url


def test_byte_alerts_humanize_in_iec_units():
    for rule in alerts():
        text = " ".join(rule["annotations"].values())
        if "humanize " in text or re.search(r"humanize\s*}}", text):
            pytest.fail(f"{rule['alert']}: bytes must use humanize1024, not humanize")


def test_severities_page_only_on_risk():
    """No informational alert (a healthy state is a panel or a recording rule); critical only where
    the outcome is an OOM kill soon."""
    levels = {(rule["alert"], rule["labels"]["severity"]) for rule in alerts()}
    assert not [name for name, level in levels if level == "info"]
    assert [name for name, level in levels if level == "critical"] == ["SystemdUnitAnonMemoryWillHitMemoryMax"]
    assert "SystemdUnitMemoryMostlyCache" not in alert_ids()
    assert "unit:systemd_unit_memory_reclaimable_cache_share:ratio" in queries.recorded_names()


def test_rule_groups_have_intervals_and_alerts_read_no_subqueries():
    """Bounded cost: every group sets its interval; range functions over long windows run in the
    slow recording group (2 minutes: at most the 5-minute lookback, or recorded series would
    vanish between evaluations), and no rule evaluates a subquery."""
    for path in queries.rule_files():
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            assert "interval" in group, f"{path.name} {group['name']}: no interval"
            for rule in group["rules"]:
                assert not re.search(r"\[\d+[smhd]:\d*[smhd]?\]", rule["expr"]), f"{group['name']}: a subquery"
                if re.search(r"\[1h\]", rule["expr"]):
                    assert group["interval"] == "2m", f"{rule.get('record') or rule['alert']}: 1h window every minute"


JOB = 'job="systemd-memory-exporter"'


def test_every_exporter_selector_carries_the_job_selector(contract):
    """The job selector is one literal: every selector of an exporter series in the rules has it."""
    recorded = queries.recorded_names()
    for r in queries.rule_expressions(with_annotations=False):
        for metric, body in re.findall(r"\b([a-z_:][a-z0-9_:]*)\{([^}]*)\}", r.expr):
            if metric in recorded or metric.startswith("unit:") or metric.startswith("instance:"):
                continue
            assert JOB in body, f"{r.name}: {metric}{{{body}}} has no {JOB}"
        bare = re.findall(r"(?<![:\w])(systemd_[a-z0-9_]+|up)\b(?![{(_a-z:])", r.expr)
        assert not bare, f"{r.name}: selectors without labels: {bare}"


def test_rules_and_their_tests_work_for_another_job(need_promtool, tmp_path):
    """The README's recipe for another job name (replace the selector text) keeps every test green."""
    rules, tests = tmp_path / "deploy" / "prometheus", tmp_path / "tests" / "rules"
    rules.mkdir(parents=True)
    tests.mkdir(parents=True)
    for path in queries.rule_files():
        (rules / path.name).write_text(path.read_text(encoding="utf-8").replace(JOB, 'job=~"sme|sme-.+"'))
    for path in RULE_TESTS:
        text = path.read_text(encoding="utf-8").replace(JOB, 'job="sme"').replace('job: "systemd-memory-exporter"', 'job: "sme"')
        (tests / path.name).write_text(text.replace("var-job=systemd-memory-exporter", "var-job=sme")
                                       .replace("(job systemd-memory-exporter)", "(job sme)"))
    result = promtool.run("test", "rules", *sorted(tests.glob("*.test.yml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_recording_rule_names_follow_level_metric_operations():
    pattern = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*(:[a-z][a-z0-9_]*)?$")
    for name in queries.recorded_names():
        assert pattern.match(name), name


# --- names: only what the exporter (or Prometheus) produces ----------------------------------------
def test_rule_expressions_use_only_contract_names(contract):
    recorded = queries.recorded_names()
    problems = [
        f"{r.kind} {r.name}: {problem}"
        for r in queries.rule_expressions()
        for problem in contract.problems(r.expr, recorded)
    ]
    assert not problems, "\n".join(problems)


def test_alert_label_references_exist(contract):
    """$labels.x in annotations: x must be a label the alert's series can have."""
    for rule in alerts():
        used = set(re.findall(r"\$labels\.(\w+)", " ".join(rule["annotations"].values())))
        assert used <= contract.all_labels, f"{rule['alert']}: {used - contract.all_labels}"


def test_name_check_catches_mistakes(contract):
    """The checker itself: each of these must be reported."""
    assert contract.problems('systemd_unit_memory_bytes{type="rss"}')
    assert contract.problems('systemd_unit_memory_bytes{item="anon"}')
    assert contract.problems('systemd_unit_memory_stat_bytes{item="mapped_file"}')
    assert contract.problems('systemd_unit_memory_rss_bytes{unit="a"}')
    assert contract.problems('sum by (pid) (systemd_unit_processes)')
    assert contract.problems('systemd_unit_memory_events_total{event=~"oom|kill"}')
    assert contract.problems('systemd_unit_info{unit_type="service"}') == []
    assert contract.problems('label_replace(up, "cgroup", "$1", "instance", "(.*)") and on (cgroup) up') == []


# --- the contract parser ---------------------------------------------------------------------------
def test_contract_knows_the_metrics(contract):
    assert contract.knows("systemd_unit_memory_bytes")
    assert contract.knows("process_resident_memory_bytes")  # process_* rows
    assert not contract.knows("systemd_unit_memory_usage_bytes")
    assert contract.labels_of("systemd_unit_memory_limit_bytes") == {"unit", "limit", "uid", "instance", "job"}
    assert {"cgroup_usage", "rss_anon", "rss_file", "rss_shmem", "swap"} <= contract.values_of("systemd_unit_memory_bytes", "type")
    assert {"file_mapped", "file_dirty", "file_writeback", "kernel"} <= contract.values_of("systemd_unit_memory_stat_bytes", "item")
    assert "oom_kill" in contract.values_of("systemd_unit_memory_events_total", "event")
    assert contract.values_of("systemd_unit_info", "unit_type") >= {"service", "slice"}


def test_contract_is_the_readme_metrics_section(tmp_path):
    (tmp_path / "README.md").write_text(
        "# Project\n\n## Metrics\n\n### Per unit\n"
        "| metric | type | labels | meaning |\n|---|---|---|---|\n"
        "| `new_metric` | gauge | unit, kind | kind in a, b |\n"
        "| systemd_unit_memory_events_total | counter | unit, event | v2 memory.events: low, high, max, oom, "
        "oom_kill, oom_group_kill; v1: max = memory.failcnt |\n\n"
        "## Other\n| other_metric | gauge | | |\n"
    )
    contract = metric_contract.load_contract(tmp_path)
    assert contract.source.name == "README.md"
    assert contract.knows("new_metric") and not contract.knows("other_metric")
    assert contract.values_of("new_metric", "kind") == {"a", "b"}
    # "...: a, b, c" when one label besides unit is not enumerated otherwise.
    assert contract.values_of("systemd_unit_memory_events_total", "event") == {
        "low", "high", "max", "oom", "oom_kill", "oom_group_kill"}
    # uid (issue 12) is accepted on every per-unit metric before README lists it.
    assert contract.labels_of("new_metric") == {"unit", "kind", "uid", "instance", "job"}


def test_contract_without_a_metrics_section_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("# Project\n\nNo metrics here yet.\n")
    with pytest.raises(FileNotFoundError):
        metric_contract.load_contract(tmp_path)


# --- the PromQL name extractor ----------------------------------------------------------------------
def test_names_of_a_complex_expression():
    found = promql_names.names(
        '# a comment naming fake_metric{x="y"}\n'
        'sum by (instance, job) (rate(a_total{kind="some", unit=~"$unit"}[5m] offset 1h))\n'
        '/ on (instance) group_left (version) max without (phase) (b @ end())\n'
        'and label_replace(c, "dst", "$1", "src", "(.*)")\n'
        'or min_over_time(deriv(d[1h])[6h:5m]) > bool Inf'
    )
    assert found.metrics == {"a_total", "b", "c", "d"}
    assert found.labels == {"instance", "job", "kind", "unit", "version", "phase", "src"}
    assert found.defined_labels == {"dst"}
    assert {(m.metric, m.label, m.value) for m in found.matchers} == {("a_total", "kind", "some"), ("a_total", "unit", "$unit")}


def test_names_inside_strings_are_not_metrics():
    found = promql_names.names('label_join(up{job="not_a_metric"}, "joined", ",", "job", "instance")')
    assert found.metrics == {"up"}
    assert found.labels == {"job", "instance"}


# --- documentation -----------------------------------------------------------------------------------
def test_readme_alert_table_lists_every_alert_with_its_severities():
    text = readme_section("### Alerts")
    rows = {}
    for cells in (line.strip("|").split("|") for line in text.splitlines() if line.startswith("| `")):
        rows.setdefault(cells[0].strip("` "), set()).add(cells[1].strip("` "))
    expected = {}
    for rule in alerts():
        expected.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
    assert rows == expected
