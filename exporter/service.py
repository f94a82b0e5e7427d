"""The long-running part: a sampler thread that publishes snapshots on a fixed interval.

A scrape never samples (except with --sample.interval=0): it takes the published snapshot,
already rendered and compressed, so its cost is a copy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .gzipstream import OpenGzip, gzip_ending, inflate_open
from .render import DEFAULT_BUDGET, SeriesBudget, render_families
from .discovery_process import DiscoveryProcess
from .sampler import Sampler, SamplerConfig
from .snapshot import Snapshot

log = logging.getLogger(__name__)


# Units of a replaced snapshot freed at a time (let_go).
RELEASE_UNITS = 250


@dataclass(frozen=True)
class Published:
    snapshot: Snapshot
    # Only the compressed text is kept: Prometheus always asks for gzip, and the plain text
    # (2.2 MB at 1,000 units x 10 processes, 18x the gzip) would sit in memory for the rare
    # curl without --compressed, which gets it decompressed (a few ms). The gzip member is left
    # open, so each scrape ends it with its own lines (exporter/gzipstream.py).
    body_gzip_open: bytes
    body_crc: int
    body_size: int
    render_seconds: float

    def body(self) -> bytes:
        return inflate_open(self.body_gzip_open)

    def gzip_ending(self, tail: bytes) -> bytes:
        """What completes body_gzip_open into one gzip member of the text followed by ``tail``."""
        return gzip_ending(tail, self.body_crc, self.body_size)


class ScrapesFirst:
    """While a scrape is being answered, the sampler thread waits at its next pause point.

    Threads share one GIL. A scrape that meets a sample cycle used to wait for it after each
    of its own releases (every read, every send), up to the 1 ms switch interval each time, and
    longer where the cycle held it in C (tests/bench/inner.py gil measures where). So the scrape
    says it is running (``scrape()``), and the cycle, at each pause point (per unit and per
    cgroup, between chunks of the discovery answer), waits until no scrape runs: the scrape
    gets the GIL, and the core, back at its next release. A scrape that takes longer than
    ``max_wait`` (a client reading slowly is outside it: the send is) stops holding the cycle
    up for the rest of that cycle.
    """

    def __init__(self, max_wait: float = 0.05):
        self._lock = threading.Lock()
        self._running = 0
        self._idle = threading.Event()
        self._idle.set()
        self._max_wait = max_wait
        self._patient = True  # until a scrape outlasts max_wait in this cycle
        self.paused_seconds = 0.0  # how long cycles waited for scrapes, in all

    @contextlib.contextmanager
    def scrape(self) -> Iterator[None]:
        with self._lock:
            self._running += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if not self._running:
                    self._idle.set()

    def pause_point(self) -> None:
        """Called by the sampler thread between units; returns at once when no scrape runs."""
        if self._running and self._patient:
            started = time.perf_counter()
            self._patient = self._idle.wait(self._max_wait)
            self.paused_seconds += time.perf_counter() - started

    def new_cycle(self) -> None:
        self._patient = True


def _no_pause() -> None:
    pass


def publish(snapshot: Snapshot, budget: SeriesBudget = DEFAULT_BUDGET, pause: Callable[[], None] = _no_pause) -> Published:
    started = time.perf_counter()
    # Compressed here, once per snapshot, rather than per scrape, and a family at a time as it
    # is rendered. Level 1: at 1,000 units it took 2.9 ms for 96 KB where level 5 took 7.3 ms
    # for 85 KB and 6 took 10.5 ms for 75 KB; eleven kilobytes a scrape are worth less than
    # 4 ms of every cycle.
    compressed = OpenGzip(1)
    for text in render_families(snapshot, budget, pause):
        compressed.compress(text)
        del text
        pause()
    return Published(snapshot, compressed.finish(), compressed.crc, compressed.size, time.perf_counter() - started)


def let_go(units: list, pause: Callable[[], None]) -> None:
    """Frees a replaced snapshot's units a few hundred at a time, a scrape pause point between:
    freeing 3,000 units' records in one go held the GIL for ~10 ms (tests/bench, inner.py gil,
    where it waits between cycles). ``units`` holds the last references unless a scrape still
    reads that snapshot; then it is freed when that scrape ends."""
    while units:
        del units[-RELEASE_UNITS:]
        pause()


class SampleLoop:
    """Owns the sampler thread, which owns the discovery child; hands out the latest Published."""

    def __init__(self, config: SamplerConfig, discovery: DiscoveryProcess, dbus_timeout: float,
                 budget: SeriesBudget = DEFAULT_BUDGET):
        self.config = config
        self.budget = budget
        self.dbus_timeout = dbus_timeout
        self._discovery = discovery
        self.scrapes_first = ScrapesFirst()
        pause = self.scrapes_first.pause_point
        self._sampler = Sampler(config, lambda: discovery.request(wait=dbus_timeout + 1, pause=pause), pause)
        self._latest: Published | None = None
        self._generation = 0  # cycles ended
        self._sampling = False  # a cycle is under way
        self._changed = threading.Condition()
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends sampling. The sampler thread owns the discovery child and closes it itself:
        closing it from here raced with a request in flight ("write to closed file")."""
        self._stop.set()
        self._wanted.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
            if self._thread.is_alive():
                # Most likely waiting for D-Bus (up to dbus_timeout + 1 s): end the child, which
                # the sampler sees as a child gone, so it finishes its cycle without waiting.
                self._discovery.interrupt()
                # Past this, exit anyway (systemd's TimeoutStopSec is 15 s): the thread is a
                # daemon, and the child, if any, exits when its stdin closes with us.
                self._thread.join(5.0)
        elif self._thread.ident is None:  # never started
            self._discovery.stop()

    def open_descriptors(self) -> int | None:
        """The process's open descriptors at the end of the last cycle (None before one)."""
        return self._sampler.files.open_descriptors

    def latest(self, wait: float = 0.0) -> Published | None:
        """The latest snapshot; with interval 0, a fresh one (waiting up to ``wait`` seconds)."""
        if self.config.interval > 0:
            if self._latest is None and wait:
                with self._changed:
                    self._changed.wait_for(lambda: self._latest is not None, timeout=wait)
            return self._latest
        with self._changed:
            # A cycle under way began before this request, so it is not fresh: wait for the next,
            # which this request's wanted starts (counting it as fresh would leave the wanted set
            # and start one more cycle that nobody asked for).
            target = self._generation + (2 if self._sampling else 1)
            self._wanted.set()
            self._changed.wait_for(lambda: self._generation >= target, timeout=wait)
            return self._latest

    def last(self) -> Published | None:
        """The latest snapshot as it is, never starting a cycle: what pages show (with interval
        0, what the last scrape saw; latest() would sample for a view nobody scrapes)."""
        return self._latest

    def _run(self) -> None:
        try:
            self._sample_until_stopped()
        finally:
            self._discovery.stop()

    def _sample_until_stopped(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            with self._changed:  # together, so each request is served by the first cycle after it
                self._wanted.clear()
                self._sampling = True
            published = None
            try:
                self.scrapes_first.new_cycle()
                published = publish(self._sampler.sample(), self.budget, self.scrapes_first.pause_point)
            except Exception:  # a bug must not end sampling: log it and keep the last snapshot
                log.exception("sample cycle failed; serving the previous snapshot")
            with self._changed:
                self._sampling = False
                previous = self._latest if published is not None else None
                self._latest = published or self._latest
                self._generation += 1
                self._changed.notify_all()
            if previous is not None:
                units = list(previous.snapshot.units)
                del previous
                let_go(units, self.scrapes_first.pause_point)
            if self.config.interval > 0:
                # Fixed schedule, not fixed sleep: a slow cycle does not shift the next ones.
                next_at += self.config.interval
                now = time.monotonic()
                if next_at < now:
                    next_at = now
                self._stop.wait(next_at - now)
            else:
                self._wanted.wait()
