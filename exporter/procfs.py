"""Per-process memory from /proc/PID/status: a pure parser and a thin reader.

Why not psutil here: psutil's memory_info() reads /proc/PID/statm, which has no split between
anonymous, file and shmem pages (its "shared" is RssFile + RssShmem) and no swap, and
memory_full_info() parses the whole of /proc/PID/smaps — the cost trap of process-exporter
#142/#246. /proc/PID/status carries RssAnon, RssFile, RssShmem and VmSwap in one small file
(Documentation/filesystems/proc.rst, table 1-2), so one read per process gives top's RES split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .cgroupfs import ParseError, parse_uint, read_text


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    """Bytes. VmSwap counts private anonymous swap only (shmem swap is not in it)."""

    rss_anon: int
    rss_file: int
    rss_shmem: int
    swap: int


# Kernel threads and zombies have no Vm*/Rss* lines: they hold no user memory.
NO_USER_MEMORY = ProcessMemory(0, 0, 0, 0)

_FIELDS = ("RssAnon:", "RssFile:", "RssShmem:", "VmSwap:")


def parse_status(text: str) -> ProcessMemory:
    """The four memory fields of /proc/PID/status, in bytes ("RssAnon:\\t  1234 kB")."""
    values = []
    for field in _FIELDS:
        start = text.find(field)
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


def read_status(procfs: str, pid: int) -> ProcessMemory:
    """Raises OSError (vanished: ENOENT/ESRCH; EACCES under hidepid) or ParseError."""
    return parse_status(read_text(os.path.join(procfs, str(pid), "status")))
