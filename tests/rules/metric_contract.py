"""The exporter's metric contract, read from the Markdown tables that define it.

Source: README.md, section "## Metrics" (up to the next heading of level 1 or 2).
Each table row is `| metric | type | labels | meaning |`. Label values are taken from the meaning
column where it enumerates them, in one of these forms (per metric, since `type` means a memory kind
on one metric and a unit type on another):
    "<label> in a, b, c"     "<label>=a, b: ..."     "<label> (a, b, c)"
and, for a metric with a single label besides `unit` that no such form enumerates, the first
"...: a, b, c" list of three or more names (memory.events: low, high, ...).
A label whose values are not enumerated is not value-checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

try:  # imported as rules.metric_contract (tests) or as metric_contract (a script in tests/rules)
    from . import promql_names
except ImportError:  # pragma: no cover
    import promql_names

REPO_ROOT = Path(__file__).resolve().parents[2]

# Added by Prometheus, not by the exporter: every scraped series has these target labels, and
# every target has these series.
TARGET_LABELS = frozenset({"instance", "job"})
PROMETHEUS_METRICS = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)

# Labels announced by an open issue and used by the dashboards and rules before the contract lists
# them: issue 12 gives every user unit uid="<UID>" (system units have none). Added to every per-unit
# metric (those with a `unit` label) that does not list it yet; a no-op once README.md does.
ANNOUNCED_UNIT_LABELS = ("uid",)

_NAME_LIST = r"[a-z_][a-z0-9_]*(?:,\s*[a-z_][a-z0-9_]*)*"


@dataclass(frozen=True)
class MetricSpec:
    name: str  # for a wildcard row ("process_*") the prefix, with is_prefix set
    type: str
    labels: tuple[str, ...]
    label_values: dict[str, frozenset[str]] = field(default_factory=dict)
    is_prefix: bool = False


@dataclass(frozen=True)
class Contract:
    source: Path
    specs: tuple[MetricSpec, ...]

    def spec(self, metric: str) -> MetricSpec | None:
        for spec in self.specs:
            if (spec.is_prefix and metric.startswith(spec.name)) or spec.name == metric:
                return spec
        return None

    def knows(self, metric: str) -> bool:
        return self.spec(metric) is not None or metric in PROMETHEUS_METRICS

    def labels_of(self, metric: str) -> frozenset[str] | None:
        """Labels a series of `metric` can carry (target labels included); None if unknown."""
        if metric in PROMETHEUS_METRICS:
            return TARGET_LABELS
        spec = self.spec(metric)
        if spec is None or spec.is_prefix:
            return None
        return frozenset(spec.labels) | TARGET_LABELS

    @property
    def all_labels(self) -> frozenset[str]:
        return frozenset(label for spec in self.specs for label in spec.labels) | TARGET_LABELS

    def values_of(self, metric: str, label: str) -> frozenset[str] | None:
        spec = self.spec(metric)
        return spec.label_values.get(label) if spec else None

    def problems(self, expr: str, extra_metrics: set[str] = frozenset()) -> list[str]:
        """What in a PromQL expression the exporter does not produce: metrics, labels, label values.

        extra_metrics: names that exist too (our recording rules' outputs). A label is accepted in
        a matcher if the metric has it; elsewhere (by, on, label_replace sources) if any contract
        metric has it or the expression itself creates it (label_replace/label_join target).
        """
        found = promql_names.names(expr)
        problems = [f"unknown metric {m}" for m in sorted(found.metrics) if not (self.knows(m) or m in extra_metrics)]
        allowed_anywhere = self.all_labels | found.defined_labels | {"__name__"}
        for matcher in found.matchers:
            own = self.labels_of(matcher.metric) if matcher.metric else None
            if own is not None and matcher.label not in own | {"__name__"}:
                problems.append(f"{matcher.metric} has no label {matcher.label}")
            elif matcher.label not in allowed_anywhere:
                problems.append(f"unknown label {matcher.label}")
            known = self.values_of(matcher.metric, matcher.label) if matcher.metric else None
            literal = promql_names.literal_values(matcher)
            if known is not None and literal is not None and not literal <= known:
                problems.append(f"{matcher.metric}{{{matcher.label}}} has no value {sorted(literal - known)}")
        problems += [f"unknown label {label}" for label in sorted(found.labels - allowed_anywhere)]
        return problems


def metrics_section(markdown: str, heading: str = "## Metrics") -> str | None:
    lines = markdown.splitlines()
    for start, line in enumerate(lines):
        if line.strip().lower() == heading.lower():
            section = []
            for following in lines[start + 1:]:
                if re.match(r"#{1,2}\s", following):
                    break
                section.append(following)
            return "\n".join(section)
    return None


def _cells(row: str) -> list[str]:
    inner = row.strip().strip("|")
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def _names(cell: str) -> list[str]:
    return [name.strip().strip("`") for name in cell.split(",") if name.strip().strip("`")]


def _label_values(labels: list[str], meaning: str) -> dict[str, frozenset[str]]:
    text = meaning.replace("`", "")
    values: dict[str, frozenset[str]] = {}
    for label in labels:
        found: set[str] = set()
        for pattern in (rf"\b{label} in ({_NAME_LIST})", rf"\b{label}=({_NAME_LIST})", rf"\b{label} \(({_NAME_LIST})\)"):
            for match in re.finditer(pattern, text):
                found.update(name.strip() for name in match.group(1).split(","))
        if found:
            values[label] = frozenset(found)
    others = [label for label in labels if label != "unit" and label not in ANNOUNCED_UNIT_LABELS]
    if len(others) == 1 and others[0] not in values:
        match = re.search(r":\s*([a-z_][a-z0-9_]*(?:,\s*[a-z_][a-z0-9_]*){2,})", text)
        if match:
            values[others[0]] = frozenset(name.strip() for name in match.group(1).split(","))
    return values


def parse_contract(markdown: str, source: Path) -> Contract:
    specs = []
    for line in markdown.splitlines():
        if not line.lstrip().startswith("|"):
            continue
        cells = _cells(line)
        if len(cells) < 3 or cells[0].strip("`").lower() == "metric" or set(cells[0]) <= set("-: "):
            continue
        metric_cell, type_cell, label_cell = cells[0], cells[1], cells[2]
        meaning = cells[3] if len(cells) > 3 else ""
        labels = _names(label_cell)
        if "unit" in labels:
            labels += [label for label in ANNOUNCED_UNIT_LABELS if label not in labels]
        for name in _names(metric_cell):
            if name.endswith("*"):
                specs.append(MetricSpec(name.rstrip("*"), type_cell, tuple(labels), {}, is_prefix=True))
            else:
                specs.append(MetricSpec(name, type_cell, tuple(labels), _label_values(labels, meaning)))
    if not specs:
        raise ValueError(f"{source}: no metric table found")
    return Contract(source, tuple(specs))


def load_contract(repo_root: Path = REPO_ROOT) -> Contract:
    readme = repo_root / "README.md"
    section = metrics_section(readme.read_text(encoding="utf-8")) if readme.exists() else None
    if section is None:
        raise FileNotFoundError(f"no metric contract: no '## Metrics' section in {readme}")
    return parse_contract(section, readme)
