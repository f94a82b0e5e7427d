"""One exporter instance of the fleet test (tests/test_fleet.py) on a fixture tree.

    python3 -m tests.fleet_exporter TREE [exporter flags...]

The real server (exporter.cli's flags, the sample loop, the HTTP server, the renderer) with one
part replaced: units come from TREE/units.json instead of systemd over D-Bus. Why: the fleet test
needs 50+ hosts that differ, and one systemd can only be one host (50 exporters on one test host
would serve 50 copies of the same units and cgroups, and 50 discovery children). D-Bus discovery
itself is tested against a real systemd in tests/test_e2e.py and tests/test_reliability.py.
--path.procfs and --path.cgroupfs default to TREE's proc and sys/fs/cgroup.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from exporter import cli
from exporter.systemd import DiscoveryResult, Unit

# Every optional series on (render.EVERY_SERIES): for tests that check every figure the exporter
# can give, or every dashboard panel, rather than the default series budget.
EVERY_SERIES_FLAGS = ("--collector.stat.fields=.+", "--collector.events.fields=.+", "--collector.limits.fields=.+",
                      "--collector.pressure.fields=.+", "--collector.peak")


class FixtureDiscovery:
    """DiscoveryProcess's interface, answering every request with the tree's units."""

    def __init__(self, units: tuple[Unit, ...]):
        self._result = DiscoveryResult(units, True, "", 1.0, "system_bus")

    def request(self, wait: float, pause=None) -> DiscoveryResult:
        return self._result

    def interrupt(self) -> None:
        pass

    def stop(self) -> None:
        pass


def load_units(tree: Path) -> tuple[Unit, ...]:
    return tuple(Unit(**unit) for unit in json.loads((tree / "units.json").read_text()))


def main(argv: list[str]) -> int:
    tree = Path(argv[0])
    serve_parser, _ = cli.build_parsers()
    flags = [f"--path.procfs={tree / 'proc'}", f"--path.cgroupfs={tree / 'sys/fs/cgroup'}", *argv[1:]]
    return cli.run_server(serve_parser.parse_args(flags), serve_parser, discovery=FixtureDiscovery(load_units(tree)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
