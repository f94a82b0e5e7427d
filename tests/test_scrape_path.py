"""The scrape's own pieces: the stored blocks that end the snapshot's open gzip member
(exporter/gzipstream.py), and the process collector that neither lists /proc/self/fd nor reads files
with buffered I/O at every scrape, yet gives client_python's families and values."""

from __future__ import annotations

import gzip
import os
import resource
import zlib

from prometheus_client import CollectorRegistry, ProcessCollector

from exporter.gzipstream import GZIP_HEADER, OpenGzip, gzip_ending, inflate_open
from exporter.web import OwnProcessCollector


def test_stored_blocks_end_an_open_compressed_member_as_one_member():
    for data in (b"", b"x", b"# HELP a\n" * 10_000, os.urandom(70_000)):  # 0, 1, 2 blocks
        assert gzip.decompress(GZIP_HEADER + gzip_ending(data)) == data  # a member of stored blocks alone
        for head in ([], [b"head\n"], [b"# TYPE b gauge\n" * 5_000, os.urandom(70_000)]):
            opened = OpenGzip(1)
            for piece in head:
                opened.compress(piece)
            stream = opened.finish()
            assert inflate_open(stream) == b"".join(head)
            # zlib at wbits 31 reads one member and checks its CRC and length, as curl does.
            member = zlib.decompressobj(wbits=31)
            assert member.decompress(stream + gzip_ending(data, opened.crc, opened.size)) == b"".join(head) + data
            assert member.eof and member.unused_data == b""


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
