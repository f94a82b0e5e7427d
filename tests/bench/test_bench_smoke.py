"""The benchmark at a smoke size (20 units x 3 processes) on the session test host: every key
of the JSON is there and every figure is sane. No timed assertion: speed is read from the full
run (python3 -m tests.bench), never asserted."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from tests.bench import bench

pytestmark = pytest.mark.e2e

# What the full benchmark needs beyond the test suite's own prerequisites.
TOOLS = {"strace": "strace", "gcc": "gcc", "prometheus-node-exporter": "prometheus-node-exporter",
         "prometheus-process-exporter": "prometheus-process-exporter"}


@pytest.fixture(scope="module")
def results(testhost):
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing and os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"benchmark tools missing in CI: apt-get install {' '.join(missing)}", pytrace=False)
    opts = bench.Options(
        sizes=[bench.Size(20, 3)], default_size="20x3", cycles=3, interval=1.0, cpu_window_cycles=2,
        scrapes=40, peer_scrapes=2, trace_peers=True, progress=False,
    )
    out = bench.run(testhost, opts)
    json.dumps(out)  # serialisable as it will be written
    return out


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_headline_key_is_there(results):
    assert set(bench.HEADLINE_KEYS) <= set(results)
    for key in ("sample_cpu_seconds", "scrape_p99_ms", "exporter_rss_mib", "core_share_at_15s"):
        assert finite_positive(results[key]), (key, results[key])
    for key, tool in (("sample_vs_floor", "strace"), ("floor_seconds", "strace"),
                      ("cpu_vs_process_exporter", "prometheus-process-exporter"),
                      ("scrape_vs_node_exporter", "prometheus-node-exporter")):
        if shutil.which(tool):
            assert finite_positive(results[key]), (key, results[key])


def test_the_cycle_saw_every_unit_and_process(results):
    size = results["sizes"]["20x3"]
    assert size["cycle"]["units"] >= 20
    assert size["processes"] >= 20 * 3
    assert size["cycle"]["errors"] == 0
    cpu = size["cycle"]["median"]["cpu"]
    assert all(cpu[phase] >= 0 for phase in ("discovery", "cgroup", "procfs", "build", "render"))
    assert cpu["cycle"] >= cpu["sample"] > 0
    assert 5 < size["exporter"]["rss_mib"] < 500
    assert size["exporter"]["scrape_ms"]["p50"] <= size["exporter"]["scrape_ms"]["p99"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace records the files a cycle reads")
def test_the_floor_replays_the_cycles_reads(results):
    floor = results["sizes"]["20x3"]["floor"]
    assert floor["reads"]["F /proc/PID/status"] >= 20 * 3
    assert floor["reads"]["F memory.stat"] >= 20
    assert floor["procfs_phase"]["ops"] + floor["cgroup_phase"]["ops"] <= floor["ops"]
    assert floor["cpu"] > 0
    # The recorded cycle read its files through kept descriptors (pread64): still one F each.
    kept = floor["kept"]
    assert kept["ops"] == floor["ops"] and kept["cpu"] > 0 and kept["failed_opens"] <= floor["failed_opens"] + 5
    # Its Python replay ran the same operations through as many kept descriptors.
    replay = kept["python_replay"]
    assert replay["ops"] == kept["ops"] and replay["kept"] == kept["kept"] and replay["cpu"] > 0


def test_the_cycle_keeps_descriptors_and_runs_without_them_too(results):
    size = results["sizes"]["20x3"]
    assert size["cycle"]["kept_files"] >= 20 * 3, "the default cap holds every file of 20 units"
    assert size["kept_variants"]["none"]["kept_files"] == 0
    assert size["kept_variants"]["all"]["kept_files"] >= size["cycle"]["kept_files"]
    for variant in size["kept_variants"].values():
        assert variant["errors"] == 0 and variant["units"] == size["cycle"]["units"]
        assert abs(variant["processes"] - size["cycle"]["processes"]) <= 5  # the host's own may come and go


def test_the_gil_probe_saw_the_cycle(results):
    gil = results["sizes"]["20x3"]["gil"]
    for run in (gil["plain"], gil["scrapes_first"]):
        assert run["all"]["n"] > 0
        assert {"cgroup", "procfs"} & run["waits"].keys()


@pytest.mark.skipif(shutil.which("prometheus-process-exporter") is None, reason="peer not installed")
def test_process_exporter_reads_are_counted(results):
    peer = results["sizes"]["20x3"]["process_exporter"]
    assert peer["reads_per_scrape"].get("/proc/PID/stat", 0) >= 20 * 3
    assert peer["cpu_per_scrape"] >= 0


def test_the_table_renders(results):
    results["command"] = "smoke"
    text = bench.markdown(results)
    assert "20x3 units x procs" in text and "sample_vs_floor" in text
