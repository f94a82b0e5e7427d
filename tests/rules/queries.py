"""Every PromQL expression the project ships, ready to run against a Prometheus.

    from rules import queries            # with tests/ on sys.path
    for q in queries.dashboard_queries({"instance": "localhost:10073", "unit": "foo\\\\.service"}):
        print(q.dashboard, q.panel, q.expr)          # q.expr has the template variables filled in
    queries.alert_expr("SystemdUnitLargeTmpfs")

    python3 tests/rules/queries.py      # prints them all, one per line (tab-separated)

Sources: grafana/dashboards/*.json (panel targets, query variables, annotation queries) and
deploy/prometheus/*rules.yml (recording and alerting rules, and the queries inside alert annotation
templates).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO_ROOT / "grafana" / "dashboards"
RULES_DIR = REPO_ROOT / "deploy" / "prometheus"

# What Grafana would put in for each variable. unit and uid: the multi-value variables' "All" values,
# as Grafana writes them (a selection is regex-escaped by Grafana: see tests/test_dashboards.py).
# unit_name: the unit of the single-select unit dashboard, which its queries escape with ${unit:regex}.
SAMPLE_VALUES = {
    "datasource": "prometheus",
    "job": "systemd-memory-exporter",
    "instance": "localhost:10073",
    "unit": ".+",
    "uid": ".*",
    "unit_name": "systemd-journald.service",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "6h",
    "__range_s": "21600",
    "__range_ms": "21600000",
}

# $name, ${name}, ${name:format}, [[name]]. "$1" in a label_replace replacement is not a variable.
_VARIABLE = re.compile(r"\$\{(\w+)(?::([^}]*))?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def grafana_regex_escape(value: str) -> str:
    """Grafana's ${var:regex} format (escapeRegex in @grafana/data): a backslash before each of \\^$*+?.()|[]{}/."""
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\" + m.group(), value)


def substitute(text: str, values: dict[str, str] | None = None) -> str:
    """Fills in Grafana template variables; unknown variables are an error (a typo, most likely)."""
    merged = {**SAMPLE_VALUES, **(values or {})}

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(3) or match.group(4)
        if name.isdigit():
            return match.group(0)
        if name not in merged:
            raise KeyError(f"unknown template variable ${name} in {text!r}")
        if match.group(2) == "regex":  # a single-select variable's raw value, escaped by the format
            return grafana_regex_escape(merged.get(f"{name}_name", merged[name]))
        return merged[name]

    return _VARIABLE.sub(replace, text)


class DashboardQuery(NamedTuple):
    dashboard: str  # dashboard title
    panel: str  # panel title; "variable <name>" or "annotation <name>" for those
    expr: str  # template variables substituted
    raw_expr: str  # as stored in the dashboard
    ref_id: str
    uid: str  # dashboard uid
    kind: str  # "panel", "variable" or "annotation"
    legend: str
    instant: bool


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[Path, dict]:
    return {path: json.loads(path.read_text(encoding="utf-8")) for path in sorted(directory.glob("*.json"))}


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """All panels, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.+),)?\s*(?P<label>\w+)\s*\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$", re.DOTALL)


def variable_expr(variable: dict) -> tuple[str | None, str | None]:
    """(PromQL inside a Prometheus query variable, label it lists) for a label_values/query_result."""
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query", "")
    match = _LABEL_VALUES.match(query or "")
    if match:
        return match.group("selector"), match.group("label")
    match = _QUERY_RESULT.match(query or "")
    if match:
        return match.group("expr"), None
    return None, None


def dashboard_queries(values: dict[str, str] | None = None, directory: Path = DASHBOARD_DIR) -> list[DashboardQuery]:
    found = []
    for dashboard in load_dashboards(directory).values():
        title, uid = dashboard["title"], dashboard["uid"]
        for panel in iter_panels(dashboard):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append(DashboardQuery(
                        title, panel.get("title", ""), substitute(target["expr"], values), target["expr"],
                        target.get("refId", ""), uid, "panel", target.get("legendFormat", ""),
                        bool(target.get("instant")),
                    ))
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                expr, _ = variable_expr(variable)
                if expr:
                    found.append(DashboardQuery(
                        title, f"variable {variable['name']}", substitute(expr, values), expr, "", uid,
                        "variable", "", True,
                    ))
        for annotation in dashboard.get("annotations", {}).get("list", []):
            if annotation.get("expr"):
                found.append(DashboardQuery(
                    title, f"annotation {annotation['name']}", substitute(annotation["expr"], values),
                    annotation["expr"], "", uid, "annotation", annotation.get("titleFormat", ""), False,
                ))
    return found


class RuleExpr(NamedTuple):
    file: Path
    group: str
    name: str  # record or alert name
    kind: str  # "record", "alert" or "annotation" (a query inside an alert's annotation template)
    expr: str
    rule: dict


def rule_files(directory: Path = RULES_DIR) -> list[Path]:
    return sorted(directory.glob("*rules.yml"))


# printf "systemd_unit_memory_bytes{...,unit=%q}" $labels.unit ... | query
_TEMPLATE_QUERY = re.compile(r'printf\s+"((?:[^"\\]|\\.)*)"((?:\s+\$labels\.\w+)*)\s*\|\s*query')


def annotation_queries(rule: dict, labels: dict[str, str] | None = None) -> list[str]:
    """PromQL run by an alert's annotation templates, with sample label values quoted as Go would."""
    labels = {"instance": "localhost:10073", "job": "systemd-memory-exporter", "unit": "foo.service", "source": "procfs",
              **(labels or {})}
    found = []
    for text in rule.get("annotations", {}).values():
        for match in _TEMPLATE_QUERY.finditer(text):
            fmt = json.loads(f'"{match.group(1)}"')  # a Go string literal; JSON's escapes agree here
            args = [labels.get(name, "x") for name in re.findall(r"\$labels\.(\w+)", match.group(2))]
            found.append(_go_printf(fmt, args))
    return found


def _go_printf(fmt: str, args: list[str]) -> str:
    args = iter(args)

    def verb(match: re.Match) -> str:
        if match.group() == "%%":
            return "%"
        value = next(args)
        return json.dumps(value) if match.group() == "%q" else value

    return re.sub(r"%[qs%]", verb, fmt)


def rule_expressions(directory: Path = RULES_DIR, with_annotations: bool = True) -> list[RuleExpr]:
    found = []
    for path in rule_files(directory):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                kind = "alert" if "alert" in rule else "record"
                name = rule[kind]
                found.append(RuleExpr(path, group["name"], name, kind, rule["expr"], rule))
                if with_annotations and kind == "alert":
                    for query in annotation_queries(rule):
                        found.append(RuleExpr(path, group["name"], name, "annotation", query, rule))
    return found


def alert_expr(name: str, directory: Path = RULES_DIR) -> str:
    for rule in rule_expressions(directory, with_annotations=False):
        if rule.kind == "alert" and rule.name == name:
            return rule.expr
    raise KeyError(f"no alert named {name}")


def recorded_names(directory: Path = RULES_DIR) -> set[str]:
    return {rule.name for rule in rule_expressions(directory, with_annotations=False) if rule.kind == "record"}


def main() -> None:
    for q in dashboard_queries():
        print("\t".join((q.dashboard, q.panel, q.ref_id, " ".join(q.expr.split()))))
    for r in rule_expressions():
        print("\t".join((r.file.name, r.kind, r.name, " ".join(r.expr.split()))))


if __name__ == "__main__":
    main()
    sys.exit(0)
