"""The HTTP shell's own logic: the listen address, content negotiation, and the lines written
per scrape (exporter/render.py's render_scrape, the one writer of every /metrics line)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.render import render_scrape
from exporter.web import gzip_accepted, parse_listen_address, send_parts


@pytest.mark.parametrize(
    "listen, address",
    [
        (":10073", ("", 10073)),  # every address: serve() listens dual-stack
        ("127.0.0.1:9", ("127.0.0.1", 9)),
        ("[::1]:65535", ("::1", 65535)),
        ("[::]:1", ("::", 1)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_listen_addresses_in_node_exporters_form(listen, address):
    assert parse_listen_address(listen) == address


@pytest.mark.parametrize("listen", ["10073", "localhost", "host:", "host:0", "host:65536", "host:http", ":-1", "", ":²", ":٣"])
def test_bad_listen_addresses_are_refused(listen):
    with pytest.raises(ValueError, match="invalid listen address"):
        parse_listen_address(listen)


@pytest.mark.parametrize(
    "header, gzip",
    [
        ("gzip", True),
        ("GZip", True),
        ("deflate, gzip;q=1.0, *;q=0.5", True),  # Prometheus' own header is just "gzip"
        ("gzip ; q=0.001", True),
        ("*", True),
        ("", False),
        ("identity", False),
        ("x-gzip", False),  # a token, not a substring
        ("gzip;q=0", False),
        ("gzip;q=0.000", False),
        ("br, gzip;q=0", False),
        ("gzip;q=0, *", False),  # named with q=0: "*" does not bring it back
        ("*;q=0", False),
        ("gzip;q=high", False),
    ],
)
def test_accept_encoding_is_read_by_tokens_and_q_values(header, gzip):
    assert gzip_accepted(header) is gzip


def families(text: str) -> dict[str, tuple[str, list]]:
    return {f.name: (f.type, [(s.name, s.labels) for s in f.samples]) for f in text_string_to_metric_families(text)}


def test_own_process_lines_carry_what_client_python_would_write():
    registry = CollectorRegistry(auto_describe=False)
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    ours = render_scrape(registry.collect(), 0.25).decode()
    theirs = generate_latest(registry).decode()
    expected = families(theirs)
    expected["systemd_memory_exporter_render_duration_seconds"] = (
        "gauge", [("systemd_memory_exporter_render_duration_seconds", {})])
    assert families(ours) == expected
    assert "\nsystemd_memory_exporter_render_duration_seconds 0.25\n" in ours
    # Before the first snapshot there is no render time to report.
    assert "render_duration" not in render_scrape(registry.collect(), None).decode()


def test_parts_sent_by_sendmsg_arrive_whole_and_in_order_when_the_kernel_takes_a_few_at_a_time():
    """A 3 MiB body through a 4 KiB send buffer to a reader that sips: with a socket timeout,
    sendmsg returns after part of a part, and send_parts must go on from that byte."""
    parts = [b"HTTP/1.1 200 OK\r\n\r\n", os.urandom(3 << 20), b"", b"tail"]
    sender, receiver = socket.socketpair()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender.settimeout(10)
    received = bytearray()

    def read() -> None:
        while chunk := receiver.recv(65536):
            received.extend(chunk)
            time.sleep(0.0002)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        send_parts(sender, None, parts)
    finally:
        sender.close()
        reader.join(30)
        receiver.close()
    assert not reader.is_alive()
    assert received == b"".join(parts)
