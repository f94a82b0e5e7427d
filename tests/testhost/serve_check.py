"""Does the exporter pip-installed for this Python serve? (.ci/run runs it with each venv's python.)

    /path/to/venv/bin/python -m tests.testhost.serve_check [--layout hybrid|legacy]

Boots a test host of that layout with the venv bound in, starts the venv's console script
`systemd-memory-exporter` there with cwd / (the installed package, not the checkout), waits
for a scrape with units discovered over D-Bus, checks the layout it reports and that a unit's
cgroup_usage equals systemctl's MemoryCurrent, and prints one line of evidence. Exit status 0
when it serves, 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from tests.testhost import TestHost, workloads
from tests.truth import ExporterClient, free_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testhost.serve_check")
    parser.add_argument("--layout", choices=("hybrid", "legacy"), default="hybrid")
    args = parser.parse_args(argv)
    script = Path(sys.prefix) / "bin" / "systemd-memory-exporter"
    if not script.exists():
        print(f"serve_check: {script} missing: pip install the project into this Python first", file=sys.stderr)
        return 1
    with TestHost(name="serve", layout=args.layout, extra_binds=[sys.prefix]) as host:
        unit = workloads.anon_hog(host, 20)
        port = free_port()
        proc = host.popen([str(script), f"--web.listen-address=127.0.0.1:{port}", "--sample.interval=1"],
                          cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            client = ExporterClient(f"http://127.0.0.1:{port}/metrics", 1.0)
            client.wait_ready(timeout=30)
            client.next_sample()
            m = client.scrape()
            current = int(host.show(unit, "MemoryCurrent")["MemoryCurrent"])
            usage = m.value("systemd_unit_memory_bytes", unit=unit, type="cgroup_usage")
            layout = m.value("systemd_memory_exporter_cgroup_layout_info", layout=args.layout, memory_controller="v1")
            ok = layout == 1 and abs(usage - current) <= 0.02 * current
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=10)
    version = ".".join(map(str, sys.version_info[:3]))
    print(f"serve_check: Python {version}, pystemd {metadata.version('pystemd')}, {args.layout}: {script} served "
          f"{len(m.label_values('systemd_unit_info', 'unit'))} units; {unit} cgroup_usage {usage:.0f} "
          f"vs MemoryCurrent {current} -> {'ok' if ok else 'MISMATCH'}")
    if "Traceback" in out or not ok:
        print(out, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
