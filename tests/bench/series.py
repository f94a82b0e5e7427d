"""Series per unit and per host, cgroup v1 and v2, at 100 and 1,000 units: the series budget.

    python3 -m tests.bench.series [--json FILE]

Each host is a captured fixture tree (tests/fixtures/hybrid: cgroup v1 memory controller, hybrid
layout; tests/fixtures/v2: unified) grown to 100 or 1,000 units by copying one captured
service's cgroup files under new names (bench-N.service in system.slice): which series a unit
has depends only on which files its cgroup has, and the copies have exactly the captured ones.
"plain" copies th-cache-1.service (v1) / smx-anon-1.service (v2), which have no limits;
"limited" copies smx-limited-9.service (v2: MemoryMax, MemoryHigh, MemoryLow, MemoryMin,
MemorySwapMax) and, on v1, th-cache-1.service with memory.limit_in_bytes set, the only v1 limit:
the worst case a budget must hold for. Counted from the renderer the server uses (the
snapshot's lines; a scrape adds ~40 process_*/python_* lines and render_duration).
No timing here: tests/bench/bench.py measures cost.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from exporter.render import DEFAULT_BUDGET, EVERY_SERIES, SeriesBudget, render
from exporter.sampler import Sampler, SamplerConfig
from exporter.systemd import DiscoveryResult, Unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CAPTURES = {"v1": "hybrid", "v2": "v2"}
TEMPLATES = {("v1", "plain"): "th-cache-1.service", ("v1", "limited"): "th-cache-1.service",
             ("v2", "plain"): "smx-anon-1.service", ("v2", "limited"): "smx-limited-9.service"}
# The budget: at most this many series per unit with the default flags.
BUDGET = {"v1": 20, "v2": 24}
SIZES = (100, 1000)
BUDGETS = {"default": DEFAULT_BUDGET, "all": EVERY_SERIES}


def grow(version: str, template: str, units: int, workdir: Path) -> Path:
    """A copy of the capture with bench-N.service units added until it reports `units`."""
    capture = CAPTURES[version]
    tree = workdir / f"{version}-{template}-{units}"
    shutil.copytree(FIXTURES / capture, tree, symlinks=True)
    listed = json.loads((tree / "units.json").read_text())
    source = next(u for u in listed if u["name"] == TEMPLATES[(version, template)])
    hierarchies = ("memory", "unified") if capture == "hybrid" else ("",)
    for n in range(units - len(listed)):
        name = f"bench-{n}.service"
        cgroup = f"/system.slice/{name}"
        for hierarchy in hierarchies:
            root = tree / "sys/fs/cgroup" / hierarchy
            shutil.copytree(root / source["control_group"].lstrip("/"), root / cgroup.lstrip("/"))
            if version == "v1" and template == "limited" and hierarchy == "memory":
                (root / cgroup.lstrip("/") / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
        listed.append({**source, "name": name, "control_group": cgroup})
    (tree / "units.json").write_text(json.dumps(listed))
    return tree


def sample(tree: Path):
    units = tuple(Unit(**u) for u in json.loads((tree / "units.json").read_text()))
    config = SamplerConfig(procfs=str(tree / "proc"), cgroupfs=str(tree / "sys/fs/cgroup"), interval=15)
    return Sampler(config, lambda: DiscoveryResult(units, True, "", 1.0, "system_bus")).sample()


def count(snapshot, budget: SeriesBudget) -> dict:
    body = render(snapshot, budget)
    lines = [line for line in body.decode().splitlines() if line and not line.startswith("#")]
    per_unit = Counter()
    for line in lines:
        if 'unit="' in line:
            per_unit[line.split('unit="', 1)[1].split('"', 1)[0]] += 1
    copies = [n for name, n in per_unit.items() if name.startswith("bench-")]
    return {
        "series per unit": max(copies) if copies else None,
        "series per host": len(lines),
        "per-unit series per host": sum(per_unit.values()),
        "units": len(snapshot.units),
        "body bytes": len(body),
        "body bytes gzip": len(gzip.compress(body, compresslevel=1, mtime=0))  # as exporter/service.py compresses,
    }


def measure(workdir: Path, sizes=SIZES) -> dict:
    """{(version, template, units, budget name): count(...)}"""
    results = {}
    for version in CAPTURES:
        for template in ("plain", "limited"):
            for units in sizes:
                snapshot = sample(grow(version, template, units, workdir))
                for name, budget in BUDGETS.items():
                    results[(version, template, units, name)] = count(snapshot, budget)
    return results


def table(results: dict, sizes=SIZES) -> str:
    columns = [(v, b) for v in CAPTURES for b in BUDGETS]
    head = "| | " + " | ".join(f"{v} {b}" for v, b in columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    rows = []

    def row(label, template, units, key, fmt="{:,}"):
        values = [results[(v, template, units, b)][key] for v, b in columns]
        rows.append(f"| {label} | " + " | ".join(fmt.format(x) for x in values) + " |")

    row("series per unit, no limits", "plain", sizes[0], "series per unit")
    row("series per unit, every limit set (worst case)", "limited", sizes[0], "series per unit")
    rows.append("| budget (at most, default) | " + " | ".join(str(BUDGET[v]) if b == "default" else "" for v, b in columns) + " |")
    for units in sizes:
        row(f"series per host, {units:,} units (no limits)", "plain", units, "series per host")
        row(f"series per host, {units:,} units (every limit set)", "limited", units, "series per host")
        row(f"/metrics body per host, {units:,} units, gzip", "plain", units, "body bytes gzip")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.bench.series", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smx-series-") as tmp:
        results = measure(Path(tmp))
    sys.stdout.write(table(results))
    if args.json:
        args.json.write_text(json.dumps({" ".join(map(str, k)): v for k, v in results.items()}, indent=1))
    over = [k for k, v in results.items() if k[3] == "default" and v["series per unit"] > BUDGET[k[0]]]
    if over:
        print(f"over budget: {over}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
