"""The dashboard around the panels: variables, links between the dashboards, annotations, metadata."""

from __future__ import annotations

from .panels import DS, PANEL_NAMES
from .promql import Selectors

TAG = "systemd-memory"
SCHEMA_VERSION = 39  # Grafana 10.4 / 11.0; newer Grafana migrates it on load.
UNIT_DASHBOARD = "/d/systemd-memory-unit/systemd-unit-memory"


def _variable(name: str, label: str, description: str, kind: str, **fields) -> dict:
    return {
        "name": name,
        "label": label,
        "description": description,
        "type": kind,
        **fields,
        "regex": "",
        "hide": 0,
        "multi": False,
        "includeAll": False,
        "current": {},
        "options": [],
    }


def query_variable(name: str, label: str, metric: str, label_name: str, description: str, **extra) -> dict:
    query = f"label_values({metric}, {label_name})"
    variable = _variable(
        name, label, description, "query",
        datasource=DS,
        definition=query,
        query={"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        refresh=2,  # on time range change: units come and go
        sort=1,
    )
    variable["skipUrlSync"] = False
    variable.update(extra)
    return variable


def datasource_variable() -> dict:
    variable = _variable("datasource", "Data source", "Prometheus that scrapes systemd-memory-exporter.",
                         "datasource", query="prometheus")
    variable.update(refresh=1, skipUrlSync=False)
    return variable


def host_variables(sel: Selectors) -> list[dict]:
    """The variables that pick one host: [cluster,] [job,] instance."""
    variables = []
    if sel.cluster_label:
        variables.append(query_variable(
            "cluster", "Cluster", "systemd_memory_exporter_build_info", sel.cluster_label,
            f"Cluster (label {sel.cluster_label}) to show.",
        ))
    if sel.job_variable:
        cluster = f'{{{sel.cluster_label}="$cluster"}}' if sel.cluster_label else ""
        variables.append(query_variable(
            "job", "Job", f"systemd_memory_exporter_build_info{cluster}", "job",
            "Prometheus job that scrapes systemd-memory-exporter.",
        ))
    variables.append(query_variable(
        "instance", "Host", f"systemd_memory_exporter_build_info{{{sel.scope}}}", "instance",
        "Host (Prometheus instance) to show.",
    ))
    return variables


ALL = {"text": ["All"], "value": ["$__all"]}


def user_variable(sel: Selectors) -> dict:
    # All is ".*", which also matches the system's units (they have no uid label).
    return query_variable(
        "uid", "User", f"systemd_unit_info{{{sel.host}}}", "uid",
        "Users whose own units to show (uid label; All = the system's units and every user's).",
        multi=True, includeAll=True, allValue=".*", current=ALL,
    )


def unit_variable(sel: Selectors, single: bool = False, default_unit: str | None = None) -> dict:
    """Every unit the exporter reports: services, scopes (machine-*.scope of VMs, libpod-*/docker-*
    of containers), slices. single: one unit, no All (a dashboard about one unit)."""
    listed = f'systemd_unit_info{{{sel.host}, uid=~"$uid"}}'
    if single:
        return query_variable("unit", "Unit", listed, "unit", "The systemd unit to show.",
                              current={"text": default_unit, "value": default_unit})
    return query_variable(
        "unit", "Unit", listed, "unit",
        "systemd units to show (regex match; All = every unit the exporter reports).",
        multi=True, includeAll=True, allValue=".+", current=ALL,
    )


def unit_link(sel: Selectors, unit_value: str) -> list[dict]:
    """A data link to the unit dashboard; unit_value is a Grafana data-link variable for the unit.

    The user selection is carried over as it is (${uid:queryparam}), not taken from the clicked
    unit: a system unit has no uid label, and a data-link variable without a value is left in the
    URL as text, which would select nothing."""
    keep = "".join(f"&${{{v['name']}:queryparam}}" for v in host_variables(sel))
    return [
        {
            "title": "Open the unit dashboard",
            # percentencode: unit names carry backslash escapes (foo\x2dbar.service).
            "url": f"{UNIT_DASHBOARD}?${{datasource:queryparam}}{keep}&${{uid:queryparam}}"
            f"&var-unit=${{{unit_value}:percentencode}}&${{__url_time_range}}",
        }
    ]


def dashboard(uid: str, title: str, description: str, panels: list[dict], sel: Selectors, time_from: str = "now-6h",
              single_unit: str | None = None, annotations: list | None = None) -> dict:
    """single_unit: the default of a single-select unit variable (a dashboard about one unit)."""
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *(
                {"type": "panel", "id": kind, "name": name, "version": ""}
                for kind, name in sorted(
                    {(p["type"], PANEL_NAMES[p["type"]]) for p in panels if p["type"] != "row"}
                )
            ),
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                *(annotations or []),
            ]
        },
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "type": "dashboards",
                "title": "systemd memory",
                "tags": [TAG],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "panels": panels,
        "refresh": "1m",
        "schemaVersion": SCHEMA_VERSION,
        "tags": [TAG, "systemd", "memory"],
        "templating": {"list": [
            datasource_variable(), *host_variables(sel), user_variable(sel),
            unit_variable(sel, single=single_unit is not None, default_unit=single_unit),
        ]},
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }
