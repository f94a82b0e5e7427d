"""The one decorator for the exporter's immutable records.

`dataclass(slots=True)` exists from Python 3.10; on 3.9 (RHEL 9, Debian 11, openEuler 22.03)
records are plain frozen dataclasses. Slots only save memory per instance (one record per
unit and per process each cycle), so behaviour is the same on every version.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

if sys.version_info >= (3, 10):
    record = dataclass(frozen=True, slots=True)
else:  # pragma: no cover - exercised by the Python 3.9 CI leg
    record = dataclass(frozen=True)
