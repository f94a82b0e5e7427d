"""Unit discovery in a child process.

Why a process and not a thread: pystemd holds the GIL inside sd_bus_call, and sd-bus waits up
to 90 s for the authentication of a connection to a frozen dbus-daemon (BUS_AUTH_TIMEOUT;
$SYSTEMD_BUS_TIMEOUT bounds method calls only). In a thread that would freeze every thread of
the exporter, /metrics included. A child can hang alone: the sampler goes on with the last
known units, and a child that hangs too long is killed and started again.

Protocol: the parent writes "refresh\\n"; the child answers one JSON line. The child exits
when its stdin closes (the parent went away).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
import time
from dataclasses import astuple

from .systemd import Discovery, DiscoveryError, DiscoveryResult, Unit, UnitFilter

log = logging.getLogger(__name__)


class DiscoveryProcess:
    """The parent's side. Not thread-safe: the sampler thread alone calls ``request`` and
    ``stop``; other threads may only ``interrupt``."""

    def __init__(self, include: str, exclude: str, types: list[str], private_socket: str, timeout: float,
                 user_units_root: str | None = None):
        self._argv = [
            sys.executable, "-m", "exporter.discovery_process",
            json.dumps({"include": include, "exclude": exclude, "types": types,
                        "private_socket": private_socket, "timeout": timeout,
                        "user_units_root": user_units_root,
                        "log_level": logging.getLogger().getEffectiveLevel()}),
        ]
        # Past this, a refresh is not slow but stuck: kill the child and start another.
        self.hang_limit = max(30.0, 10 * timeout)
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._pending_since: float | None = None
        self._result = DiscoveryResult((), False, "not yet discovered", None, "none")
        self._logged_down = False

    def request(self, wait: float) -> DiscoveryResult:
        """A fresh unit list if the child answers within ``wait`` seconds, else the last one."""
        if self._proc is None or self._proc.poll() is not None:
            self._spawn()
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
        line = self._read_line(wait)
        if line is None and self._pending_since is None:  # the child died mid-answer
            return self._failed("discovery process exited; starting another at the next cycle")
        if line is None:
            overdue = time.monotonic() - self._pending_since
            if overdue > self.hang_limit:
                log.error("discovery process stuck for %.0fs, restarting it", overdue)
                self._kill()
            return self._stale(f"D-Bus has not answered for {overdue:.0f}s")
        self._pending_since = None
        reply = json.loads(line)
        if not reply["ok"]:
            return self._failed(reply["error"], reply["transport"])
        if self._logged_down:
            log.info("systemd is reachable again over the %s", reply["transport"].replace("_", " "))
            self._logged_down = False
        self._result = DiscoveryResult(
            tuple(Unit(*fields) for fields in reply["units"]), True, "", time.time(), reply["transport"],
            tree_failures=tuple(tuple(f) for f in reply.get("tree_failures", ())),
        )
        return self._result

    def _failed(self, message: str, transport: str = "none") -> DiscoveryResult:
        if not self._logged_down:
            log.error("unit discovery failed, serving the last known units and retrying: %s", message)
            self._logged_down = True
        last = self._result
        self._result = DiscoveryResult(last.units, False, message, last.refreshed_at, transport, "unavailable")
        return self._result

    def _stale(self, message: str) -> DiscoveryResult:
        last = self._result
        return DiscoveryResult(last.units, False, message, last.refreshed_at, last.transport, "timeout")

    def _read_line(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        stdout = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                if not selector.select(max(deadline - time.monotonic(), 0)):
                    return None
                chunk = os.read(stdout, 1 << 20)
                if not chunk:  # the child died mid-answer; the next request starts another
                    self._kill()
                    return None
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _spawn(self) -> None:
        if self._proc is not None:
            log.warning("discovery process exited with %s, starting another", self._proc.returncode)
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self._buffer = b""
        self._pending_since = None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        self._pending_since = None

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


def serve(config: dict) -> None:
    """The child's side: one refresh per request line, one JSON answer per refresh."""
    logging.basicConfig(level=config["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    unit_filter = UnitFilter.build(config["include"], config["exclude"], config["types"])
    discovery = Discovery(unit_filter, config["private_socket"], config["timeout"], config.get("user_units_root"))
    for _request in sys.stdin.buffer:
        try:
            units = discovery.refresh()
            reply = {"ok": True, "transport": discovery.transport, "units": [astuple(u) for u in units],
                     "tree_failures": discovery.tree_failures}
        except DiscoveryError as e:
            reply = {"ok": False, "transport": discovery.transport, "error": str(e)}
        sys.stdout.write(json.dumps(reply, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    discovery.close()


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
