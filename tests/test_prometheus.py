"""A real Prometheus (Debian's `prometheus`, on loopback, its own config and data dir) scrapes
the exporter inside the test host and evaluates the shipped rules; every dashboard query must
return data, and the cache alert must tell the page-cache workload from the anon hog."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.rules import queries
from tests.testhost import workloads
from tests.truth import MiB, exporter_in_host, free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
JOB = "systemd-memory-exporter"


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list[dict]:
        data = urllib.parse.urlencode({"query": expr}).encode()
        with urllib.request.urlopen(self.url + "/api/v1/query", data=data, timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]


@pytest.fixture(scope="module")
def setup(testhost, tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (tests/prerequisites.sh installs it)")
    units = {
        "cache": workloads.page_cache_reader(testhost, 320),  # the cache alert wants >= 256 MiB of usage
        "anon": workloads.anon_hog(testhost, 300),
        "limited": workloads.payload(testhost, "th-limited.service", "anon", 60, properties=["MemoryMax=400M"]),
    }
    with exporter_in_host(testhost, 1.0) as exporter:
        workdir = tmp_path_factory.mktemp("prometheus")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(REPO / "deploy/prometheus/recording-rules.yml"), str(REPO / "deploy/prometheus/alerting-rules.yml")],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}]}],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        port = free_port()
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "w"),
        )
        prometheus = Prometheus(f"http://127.0.0.1:{port}")
        try:
            deadline = time.monotonic() + 60
            while True:  # ready, and enough samples for 1m rate windows
                try:
                    if len(prometheus.query(f'count_over_time(up{{job="{JOB}"}}[1m]) >= 5')) == 1:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("Prometheus did not scrape the exporter:\n" + (workdir / "prometheus.log").read_text()[-3000:])
                time.sleep(0.5)
            # A child allocates past MemoryMax and is OOM-killed once Prometheus has seen the unit; the
            # unit lives on (OOMPolicy=continue: systemd would stop it otherwise), so the
            # increase of its oom_kill count is there to see.
            units["oom"] = workloads.start_unit(
                testhost, "th-oom.service",
                ["/bin/sh", "-c", "sleep 3; python3 -c 'bytearray(200 << 20)'; exec sleep infinity"],
                properties=["MemoryMax=64M", "OOMPolicy=continue"],
            )
            oom_seen = f'increase(systemd_unit_memory_events_total{{unit="th-oom.service", event="oom_kill"}}[1m]) > 0'
            while not prometheus.query(oom_seen):
                if time.monotonic() > deadline + 30:
                    pytest.fail("the OOM kill in th-oom.service never showed in Prometheus")
                time.sleep(0.5)
            yield prometheus, exporter, units
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            workloads.stop_units(testhost, units.values())


def test_prometheus_returns_per_unit_values(setup):
    prometheus, _, units = setup
    result = prometheus.query(f'systemd_unit_memory_bytes{{job="{JOB}", unit="{units["anon"]}", type="rss_anon"}}')
    assert len(result) == 1 and float(result[0]["value"][1]) >= 290 * MiB
    result = prometheus.query(f'systemd_unit_memory_bytes{{job="{JOB}", unit="{units["cache"]}", type="page_cache"}}')
    assert len(result) == 1 and float(result[0]["value"][1]) >= 300 * MiB


# cgroup v1 has no MemoryHigh (systemd maps only MemoryMax onto memory.limit_in_bytes), so this
# series cannot exist on this host; the cgroup v2 guest tests (tests/vm) cover it.
V1_CANNOT_HAVE = ('limit="high"',)


def test_every_dashboard_query_returns_data(setup):
    prometheus, exporter, _ = setup
    values = {"instance": f"127.0.0.1:{exporter.port}", "job": JOB}
    empty = [f"{q.dashboard} / {q.panel} / {q.ref_id}: {q.expr}" for q in queries.dashboard_queries(values)
             if not any(marker in q.expr for marker in V1_CANNOT_HAVE) and not prometheus.query(q.expr)]
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_oom_kill_is_counted(setup):
    prometheus, _, units = setup
    result = prometheus.query(f'systemd_unit_memory_events_total{{unit="{units["oom"]}", event="oom_kill"}}')
    assert len(result) == 1 and float(result[0]["value"][1]) >= 1


def test_cache_alert_tells_page_cache_from_anon(setup):
    prometheus, _, units = setup
    expr = queries.alert_expr("SystemdUnitMemoryMostlyCache")
    firing = {series["metric"]["unit"] for series in prometheus.query(expr)}
    assert units["cache"] in firing
    assert units["anon"] not in firing


def test_recording_rules_are_evaluated(setup):
    prometheus, _, units = setup
    deadline = time.monotonic() + 10
    while not (result := prometheus.query(f'unit:systemd_unit_memory_gap_bytes{{unit="{units["cache"]}"}}')):
        assert time.monotonic() < deadline, "the gap rule produced nothing"
        time.sleep(0.5)
    assert float(result[0]["value"][1]) >= 250 * MiB
