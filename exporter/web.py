"""HTTP: /metrics from the published snapshot, a landing page, and the exporter's own process
metrics. A thin shell: everything it shows comes from the snapshot.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import resource
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import __version__
from .page import CONTENT_TYPE as PAGE_CONTENT_TYPE
from .page import Pages
from .render import render_scrape
from .service import SampleLoop
from .webconfig import WebConfig

log = logging.getLogger(__name__)

# The classic text format, which every Prometheus version parses.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class OwnProcessCollector(ProcessCollector):
    """client_python's process_* metrics, read the way a scrape can afford.

    Its ProcessCollector lists /proc/self/fd at every scrape for process_open_fds: about 2 us
    per descriptor, 6 ms with the 4,096 descriptors --sample.kept-files keeps by default and
    47 ms with 19,000 (exporter/keptfiles.py). Here that count comes from the last sample cycle
    (the sampler lists it once per cycle), /proc/self/stat is read through one descriptor kept
    open (one pread, one release of the GIL; the scrape waits for the GIL again after each
    release while a cycle runs), and the descriptor limit comes from getrlimit. The names,
    types and values are client_python's; only process_open_fds' HELP says when it was counted.
    """

    def __init__(self, open_descriptors: Callable[[], int | None], registry: CollectorRegistry):
        self._open_descriptors = open_descriptors
        self._stat_fd: int | None = None
        self._lock = threading.Lock()
        super().__init__(registry=registry)

    def _stat(self) -> bytes:
        with self._lock:
            if self._stat_fd is None:
                self._stat_fd = os.open(os.path.join(self._proc, "self", "stat"), os.O_RDONLY | os.O_CLOEXEC)
            fd = self._stat_fd
        return os.pread(fd, 4096, 0)  # pread has no shared offset: scrape threads may race

    def collect(self):
        if not self._btime:
            return []
        result = []
        try:
            parts = self._stat().split(b")")[-1].split()
        except OSError:
            pass
        else:
            p = self._prefix
            result += [
                GaugeMetricFamily(p + "virtual_memory_bytes", "Virtual memory size in bytes.", value=float(parts[20])),
                GaugeMetricFamily(p + "resident_memory_bytes", "Resident memory size in bytes.",
                                  value=float(parts[21]) * self._pagesize),
                GaugeMetricFamily(p + "start_time_seconds", "Start time of the process since unix epoch in seconds.",
                                  value=float(parts[19]) / self._ticks + self._btime),
                CounterMetricFamily(p + "cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                                    value=(float(parts[11]) + float(parts[12])) / self._ticks),
            ]
        count = self._open_descriptors()
        if count is None:  # no cycle yet: few descriptors, so listing them is cheap
            count = len(os.listdir(os.path.join(self._proc, "self", "fd")))
        result += [
            GaugeMetricFamily(self._prefix + "open_fds", "Number of open file descriptors (at the last sample cycle).",
                              value=float(count)),
            GaugeMetricFamily(self._prefix + "max_fds", "Maximum number of open file descriptors.",
                              value=float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])),
        ]
        return result


def _self_registry(open_descriptors: Callable[[], int | None]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    OwnProcessCollector(open_descriptors, registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class DeadlineReader(io.RawIOBase):
    """A connection's reads, each waiting only for what is left of a deadline.

    The socket's own timeout bounds one recv, so a client that sends a byte every few seconds
    would keep a connection slot for ever (128 of them stop every scrape: slowloris). With
    ``deadline`` set, the request line and headers must all arrive by then. Built on recv_into
    rather than socket.SocketIO, which makefile() ties to the socket's private reference count.
    """

    def __init__(self, connection: socket.socket, timeout: float):
        self._connection = connection
        self._timeout = timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is None:
            return self._connection.recv_into(buffer)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._connection.settimeout(min(left, self._timeout))
        try:
            return self._connection.recv_into(buffer)
        finally:
            self._connection.settimeout(self._timeout)  # the send keeps its own budget


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    # Bounded work per connection: a request must arrive within this many seconds of the wait
    # for it (an idle keep-alive connection is dropped then), and its response must be taken
    # within as many from its first byte (a scrape may wait for a sample before it).
    request_timeout = 10.0
    # At most this many connections get a thread; more wait in the listen backlog, which is
    # sized so a burst of scrapers is queued by the kernel instead of having SYNs dropped.
    max_connections = 128
    request_queue_size = 512

    def __init__(
        self, address: tuple[str, int], loop: SampleLoop, telemetry_path: str, family: int, web_config: WebConfig | None = None,
        grafana_url: str = "",
    ):
        self.address_family = family
        self.loop = loop
        self.telemetry_path = telemetry_path
        self.pages = Pages(telemetry_path, grafana_url)
        self.self_registry = _self_registry(loop.open_descriptors)
        self.slots = threading.BoundedSemaphore(self.max_connections)
        self.web_config = web_config
        self._stopping = threading.Event()
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # "::" takes IPv4 too (mapped), whatever net.ipv6.bindv6only says, as Go's does.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def shutdown(self) -> None:
        self._stopping.set()  # first: the accept loop may be waiting for a slot (process_request)
        super().shutdown()

    def process_request(self, request, client_address):
        # More than max_connections at once wait in the listen backlog instead of each
        # getting a thread: slow clients cannot multiply threads without bound. The wait is in
        # the accept loop, so it looks up now and then: a SIGTERM must not wait for a free slot.
        while not self.slots.acquire(timeout=0.25):
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-response is its own problem, not a traceback on stderr.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("connection from %s ended: %s", client_address[0], error)
        else:
            log.exception("error serving %s", client_address[0])

    def process_request_thread(self, request, client_address):
        try:
            # TLS is set up here, in each connection's thread, with the web config in force when
            # it was accepted (SIGHUP may replace self.web_config: cli.py).
            web_config = self.web_config
            if web_config is not None:
                try:
                    request = web_config.handshake(request, self.request_timeout)
                except Exception:  # outside handle_error's reach: log it here, drop the connection
                    log.exception("TLS setup with %s failed", client_address[0])
                    self.shutdown_request(request)
                    return
            if request is not None:
                super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


# A GET body read and dropped rather than left unread (Handler._discard_body); larger ones close.
MAX_DISCARDED_BODY = 64 << 10


class Handler(BaseHTTPRequestHandler):
    server: ExporterServer
    protocol_version = "HTTP/1.1"
    # Errors found before the version is parsed (garbage, HTTP/9.9) still get a status line.
    default_request_version = "HTTP/1.0"
    server_version = f"systemd-memory-exporter/{__version__}"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout
        # Without it a small response waits ~40 ms for the client's delayed ACK (Nagle):
        # measured by tests/bench as p50 41.8 ms -> 0.54 ms for a 100-unit scrape.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
        self.rfile.close()  # makefile()'s reader, replaced by one that keeps a deadline
        self._reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.server.request_timeout
        try:
            super().handle_one_request()
        finally:
            self._reader.deadline = None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._discard_body()
        if not self.path.startswith("/"):
            self.path = _origin_form(self.path)
        web_config = self.server.web_config
        if web_config is not None and not web_config.authorized(self.headers.get("Authorization")):
            self._unauthorized()  # before any route: nothing is served without the password
            return
        path = self.path.partition("?")[0]
        if path == self.server.telemetry_path:
            self._metrics()
        elif self.server.pages.handles(path):
            self._page(self.path)  # with its query: ?uid= picks a user manager's unit
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _discard_body(self) -> None:
        """A GET's body means nothing here, but left unread it would be parsed as the next
        request on this connection (request smuggling behind a proxy that forwards it). One of
        a known, small length is read and dropped (within the request's deadline); any other
        (chunked, large, unparsable) ends the connection after this response."""
        length = self.headers.get("Content-Length", "0").strip()
        if "Transfer-Encoding" not in self.headers and length.isdigit() and int(length) <= MAX_DISCARDED_BODY:
            if int(length):
                self.rfile.read(int(length))
            return
        self.close_connection = True

    def _metrics(self) -> None:
        loop = self.server.loop
        published = loop.latest(wait=max(loop.dbus_timeout * 2, 10.0))
        started = time.perf_counter()
        # The sampler waits while this runs, the send included (service.ScrapesFirst): after
        # the send's release of the GIL a running cycle would hold it a switch interval. A
        # client too slow to take the body in costs a cycle at most ScrapesFirst.max_wait.
        with loop.scrapes_first.scrape():
            own = render_scrape(self.server.self_registry.collect(), published and published.render_seconds)
            gzip_ok = gzip_accepted(self.headers.get("Accept-Encoding", ""))
            if published is None:
                self._send(503, b"# no sample yet\n" + own, CONTENT_TYPE)
                return
            if gzip_ok:
                # The snapshot part was compressed once; own ends its open gzip member.
                # Sent as two parts, never joined: see end_headers.
                body = (published.body_gzip_open, published.gzip_ending(own))
            else:
                body = (published.body(), own)
            self._send(200, body, CONTENT_TYPE, gzip_ok)
        log.debug("scrape served in %.1f ms", (time.perf_counter() - started) * 1000)

    def _page(self, target: str) -> None:
        gzip_ok = gzip_accepted(self.headers.get("Accept-Encoding", ""))
        status, body, gzipped = self.server.pages.respond(target, self.server.loop.last(), gzip_ok)
        self._send(status, body, PAGE_CONTENT_TYPE, gzipped)

    def _send(self, status: int, body: bytes | tuple[bytes, ...], content_type: str, gzipped: bool = False) -> None:
        parts = (body,) if isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(map(len, parts))))
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers(*(() if self.command == "HEAD" else parts))

    def _unauthorized(self) -> None:
        body = b"Unauthorized\n"
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="systemd-memory-exporter"')
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def end_headers(self, *body: bytes) -> None:
        """The headers, and the ``body`` parts after them, in one sendmsg: one release of the GIL
        per response, not two (a scrape meeting a sample cycle waits for the GIL after each
        release), and no copy of the body. Joining a 255 KiB body (3,000 units) to its headers
        made two fresh copies per scrape: 128 page faults and about 0.7 ms more than a server
        sending a fixed body (tests/bench's HTTP floor). TLS (an SSLSocket has no sendmsg)
        writes the parts one after another."""
        if self.server.web_config is not None:  # http_server_config.headers, on every response
            for name, value in self.server.web_config.headers.items():
                self.send_header(name, value)
        buffered = getattr(self, "_headers_buffer", None)  # http.server's; absent for HTTP/0.9
        if buffered is None:
            super().end_headers()
            parts = [part for part in body if part]
        else:
            buffered.append(b"\r\n")
            parts = [b"".join(buffered), *(part for part in body if part)]
            self._headers_buffer = []
        send_parts(self.connection, self.wfile, parts, time.monotonic() + self.server.request_timeout)

    do_HEAD = do_GET


def _origin_form(target: str) -> str:
    """The path and query of an absolute-form request target ("http://host/metrics"), which a
    server must accept (RFC 9112 3.2.2); anything else is left to give 404."""
    parts = urllib.parse.urlsplit(target)
    if parts.scheme.lower() not in ("http", "https"):
        return target
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def send_parts(connection: socket.socket, wfile, parts: list[bytes], deadline: float | None = None) -> None:
    """All of ``parts``, in order, on ``connection``: by sendmsg (scatter-gather, no join), or
    for TLS (an SSLSocket's sendmsg raises NotImplementedError) one write each on ``wfile``.
    ``deadline`` (monotonic): past it, a client still taking the body in a little at a time
    is dropped (TimeoutError), as one that takes nothing is by the socket's timeout."""
    if isinstance(connection, ssl.SSLSocket):
        for part in parts:  # sendall: the socket's timeout bounds each part as a whole
            wfile.write(part)
        return
    views = [memoryview(part) for part in parts]
    while views:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the client did not take the response in time")
        sent = connection.sendmsg(views)  # with a socket timeout it may send only some of them
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


def gzip_accepted(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header admits gzip (RFC 9110, 12.5.3).

    Tokens as client_python's gzip_accepted splits them (on "," then ";", case-insensitive),
    plus the q-values it ignores: "gzip;q=0" refuses gzip, and "*" stands for any coding the
    header does not name.
    """
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, *params = (part.strip().lower() for part in item.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0  # an unreadable q-value accepts nothing
        if coding:
            weights[coding] = weight
    return weights.get("gzip", weights.get("*", 0.0)) > 0


def serve(
    loop: SampleLoop, listen: str, telemetry_path: str, web_config: WebConfig | None = None, grafana_url: str = ""
) -> ExporterServer:
    host, port = parse_listen_address(listen)
    if not host and socket.has_ipv6:
        # ":port" is every address, IPv6 too, as node_exporter's (Go's) listener is: one
        # dual-stack socket. A host without IPv6 (ipv6.disable=1) refuses it: IPv4 alone then.
        try:
            return ExporterServer(("::", port), loop, telemetry_path, socket.AF_INET6, web_config, grafana_url)
        except OSError as e:
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return ExporterServer((host or "0.0.0.0", port), loop, telemetry_path, family, web_config, grafana_url)


def parse_listen_address(listen: str) -> tuple[str, int]:
    """node_exporter's form: "host:port", "[v6]:port" or ":port": host "", every address, which
    serve() listens on as "::" dual-stack where the host has IPv6, else as 0.0.0.0."""
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:  # "²".isdigit() too
        raise ValueError(f"invalid listen address {listen!r}: want host:port, [ipv6]:port or :port")
    host = host.strip("[]")
    return host, int(port)
