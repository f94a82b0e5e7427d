"""promtool as the PromQL parser of record (Prometheus' own parser, the version Debian ships)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml


def find() -> str | None:
    return shutil.which("promtool")


def run(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    return subprocess.run([find() or "promtool", *map(str, args)], capture_output=True, text=True, timeout=60)


def parse_errors(expressions: list[tuple[str, str]]) -> str | None:
    """Parses every (label, expr) with `promtool check rules`; None if all parse, else promtool's output.

    Each expression becomes a recording rule in a group named after its label, so an error message
    says which dashboard panel or rule it came from. One promtool run for all of them keeps it fast.
    """
    groups = [
        {"name": f"{index}: {label}", "rules": [{"record": f"parsed_expression_{index}", "expr": expr}]}
        for index, (label, expr) in enumerate(expressions)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "expressions.rules.yml"
        path.write_text(yaml.safe_dump({"groups": groups}, allow_unicode=True, sort_keys=False), encoding="utf-8")
        result = run("check", "rules", path)
    return None if result.returncode == 0 else result.stdout + result.stderr
