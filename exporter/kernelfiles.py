"""Kernel files in general: one read per file, the decimal they all print, and the error
boundary, the one place a failed read or parse is given its meaning.

Every reader (cgroup files, /proc/PID/status, smaps_rollup) catches ``OSError`` and
``ParseError`` and asks ``failure_reason`` what happened, as psutil's ``wrap_exceptions`` and
below's ``wrap()`` do: a file that went away is missing data (``VANISHED``), not an error;
anything else is an error of one reason (``PERMISSION``, ``IO``, ``PARSE``), which is what
``errors_total{reason=...}`` counts.
"""

from __future__ import annotations

import errno
import os


class ParseError(ValueError):
    """A kernel file whose content is not what the kernel documents."""


def parse_uint(text: str) -> int:
    """A kernel decimal: ASCII digits only (int() would also take "1_000", " 7" or "٣")."""
    if not (text.isascii() and text.isdigit()):
        raise ParseError(f"expected a non-negative integer, got {text[:40]!r}")
    return int(text)


# The meanings a failed read can have.
VANISHED = "vanished"
PERMISSION = "permission"
IO = "io"
PARSE = "parse"
# Not a failed read: a directory in a user's delegated tree skipped as a unit (exporter/systemd.py).
# Counted and logged, but it leaves source_up alone: any user could otherwise hold it at 0.
REJECTED = "rejected"

# The errnos that mean "this cgroup or process went away while we read it": missing data,
# not an error (below's collector treats cgroups the same way). ESRCH: a process gone
# between listing and reading /proc/PID.
VANISHED_ERRNOS = frozenset({errno.ENOENT, errno.ENODEV, errno.ESRCH})
_PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


def failure_reason(error: OSError | ParseError) -> str:
    """VANISHED, PERMISSION, IO or PARSE: what a reader's exception means."""
    if isinstance(error, ParseError):
        return PARSE
    if error.errno in VANISHED_ERRNOS:
        return VANISHED
    return PERMISSION if error.errno in _PERMISSION_ERRNOS else IO


def describe(error: OSError | ParseError) -> str:
    """The part of an error worth logging: strerror without the path, or the parse message."""
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


READ_SIZE = 65536  # the first read of any file (keptfiles.py's too)
# A seq_file prints into a buffer of a page, and one read returns at most that buffer. A file of
# one record (status, memory.stat, smaps_rollup: nearly all we read) comes whole, the buffer
# grown to fit it; a file printed record by record (cgroup.procs: a PID a line) comes a page at
# a time, each read ending on a whole record. So a read within a record's length of a page, or
# longer, may have more after it; a shorter one is all there is (records here are at most 64
# bytes). Taking only a full 64 KiB read for "more" cut a cgroup.procs of 1,200 PIDs to 682.
MORE_MAY_FOLLOW = min(READ_SIZE, os.sysconf("SC_PAGE_SIZE")) - 64


def read_bytes(path: str | bytes) -> bytes:
    """One open, one read, one close for any file under 64 KiB.

    stat() sizes of kernel files lie (0 or 4096), so read a fixed chunk, and read on to the
    end only when it came near a page or more (MORE_MAY_FOLLOW).
    Raw os calls: a buffered open() costs an extra fstat and ioctl per file; these three
    cost little more than the same calls from C (tests/bench measures both).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, READ_SIZE)
        if len(data) >= MORE_MAY_FOLLOW:
            chunks = [data]
            while chunk := os.read(fd, READ_SIZE):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return data


def read_text(path: str) -> str:
    """read_bytes as text; a stray non-ASCII byte becomes U+FFFD, which the parsers reject."""
    return read_bytes(path).decode("ascii", errors="replace")


def read_many(paths: list[str | bytes]) -> list[bytes | OSError]:
    """read_bytes of each path, with the OSError it raised in place of a file's bytes (the
    interface of KeptFiles.read_many, with no descriptor kept)."""
    out: list[bytes | OSError] = []
    for path in paths:
        try:
            out.append(read_bytes(path))
        except OSError as e:
            out.append(e)
    return out
