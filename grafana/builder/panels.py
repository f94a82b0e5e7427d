"""Panel constructors: one function per panel type, the options every panel of that type shares.

Dashboards place panels with pos(); the frame numbers them. Standard library only: the foundation
SDK's typed builders were tried and made a panel longer (a builder call per option) without
checking more than tests/test_dashboards.py's round trip through the same SDK does.
"""

from __future__ import annotations

DS = {"type": "prometheus", "uid": "${datasource}"}
BYTES = "bytes"  # Grafana's "bytes(IEC)": KiB, MiB, GiB.
REDUCE_LAST = {"calcs": ["lastNotNull"], "fields": "", "values": False}


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series") -> dict:
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "format": fmt,
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "refId": ref,
    }


def ref_id(index: int) -> str:
    return chr(ord("A") + index)


def targets(*specs) -> list[dict]:
    """specs: (expr, legend) pairs; refIds A, B, C... in order."""
    return [target(expr, legend, ref_id(i)) for i, (expr, legend) in enumerate(specs)]


def pos(x: int, y: int, w: int, h: int) -> dict:
    return {"h": h, "w": w, "x": x, "y": y}


def _panel(kind: str, title: str, description: str, grid: dict, tgts: list[dict], defaults: dict,
           overrides: list | None, options: dict, **extra) -> dict:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": grid,
        "targets": tgts,
        **extra,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": options,
    }


def timeseries(
    title: str, description: str, grid: dict, tgts: list[dict], unit: str = BYTES, stack: bool = False,
    overrides: list | None = None, bars: bool = False, legend_calcs=("lastNotNull", "max"), min0: bool = True,
) -> dict:
    custom = {
        "drawStyle": "bars" if bars else "line",
        "lineInterpolation": "linear",
        "lineWidth": 1,
        "fillOpacity": 80 if bars else (35 if stack else 8),
        "gradientMode": "none",
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "axisPlacement": "auto",
    }
    if min0:
        custom["axisSoftMin"] = 0
    return _panel(
        "timeseries", title, description, grid, tgts,
        {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}},
        overrides,
        {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": list(legend_calcs)},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    )


def stat(title: str, description: str, grid: dict, expr: str, unit: str = BYTES, color: str = "blue") -> dict:
    return _panel(
        "stat", title, description, grid, [target(expr)],
        {"unit": unit, "color": {"mode": "fixed", "fixedColor": color}} | ({"decimals": 1} if unit == BYTES else {}),
        None,
        {
            "reduceOptions": REDUCE_LAST,
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "value",
        },
    )


def bargauge(
    title: str, description: str, grid: dict, expr: str, links: list[dict], unit: str = BYTES,
    legend: str = "{{unit}}", thresholds: list | None = None, max_value: float | None = None,
) -> dict:
    defaults = {
        "unit": unit,
        "min": 0,
        "color": {"mode": "thresholds"} if thresholds else {"mode": "continuous-BlPu"},
        "thresholds": {"mode": "absolute", "steps": thresholds or [{"color": "blue", "value": None}]},
        "links": links,
    }
    if max_value is not None:
        defaults["max"] = max_value
    return _panel(
        "bargauge", title, description, grid, [target(expr, legend, instant=True)], defaults, None,
        {
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
            "sizing": "auto",
            "minVizHeight": 16,
            "minVizWidth": 8,
            "maxVizHeight": 300,
            "reduceOptions": REDUCE_LAST,
        },
    )


def table(title: str, description: str, grid: dict, columns: list[tuple[str, str]], sort_by: str,
          key: str = "unit", key_name: str | None = None, overrides: list | None = None) -> dict:
    """An instant table: one column per (name, expr), merged on their labels, the key column first."""
    refs = [ref_id(i) for i in range(len(columns))]
    rename = {f"Value #{ref}": name for ref, (name, _) in zip(refs, columns)}
    return _panel(
        "table", title, description, grid,
        [target(expr, "", ref, instant=True, fmt="table") for ref, (_, expr) in zip(refs, columns)],
        {"unit": BYTES, "decimals": 1, "custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
        overrides,
        {
            "showHeader": True,
            "cellHeight": "sm",
            "sortBy": [{"displayName": sort_by, "desc": True}],
            "footer": {"show": False, "reducer": ["sum"], "countRows": False, "fields": ""},
        },
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "job": True, "instance": True},
                    "indexByName": {key: 0, **{f"Value #{ref}": i + 1 for i, ref in enumerate(refs)}},
                    "renameByName": ({key: key_name} if key_name else {}) | rename,
                },
            },
        ],
    )


def text(title: str, grid: dict, content: str) -> dict:
    return {
        "type": "text",
        "title": title,
        "description": "",
        "gridPos": grid,
        "options": {"mode": "markdown", "content": content,
                    "code": {"language": "plaintext", "showLineNumbers": False, "showMiniMap": False}},
    }


# --- Overrides -----------------------------------------------------------------------------------
def by_ref(ref: str, *properties) -> dict:
    return {"matcher": {"id": "byFrameRefID", "options": ref}, "properties": list(properties)}


def by_name(name: str, *properties) -> dict:
    return {"matcher": {"id": "byName", "options": name}, "properties": list(properties)}


def prop(name: str, value) -> dict:
    return {"id": name, "value": value}


NOT_STACKED = prop("custom.stacking", {"mode": "none", "group": "A"})
NO_FILL = prop("custom.fillOpacity", 0)
DASH = prop("custom.lineStyle", {"fill": "dash", "dash": [10, 10]})
LINE_ON_TOP = (NOT_STACKED, NO_FILL, prop("custom.lineWidth", 2))


def fixed(color: str) -> dict:
    return prop("color", {"mode": "fixed", "fixedColor": color})


def dashed(color: str) -> tuple:
    return (NOT_STACKED, NO_FILL, DASH, fixed(color))


PANEL_NAMES = {"timeseries": "Time series", "stat": "Stat", "bargauge": "Bar gauge", "table": "Table", "text": "Text"}
