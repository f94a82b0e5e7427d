"""The landing page, /unit/<name> and `explain --format json`, on the snapshots of the fixture
trees (real kernel files captured from real hosts: each tree's SOURCE.md says which).

The page's HTML is parsed with the standard library's parser and its figures checked against
the snapshot's own numbers; tests/test_page_browser.py checks the same page as laid out by a
real chromium on a real systemd.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from html.parser import HTMLParser
from urllib.parse import unquote

import pytest

from exporter.explain import explain, reconcile, slice_of
from exporter.page import BAR_UNITS, Pages, landing_page, unit_href
from exporter.service import Published
from exporter.snapshot import Breakdown
from tests.test_cli import run_cli
from tests.test_sampler import FIXTURES, TREES, load_units, sample_tree


def published(snapshot) -> Published:
    return Published(snapshot, b"", 0, 0, 0.0)  # pages read the snapshot, never the body


class Dom(HTMLParser):
    """Just enough DOM: every element's tag, attributes, parent and text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._stack: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "parent": self._stack[-1] if self._stack else None, "text": ""}
        self.elements.append(element)
        if tag not in ("input", "meta", "wbr", "br"):
            self._stack.append(element)

    def handle_endtag(self, tag):
        while self._stack:
            if self._stack.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for element in self._stack:
            element["text"] += data

    def find(self, tag: str | None = None, **attrs: str) -> list[dict]:
        return [
            e for e in self.elements
            if (tag is None or e["tag"] == tag) and all(e["attrs"].get(k.rstrip("_")) == v for k, v in attrs.items())
        ]

    def within(self, ancestor: dict, tag: str) -> list[dict]:
        out = []
        for e in self.elements:
            p = e["parent"]
            while p is not None and p is not ancestor:
                p = p["parent"]
            if p is ancestor and e["tag"] == tag:
                out.append(e)
        return out


def rows(dom: Dom) -> list[dict]:
    return [e for e in dom.elements if "unit" in e["attrs"].get("class", "").split() and "data-unit" in e["attrs"]]


def with_user_units(snapshot):
    """The v2 capture with two of its units moved to user 1000's manager, as the users
    helper's discovery reports them (Unit.uid), to exercise the user filter."""
    moved = {"smx-anon-1.service", "smx-cache-2.service"}
    units = tuple(
        dataclasses.replace(s, unit=dataclasses.replace(s.unit, uid=1000)) if s.unit.name in moved else s
        for s in snapshot.units
    )
    return dataclasses.replace(snapshot, units=units)


@pytest.mark.parametrize("name", TREES)
def test_every_unit_has_a_row_with_a_link_to_its_page(name):
    snapshot = sample_tree(FIXTURES / name)
    dom = Dom(landing_page(published(snapshot), "/metrics"))
    listed = {r["attrs"]["data-unit"] for r in rows(dom)}
    assert listed == {s.unit.name for s in snapshot.units}
    for row in rows(dom):
        links = dom.within(row, "a")
        assert unquote(links[0]["attrs"]["href"]) == "/unit/" + row["attrs"]["data-unit"]
        assert links[0]["text"] == row["attrs"]["data-unit"]  # <wbr> breaks add no text
    # Slices apart: collapsed under a <details>, not among the units.
    slices = dom.find("details", id="slices")[0]
    in_details = {e["attrs"]["data-unit"] for e in dom.within(slices, "div") if "data-unit" in e["attrs"]}
    assert in_details == {s.unit.name for s in snapshot.units if s.unit.type == "slice"}


def test_escaped_names_travel_percent_encoded():
    name = "smx\\x2descaped\\x2ddemo\\x2d6.service"
    assert unit_href(name) == "/unit/smx%5Cx2descaped%5Cx2ddemo%5Cx2d6.service"  # no raw "\": browsers make it "/"
    assert unit_href("user@1000.service") == "/unit/user%401000.service"


@pytest.mark.parametrize("name", TREES)
def test_bar_widths_are_the_figures_on_one_scale(name):
    snapshot = sample_tree(FIXTURES / name)
    dom = Dom(landing_page(published(snapshot), "/metrics"))
    units = [r for r in rows(dom) if "slice" not in r["attrs"]["class"].split()]
    scales = {next(d for d in dom.within(r, "div") if "track" in d["attrs"].get("class", "").split())["attrs"]["data-scale"] for r in units}
    assert len(scales) == 1, "every unit row shares one scale"
    scale = int(scales.pop())
    checked = 0
    for row in units:
        sample = snapshot.unit(row["attrs"]["data-unit"])
        b = Breakdown.of(sample)
        rects = dom.within(row, "rect")
        x = 0.0
        for rect in rects:
            value = getattr(b, rect["attrs"]["data-part"])
            assert int(rect["attrs"]["data-bytes"]) == value > 0
            assert float(rect["attrs"]["width"]) == pytest.approx(value * BAR_UNITS / scale, abs=1e-3)
            assert float(rect["attrs"]["x"]) == pytest.approx(x, abs=1e-3)  # stacked end to end
            x += float(rect["attrs"]["width"])
        if b.systemctl is not None and b.remainder is not None and b.remainder >= 0:
            assert x == pytest.approx(b.systemctl * BAR_UNITS / scale, abs=5e-3)  # the whole bar is systemctl's figure
            checked += 1
        mark = dom.within(row, "i")[0]
        left = float(re.search(r"left:([\d.]+)%", mark["attrs"]["style"]).group(1))
        assert left == pytest.approx(b.top * 100 / scale, abs=1e-3)
    assert checked >= 5


@pytest.mark.parametrize("key", ["top", "gap"])
def test_sort_orders_are_the_figures_ranked(key):
    snapshot = sample_tree(FIXTURES / "v2")
    dom = Dom(landing_page(published(snapshot), "/metrics"))
    units = [r for r in rows(dom) if "slice" not in r["attrs"]["class"].split()]
    order = {r["attrs"]["data-unit"]: int(re.search(rf"--o-{key}:(\d+)", r["attrs"]["style"]).group(1)) for r in units}
    ranked = sorted(order, key=order.get)
    figures = [getattr(Breakdown.of(snapshot.unit(u)), key) for u in ranked]
    assert figures == sorted(figures, key=lambda v: (v is None, -(v or 0)))
    assert sorted(order.values()) == list(range(len(units)))
    # Default (DOM) order is systemctl's figure, largest first.
    systemctl = [Breakdown.of(snapshot.unit(r["attrs"]["data-unit"])).systemctl or 0 for r in units]
    assert systemctl == sorted(systemctl, reverse=True)


def test_filters_by_type_slice_and_user_are_css_over_row_classes():
    snapshot = with_user_units(sample_tree(FIXTURES / "v2"))
    text = landing_page(published(snapshot), "/metrics")
    dom = Dom(text)
    units = [r for r in rows(dom) if "slice" not in r["attrs"]["class"].split()]
    for row in units:
        r = reconcile(snapshot.unit(row["attrs"]["data-unit"]))
        classes = row["attrs"]["class"].split()
        assert f"t-{r.type}" in classes
        assert ("u-system" if r.uid is None else f"u-{r.uid}") in classes
        slice_class = next(c for c in classes if c.startswith("s-"))
        label = dom.find("label", for_="slice-" + slice_class[2:])[0]
        assert label["text"] == r.slice
    for control in ("type-service", "type-mount", "user-system", "user-1000", "sort-top", "sort-gap"):
        assert dom.find("input", id=control), control
        assert dom.find("label", for_=control), control
    assert "#user-1000:checked~main #units .unit:not(.u-1000)" in text
    assert "#type-mount:checked~main #units .unit:not(.t-mount)" in text
    assert "#sort-gap:checked~main #units .unit{order:var(--o-gap)}" in text
    assert sum("u-1000" in r["attrs"]["class"] for r in units) == 2


def test_slice_of_a_cgroup_path():
    assert slice_of("/system.slice/foo.service") == "system.slice"
    assert slice_of("/smx.slice/smx-outer.slice/smx-outer-inner.slice/x.service") == "smx-outer-inner.slice"
    assert slice_of("/init.scope") == "-.slice"
    assert slice_of("/user.slice/user-1000.slice/user@1000.service/app.slice/a.service") == "app.slice"
    assert slice_of("/system.slice") == "-.slice"


@pytest.mark.parametrize("name", TREES)
def test_no_script_and_no_external_assets(name):
    text = landing_page(published(sample_tree(FIXTURES / name)), "/metrics")
    assert "<script" not in text.lower()
    assert not re.search(r"\son[a-z]+=", text), "no inline event handlers"
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "nothing loaded from elsewhere"
    assert "@import" not in text and "url(" not in text


def test_landing_page_is_rendered_once_per_snapshot():
    snapshot = sample_tree(FIXTURES / "v2")
    pages = Pages("/metrics")
    first, second = published(snapshot), published(snapshot)
    bodies = []
    threads = [threading.Thread(target=lambda: bodies.append(pages.respond("/", first))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert pages.renders == 1 and len(bodies) == 8 and len({b[1] for b in bodies}) == 1
    status, packed, gzipped = pages.respond("/", first, gzip_ok=True)
    assert (status, gzipped, pages.renders) == (200, True, 1)
    import gzip

    assert gzip.decompress(packed) == bodies[0][1]
    pages.respond("/", second)
    assert pages.renders == 2  # a new snapshot, a new render
    pages.respond(unit_href("dbus.service"), second)
    assert pages.renders == 2  # unit pages do not re-render the landing page


def test_unit_page_shows_limits_events_pressure_and_grafana_links():
    snapshot = sample_tree(FIXTURES / "v2")
    pages = Pages("/metrics", "http://grafana.example:3000/")
    status, body, _ = pages.respond(unit_href("smx-limited-9.service"), published(snapshot))
    text = body.decode()
    assert status == 200
    memory = snapshot.unit("smx-limited-9.service").memory
    assert memory.limits["max"] == 200 << 20  # the capture's MemoryMax=200M
    dom = Dom(text)
    assert dom.find("h1")[0]["text"] == "smx-limited-9.service"
    cells = [e["text"] for e in dom.find("td")]
    assert "MemoryMax" in cells and "200.0 MiB" in cells and "MemoryHigh" in cells
    assert "oom_kill" in cells and "max" in cells
    assert "some (at least one task stalled)" in cells
    links = [e["attrs"]["href"] for e in dom.find("a")]
    assert "http://grafana.example:3000/d/systemd-memory-unit?var-unit=smx-limited-9.service" in links
    assert "http://grafana.example:3000/d/systemd-memory-why?var-unit=smx-limited-9.service" in links


def test_grafana_links_of_a_user_unit_select_its_user():
    snapshot = sample_tree(FIXTURES / "v2")
    system = snapshot.unit("dbus.service")
    user = dataclasses.replace(system, unit=dataclasses.replace(system.unit, uid=1500))
    snapshot = dataclasses.replace(snapshot, units=snapshot.units + (user,))
    pages = Pages("/metrics", "http://grafana.example:3000/")
    links = [e["attrs"]["href"] for e in Dom(pages.respond("/unit/dbus.service?uid=1500", published(snapshot))[1].decode()).find("a")]
    assert "http://grafana.example:3000/d/systemd-memory-unit?var-unit=dbus.service&var-uid=1500" in links
    assert "http://grafana.example:3000/d/systemd-memory-why?var-unit=dbus.service&var-uid=1500" in links
    links = [e["attrs"]["href"] for e in Dom(pages.respond("/unit/dbus.service", published(snapshot))[1].decode()).find("a")]
    assert "http://grafana.example:3000/d/systemd-memory-unit?var-unit=dbus.service" in links


def test_unit_page_of_an_escaped_name_and_without_grafana():
    snapshot = sample_tree(FIXTURES / "v2")
    name = "smx\\x2descaped\\x2ddemo\\x2d6.service"
    status, body, _ = Pages("/metrics").respond(unit_href(name), published(snapshot))
    dom = Dom(body.decode())
    assert status == 200 and dom.find("h1")[0]["text"] == name
    assert "grafana" not in body.decode().lower()
    # A literal backslash, as curl sends it, finds the unit too.
    assert Pages("/metrics").respond("/unit/" + name, published(snapshot))[0] == 200


def test_unknown_unit_and_no_sample_yet():
    snapshot = sample_tree(FIXTURES / "v2")
    status, body, _ = Pages().respond("/unit/no-such.service", published(snapshot))
    assert status == 404 and "no-such.service" in body.decode()
    assert Pages().respond("/unit/dbus.service", None)[0] == 503
    status, body, _ = Pages().respond("/", None)
    assert status == 200 and "no sample yet" in body.decode()


def test_unit_without_a_memory_cgroup_shows_top_only():
    snapshot = sample_tree(FIXTURES / "hybrid")
    no_cgroup = [s for s in snapshot.units if s.memory is None]
    if not no_cgroup:  # make one: the same unit as a v1 host with MemoryAccounting=no shows it
        sample = snapshot.units[0]
        snapshot = dataclasses.replace(snapshot, units=(dataclasses.replace(sample, memory=None),) + snapshot.units[1:])
        no_cgroup = [snapshot.units[0]]
    name = no_cgroup[0].unit.name
    dom = Dom(landing_page(published(snapshot), "/metrics"))
    row = next(r for r in rows(dom) if r["attrs"]["data-unit"] == name)
    assert not dom.within(row, "rect") and "no memory cgroup" in row["text"]
    status, body, _ = Pages().respond(unit_href(name), published(snapshot))
    assert status == 200 and "No memory cgroup" in body.decode()


@pytest.mark.parametrize("name", TREES)
def test_explain_json_is_the_reconciliation(name):
    snapshot = sample_tree(FIXTURES / name)
    names = [s.unit.name for s in snapshot.units]
    data = json.loads(explain(snapshot, names, format="json"))
    assert data["layout"] == snapshot.layout.name
    assert [u["unit"] for u in data["units"]] == names
    for unit in data["units"]:
        sample = snapshot.unit(unit["unit"])
        b = Breakdown.of(sample)
        assert unit["systemctl"] == b.systemctl and unit["top"] == b.top == unit["rss_anon"] + unit["rss_file"] + unit["rss_shmem"]
        if b.systemctl is not None and unit["parts"]:
            # The parts add up to systemctl's figure (the remainder is what the kernel does not itemise).
            assert sum(p["bytes"] or 0 for p in unit["parts"]) == b.systemctl
        assert unit["limits"] == dict(sample.memory.limits) if sample.memory else unit["limits"] == {}
        assert unit["verdict"].startswith(("Verdict:", "No cgroup"))


def test_explain_text_and_json_say_the_same():
    snapshot = sample_tree(FIXTURES / "v2")
    text = explain(snapshot, ["smx-cache-2.service"])
    unit = json.loads(explain(snapshot, ["smx-cache-2.service"], format="json"))["units"][0]
    assert unit["verdict"] in text
    assert "unmapped page cache               200.0 MiB   97 %  files read or written: reclaimable, harmless" in text
    assert next(p for p in unit["parts"] if p["key"] == "unmapped_cache")["bytes"] == 200 << 20


def test_explain_default_selection_is_the_top_non_slice_units():
    snapshot = sample_tree(FIXTURES / "v2")
    data = json.loads(explain(snapshot, top=3, format="json"))
    assert [u["unit"] for u in data["units"]] == ["smx-cache-2.service", "smx-anon-1.service", "smx-shm-3.service"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--web.grafana-url=ftp://grafana"], "--web.grafana-url"),
        (["--web.grafana-url=grafana:3000"], "--web.grafana-url"),
        (["explain", "--format=xml"], "--format"),
    ],
)
def test_bad_page_flags_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_fixture_units_file_is_what_the_pages_list():
    assert {u.name for u in load_units(FIXTURES / "v2")} >= {"smx-limited-9.service", "smx\\x2descaped\\x2ddemo\\x2d6.service"}


def test_a_user_unit_named_like_a_system_unit_has_its_own_row_and_page():
    """dbus.service runs in the system manager and in user@1000's: two rows, two pages."""
    snapshot = sample_tree(FIXTURES / "v2")
    system = snapshot.unit("dbus.service")
    user = dataclasses.replace(
        system,
        unit=dataclasses.replace(system.unit, uid=1000, control_group="/user.slice/user-1000.slice/user@1000.service/session.slice/dbus.service"),
        processes=dataclasses.replace(system.processes, processes=system.processes.processes + 1),
    )
    snapshot = dataclasses.replace(snapshot, units=snapshot.units + (user,))
    dom = Dom(landing_page(published(snapshot), "/metrics"))
    hrefs = sorted(dom.within(r, "a")[0]["attrs"]["href"] for r in rows(dom) if r["attrs"]["data-unit"] == "dbus.service")
    assert hrefs == ["/unit/dbus.service", "/unit/dbus.service?uid=1000"]
    pages = Pages()
    _, system_page, _ = pages.respond("/unit/dbus.service", published(snapshot))
    _, user_page, _ = pages.respond("/unit/dbus.service?uid=1000", published(snapshot))
    assert "slice system.slice" in system_page.decode() and "system manager" in system_page.decode()
    text = user_page.decode()
    assert "slice session.slice" in text and "uid 1000" in text  # the UID, never a name: /etc/passwd may not be the host's
    assert pages.respond("/unit/dbus.service?uid=1001", published(snapshot))[0] == 404
    assert pages.respond("/unit/dbus.service?uid=x", published(snapshot))[0] == 400
    # More digits than int() takes (4,300 on 3.11+) is a 400 too, not an exception out of respond.
    assert pages.respond("/unit/dbus.service?uid=" + "1" * 5000, published(snapshot))[0] == 400
    assert pages.respond("/unit/dbus.service?uid=4294967295", published(snapshot))[0] == 404
    assert pages.respond("/unit/dbus.service?uid=%C2%B2", published(snapshot))[0] == 400  # "²".isdigit() is True


def test_names_are_escaped_in_markup_and_links():
    """systemd escapes unit names, but the page must not depend on it: markup stays markup."""
    snapshot = sample_tree(FIXTURES / "v2")
    odd = 'a"<b>&\'.service'
    first = snapshot.units[0]
    snapshot = dataclasses.replace(
        snapshot, units=(dataclasses.replace(first, unit=dataclasses.replace(first.unit, name=odd)),) + snapshot.units[1:]
    )
    text = landing_page(published(snapshot), "/metrics")
    assert "<b>&" not in text and 'a"<' not in text
    dom = Dom(text)
    row = next(r for r in rows(dom) if r["attrs"]["data-unit"] == odd)
    assert unquote(dom.within(row, "a")[0]["attrs"]["href"]) == "/unit/" + odd
    status, body, _ = Pages().respond(unit_href(odd), published(snapshot))
    assert status == 200 and "<b>&" not in body.decode() and Dom(body.decode()).find("h1")[0]["text"] == odd
