"""A real Prometheus (Debian's `prometheus`, on loopback, its own config and data dir) scrapes
the exporter inside the test host and evaluates the shipped rules; every dashboard query must
return data, and the cache alert must tell the page-cache workload from the anon hog."""

from __future__ import annotations

import time

import pytest

from tests.fleet_exporter import EVERY_SERIES_FLAGS
from tests.rules import prometheus as prom
from tests.rules import queries
from tests.testhost import workloads
from tests.truth import MiB, exporter_in_host, free_port

pytestmark = pytest.mark.e2e

JOB = prom.JOB


@pytest.fixture(scope="module")
def setup(testhost, tmp_path_factory):
    units = {
        "cache": workloads.page_cache_reader(testhost, 320),  # the cache alert wants >= 256 MiB of usage
        "anon": workloads.anon_hog(testhost, 300),
        "limited": workloads.payload(testhost, "th-limited.service", "anon", 60, properties=["MemoryMax=400M"]),
    }
    try:
        # Every series on: every dashboard panel, the opt-in ones included (tests/test_fleet.py
        # checks the dashboards under the default series budget).
        with exporter_in_host(testhost, 1.0, *EVERY_SERIES_FLAGS) as exporter, \
                prom.running([f"127.0.0.1:{exporter.port}"], tmp_path_factory.mktemp("prometheus"), free_port()) as (prometheus, proc):
            prometheus.wait_for_scrapes(5, timeout=60, proc=proc)
            deadline = time.monotonic() + 60
            # A child allocates past MemoryMax and is OOM-killed once Prometheus has seen the unit; the
            # unit lives on (OOMPolicy=continue: systemd would stop it otherwise), so the
            # increase of its oom_kill count is there to see.
            units["oom"] = workloads.start_unit(
                testhost, "th-oom.service",
                ["/bin/sh", "-c", "sleep 3; python3 -c 'bytearray(200 << 20)'; exec sleep infinity"],
                properties=["MemoryMax=64M", "OOMPolicy=continue"],
            )
            oom_seen = f'increase(systemd_unit_memory_events_total{{unit="{units["oom"]}", event="oom_kill"}}[1m]) > 0'
            while not prometheus.query(oom_seen):
                if time.monotonic() > deadline:
                    pytest.fail("the OOM kill in th-oom.service never showed in Prometheus")
                time.sleep(0.5)
            yield prometheus, exporter, units
    finally:
        workloads.stop_units(testhost, units.values())


def test_prometheus_returns_per_unit_values(setup):
    prometheus, _, units = setup
    result = prometheus.query(f'systemd_unit_memory_bytes{{job="{JOB}", unit="{units["anon"]}", type="rss_anon"}}')
    assert len(result) == 1 and float(result[0]["value"][1]) >= 290 * MiB
    result = prometheus.query(f'systemd_unit_memory_bytes{{job="{JOB}", unit="{units["cache"]}", type="page_cache"}}')
    assert len(result) == 1 and float(result[0]["value"][1]) >= 300 * MiB


# cgroup v1 has no MemoryHigh (systemd maps only MemoryMax onto memory.limit_in_bytes), so this
# series cannot exist on this host. tests/vm/test_v2_truth.py runs every dashboard query, this
# one included, in a real Prometheus against the exporter in the cgroup v2 guest.
V1_CANNOT_HAVE = ('limit="high"',)


def test_every_dashboard_query_returns_data(setup):
    prometheus, exporter, _ = setup
    values = {"instance": f"127.0.0.1:{exporter.port}", "job": JOB}
    # The fleet dashboard reads fleet-rules.yml, not loaded here: tests/test_fleet.py runs it on 52 hosts.
    empty = [f"{q.dashboard} / {q.panel} / {q.ref_id}: {q.expr}" for q in queries.dashboard_queries(values)
             if q.uid != "systemd-memory-fleet"
             and not any(marker in q.expr for marker in V1_CANNOT_HAVE) and not prometheus.query(q.expr)]
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
