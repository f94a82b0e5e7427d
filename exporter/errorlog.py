"""Failed reads: counted since start (errors_total, vanished_total), logged once in a while,
and tallied per cycle, which is what each source's health in the snapshot is taken from.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable

from .kernelfiles import PERMISSION, REJECTED, VANISHED, ParseError, describe, failure_reason

log = logging.getLogger(__name__)

HIDEPID_HINT = (
    " (other users' processes are hidden: is /proc mounted with hidepid? Their RSS is missing from"
    " the per-unit sums; see deploy/systemd/README.md for the group or capability that restores them)"
)


class ErrorLog:
    """Counts errors by (source, reason) and logs each distinct kind of problem once a while.

    A bad file seen every cycle would otherwise flood the journal; the counter carries the rate.
    A kind is (source, reason, file name): the same fault in many cgroups is logged once.
    """

    def __init__(self, repeat_after: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.counts: Counter[tuple[str, str]] = Counter()
        self.vanished: Counter[str] = Counter()
        self._last_logged: dict[tuple[str, str, str], float] = {}
        self._repeat_after = repeat_after
        self._clock = clock

    def error(self, source: str, reason: str, where: str, message: str) -> None:
        self.counts[source, reason] += 1
        self.warn(source, reason, where, message)

    def warn(self, source: str, reason: str, where: str, message: str) -> None:
        """Log without counting (once per kind per ``repeat_after``)."""
        key = (source, reason, os.path.basename(where))
        now = self._clock()
        if now - self._last_logged.get(key, -self._repeat_after) >= self._repeat_after:
            self._last_logged[key] = now
            log.warning("%s error (%s) at %s: %s", source, reason, where, message)


# user@UID.service and everything below it are delegated to that user: systemd chowns them to
# the user, who may mkdir any name there or chmod any of it. The exporter runs as its own
# unprivileged user (deploy/systemd), so a name rejected there (REJECTED) or a refused read
# there is that user's doing: counted and logged, but it leaves source_up alone, or any user
# could hold it at 0 and fire SourceDown.
_USER_MANAGER_TREE = re.compile(r"/user@\d+\.service(?:/|$)")


def fails_source(reason: str, where: str) -> bool:
    return not (reason == REJECTED or (reason == PERMISSION and _USER_MANAGER_TREE.search(where)))


class CycleErrors:
    """One cycle's failed reads, by source: a source is up when none of its reads failed
    (node_exporter's execute() takes success from the collector's own result in the same way).
    Each failure also goes to the ErrorLog's counters and log."""

    def __init__(self, errors: ErrorLog):
        self.errors = errors
        self.failed: Counter[str] = Counter()

    def error(self, source: str, reason: str, where: str, message: str) -> None:
        if fails_source(reason, where):
            self.failed[source] += 1
        self.errors.error(source, reason, where, message)

    def read_failed(self, source: str, where: str, error: OSError | ParseError) -> str:
        """Count ``error`` unless it means the file vanished; returns its reason either way."""
        reason = failure_reason(error)
        if reason != VANISHED:
            message = describe(error)
            if source == "procfs" and reason == PERMISSION:
                message += HIDEPID_HINT
            self.error(source, reason, where, message)
        return reason

    def vanished(self, kind: str) -> None:
        """A process or cgroup that went away mid-read: missing data, counted, no error."""
        self.errors.vanished[kind] += 1
