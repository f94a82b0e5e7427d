"""Per-process memory from /proc/PID/status, summed over cgroup subtrees: the parsers, and the
walker that reads every cgroup.procs and status file of a cycle once.

Why not psutil here: psutil's memory_info() reads /proc/PID/statm, which has no split between
anonymous, file and shmem pages (its "shared" is RssFile + RssShmem) and no swap, and
memory_full_info() parses the whole of /proc/PID/smaps — the cost trap of process-exporter
#142/#246. /proc/PID/status carries RssAnon, RssFile, RssShmem and VmSwap in one small file
(Documentation/filesystems/proc.rst, table 1-2), so one read per process gives top's RES split.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterable

from .cgroupfs import cgroup_path, child_cgroups, minimal_roots, read_procs
from .errorlog import CycleErrors
from .kernelfiles import VANISHED, ParseError, failure_reason, parse_uint, read_bytes, read_many
from .records import record


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


# One process's four lines, to the first VmSwap after them: findall over a cgroup's status
# files joined finds one row per file that parse_status_bytes's fast path would take.
_STATUS_ROW = re.compile(
    rb"\nRssAnon:[ \t]*(\d+) kB\nRssFile:[ \t]*(\d+) kB\nRssShmem:[ \t]*(\d+) kB\n(?:[^\n]*\n)*?VmSwap:[ \t]*(\d+) kB\n"
)


def sum_status_bytes(files: list[bytes | OSError]) -> tuple[int, int, int, int] | None:
    """parse_status_bytes summed over a cgroup's status files, or None to parse them one by one.

    One findall over the joined files and four sums in C, instead of a Python loop per process
    (1.3 us a process against 1.7, tests/bench). The kernel escapes newlines in the one line a
    process controls (Name:), so a status file holds one such row; a file without one (a zombie,
    a kernel thread, an odd file) makes the count come short, and None sends every file to
    parse_status_bytes, which knows what each of them means; so does a read that failed.
    """
    try:
        joined = b"".join(files)
    except TypeError:  # an OSError in place of a file
        return None
    rows = _STATUS_ROW.findall(joined)
    if len(rows) != len(files):
        return None
    if not rows:
        return 0, 0, 0, 0
    anon, file, shmem, swap = zip(*rows)
    return (sum(map(int, anon)) << 10, sum(map(int, file)) << 10, sum(map(int, shmem)) << 10,
            sum(map(int, swap)) << 10)


@record
class ProcessTotals:
    """Sums over every process in a cgroup subtree (bytes), from /proc/PID/status."""

    processes: int = 0
    rss_anon: int = 0
    rss_file: int = 0
    rss_shmem: int = 0
    swap: int = 0  # VmSwap: private anonymous swap

    @property
    def rss(self) -> int:
        """top's RES / ps's RSS, summed."""
        return self.rss_anon + self.rss_file + self.rss_shmem


def leader_gone_threads_live(data: bytes) -> bool:
    """A status file of a process whose main thread has exited while others run (pthread_exit
    in main): the leader is a zombie with no Rss lines, yet cgroup.procs lists the process and
    its memory is all there, in its live threads' status files."""
    at = data.find(b"\nThreads:")
    return at >= 0 and b"\nState:\tZ" in data and data[at + 9:data.find(b"\n", at + 1)].strip() not in (b"", b"1")


def live_thread_dir(procfs: str, pid: int) -> str | None:
    """/proc/PID/task/TID of a thread of ``pid`` other than its leader, or None (gone, or none
    left): where a process whose main thread exited is read (status here, statm and
    smaps_rollup in exporter/pss.py)."""
    task = f"{procfs}/{pid}/task"
    try:
        tids = os.listdir(task)
    except OSError:
        return None
    return next((f"{task}/{tid}" for tid in tids if tid.isdigit() and int(tid) != pid), None)


def in_own_pid_namespace(procfs: str) -> bool:
    """Whether ``procfs`` is a procfs of our own PID namespace: only there does a PID from
    cgroup.procs name the process kill(2) reaches, so only there can hidden_by_hidepid tell."""
    try:
        return os.readlink(os.path.join(procfs, "self")) == str(os.getpid())
    except OSError:
        return False


def hidden_by_hidepid(pid: int) -> bool:
    """A PID listed in cgroup.procs with no /proc entry: hidden from us, or gone?
    hidepid=invisible makes another user's /proc/PID look like a process that exited."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # alive, and not ours: hidepid hid it
    except OSError:
        return False
    return False  # ours, so not hidden: it exited between the listing and the read


class ProcessWalker:
    """Sums /proc/PID/status over cgroup subtrees: every cgroup.procs and status read once.

    The hot loop of a cycle: one status file per process. It reads bytes through raw fds and
    parses them without decoding (parse_status_bytes), and sums plain ints. One walker per
    cycle: its failed reads are that cycle's (``errors``).
    """

    def __init__(self, procs_root: str, procfs: str, errors: CycleErrors,
                 read: Callable[[str | bytes], bytes] = read_bytes,
                 read_each: Callable[[list[str | bytes]], list[bytes | OSError]] = read_many,
                 pause: Callable[[], None] = lambda: None):
        self.procs_root = procs_root
        self.procfs = procfs
        self.errors = errors
        # read_bytes and read_many, or a KeptFiles' (exporter/keptfiles.py): descriptors kept
        # across cycles. read_each takes a cgroup's status files in one call.
        self._read = read
        self._read_each = read_each
        self._pause = pause  # once per cgroup: where a running scrape goes first (service.py)
        self._status = os.fsencode(procfs) + b"/%d/status"
        # cgroup -> (PIDs, child cgroups) as this walk read them: ([], []) for one that went
        # away, None for one that could not be read. The PSS pass (exporter/pss.py) takes its
        # processes from here, so cgroup.procs is read once per cycle and both see the same PIDs.
        self.listings: dict[str, tuple[list[int], list[str]] | None] = {}
        # Every PID counted this walk. cgroup.procs files are read one after another, so a
        # process moved from a walked cgroup to a later one (pam_systemd, systemd-run --scope)
        # is listed twice, and on v1 a process whose threads sit in two cgroups is listed in
        # both for good: counted once, in the first, their common slice does not sum it twice.
        self._counted: set[int] = set()
        # Processes whose main thread exited while others run, read through a live thread (the
        # PSS pass reads them so too).
        self.leaders_gone: set[int] = set()
        self._own_pid_namespace = in_own_pid_namespace(procfs)

    def _from_a_live_thread(self, pid: int) -> tuple[int, int, int, int]:
        """A process's memory from one of its live threads (they share it), when its leader is
        a zombie; nothing when none is left. Rare: one listing and one read more."""
        thread = live_thread_dir(self.procfs, pid)
        if thread is None:
            return 0, 0, 0, 0
        try:
            return parse_status_bytes(read_bytes(f"{thread}/status"))
        except OSError as e:
            if failure_reason(e) != VANISHED:
                raise
            return 0, 0, 0, 0

    def _hidden(self, pid: int) -> bool:
        return self._own_pid_namespace and hidden_by_hidepid(pid)

    def totals(self, cgroups: Iterable[str]) -> dict[str, ProcessTotals]:
        """cgroup path -> totals of its subtree, for every cgroup at or below ``cgroups``."""
        result: dict[str, ProcessTotals] = {}
        for root in minimal_roots(cgroups):
            self._walk(root, result)
        return result

    def _walk(self, root: str, result: dict[str, ProcessTotals]) -> None:
        """Depth first, each cgroup's totals once its children's are in. A loop with its own
        stack, not recursion: a user may nest cgroups in a delegated subtree (user@UID.service)
        deeper than Python's recursion limit, and one RecursionError would end every cycle."""
        own = self._own(root, listed=False)
        if own is None:
            return
        # (cgroup, [processes, anon, file, shmem, swap] so far, its child cgroups not walked yet)
        stack = [(root, own[0], iter(own[1]))]
        while stack:
            cgroup, sums, children = stack[-1]
            child = next(children, None)
            if child is not None:
                path = f"{'' if cgroup == '/' else cgroup}/{child}"
                own = self._own(path, listed=True)
                if own is not None:
                    stack.append((path, own[0], iter(own[1])))
                continue
            stack.pop()
            result[cgroup] = ProcessTotals(*sums)
            if stack:
                parent = stack[-1][1]
                parent[:] = map(sum, zip(parent, sums))

    def _own(self, cgroup: str, listed: bool) -> tuple[list[int], list[str]] | None:
        """The sums of the processes in ``cgroup`` itself, and its child cgroups; None when it
        cannot be read. ``listed``: the directory was seen in its parent's listing, so its
        absence now means it vanished mid-walk. A unit's own path may never have existed
        (systemd names a ControlGroup for idle sockets and mounts that have no directory): no
        cgroup, no count."""
        self._pause()
        directory = cgroup_path(self.procs_root, cgroup)
        try:
            pids = read_procs(self._read, directory)  # threaded: [], its domain (walked first) lists them
            children = child_cgroups(directory)
        except (OSError, ParseError) as e:
            # A parse error names the file; an OSError may come from the listing too.
            where = directory + "/cgroup.procs" if isinstance(e, ParseError) else directory
            vanished = self.errors.read_failed("cgroup", where, e) == VANISHED
            if vanished and listed:
                self.errors.vanished("cgroup")
            self.listings[cgroup] = ([], []) if vanished else None
            return None
        # PID 0: a process outside our PID namespace (a container's launcher); it has no
        # /proc entry here, so it is not one of the processes we can see.
        counted = self._counted
        if 0 in pids or not counted.isdisjoint(pids):
            pids = [pid for pid in pids if pid and pid not in counted]
        counted.update(pids)
        self.listings[cgroup] = (pids, children)
        count, anon, file, shmem, swap = len(pids), 0, 0, 0, 0
        status = self._status
        files = self._read_each([status % pid for pid in pids])
        sums = sum_status_bytes(files)
        if sums is not None:
            anon, file, shmem, swap = sums
        else:
            for pid, data in zip(pids, files):
                try:
                    if type(data) is not bytes:
                        raise data
                    pid_anon, pid_file, pid_shmem, pid_swap = parse_status_bytes(data)
                    if not (pid_anon or pid_file) and leader_gone_threads_live(data):
                        self.leaders_gone.add(pid)
                        pid_anon, pid_file, pid_shmem, pid_swap = self._from_a_live_thread(pid)
                except (OSError, ParseError) as e:
                    if self.errors.read_failed("procfs", f"{self.procfs}/PID/status", e) == VANISHED:
                        if e.errno == errno.ENOENT and self._hidden(pid):
                            self.errors.read_failed("procfs", f"{self.procfs}/PID/status", PermissionError(errno.EACCES, "hidden"))
                        else:
                            self.errors.vanished("process")
                            count -= 1
                    continue
                anon += pid_anon
                file += pid_file
                shmem += pid_shmem
                swap += pid_swap
        return [count, anon, file, shmem, swap], children
