"""The README's metric table is the contract: it must name exactly what the exporter renders,
with the labels it renders. Dashboards and rules are checked against the same table
(tests/test_dashboards.py, tests/test_rules.py), so all three stay in step with the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from exporter.render import EVERY_SERIES, render
from tests.test_sampler import FIXTURES, sample_tree

README = Path(__file__).resolve().parents[1] / "README.md"
# Written by the web layer per scrape, not by the snapshot renderer.
PER_SCRAPE = {"systemd_memory_exporter_render_duration_seconds": set()}


def readme_contract() -> dict[str, set[str]]:
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    # Rows whose type column is a metric type: not the header row ("| metric | type | labels |").
    rows = re.findall(r"^\| ([a-z_*]+) \| (?:gauge|counter|histogram|summary|info) \| ([^|]*) \|", section, re.M)
    return {name: {label.strip() for label in labels.split(",") if label.strip()} for name, labels in rows}


def exposed_name(family) -> str:
    """client_python names a counter family without _total; the exposition and README with."""
    return family.name + ("_total" if family.type == "counter" else "")


def rendered() -> dict[str, set[str]]:
    families = {}
    for tree in ("hybrid", "v2"):
        snapshot = sample_tree(FIXTURES / tree)
        # As --collector.pss renders it: its own health families appear only then.
        with_pss = dataclasses.replace(snapshot, pss_skipped={"max_rss": 1}, pss_deferred_units=0)
        # and a user manager's unit (uid label): the fixture's first unit, as if uid 1500 ran it
        first = with_pss.units[0]
        user_unit = dataclasses.replace(first, unit=dataclasses.replace(first.unit, uid=1500))
        with_pss = dataclasses.replace(with_pss, units=with_pss.units + (user_unit,))
        for family in text_string_to_metric_families(render(with_pss, EVERY_SERIES).decode()):
            name = exposed_name(family)
            labels = families.setdefault(name, set())
            for sample in family.samples:
                labels.update(sample.labels)
    return families | PER_SCRAPE | web_config_families()


def web_config_families() -> dict[str, set[str]]:
    """What a --web.config.file adds to each scrape: its reload collector's families (an empty
    config file: neither TLS nor users, which the exporter accepts)."""
    import tempfile

    from exporter.webconfig import WebConfigFile

    with tempfile.NamedTemporaryFile("w", suffix=".yml") as empty:
        empty.write("{}\n")
        empty.flush()
        reloads = WebConfigFile(empty.name)
    return {exposed_name(family): {label for s in family.samples for label in s.labels}
            for family in reloads.collect()}


def test_readme_names_exactly_what_is_rendered():
    contract = {name: labels for name, labels in readme_contract().items() if not name.endswith("*")}
    assert set(contract) == set(rendered())


def test_rendered_labels_are_documented():
    contract = readme_contract()
    for name, labels in rendered().items():
        assert labels <= contract[name], f"{name}: {labels - contract[name]} not in the README"
