"""No dead code in exporter/: vulture (a test dependency) must find nothing at 80 % confidence
or more, the level of unused imports, variables and unreachable code. Lower levels flag what
only the standard library calls (do_HEAD, handle_error), so they are not used here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_vulture_finds_no_dead_code_in_exporter():
    result = subprocess.run([sys.executable, "-m", "vulture", "exporter/", "--min-confidence", "80"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
