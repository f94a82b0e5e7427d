"""Per-process memory from /proc/PID/status: a pure parser and a thin reader.

Why not psutil here: psutil's memory_info() reads /proc/PID/statm, which has no split between
anonymous, file and shmem pages (its "shared" is RssFile + RssShmem) and no swap, and
memory_full_info() parses the whole of /proc/PID/smaps — the cost trap of process-exporter
#142/#246. /proc/PID/status carries RssAnon, RssFile, RssShmem and VmSwap in one small file
(Documentation/filesystems/proc.rst, table 1-2), so one read per process gives top's RES split.
"""

from __future__ import annotations

import os
import re
from .records import record

from .cgroupfs import ParseError, parse_uint, read_bytes


@record
class ProcessMemory:
    """Bytes. VmSwap counts private anonymous swap only (shmem swap is not in it)."""

    rss_anon: int
    rss_file: int
    rss_shmem: int
    swap: int


# Kernel threads and zombies have no Vm*/Rss* lines: they hold no user memory.
NO_USER_MEMORY = ProcessMemory(0, 0, 0, 0)

_FIELDS = ("RssAnon:", "RssFile:", "RssShmem:", "VmSwap:")


def _line(text: str, field: str) -> int:
    """Where the line starting with ``field`` begins, or -1. Anchored at a line start: the
    Name: line is the process's own comm, and a process named "RssAnon: 1 kB" must not
    be able to stand in for its real RssAnon line."""
    if text.startswith(field):
        return 0
    start = text.find("\n" + field)
    return start + 1 if start >= 0 else -1


def parse_status(text: str) -> ProcessMemory:
    """The four memory fields of /proc/PID/status, in bytes ("RssAnon:\\t  1234 kB")."""
    values = []
    for field in _FIELDS:
        start = _line(text, field)
        if start < 0:
            # A complete status file (it reaches "Threads:") without Rss lines is a kernel
            # thread or a zombie; a truncated one is an error.
            if field == "RssAnon:" and "\nThreads:" in text:
                return NO_USER_MEMORY
            raise ParseError(f"/proc/PID/status lacks {field}")
        end = text.find("\n", start)
        parts = text[start + len(field) : end if end >= 0 else len(text)].split()
        if len(parts) != 2 or parts[1] != "kB":
            raise ParseError(f"malformed {field} line")
        values.append(parse_uint(parts[0]) * 1024)
    return ProcessMemory(*values)


# The kernel prints RssAnon, RssFile and RssShmem on consecutive lines, and VmSwap a few
# lines after them (fs/proc/task_mmu.c, task_mem()); \d in a bytes pattern is ASCII only.
_RSS_LINES = re.compile(rb"\nRssAnon:[ \t]*(\d+) kB\nRssFile:[ \t]*(\d+) kB\nRssShmem:[ \t]*(\d+) kB\n")
_SWAP_LINE = re.compile(rb"\nVmSwap:[ \t]*(\d+) kB\n")


def parse_status_bytes(data: bytes) -> tuple[int, int, int, int]:
    """parse_status on the raw file: (rss_anon, rss_file, rss_shmem, swap) in bytes.

    The sampler's hot loop, once per process per cycle: two precompiled matches on bytes
    cost about a fifth of decoding and running parse_status. Only a file laid out as the
    kernel lays it out takes this path; anything else (kernel threads, zombies, truncated
    or odd files) goes to parse_status, which gives the same figures or the same ParseError.
    """
    start = data.find(b"\nRssAnon:")
    rss = _RSS_LINES.match(data, start) if start >= 0 else None
    if rss is not None:
        swap_at = data.find(b"\nVmSwap:", rss.end() - 1)
        swap = _SWAP_LINE.match(data, swap_at) if swap_at >= 0 else None
        if swap is not None:
            return int(rss[1]) << 10, int(rss[2]) << 10, int(rss[3]) << 10, int(swap[1]) << 10
    m = parse_status(data.decode("ascii", errors="replace"))
    return m.rss_anon, m.rss_file, m.rss_shmem, m.swap


def status_path(procfs: str, pid: int) -> bytes:
    return b"%s/%d/status" % (os.fsencode(procfs), pid)


def read_status(procfs: str, pid: int) -> ProcessMemory:
    """Raises OSError (vanished: ENOENT/ESRCH; EACCES under hidepid) or ParseError."""
    return ProcessMemory(*parse_status_bytes(read_bytes(status_path(procfs, pid))))
