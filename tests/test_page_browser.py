"""The landing page and a unit's page in a real browser: Debian's chromium, headless, loads
them from the exporter running in the real-systemd test host with real workloads.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
messages separated by NUL on fds 3 and 4), so the test reads the *laid-out* page
(getBoundingClientRect) with the standard library only. `--dump-dom` would give the markup
back, which tests/test_page.py already parses; only layout shows that the bars a person sees
are proportional to the figures. Clicks are real mouse events on the labels, so the CSS-only
sort and filters are exercised as a person uses them.

Screenshots go to tests/output/ (gitignored; CI keeps it as an artifact).
UPDATE_SCREENSHOT=1 also copies the landing page's to tests/screenshots/page.png, the README's picture.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.testhost import workloads
from tests.truth import MiB, Scrape, exporter_in_host

pytestmark = pytest.mark.e2e

OUTPUT = Path(__file__).parent / "output"
README_PICTURE = Path(__file__).parent / "screenshots" / "page.png"
INTERVAL = 2.0
WIDTH = 1280
GRAFANA = "http://grafana.invalid:3000"
USER, UID = "u", 1500
# Chromium as the brief says it must run here: as root, nothing fetched from the network.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--remote-debugging-pipe",
)


class Chromium:
    """One headless chromium, one tab, spoken to over the DevTools pipe. Every wait has a deadline."""

    def __init__(self, timeout: float = 30.0):
        binary = shutil.which("chromium")
        if binary is None:
            if os.environ.get("CI"):
                raise RuntimeError("chromium is not installed (tests/prerequisites.sh installs it)")
            pytest.skip("chromium not installed (tests/prerequisites.sh installs it)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="smx-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def onto_fds_3_and_4():  # dup first: either pipe end may already be fd 3 or 4
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = open(Path(self.profile) / "chromium.log", "w+")
        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=onto_fds_3_and_4, close_fds=False, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH, height=900, deviceScaleFactor=1, mobile=False)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError(f"chromium did not answer within {self.timeout}s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe: " + self.stderr())
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self._events.append(reply)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self._events):
                if event["method"] == method:
                    return self._events.pop(i)
            self._events.append(self._read_message(deadline))

    def open(self, url: str) -> None:
        self._events.clear()
        result = self.call("Page.navigate", session=True, url=url)
        assert not result.get("errorText"), f"{url}: {result.get('errorText')}"
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real left click in the middle of the element, as a person's mouse makes it."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        assert box is not None, selector
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        height = self.evaluate("document.documentElement.scrollHeight")
        self.evaluate("window.scrollTo(0, 0)")
        data = self.call(
            "Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1},
        )["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def stderr(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-2000:]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


# What the page shows for each unit row, as laid out: its bar's segments (bytes and pixels),
# top's mark and where the row sits on screen.
ROWS_JS = """
[...document.querySelectorAll('#units .unit')].map(row => {
  const track = row.querySelector('.track'), t = track.getBoundingClientRect();
  const mark = row.querySelector('.mark').getBoundingClientRect();
  const link = row.querySelector('a.name'), box = row.getBoundingClientRect();
  return {
    unit: row.dataset.unit, uid: row.dataset.uid, name: link.textContent, href: link.href,
    scale: +track.dataset.scale, track: t.width,
    segments: [...row.querySelectorAll('rect.seg')].map(s => {
      const r = s.getBoundingClientRect();
      return {part: s.dataset.part, left: r.left - t.left, width: r.width};
    }),
    mark: mark.left + mark.width / 2 - t.left,
    y: box.top + window.scrollY, shown: row.offsetParent !== null,
  };
})
"""


def expected_parts(m: Scrape, unit: str) -> dict[str, int]:
    """The cgroup figure's parts, worked out here from /metrics (semantics.md's reading of
    memory.stat), not taken from the page."""
    def stat(item):
        return int(m.value("systemd_unit_memory_stat_bytes", unit=unit, item=item))

    usage = int(m.value("systemd_unit_memory_bytes", unit=unit, type="cgroup_usage"))
    anon, file, shmem = stat("anon"), stat("file"), stat("shmem")
    kernel = int(m.get("systemd_unit_memory_stat_bytes", unit=unit, item="kernel") or 0)
    rss_shmem = int(m.value("systemd_unit_memory_bytes", unit=unit, type="rss_shmem"))
    mapped = min(max(stat("file_mapped") - min(shmem, rss_shmem), 0), max(file - shmem, 0))
    return {
        "anon": anon, "mapped_file": mapped, "unmapped_cache": max(file - shmem - mapped, 0), "shmem": shmem,
        "kernel": kernel, "remainder": usage - anon - file - kernel,
    }


def top_of(m: Scrape, unit: str) -> int:
    return int(sum(m.value("systemd_unit_memory_bytes", unit=unit, type=t) for t in ("rss_anon", "rss_file", "rss_shmem")))


def assert_close_px(measured: float, expected: float, what: str) -> None:
    """Within 1 % of the figure; below 5 px, within 0.05 px (a 1 % of a 2 px sliver is
    smaller than chromium's layout unit, 1/64 px)."""
    tolerance = max(0.01 * expected, 0.05)
    assert abs(measured - expected) <= tolerance, f"{what}: {measured:.3f} px, want {expected:.3f} px ± {tolerance:.3f}"


@pytest.fixture(scope="module")
def exporter(testhost):
    with exporter_in_host(testhost, INTERVAL, f"--web.grafana-url={GRAFANA}") as client:
        yield client


@pytest.fixture(scope="module")
def units(testhost, exporter):
    """The test host's sample workloads (the README's picture shows them), plus a MemoryMax."""
    started = {
        **workloads.truth_workloads(testhost),
        "limited": workloads.payload(testhost, "th-limited.service", "anon", 60,
                                     properties=["MemoryMax=200M"]),
    }
    exporter.next_sample()
    yield started
    workloads.stop_units(testhost, started.values())


@pytest.fixture(scope="module")
def user_unit(testhost, exporter, units):
    """A real user manager (user@1500.service, as tests/test_user_units.py starts it) with one
    unit of its own; after the page fixture's load, so the other tests see the system's only."""
    workloads.user_manager(testhost, USER, UID)
    unit = workloads.user_payload(testhost, USER, "th-user-app.service", "anon", 40)
    exporter.next_sample()
    yield unit
    workloads.stop_user_units(testhost, USER, [unit])
    testhost.systemctl("stop", f"user@{UID}.service", check=False)


@pytest.fixture(scope="module")
def browser():
    chromium = Chromium()
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def page(exporter, units, browser):
    """The landing page as laid out, and a /metrics scrape of the same snapshot (same sample
    timestamp before and after the page load)."""
    root = f"http://127.0.0.1:{exporter.port}/"
    deadline = time.monotonic() + 10 * INTERVAL
    while True:
        before = exporter.scrape()
        browser.open(root)
        rows = browser.evaluate(ROWS_JS)
        after = exporter.scrape()
        stamp = "systemd_memory_exporter_last_sample_timestamp_seconds"
        if before.value(stamp) == after.value(stamp):
            return {"rows": rows, "metrics": after, "root": root}
        assert time.monotonic() < deadline, "no page load fell within one sample"


def test_every_unit_is_on_the_page(page, units):
    m = page["metrics"]
    on_page = {r["unit"] for r in page["rows"]}
    exported = {u for u in m.label_values("systemd_unit_info", "unit") if not u.endswith(".slice")}
    assert on_page == exported
    for unit in units.values():
        assert unit in on_page
    rows = {r["unit"]: r for r in page["rows"]}
    for unit, row in rows.items():
        assert row["name"] == unit  # as systemd spells it, escapes included
        assert row["shown"]
    escaped = rows[units["escaped"]]
    assert "\\" in units["escaped"] and "%5C" in escaped["href"]


def test_bar_widths_are_proportional_to_the_figures(page, units):
    m = page["metrics"]
    rows = page["rows"]
    # The shared scale: the widest bar's bytes (parts end to end, or top's mark if further).
    extents = []
    for row in rows:
        parts = expected_parts(m, row["unit"]) if m.get("systemd_unit_memory_bytes", unit=row["unit"], type="cgroup_usage") is not None else {}
        usage = int(m.get("systemd_unit_memory_bytes", unit=row["unit"], type="cgroup_usage") or 0)
        extents.append(max(sum(v for v in parts.values() if v > 0), usage, top_of(m, row["unit"])))
    scale = max(extents)
    assert all(row["scale"] == scale for row in rows)
    checked = 0
    for row in rows:
        unit, px_per_byte = row["unit"], row["track"] / scale
        assert row["track"] > 300, "the bar column has room"
        assert_close_px(row["mark"], top_of(m, unit) * px_per_byte, f"{unit} top mark")
        if m.get("systemd_unit_memory_bytes", unit=unit, type="cgroup_usage") is None:
            assert not row["segments"]
            continue
        parts = expected_parts(m, unit)
        drawn = [(k, v) for k, v in parts.items() if v > 0]
        assert [s["part"] for s in row["segments"]] == [k for k, _ in drawn]
        left = 0.0
        for segment, (key, value) in zip(row["segments"], drawn):
            assert_close_px(segment["width"], value * px_per_byte, f"{unit} {key}")
            assert_close_px(segment["left"], left, f"{unit} {key} starts where the previous part ends")
            left += value * px_per_byte
        total = sum(s["width"] for s in row["segments"])
        usage = m.value("systemd_unit_memory_bytes", unit=unit, type="cgroup_usage")
        if parts["remainder"] >= 0:
            assert_close_px(total, usage * px_per_byte, f"{unit} whole bar = systemctl's figure")
        checked += 1
    assert checked >= len(units)
    # The workloads look like what they are: most of the cache reader's bar is page cache,
    # most of the tmpfs writer's is shmem, most of the hog's is anonymous memory.
    by_unit = {r["unit"]: {s["part"]: s["width"] for s in r["segments"]} for r in rows}
    for unit, part in (("cache", "unmapped_cache"), ("shm", "shmem"), ("anon", "anon")):
        widths = by_unit[units[unit]]
        assert widths[part] > 0.8 * sum(widths.values()), (unit, widths)
    assert by_unit[units["anon"]]["anon"] >= 140 * MiB * rows[0]["track"] / scale


def test_sort_by_top_and_gap_with_a_click(page, browser):
    m = page["metrics"]
    try:
        for key in ("top", "gap"):
            browser.click(f"label[for=sort-{key}]")
            rows = browser.evaluate(ROWS_JS)
            shown = [r["unit"] for r in sorted(rows, key=lambda r: r["y"])]
            if key == "top":
                figures = [top_of(m, u) for u in shown]
            else:
                figures = [
                    int(m.value("systemd_unit_memory_bytes", unit=u, type="cgroup_usage")) - top_of(m, u)
                    if m.get("systemd_unit_memory_bytes", unit=u, type="cgroup_usage") is not None else None
                    for u in shown
                ]
            known = [f for f in figures if f is not None]
            assert known == sorted(known, reverse=True), (key, list(zip(shown, figures)))
            assert figures[len(known):] == [None] * (len(figures) - len(known)), "unknown gaps last"
    finally:
        browser.click("label[for=sort-systemctl]")


def test_filters_by_slice_type_and_user_with_a_click(page, browser, units, user_unit):
    browser.open(page["root"])  # again: the user's unit came after the page fixture's load
    rows = browser.evaluate(ROWS_JS)
    assert {(r["unit"], r["uid"]) for r in rows} >= {(user_unit, str(UID)), (units["anon"], "")}
    try:
        slice_for = browser.evaluate(
            "[...document.querySelectorAll('label[for^=slice-]')].find(l => l.textContent === 'th-outer-inner.slice').htmlFor"
        )
        browser.click(f"label[for={slice_for}]")
        shown = {r["unit"] for r in browser.evaluate(ROWS_JS) if r["shown"]}
        assert shown == {units["nested"]}
        browser.click("label[for=slice-all]")
        browser.click("label[for=type-scope]")
        shown = {r["unit"] for r in browser.evaluate(ROWS_JS) if r["shown"]}
        assert shown and all(u.endswith(".scope") for u in shown), shown
        browser.click("label[for=type-all]")
        browser.click(f"label[for=user-{UID}]")
        shown = {(r["unit"], r["uid"]) for r in browser.evaluate(ROWS_JS) if r["shown"]}
        assert (user_unit, str(UID)) in shown and {uid for _, uid in shown} == {str(UID)}, shown
        browser.click("label[for=user-system]")
        rows = browser.evaluate(ROWS_JS)
        shown = {(r["unit"], r["uid"]) for r in rows if r["shown"]}
        assert (units["anon"], "") in shown and {uid for _, uid in shown} == {""}, shown
        assert {(r["unit"], r["uid"]) for r in rows if not r["shown"]} >= {(user_unit, str(UID))}
    finally:
        for reset in ("slice-all", "type-all", "user-all"):
            browser.click(f"label[for={reset}]")
    assert all(r["shown"] for r in browser.evaluate(ROWS_JS))
    browser.screenshot(OUTPUT / "page.png")
    if os.environ.get("UPDATE_SCREENSHOT"):
        README_PICTURE.parent.mkdir(exist_ok=True)
        shutil.copyfile(OUTPUT / "page.png", README_PICTURE)


def test_unit_page_of_an_escaped_name(page, browser, units):
    href = next(r["href"] for r in page["rows"] if r["unit"] == units["escaped"])
    browser.open(href)
    assert browser.evaluate("document.querySelector('h1').textContent") == units["escaped"]
    links = browser.evaluate("[...document.querySelectorAll('ul.grafana a')].map(a => a.href)")
    encoded = units["escaped"].replace("\\", "%5C")
    assert links == [f"{GRAFANA}/d/systemd-memory-unit?var-unit={encoded}", f"{GRAFANA}/d/systemd-memory-why?var-unit={encoded}"]
    headings = browser.evaluate("[...document.querySelectorAll('h2')].map(h => h.textContent)")
    assert {"Limits", "Events", "Pressure", "Grafana"} <= set(headings)


def test_unit_page_shows_the_limit_and_the_reconciliation(page, browser, units, testhost):
    href = next(r["href"] for r in page["rows"] if r["unit"] == units["limited"])
    browser.open(href)
    cells = browser.evaluate("[...document.querySelectorAll('td')].map(td => td.textContent)")
    assert "MemoryMax" in cells and cells[cells.index("MemoryMax") + 1] == "200.0 MiB"
    assert testhost.show(units["limited"], "MemoryMax")["MemoryMax"] == str(200 * MiB)
    assert "anonymous memory" in " ".join(cells)
    bar = browser.evaluate(
        "(() => { const t = document.querySelector('.unitbar .track').getBoundingClientRect();"
        " return [...document.querySelectorAll('.unitbar rect.seg')].reduce((a, s) => a + s.getBoundingClientRect().width, 0) / t.width; })()"
    )
    assert 0.5 < bar <= 1.0 + 1e-6  # its own scale: the bar fills the width up to the larger of the two views
    browser.screenshot(OUTPUT / "unit.png")
    missing = f"http://127.0.0.1:{page['root'].split(':')[2].rstrip('/')}/unit/no-such.service"
    browser.open(missing)
    assert browser.evaluate("document.querySelector('h1').textContent") == "Not found"


def test_explain_json_in_the_host_reconciles_the_same_workloads(testhost, units):
    """`explain --format json` for scripts, on the same real units (its own sample)."""
    names = [units["cache"], units["shm"], units["escaped"], units["limited"]]
    out = testhost.run(["python3", "-m", "exporter", "explain", "--format=json", *names]).stdout
    data = json.loads(out)
    assert data["layout"] == "hybrid" and data["memory_controller"] == "v1"
    by_unit = {u["unit"]: u for u in data["units"]}
    assert set(by_unit) == set(names)
    for unit in by_unit.values():
        assert sum(p["bytes"] or 0 for p in unit["parts"]) == unit["systemctl"]  # the parts are the whole figure
        assert unit["top"] == unit["rss_anon"] + unit["rss_file"] + unit["rss_shmem"]
    parts = {name: {p["key"]: p["bytes"] for p in unit["parts"]} for name, unit in by_unit.items()}
    assert parts[units["cache"]]["unmapped_cache"] >= 180 * MiB
    assert parts[units["shm"]]["shmem"] >= 95 * MiB
    assert by_unit[units["limited"]]["limits"] == {"max": 200 * MiB}
    assert "reclaimable page cache" in by_unit[units["cache"]]["verdict"]
