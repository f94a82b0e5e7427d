"""A scrape relay: an HTTP server on the machine's loopback whose every GET is fetched from a URL
inside the guest, through the agent (the guest has no network: `-nic none`). Lets a Prometheus
on the machine scrape the exporter that runs in the guest, body for body."""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

from .guest import _FETCH

EXPOSITION = "text/plain; version=0.0.4; charset=utf-8"


@contextlib.contextmanager
def scrape_relay(vm, guest_url: str, port: int, timeout: float = 10) -> Iterator[str]:
    """Serves GET http://127.0.0.1:port/metrics from guest_url; yields the relay's host:port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - stdlib name
            try:
                body = vm.run(["python3", "-c", _FETCH, guest_url, timeout], timeout=timeout + 10,
                              check=True, text=False).stdout
                status = 200
            except Exception as e:  # noqa: BLE001 - any failure is a failed scrape, not a dead relay
                body, status = f"relay: {guest_url}: {e}\n".encode(), 502
            self.send_response(status)
            self.send_header("Content-Type", EXPOSITION)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    # server_close() then joins the handler threads: none may hold the agent into the next test.
    server.daemon_threads = False
    thread = threading.Thread(target=server.serve_forever, name="scrape-relay", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
