#!/usr/bin/python3
"""Runs inside the guest: one exporter sample, and what systemd and the kernel say right after.

    echo '{"url": ..., "units": [...], ...}' | systemd-run --pipe --wait --unit=smx-probe-N.service \
        /opt/systemd-memory-exporter/bin/python /project/tests/vm/probe.py

One agent round trip instead of several, so the exporter's sample, the cgroup files and
`systemctl show` are read within a fraction of a second of each other, in that order. Run as
its own transient unit, so that the probe (and the systemctl it runs) is charged to none of
the units it measures. Standard library plus prometheus_client (run by the exporter's venv
python in the guest). The request is JSON on stdin (or argv[1]) with the keys:

  url      the exporter's /metrics (required)
  run      argv to run first (e.g. systemctl stop UNIT); "elapsed" is counted from its end
  wait     true (default): wait for a sample that started after `run`, so it reflects it
  timeout  seconds to wait for that sample (default 30)
  units    unit names, or "all" for every unit in the scrape's systemd_unit_info
  props    systemctl show properties to read for those units (ControlGroup is always read)
  files    cgroup file names to read in each of those units' cgroup directories
  root     where those directories are (default /sys/fs/cgroup; /sys/fs/cgroup/memory on v1)

Prints JSON: {"scrape": text, "elapsed": s, "run": {...},
              "units": {name: {"show": {prop: value}, "files": {name: text or null}}}}.
"""
import json
import re
import subprocess
import sys
import time
import urllib.request

CGROUP_ROOT = "/sys/fs/cgroup"
_LAST_SAMPLE = re.compile(r"^systemd_memory_exporter_last_sample_timestamp_seconds (\S+)$", re.M)


def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def wait_for_sample(url, after, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = fetch(url)
            found = _LAST_SAMPLE.search(text)
            if found and float(found.group(1)) > after:
                return text
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"no sample started after {after} within {timeout} s")
        time.sleep(0.05)


def unit_names(text):
    from prometheus_client.parser import text_string_to_metric_families
    return sorted({s.labels["unit"] for family in text_string_to_metric_families(text)
                   for s in family.samples if s.name == "systemd_unit_info"})


def show(units, props):
    """systemctl show for many units at once: blocks separated by blank lines, in order."""
    out = subprocess.run(["systemctl", "show", *(f"--property={p}" for p in props), "--", *units],
                         capture_output=True, text=True, check=True).stdout
    blocks = [dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
              for block in out.strip().split("\n\n")] if units else []
    if len(blocks) != len(units):
        sys.exit(f"systemctl show gave {len(blocks)} blocks for {len(units)} units")
    return dict(zip(units, blocks))


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def main():
    request = json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    url = request["url"]
    result = {}
    if request.get("run"):
        ran = subprocess.run(request["run"], capture_output=True, text=True)
        result["run"] = {"returncode": ran.returncode, "stdout": ran.stdout, "stderr": ran.stderr}
    called = time.time()
    units = request.get("units") or []
    if units == "all":
        units = unit_names(fetch(url))
    # Where each unit's files are: asked before the sample, so that after it only files are read
    # until the figures to compare are all in.
    groups = {name: shown.get("ControlGroup", "") for name, shown in show(units, ["ControlGroup"]).items()}
    if request.get("wait", True):
        text = wait_for_sample(url, called, request.get("timeout", 30))
    else:
        text = fetch(url)
    result["elapsed"] = time.time() - called
    result["scrape"] = text
    files = {}
    for name, group in groups.items():
        directory = request.get("root", CGROUP_ROOT) + (group if group != "/" else "")
        files[name] = {f: read(f"{directory}/{f}") if group else None for f in request.get("files", ())}
    props = [p for p in request.get("props", ()) if p != "ControlGroup"]
    shown = show(units, props) if props else {name: {} for name in units}
    result["units"] = {name: {"show": {"ControlGroup": groups[name], **shown[name]}, "files": files[name]}
                       for name in units}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
