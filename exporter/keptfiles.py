"""Kernel files read through descriptors kept open across sample cycles.

cgroup control files and /proc/PID/status are seq_file-backed: reading a descriptor again
from offset 0 (pread) makes the kernel generate the content afresh, so a cycle that keeps
its descriptors pays the read alone, not the path walk of open and the teardown of close
(tests/bench: the C floor of one cycle's files at 1,000 units x 10 processes falls to about
half). A descriptor outlives nothing it should not: a kept /proc/PID/status of a process
that exited reads ESRCH, never another process's data, and a kept file of a removed cgroup
reads ENODEV, even when the same path names a new process or cgroup by now. Either way the
descriptor is closed and the path opened afresh, so the caller sees what a plain open
would have shown.

The cost is kernel memory: a read seq_file keeps its buffer (a page) until close, so each
kept descriptor holds about 4.5 KiB, charged to the exporter's cgroup (memory.kmem, and so
the figure systemctl shows). Hence a cap (``limit``, the --sample.kept-files flag) besides
the descriptor limit of the process; past it, files are opened, read and closed as before.
A descriptor not read in a cycle (its process or unit went) is closed at the cycle's end.
Only files whose size is 0 (generated at each read) are kept, never regular files.
"""

from __future__ import annotations

import errno
import logging
import os
import resource

from .kernelfiles import MORE_MAY_FOLLOW, READ_SIZE, VANISHED_ERRNOS

log = logging.getLogger(__name__)

# Descriptors left for everything else: HTTP connections (128 slots), the listening socket,
# the discovery child's pipes, logging, the PSS pass and the self metrics' own reads.
RESERVED_DESCRIPTORS = 1024
# A kept descriptor's kernel memory, for the log line and the flag's help: a seq_file page
# plus its struct file and kernfs/proc bookkeeping (measured by tests/bench's kept floor).
KERNEL_BYTES_PER_DESCRIPTOR = 4608
# The default cap: at most 18 MiB of kernel memory. All of a 100-unit x 10-process host's
# files (about 1,900) fit; at 1,000 x 10 (19,000 files) the first 4,096 read in a cycle, the
# cgroup files of about 500 units, are kept. tests/bench shows the CPU and memory either way.
DEFAULT_KEPT_FILES = 4096


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (the unit's LimitNOFILE); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, e)
    return soft


LIST_ALWAYS_BELOW = 2048
LIST_EVERY = 10


def _read_rest(fd: int, data: bytes, at: int | None) -> bytes:
    """The chunks after a first one that may not be all (kernelfiles.MORE_MAY_FOLLOW), to the
    end. ``at``: the offset to pread from, or None for the descriptor's own position."""
    chunks = [data]
    while True:
        chunk = os.read(fd, READ_SIZE) if at is None else os.pread(fd, READ_SIZE, at + sum(map(len, chunks)))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class KeptFiles:
    """Reads kernel files whole, keeping up to ``limit`` descriptors across cycles.

    Only the sampler thread uses it. ``end_cycle()`` after each cycle closes the descriptors
    that cycle did not read; ``close()`` closes them all.
    """

    def __init__(self, limit: int):
        self.limit = max(0, limit)
        self._read: dict[str | bytes, int] = {}  # kept, and read in this cycle
        self._unread: dict[str | bytes, int] = {}  # kept from earlier cycles, not read yet in this one
        self.reopened_total = 0  # kept descriptors that read "gone", so their path was opened again
        # The process's open descriptors at the last end_cycle(), for process_open_fds: listing
        # /proc/self/fd costs about 1 us per descriptor (15 ms with 19,000 kept), too much for
        # every scrape (web.py) and, with many kept, for every cycle: then the other descriptors
        # (sockets, pipes: few, and slow to change) are listed every LIST_EVERY cycles.
        self.open_descriptors: int | None = None
        self._others: int | None = None
        self._cycles_since_listing = 0

    def __len__(self) -> int:
        return len(self._read) + len(self._unread)

    def read_bytes(self, path: str | bytes) -> bytes:
        """The whole file; raises OSError as os.open and os.read would for ``path``."""
        fd = self._unread.pop(path, None)
        if fd is None:
            fd = self._read.pop(path, None)  # read twice in one cycle
        if fd is not None:
            try:
                data = os.pread(fd, READ_SIZE, 0)
                if len(data) >= MORE_MAY_FOLLOW:
                    data = _read_rest(fd, data, 0)
            except OSError as e:
                os.close(fd)
                if e.errno not in VANISHED_ERRNOS:
                    raise
                # Gone through this descriptor; the path may name a new process or cgroup.
                self.reopened_total += 1
            else:
                self._read[path] = fd
                return data
        return self._open_and_read(path)

    def read_many(self, paths: list[str | bytes]) -> list[bytes | OSError]:
        """read_bytes of each path, with the OSError it would raise in place of a file's bytes.

        The hot loop of a cycle (every status file of a cgroup, every memory file of a unit):
        a kept descriptor read in full by one pread is handled here without a call per file;
        everything else (a first read, a full buffer, an error) goes through read_bytes.
        """
        unread, kept, pread = self._unread, self._read, os.pread
        out: list[bytes | OSError] = []
        append = out.append
        for path in paths:
            fd = unread.pop(path, None)
            if fd is not None:
                try:
                    data = pread(fd, READ_SIZE, 0)
                except OSError:
                    unread[path] = fd  # read_bytes reads it again, closes it, and opens afresh
                else:
                    if len(data) < MORE_MAY_FOLLOW:
                        kept[path] = fd
                        append(data)
                        continue
                    unread[path] = fd  # maybe more after it: read_bytes reads it whole
            try:
                append(self.read_bytes(path))
            except OSError as e:
                append(e)
        return out

    def read_text(self, path: str | bytes) -> str:
        """read_bytes as text; a stray non-ASCII byte becomes U+FFFD, which the parsers reject."""
        return self.read_bytes(path).decode("ascii", errors="replace")

    def _open_and_read(self, path: str | bytes) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not len(self):
                raise
            # Out of descriptors after all (something else holds more than the reserve):
            # keep half as many from now on, give the rest back, and retry once.
            self.limit = len(self) // 2
            log.warning("out of file descriptors: keeping at most %d open from now on", self.limit)
            for kept in (self._unread, self._read):
                while kept and len(self) > self.limit:
                    os.close(kept.pop(next(iter(kept))))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, READ_SIZE)
            if len(data) >= MORE_MAY_FOLLOW:
                data = _read_rest(fd, data, None)
        except BaseException:
            os.close(fd)
            raise
        # Only a file the kernel generates at each read (procfs, kernfs: size 0) is kept; a
        # regular file (a fixture tree) kept open would go on reading a deleted file's data.
        if len(self._read) + len(self._unread) < self.limit and os.fstat(fd).st_size == 0:
            self._read[path] = fd
        else:
            os.close(fd)
        return data

    def end_cycle(self) -> None:
        """Close what this cycle did not read: its process exited or its unit went."""
        self._close_all(self._unread)
        self._read, self._unread = {}, self._read
        kept = len(self._unread)
        if self._others is None or kept < LIST_ALWAYS_BELOW or self._cycles_since_listing >= LIST_EVERY:
            try:
                self._others = max(0, len(os.listdir("/proc/self/fd")) - 1 - kept)  # -1: the listing's own
            except OSError:
                self._others = None
            self._cycles_since_listing = 0
        else:
            self._cycles_since_listing += 1
        self.open_descriptors = None if self._others is None else self._others + kept

    def close(self) -> None:
        self._close_all(self._unread)
        self._close_all(self._read)

    def __del__(self) -> None:
        self.close()

    @staticmethod
    def _close_all(kept: dict[str | bytes, int]) -> None:
        for fd in kept.values():
            try:
                os.close(fd)
            except OSError:
                pass
        kept.clear()


def default_limit(wanted: int, descriptor_limit: int) -> int:
    """The cap to use: ``wanted``, within the process's descriptor limit minus a reserve."""
    return max(0, min(wanted, descriptor_limit - RESERVED_DESCRIPTORS))
