"""The scrape's own pieces (exporter/web.py): the stored gzip member appended to the snapshot's
compressed body, and the process collector that neither lists /proc/self/fd nor reads files
with buffered I/O at every scrape, yet gives client_python's families and values."""

from __future__ import annotations

import gzip
import os
import resource

from prometheus_client import CollectorRegistry, ProcessCollector

from exporter.web import OwnProcessCollector, gzip_member


def test_a_stored_gzip_member_concatenates_with_a_compressed_one():
    for data in (b"", b"x", b"# HELP a\n" * 10_000, os.urandom(70_000)):  # 0, 1, 2 blocks
        assert gzip.decompress(gzip_member(data)) == data
        assert gzip.decompress(gzip.compress(b"head\n", mtime=0) + gzip_member(data)) == b"head\n" + data


def families(collector) -> dict[str, tuple[str, float]]:
    return {m.name: (m.type, m.samples[0].value) for m in collector.collect()}


def test_own_process_collector_gives_client_pythons_families_and_values():
    theirs = families(ProcessCollector(registry=None))
    ours = families(OwnProcessCollector(lambda: 17, registry=CollectorRegistry(auto_describe=False)))
    assert ours.keys() == theirs.keys()
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
    assert ours["process_open_fds"][1] == 17, "the count from the last sample cycle"
    assert ours["process_max_fds"][1] == theirs["process_max_fds"][1] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert ours["process_start_time_seconds"] == theirs["process_start_time_seconds"]
    assert abs(ours["process_cpu_seconds"][1] - theirs["process_cpu_seconds"][1]) < 1.0
    assert abs(ours["process_resident_memory_bytes"][1] - theirs["process_resident_memory_bytes"][1]) < 64 << 20


def test_before_the_first_cycle_the_descriptors_are_listed():
    ours = families(OwnProcessCollector(lambda: None, registry=CollectorRegistry(auto_describe=False)))
    assert abs(ours["process_open_fds"][1] - len(os.listdir("/proc/self/fd"))) <= 2


def test_the_sampler_waits_at_a_pause_point_while_a_scrape_runs():
    import threading

    from exporter.service import ScrapesFirst

    gate = ScrapesFirst(max_wait=30)
    gate.pause_point()  # no scrape: returns at once
    entered, passed = threading.Event(), threading.Event()
    release = threading.Event()

    def scrape():
        with gate.scrape():
            entered.set()
            release.wait(30)

    def sampler():
        entered.wait(30)
        gate.pause_point()
        passed.set()

    threads = [threading.Thread(target=scrape), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    assert entered.wait(10)
    assert not passed.wait(0.3), "the sampler went on while the scrape ran"
    release.set()
    assert passed.wait(10), "the sampler did not go on once the scrape ended"
    for t in threads:
        t.join(10)


def test_a_scrape_that_outlasts_max_wait_holds_the_cycle_up_once():
    import threading

    from exporter.service import ScrapesFirst

    gate = ScrapesFirst(max_wait=0.05)
    release = threading.Event()
    entered = threading.Event()

    def scrape():
        with gate.scrape():
            entered.set()
            release.wait(30)

    t = threading.Thread(target=scrape)
    t.start()
    try:
        assert entered.wait(10)
        gate.pause_point()  # waits max_wait, then gives up for this cycle
        waited = gate.paused_seconds
        for _ in range(100):
            gate.pause_point()
        assert gate.paused_seconds == waited, "later pause points of the cycle must not wait again"
        gate.new_cycle()
        gate.pause_point()
        assert gate.paused_seconds > waited, "a new cycle waits for a running scrape again"
    finally:
        release.set()
        t.join(10)
