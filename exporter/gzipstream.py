"""One gzip member made of two parts: the snapshot's text, compressed once per cycle, and the
few hundred bytes each scrape adds (its own process metrics), appended without compressing
the snapshot again (RFC 1951 deflate, RFC 1952 gzip).

Why not two gzip members joined, as RFC 1952 allows: Go's reader (Prometheus) and Python's
read every member, but curl --compressed and wget --compression=auto stop after the first,
without an error, and lose the scrape's own families. So the snapshot's deflate stream is
left open (sync-flushed: byte-aligned, no final block), and a scrape ends it with stored
blocks of its own bytes and the trailer of the whole text. Stored, not deflated: a copy of
the cycle's compressor per scrape (compressobj.copy, about 256 KiB of state) would deflate
with the GIL released around it, and a scrape that lets the GIL go during a sample cycle
waits to get it back (exporter/service.py, ScrapesFirst). No stdlib call makes stored
blocks, hence these lines.
"""

from __future__ import annotations

import struct
import zlib

GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, unknown OS
_STORED_MAX = 0xFFFF


class OpenGzip:
    """Compresses text piece by piece into a gzip header and a deflate stream left open."""

    def __init__(self, level: int):
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate
        self._pieces = [GZIP_HEADER]
        self.crc = 0
        self.size = 0

    def compress(self, text: bytes) -> None:
        self.crc = zlib.crc32(text, self.crc)
        self.size += len(text)
        self._pieces.append(self._compressor.compress(text))

    def finish(self) -> bytes:
        """The header and every deflate block so far, byte-aligned, none of them final."""
        self._pieces.append(self._compressor.flush(zlib.Z_SYNC_FLUSH))
        return b"".join(self._pieces)


def gzip_ending(data: bytes, crc: int = 0, size: int = 0) -> bytes:
    """``data`` as final stored blocks and the gzip trailer, ending an open stream whose text so
    far has CRC-32 ``crc`` and length ``size``. A stored block is 3 header bits padded to a
    byte, LEN and its complement, then the bytes as they are."""
    blocks = []
    for start in range(0, max(len(data), 1), _STORED_MAX):
        chunk = data[start:start + _STORED_MAX]
        final = start + _STORED_MAX >= len(data)
        blocks.append(struct.pack("<BHH", 1 if final else 0, len(chunk), len(chunk) ^ 0xFFFF) + chunk)
    trailer = struct.pack("<II", zlib.crc32(data, crc), (size + len(data)) & 0xFFFFFFFF)
    return b"".join(blocks) + trailer


def inflate_open(stream: bytes) -> bytes:
    """The text of an OpenGzip's stream (it has no trailer to check)."""
    return zlib.decompressobj(-15).decompress(stream[len(GZIP_HEADER):])
