"""The real exporter on a fixture tree (as tests/fleet_exporter.py runs it) whose first discovery
answer comes LATE seconds after start, with a request timeout of TIMEOUT seconds instead of 10:
for the test that a scrape which waits for the first sample still gets it (tests/test_cli.py).

    python3 -m tests.late_start_exporter TREE LATE TIMEOUT [exporter flags...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from exporter import cli, web
from tests.fleet_exporter import FixtureDiscovery, load_units


class LateDiscovery(FixtureDiscovery):
    """A discovery child that answers its first request only after ``late`` seconds, as one
    waiting out --dbus.timeout on a systemd that does not answer would."""

    def __init__(self, tree: Path, late: float):
        super().__init__(load_units(tree))
        self._late = late

    def request(self, wait: float, pause=None):
        time.sleep(self._late)
        self._late = 0.0
        return super().request(wait, pause)


def main(argv: list[str]) -> int:
    tree, late, timeout = Path(argv[0]), float(argv[1]), float(argv[2])
    web.ExporterServer.request_timeout = timeout
    serve_parser, _ = cli.build_parsers()
    flags = [f"--path.procfs={tree / 'proc'}", f"--path.cgroupfs={tree / 'sys/fs/cgroup'}", *argv[3:]]
    return cli.run_server(serve_parser.parse_args(flags), serve_parser, discovery=LateDiscovery(tree, late))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
