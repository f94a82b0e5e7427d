"""Unit discovery in a child process.

Why a process and not a thread: pystemd holds the GIL inside sd_bus_call, and sd-bus waits up
to 90 s for the authentication of a connection to a frozen dbus-daemon (BUS_AUTH_TIMEOUT;
$SYSTEMD_BUS_TIMEOUT bounds method calls only). In a thread that would freeze every thread of
the exporter, /metrics included. A child can hang alone: the sampler goes on with the last
known units, and a child that hangs too long is killed and started again.

Protocol: the parent writes "refresh\\n"; the child answers a JSON header line ({"ok",
"transport", "chunks": K} or {"ok": false, "error", "failure"}, failure "timeout" or
"unavailable" as errors_total counts it) and K lines of at most CHUNK_UNITS units each (JSON
arrays of Unit fields). The parent parses one chunk at a time, with a pause point for
scrapes between chunks: one json.loads of 3,000 units held the GIL for ~11 ms here, long enough
for a scrape to wait on it. (A header with "units" holds them itself, in one line.) The child
exits when its stdin closes (the parent went away).

Memory: a fresh interpreter for the child costs its own ~14 MiB of anonymous memory. So at
start, while the exporter is still one thread, ``fork_first_child()`` forks the first child
from the exporter itself: it shares the exporter's interpreter pages copy-on-write
(gc.freeze() first, so the collector does not write to every object and unshare them). A
child that dies or hangs is replaced by a fresh interpreter as before: forking from the
exporter then would be unsafe (it has threads by then, whose locks a child would inherit
held). A fork server kept for later children was tried and measured: it keeps the old copy
of every page the exporter writes after the fork, so it cost as much as a fresh child.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import select
import selectors
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import astuple

from .systemd import Discovery, DiscoveryError, DiscoveryResult, Unit, UnitFilter

# Units per line of an answer: json.loads of one line holds the GIL for ~0.4 ms here.
CHUNK_UNITS = 100

log = logging.getLogger(__name__)


class DiscoveryProcess:
    """The parent's side. Not thread-safe: the sampler thread alone calls ``request`` and
    ``stop``; other threads may only ``interrupt``."""

    def __init__(self, include: str, exclude: str, types: list[str], private_socket: str, timeout: float,
                 user_units_root: str | None = None, cgroup_root: str | None = None):
        self._config = {"include": include, "exclude": exclude, "types": types,
                        "private_socket": private_socket, "timeout": timeout,
                        "user_units_root": user_units_root, "cgroup_root": cgroup_root,
                        "log_level": logging.getLogger().getEffectiveLevel()}
        self._argv = [sys.executable, "-m", "exporter.discovery_process", json.dumps(self._config)]
        # Past this, a refresh is not slow but stuck: kill the child and start another.
        self.hang_limit = max(30.0, 10 * timeout)
        self._proc: subprocess.Popen | None = None
        self._buffer = bytearray()
        self._expected: int | None = None  # lines in the answer being read, once its header is in
        self._pending_since: float | None = None
        self._result = DiscoveryResult((), False, "not yet discovered", None, "none")
        self._logged_down = False

    def request(self, wait: float, pause: Callable[[], None] = lambda: None) -> DiscoveryResult:
        """A fresh unit list if the child answers within ``wait`` seconds, else the last one.
        ``pause`` is called between the chunks of an answer (the sampler's scrape pause point)."""
        if self._proc is None or self._proc.poll() is not None:
            try:
                self._spawn()
            except OSError as e:  # EAGAIN at TasksMax, ENOMEM at MemoryMax: D-Bus is down, not the cycle
                self._proc = None
                return self._failed(f"cannot start the discovery process: {e}")
        if self._pending_since is None:
            try:
                self._proc.stdin.write(b"refresh\n")
                self._proc.stdin.flush()
            except (OSError, ValueError) as e:  # ValueError: its pipe already closed
                self._kill()
                return self._failed(f"discovery process gone: {e}")
            self._pending_since = time.monotonic()
        else:
            wait = 0  # asked in an earlier cycle and still hanging: look, don't wait again
        lines = self._read_reply(wait)
        if lines is None and self._pending_since is None:  # the child died mid-answer
            return self._failed("discovery process exited; starting another at the next cycle")
        if lines is None:
            overdue = time.monotonic() - self._pending_since
            if overdue > self.hang_limit:
                log.error("discovery process stuck for %.0fs, restarting it", overdue)
                self._kill()
            return self._stale(f"D-Bus has not answered for {overdue:.0f}s")
        self._pending_since = None
        reply = json.loads(lines[0])
        if not reply["ok"]:
            return self._failed(reply["error"], reply["transport"], reply.get("failure", "unavailable"))
        if self._logged_down:
            log.info("systemd is reachable again over the %s", reply["transport"].replace("_", " "))
            self._logged_down = False
        units = [Unit(*fields) for fields in reply.get("units", ())]
        for chunk in lines[1:]:
            pause()
            units.extend(Unit(*fields) for fields in json.loads(chunk))
        self._result = DiscoveryResult(
            tuple(units), True, "", time.time(), reply["transport"],
            tree_failures=tuple(tuple(f) for f in reply.get("tree_failures", ())),
        )
        return self._result

    def _failed(self, message: str, transport: str = "none", failure: str = "unavailable") -> DiscoveryResult:
        """``failure``: "timeout" when the child's D-Bus call got no answer in time (sd-bus's
        timeout comes back as an error reply from the child), else "unavailable"."""
        if not self._logged_down:
            log.error("unit discovery failed, serving the last known units and retrying: %s", message)
            self._logged_down = True
        last = self._result
        self._result = DiscoveryResult(last.units, False, message, last.refreshed_at, transport, failure)
        return self._result

    def _stale(self, message: str) -> DiscoveryResult:
        last = self._result
        return DiscoveryResult(last.units, False, message, last.refreshed_at, last.transport, "timeout")

    def _read_reply(self, timeout: float) -> list[bytearray] | None:
        """The lines of one answer (its header, then the chunks it announces), or None when they
        are not all in within ``timeout``: what came stays buffered for the next call."""
        deadline = time.monotonic() + timeout
        stdout = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while True:
                if self._expected is None and b"\n" in self._buffer:
                    header = self._buffer[: self._buffer.index(b"\n")]
                    self._expected = 1 + json.loads(header).get("chunks", 0)
                if self._expected is not None and self._buffer.count(b"\n") >= self._expected:
                    break
                if not selector.select(max(deadline - time.monotonic(), 0)):
                    return None
                chunk = os.read(stdout, 1 << 20)
                if not chunk:  # the child died mid-answer; the next request starts another
                    self._kill()
                    return None
                self._buffer += chunk
        lines = self._buffer.split(b"\n", self._expected)
        self._buffer = bytearray(lines.pop())  # what follows the answer: nothing, normally
        self._expected = None
        return lines

    def fork_first_child(self) -> bool:
        """Fork the first child from this process (see the module's docstring). Call it once,
        while the process has one thread; False when it could not (the first request then
        starts a fresh interpreter)."""
        if self._proc is not None or not hasattr(os, "pidfd_open"):
            return False
        try:  # the kernel (5.3+) or a seccomp profile may refuse it: find out before forking
            os.close(os.pidfd_open(os.getpid()))
        except OSError as e:
            log.info("no pidfd_open here (%s): the discovery child will be a new interpreter", e)
            return False
        config = dict(self._config, log_level=logging.getLogger().getEffectiveLevel())
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        gc.freeze()  # what exists now stays shared: the collector never writes to it again
        try:
            pid = os.fork()
        except OSError as e:
            log.warning("cannot fork the discovery child (%s); it will be a new interpreter", e)
            for fd in (requests_r, requests_w, replies_r, replies_w):
                os.close(fd)
            return False
        if pid == 0:  # the child
            code = 1
            try:
                os.close(requests_w)
                os.close(replies_r)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                with os.fdopen(requests_r, "rb") as requests, os.fdopen(replies_w, "w") as replies:
                    serve(config, requests, replies)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(requests_r)
        os.close(replies_w)
        self._proc = ForkedChild(pid, requests_w, replies_r, os.pidfd_open(pid))
        self._buffer = bytearray()
        self._expected = None
        self._pending_since = None
        return True

    def _spawn(self) -> None:
        if self._proc is not None:
            log.warning("discovery process exited with %s, starting another", self._proc.returncode)
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self._buffer = bytearray()
        self._expected = None
        self._pending_since = None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        self._pending_since = None
        self._buffer = bytearray()
        self._expected = None

    def interrupt(self) -> None:
        """The one call for another thread: kill the child, so that a request waiting on it
        returns now, as for a child that died. A signal only; its pipes stay with the owner."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except OSError:
                pass

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()  # the child exits at EOF
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._kill()


class ForkedChild:
    """The forked discovery child: the part of Popen that DiscoveryProcess uses, watched and
    signalled through a pidfd (no race with a reused PID)."""

    def __init__(self, pid: int, stdin_fd: int, stdout_fd: int, pidfd: int):
        self.pid = pid
        self.stdin = os.fdopen(stdin_fd, "wb")
        self.stdout = os.fdopen(stdout_fd, "rb", buffering=0)
        self._pidfd = pidfd
        self.returncode: int | str | None = None

    def poll(self) -> int | str | None:
        if self.returncode is None and _readable(self._pidfd, 0):
            self._exited()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | str:
        if self.returncode is None:
            if not _readable(self._pidfd, timeout):
                raise subprocess.TimeoutExpired("discovery child", timeout)
            self._exited()
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _exited(self) -> None:
        try:
            _pid, status = os.waitpid(self.pid, 0)  # exited, so this does not block
            self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            self.returncode = "an unknown status"
        os.close(self._pidfd)
        self._pidfd = -1
        for pipe in (self.stdin, self.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _readable(fd: int, timeout: float | None) -> bool:
    """poll(), not select(): the exporter keeps thousands of descriptors (exporter/keptfiles.py),
    and select() cannot take one numbered above 1023."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def _give_back_free_memory() -> None:
    """After each answer: collect, and let glibc return what it holds free. Measured at 1,000
    units in the test host: RssAnon 16.1 MiB after eight refreshes without, 14.3 MiB with
    (it stops growing after the second). The child's own CPU, between cycles."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):  # no _ctypes, or not glibc
        pass


def serve(config: dict, requests=None, replies=None) -> None:
    """The child's side: one refresh per request line (``requests``, binary; stdin), one JSON
    answer per refresh (``replies``, text; stdout)."""
    logging.basicConfig(level=config["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    requests = requests if requests is not None else sys.stdin.buffer
    replies = replies if replies is not None else sys.stdout
    unit_filter = UnitFilter.build(config["include"], config["exclude"], config["types"])
    discovery = Discovery(unit_filter, config["private_socket"], config["timeout"], config.get("user_units_root"),
                          config.get("cgroup_root"))
    for _request in requests:
        chunks: list[list[tuple]] = []
        try:
            rows = [astuple(u) for u in discovery.refresh()]
            chunks = [rows[i:i + CHUNK_UNITS] for i in range(0, len(rows), CHUNK_UNITS)]
            reply = {"ok": True, "transport": discovery.transport, "chunks": len(chunks),
                     "tree_failures": discovery.tree_failures}
        except DiscoveryError as e:
            reply = {"ok": False, "transport": discovery.transport, "error": str(e), "failure": e.failure}
        replies.write("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in [reply, *chunks]))
        replies.flush()
        del chunks
        _give_back_free_memory()
    discovery.close()


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
