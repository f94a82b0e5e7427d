"""A real Prometheus (Debian's `prometheus` binary) on loopback, with its own config and data
directory, scraping given targets and evaluating the shipped rules. Used by
tests/test_prometheus.py (exporter in the v1 test host) and tests/vm/test_v2_truth.py (exporter in
the cgroup v2 guest, scraped through a relay)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from .queries import RULES_DIR
from tests.processes import end

JOB = "systemd-memory-exporter"
RULE_FILES = (RULES_DIR / "recording-rules.yml", RULES_DIR / "alerting-rules.yml")


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    def __init__(self, url: str, log: Path):
        self.url = url
        self.log = log

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query, at `at` (Unix time) if given: several queries at one instant see one state."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        return self._api("query", params, expr)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._api("query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}, expr)

    def _api(self, endpoint: str, params: dict, expr: str) -> list[dict]:
        data = urllib.parse.urlencode(params).encode()
        with urllib.request.urlopen(f"{self.url}/api/v1/{endpoint}", data=data, timeout=30) as response:
            body = json.load(response)
        if body["status"] != "success":
            raise PrometheusError(f"{expr}: {body}")
        return body["data"]["result"]

    def wait_for_scrapes(self, count: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
        """Until the job has `count` successful scrapes in the last minute (enough for 1m
        windows); a failed scrape records up 0, which sum_over_time does not count."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.query(f'sum_over_time(up{{job="{JOB}"}}[1m]) >= {count}')) == 1:
                    return
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise PrometheusError(f"Prometheus did not scrape {count} times:\n" + self.log.read_text()[-3000:])
            time.sleep(0.5)


@contextlib.contextmanager
def running(targets: list[str], workdir: Path, port: int, scrape_interval: str = "1s",
            scrape_timeout: str | None = None) -> Iterator[tuple[Prometheus, subprocess.Popen]]:
    """Prometheus scraping `targets` (host:port) as job JOB with the shipped rules loaded.

    The rule files are copied with every group interval set to the scrape interval: the shipped
    1m/5m intervals bound the cost on a fleet, but a test of a few minutes needs recorded series
    within seconds. Expressions and names are unchanged."""
    if shutil.which("prometheus") is None:
        raise PrometheusError("prometheus is not installed (tests/prerequisites.sh installs it)")
    rule_files = []
    for path in RULE_FILES:
        copy = workdir / path.name
        copy.write_text(re.sub(r"(?m)^(\s+)interval: \S+$", rf"\g<1>interval: {scrape_interval}",
                               path.read_text(encoding="utf-8")), encoding="utf-8")
        rule_files.append(copy)
    job = {"job_name": JOB, "static_configs": [{"targets": targets}]}
    if scrape_timeout:
        job["scrape_timeout"] = scrape_timeout
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [job],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = workdir / "prometheus.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )
    try:
        yield Prometheus(f"http://127.0.0.1:{port}", log), proc
    finally:
        end(proc, timeout=30)
