#!/usr/bin/env python3
"""Writes the Grafana dashboards in grafana/dashboards/ from the modules in grafana/builder/.

    python3 grafana/build_dashboards.py           # rewrite grafana/dashboards/*.json
    python3 grafana/build_dashboards.py --check   # exit 1 if a JSON file differs from the builder
    python3 grafana/build_dashboards.py --job-selector 'job="sme"' --cluster-label cluster --out DIR

The JSON files are the product: Grafana imports and provisions them as they are. The builder only
keeps about forty panels consistent (one definition of "top's number", the same selectors, units and
datasource everywhere). Standard library only. tests/test_dashboards.py runs --check.

Like a monitoring mixin, the selectors are parameters: --job-selector (default: the $job variable)
and --cluster-label (default: none). The committed JSON uses the defaults.

Every query reads the exporter's series directly (no recording rules), so a dashboard works as soon
as Prometheus scrapes the exporter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from builder import fleet, overview, unit, why  # noqa: E402
from builder.promql import Queries, Selectors  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
MODULES = [overview, unit, why, fleet]  # a new dashboard: a module in builder/ with FILE and build(q), listed here
DASHBOARDS = {module.FILE: module.build for module in MODULES}


def render(build, selectors: Selectors = Selectors()) -> str:
    return json.dumps(build(Queries(selectors)), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a file is out of date")
    parser.add_argument("--job-selector", default=Selectors.job,
                        help="label matcher for the exporter's job (default: %(default)s, the $job variable)")
    parser.add_argument("--cluster-label", default=None, help="add a cluster variable over this label")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="directory for the JSON files")
    args = parser.parse_args()
    selectors = Selectors(job=args.job_selector, cluster_label=args.cluster_label)
    stale = []
    for name, build in DASHBOARDS.items():
        path = args.out / name
        text = render(build, selectors)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(name)
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("out of date (run python3 grafana/build_dashboards.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
