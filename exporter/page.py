"""The pages a person opens: `/`, every unit's memory as a stacked bar, and `/unit/<name>`, one
unit's reconciliation. Both draw exporter/explain.py's records of the published snapshot.

Plain HTML and CSS with inline SVG; no JavaScript and no external assets. Sorting and
filtering are CSS: hidden radio buttons (`:checked ~ main ...`) switch each row's flex `order`
or hide it, so the landing page is one document, rendered at most once per snapshot
(``Pages``), and every view of it comes from that one render.
"""

from __future__ import annotations

import gzip
import html
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, unquote

from . import __version__
from .explain import Reconciliation, human_bytes, layout_summary, no_memory_cgroup, percent, reconcile

if TYPE_CHECKING:  # service.py imports no page code; this is for the annotations only
    from .service import Published

# Part key -> (short legend name, colour). Tableau-10 hues: told apart by most colour-blind
# readers, and each part keeps its colour on every page.
PART_STYLE = {
    "anon": ("anonymous", "#4e79a7"),
    "mapped_file": ("mapped files", "#76b7b2"),
    "unmapped_cache": ("unmapped page cache", "#edc948"),
    "shmem": ("tmpfs / shm", "#b07aa1"),
    "kernel": ("kernel", "#9c755f"),
    "remainder": ("unexplained rest", "#bab0ac"),
}
TOP_COLOUR = "#d62728"
# The SVG bar's user-space width: segment x/width are bytes scaled to this, and the SVG is
# stretched to its column (preserveAspectRatio="none"), so widths stay exact fractions.
BAR_UNITS = 1000.0
SORTS = (("systemctl", "systemctl"), ("top", "top"), ("gap", "gap"))
UNIT_PREFIX = "/unit/"
CONTENT_TYPE = "text/html; charset=utf-8"
# memory.events (cgroup-v2.rst); on v1, "max" is memory.failcnt and oom_kill memory.oom_control's.
EVENT_MEANINGS = {
    "low": "reclaimed below MemoryLow",
    "high": "throttled above MemoryHigh",
    "max": "usage hit MemoryMax",
    "oom": "allocation failed at MemoryMax",
    "oom_kill": "processes killed by the OOM killer",
    "oom_group_kill": "whole-unit OOM kills",
}

CSS = """
:root{--ink:#1d2330;--muted:#5b6475;--line:#e3e6ec;--bg:#fff;--soft:#f5f6f9;--accent:#2f5fb3}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);
 background:var(--bg);margin:0;padding:24px 32px 48px}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.status{color:var(--muted);margin:0 0 14px}
.lede{margin:0 0 12px;max-width:62em}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;margin:0 0 14px;font-size:14px}
.legend span{display:inline-flex;align-items:center;gap:6px}
.sw{display:inline-block;width:14px;height:14px;border-radius:3px}
.sw.top{width:3px;height:18px;border-radius:0;background:""" + TOP_COLOUR + """}
.ctl{position:absolute;opacity:0;width:1px;height:1px;pointer-events:none}
.controls{display:flex;flex-wrap:wrap;gap:8px 28px;padding:10px 14px;background:var(--soft);border-radius:8px;margin:0 0 16px}
.controls div{display:flex;flex-wrap:wrap;align-items:center;gap:4px}
.controls b{font-weight:600;color:var(--muted);margin-right:4px;font-size:13px;text-transform:uppercase;letter-spacing:.04em}
.controls label{padding:2px 10px;border-radius:12px;cursor:pointer;border:1px solid var(--line);background:#fff;font-size:14px}
.controls label:hover{border-color:var(--accent)}
.rows{display:flex;flex-direction:column}
.row{display:grid;grid-template-columns:minmax(15rem,21rem) minmax(18rem,1fr) 6.5rem 6.5rem 6.5rem;
 gap:0 16px;align-items:center;padding:7px 4px;border-bottom:1px solid var(--line)}
.row.head{order:-1;font-size:13px;color:var(--muted);font-weight:600;padding-top:0}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.num.gap-neg{color:var(--muted)}
.name{font-weight:600;overflow-wrap:anywhere}
.meta,.parts{display:block;font-size:12.5px;color:var(--muted)}
.track{position:relative;height:20px;background:var(--soft);border-radius:3px}
.track svg{position:absolute;inset:0;width:100%;height:100%;display:block}
.mark{position:absolute;top:-4px;bottom:-4px;width:3px;margin-left:-1.5px;background:""" + TOP_COLOUR + """;border-radius:1px}
.track.nocg{background:repeating-linear-gradient(135deg,var(--soft) 0 6px,#fff 6px 12px)}
details{margin-top:28px}summary{cursor:pointer;font-weight:600;font-size:16px}
table{border-collapse:collapse;margin:4px 0 8px}
td,th{padding:5px 12px 5px 0;text-align:left;vertical-align:top;border-bottom:1px solid var(--line)}
th{font-size:13px;color:var(--muted);font-weight:600}
td.num{padding-left:12px}
.verdict{background:#fff8e1;border-left:4px solid #edc948;padding:10px 14px;margin:16px 0;max-width:62em}
.unitbar .track{height:28px;max-width:60em}
.empty{color:var(--muted);padding:12px 0}
@media (max-width:900px){body{padding:16px}.row{grid-template-columns:1fr repeat(3,5.5rem);gap:4px 10px}
 .row>:nth-child(2){grid-column:1/-1;grid-row:2}}
"""


def unit_href(name: str, uid: int | None = None) -> str:
    """A unit's page. Everything is percent-encoded: a browser turns "\\" into "/" in http
    URLs (WHATWG URL standard), so th\\x2dfoo.service must travel as th%5Cx2dfoo.service.
    A user manager's unit carries its UID: its name may also be a system unit's (dbus.service)."""
    return UNIT_PREFIX + quote(name, safe="") + ("" if uid is None else f"?uid={uid}")


def _user_label(uid: int | None) -> str:
    # The UID, not a name: with --path.procfs the exporter may run in a container whose
    # /etc/passwd is not the host's.
    return "system manager" if uid is None else f"uid {uid}"


def _drawn_parts(r: Reconciliation) -> list[tuple[str, int]]:
    """The parts a bar shows: only positive figures (a negative v1 remainder is usage fuzz
    below what memory.stat itemises; the text says so, the bar cannot draw it)."""
    return [(p.key, p.bytes) for p in r.parts if p.bytes and p.bytes > 0]


def bar_extent(r: Reconciliation) -> int:
    """The bytes one unit's bar needs: its parts end to end, or top's mark if further."""
    return max(sum(v for _, v in _drawn_parts(r)), r.systemctl or 0, r.top)


def bar_svg(r: Reconciliation, scale: int) -> str:
    """The unit's parts as a stacked bar on a shared ``scale`` (bytes at full width), and
    top's figure as a mark. Every number is also in a <title> for hover."""
    scale = max(scale, 1)
    rects = []
    x = 0.0
    for key, value in _drawn_parts(r):
        width = value * BAR_UNITS / scale
        label = PART_STYLE[key][0]
        rects.append(
            f'<rect class="seg p-{key}" data-part="{key}" data-bytes="{value}" x="{x:.4f}" width="{width:.4f}" '
            f'height="1" fill="{PART_STYLE[key][1]}"><title>{label}: {human_bytes(value)} '
            f"({percent(value, r.systemctl)} of systemctl)</title></rect>"
        )
        x += width
    inner = ""
    if rects:
        inner = (
            f'<svg viewBox="0 0 {BAR_UNITS:g} 1" preserveAspectRatio="none" role="img" '
            f'aria-label="parts of systemctl\'s {human_bytes(r.systemctl)}">{"".join(rects)}</svg>'
        )
    mark = (
        f'<i class="mark" data-bytes="{r.top}" style="left:{r.top * 100 / scale:.4f}%" '
        f'title="top: {human_bytes(r.top)} (summed RSS)"></i>'
    )
    classes = "track" if r.has_memory_cgroup else "track nocg"  # hatched: nothing to draw but top's mark
    return f'<div class="{classes}" data-scale="{scale}">{inner}{mark}</div>'


def _part_caption(r: Reconciliation) -> str:
    """The biggest parts in words, under the bar: readable without hovering."""
    if not r.has_memory_cgroup:
        return "no memory cgroup: only top's view"
    if not r.systemctl:
        return ""
    big = sorted(((v, k) for k, v in _drawn_parts(r) if v >= r.systemctl * 0.05), reverse=True)[:3]
    return " · ".join(f"{PART_STYLE[k][0]} {human_bytes(v)}" for v, k in big)


def _rank(values: Sequence[int | None]) -> list[int]:
    """Position of each item when sorted by value, largest first (unknown last)."""
    order = sorted(range(len(values)), key=lambda i: (values[i] is None, -(values[i] or 0)))
    ranks = [0] * len(values)
    for position, i in enumerate(order):
        ranks[i] = position
    return ranks


def _breakable(name: str) -> str:
    """The escaped name, allowed to wrap before each systemd escape (\\x2d...); browsers
    already wrap after its hyphens."""
    return html.escape(name).replace("\\", "<wbr>\\")


def _gap_cell(gap: int | None) -> str:
    if gap is None:
        return '<span class="num">n/a</span>'
    cls = "num gap-neg" if gap < 0 else "num"
    return f'<span class="{cls}">{"+" if gap > 0 else ""}{human_bytes(gap)}</span>'


def _row(r: Reconciliation, scale: int, classes: str, style: str) -> str:
    meta = f"{r.type} · {r.slice} · {r.processes} process{'es' if r.processes != 1 else ''}"
    if r.uid is not None:
        meta += f" · {_user_label(r.uid)}"
    caption = _part_caption(r)
    return (
        f'<div class="row unit {classes}" style="{style}" data-unit="{html.escape(r.unit)}" '
        f'data-uid="{"" if r.uid is None else r.uid}" '
        f'data-systemctl="{"" if r.systemctl is None else r.systemctl}" data-top="{r.top}">'
        f'<div><a class="name" href="{unit_href(r.unit, r.uid)}">{_breakable(r.unit)}</a>'
        f'<span class="meta">{html.escape(meta)}</span></div>'
        f'<div>{bar_svg(r, scale)}{f"<span class=parts>{html.escape(caption)}</span>" if caption else ""}</div>'
        f'<span class="num">{human_bytes(r.systemctl)}</span><span class="num">{human_bytes(r.top)}</span>'
        f"{_gap_cell(r.gap)}</div>"
    )


_HEAD_ROW = (
    '<div class="row head"><span>unit</span><span>what systemctl\'s figure is made of · '
    '<span style="color:' + TOP_COLOUR + '">|</span> top</span>'
    '<span class="num">systemctl</span><span class="num">top</span><span class="num">gap</span></div>'
)


def _legend() -> str:
    items = [f'<span><i class="sw" style="background:{colour}"></i>{name}</span>' for name, colour in PART_STYLE.values()]
    items.append('<span><i class="sw top"></i>top (summed RSS)</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>{body}</body></html>\n"
    )


def _status_line(published: Published) -> str:
    snapshot = published.snapshot
    summary = layout_summary(snapshot)
    sources = ", ".join(f"{name} {'up' if h.up else 'DOWN'}" for name, h in snapshot.sources.items())
    return (
        f"{len(snapshot.units)} units · sampled {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(snapshot.taken_at))} "
        f"in {snapshot.phase_seconds.get('total', 0) * 1000:.0f} ms · cgroup {summary['layout']}, memory "
        f"{summary['memory_controller'] or 'none'} · {sources}"
    )


class Controls:
    """Sort and filters without JavaScript. One hidden radio button per choice, placed before
    the controls and the rows, so `#choice:checked ~ main ...` reaches both: a filter hides the
    rows without the chosen class; a sort sets each row's flex `order` from its --o-<key>
    rank. The labels are what a person clicks."""

    def __init__(self, units: Sequence[Reconciliation]):
        self.types = sorted({r.type for r in units})
        self.slices = {name: str(i) for i, name in enumerate(sorted({r.slice for r in units}))}  # CSS-safe ids
        users = sorted({r.uid for r in units}, key=lambda u: (u is not None, u or 0))
        self.users = {u: "system" if u is None else str(u) for u in users}
        groups = {
            "sort": [(key, text) for key, text in SORTS],
            "type": [("all", "all")] + [(t, t) for t in self.types],
            "slice": [("all", "all")] + [(key, name) for name, key in self.slices.items()],
            "user": [("all", "all")] + [(key, "system" if u is None else _user_label(u)) for u, key in self.users.items()],
        }
        ids = [f"{group}-{key}" for group, options in groups.items() for key, _ in options]
        self.radios = "".join(
            f'<input class="ctl" type="radio" name="{group}" id="{group}-{key}"{" checked" if i == 0 else ""}>'
            for group, options in groups.items()
            for i, (key, _) in enumerate(options)
        )
        hidden = [f"#type-{t}:checked~main #units .unit:not(.t-{t})" for t in self.types]
        hidden += [f"#slice-{k}:checked~main #units .unit:not(.s-{k})" for k in self.slices.values()]
        hidden += [f"#user-{k}:checked~main #units .unit:not(.u-{k})" for k in self.users.values()]
        css = "".join(f"#sort-{key}:checked~main #units .unit{{order:var(--o-{key})}}" for key, _ in SORTS[1:])
        if hidden:
            css += ",".join(hidden) + "{display:none}"
        css += ",".join(f"#{i}:checked~nav label[for={i}]" for i in ids)
        css += "{background:var(--accent);color:#fff;border-color:var(--accent)}"
        css += ",".join(f"#{i}:focus-visible~nav label[for={i}]" for i in ids) + "{outline:2px solid var(--accent)}"
        self.css = css
        titles = {"sort": "Sort by", "type": "Type", "slice": "Slice", "user": "User"}
        self.nav = (
            '<nav class="controls">'
            + "".join(
                f"<div><b>{titles[group]}</b>"
                + "".join(f'<label for="{group}-{key}">{html.escape(text)}</label>' for key, text in options)
                + "</div>"
                for group, options in groups.items()
            )
            + "</nav>"
        )

    def classes(self, r: Reconciliation) -> str:
        return f"t-{r.type} s-{self.slices[r.slice]} u-{self.users[r.uid]}"


def landing_page(published: Published | None, telemetry_path: str, grafana_url: str = "") -> str:
    host = socket.gethostname()
    links = f'<a href="{html.escape(telemetry_path)}">metrics</a>'
    if grafana_url:
        links += f' · <a href="{html.escape(grafana_url)}/d/systemd-memory-overview">Grafana overview</a>'
    links += f" · systemd-memory-exporter {html.escape(__version__)}"
    if published is None:
        body = (
            f"<header><h1>systemd memory on {html.escape(host)}</h1><p class=status>no sample yet<br>{links}</p></header>"
        )
        return _document(f"systemd memory · {host}", body)
    all_r = [reconcile(s) for s in published.snapshot.units]
    units = sorted((r for r in all_r if r.type != "slice"), key=lambda r: (r.systemctl is None, -(r.systemctl or 0), -r.top))
    slices = sorted((r for r in all_r if r.type == "slice"), key=lambda r: -(r.systemctl or 0))

    controls = Controls(units)
    scale = max((bar_extent(r) for r in units), default=1)
    top_rank = _rank([r.top for r in units])
    gap_rank = _rank([r.gap for r in units])
    rows = [
        _row(r, scale, controls.classes(r), f"--o-top:{top_rank[i]};--o-gap:{gap_rank[i]}")
        for i, r in enumerate(units)
    ]
    slice_scale = max((bar_extent(r) for r in slices), default=1)
    slice_rows = [_row(r, slice_scale, "slice", "") for r in slices]

    body = (
        controls.radios
        + f'<header><h1>systemd memory on {html.escape(host)}</h1><p class="status">{html.escape(_status_line(published))}'
        f"<br>{links}</p></header>"
        '<p class="lede">Each bar is what <b>systemctl</b> says a unit uses (its cgroup\'s memory), split into what '
        'that figure is made of; the red mark is what <b>top</b> says (the summed RSS of its processes). '
        "Open a unit for the whole reconciliation.</p>"
        + _legend()
        + controls.nav
        + f'<main><section class="rows" id="units">{_HEAD_ROW}{"".join(rows) or "<p class=empty>no units</p>"}</section>'
        f'<details id="slices"><summary>Slices ({len(slices)}): each counts every unit below it, on its own scale</summary>'
        f'<div class="rows">{_HEAD_ROW}{"".join(slice_rows)}</div></details></main>'
    )
    return _document(f"systemd memory · {host}", f"<style>{controls.css}</style>" + body)


def _table(rows: list[tuple[str, ...]], head: tuple[str, ...] = ()) -> str:
    def cells(row, tag):
        return "".join(
            f'<{tag}{" class=num" if i == 1 else ""}>{c}</{tag}>' for i, c in enumerate(row)
        )

    thead = f"<tr>{cells(head, 'th')}</tr>" if head else ""
    return "<table>" + thead + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</table>"


def grafana_links(grafana_url: str, unit: str, uid: int | None = None) -> list[tuple[str, str]]:
    """Links into the shipped dashboards (grafana/dashboards: uid systemd-memory-unit and
    systemd-memory-why, both with `unit` and `uid` variables). A user's unit selects its user
    too. Not the host: Prometheus's instance label is set by the scrape config, which the
    exporter cannot see, so the dashboard keeps its own instance selection."""
    if not grafana_url:
        return []
    var = "var-unit=" + quote(unit, safe="") + ("" if uid is None else f"&var-uid={uid}")
    return [
        ("unit memory over time", f"{grafana_url}/d/systemd-memory-unit?{var}"),
        ("why systemctl disagrees with top", f"{grafana_url}/d/systemd-memory-why?{var}"),
    ]


def unit_page(r: Reconciliation, grafana_url: str = "") -> str:
    e = html.escape
    active = f"{r.active_state}/{r.sub_state}" if r.sub_state else r.active_state
    state = f"{r.type} · {active} · {r.processes} process{'es' if r.processes != 1 else ''}"
    state += f" · slice {r.slice} · {_user_label(r.uid)}"
    figures = [
        ("<b>systemctl</b> says (cgroup usage)", human_bytes(r.systemctl), "", "MemoryCurrent, systemd-cgtop"),
        (
            '<i class="sw top"></i> <b>top</b> says (RSS of its processes)',
            human_bytes(r.top),
            percent(r.top, r.systemctl),
            e(f"= anon {human_bytes(r.rss_anon)} + file {human_bytes(r.rss_file)} + shmem {human_bytes(r.rss_shmem)}"),
        ),
        ("gap (systemctl − top)", human_bytes(r.gap), "", ""),
    ]
    if r.pss is not None:
        figures.append(("PSS (shared pages counted once)", human_bytes(r.pss), percent(r.pss, r.systemctl), ""))
    if r.uss is not None:
        figures.append(("USS (pages only its processes hold)", human_bytes(r.uss), percent(r.uss, r.systemctl), ""))
    parts_html = ""
    if r.has_memory_cgroup:
        rows = [
            (
                f'<i class="sw" style="background:{PART_STYLE[p.key][1]}"></i> {e(p.label)}',
                human_bytes(p.bytes),
                percent(p.bytes, r.systemctl),
                e(p.why),
            )
            for p in r.parts
            if p.bytes is not None
        ]
        parts_html = "<h2>What systemctl's figure is made of</h2>" + _table(rows, ("part", "bytes", "share", "why"))
    else:
        parts_html = f"<p>{e(no_memory_cgroup(r))}</p>"
    extra = []
    if r.swap is not None:
        extra.append(("swap (outside usage)", human_bytes(r.swap), "", ""))
    if r.working_set is not None:
        extra.append(("working set (usage − inactive file)", human_bytes(r.working_set), "", "what the kubelet evicts on"))
    if r.peak is not None:
        extra.append(("peak usage", human_bytes(r.peak), "", ""))
    limit_names = {"max": "MemoryMax", "high": "MemoryHigh", "low": "MemoryLow", "min": "MemoryMin", "swap_max": "MemorySwapMax"}
    limits = []
    for key, value in r.limits.items():
        # The working set is what a memory limit or protection is measured against; swap_max is not.
        use = "" if key == "swap_max" or r.working_set is None else f"working set is {percent(r.working_set, value)} of it"
        limits.append((limit_names.get(key, key), human_bytes(value), use))
    events = [(e(k), str(v), EVENT_MEANINGS.get(k, "")) for k, v in r.events.items()]
    pressure = []
    if r.pressure_some_seconds is not None:
        pressure.append(("some (at least one task stalled)", f"{r.pressure_some_seconds:.3f} s"))
    if r.pressure_full_seconds is not None:
        pressure.append(("full (all tasks stalled)", f"{r.pressure_full_seconds:.3f} s"))
    sections = [
        f'<p><a href="/">← all units</a></p><h1>{e(r.unit)}</h1><p class="status">{e(state)}<br>cgroup {e(r.control_group)}</p>',
        _legend(),
        f'<div class="unitbar">{bar_svg(r, bar_extent(r))}</div>',
        f'<p class="verdict">{e(r.verdict)}</p>',
        _table(figures, ("", "bytes", "of systemctl", "")),
        parts_html,
    ]
    if extra:
        sections.append("<h2>Beside it</h2>" + _table(extra))
    sections.append(
        "<h2>Limits</h2>" + (_table(limits, ("limit", "bytes", "")) if limits else "<p>No memory limit is set.</p>")
    )
    sections.append(
        "<h2>Events</h2>"
        + (_table(events, ("event (since the cgroup was made)", "count", "")) if events else "<p>The kernel reports no memory events for this cgroup.</p>")
    )
    sections.append(
        "<h2>Pressure</h2>"
        + (
            _table(pressure, ("memory stall time, total", "seconds"))
            if pressure
            else "<p>No pressure figures: PSI (memory.pressure) exists on cgroup v2 only.</p>"
        )
    )
    links = grafana_links(grafana_url, r.unit, r.uid)
    if links:
        sections.append(
            '<h2>Grafana</h2><ul class="grafana">'
            + "".join(f'<li><a href="{e(url)}">{e(text)}</a></li>' for text, url in links)
            + "</ul>"
        )
    return _document(f"{r.unit} · systemd memory", "".join(sections))


def _not_found(text: str) -> str:
    return _document("not found · systemd memory", f'<p><a href="/">← all units</a></p><h1>Not found</h1><p>{html.escape(text)}</p>')


class Pages:
    """Serves `/` and `/unit/<name>`. The landing page is rendered at most once per published
    snapshot, on its first request (a lock makes concurrent first requests share one render),
    and kept gzipped only, as /metrics is: 1,000 units make 1.3 MB of HTML but 36 KB of gzip,
    and every browser asks for gzip. A unit page costs one unit's reconciliation."""

    def __init__(self, telemetry_path: str = "/metrics", grafana_url: str = ""):
        self.telemetry_path = telemetry_path
        self.grafana_url = grafana_url.rstrip("/")
        self.renders = 0  # landing renders so far: tests check it stays one per snapshot
        self._lock = threading.Lock()
        # A weak reference: holding the Published would keep a replaced snapshot alive (and
        # free it in a web thread) until the next visit.
        self._rendered_for: weakref.ref | None = None
        self._landing_gzip = b""

    def handles(self, path: str) -> bool:
        return path == "/" or path.startswith(UNIT_PREFIX)

    def landing_gzip(self, published: Published | None) -> bytes:
        """The landing page for ``published``, gzipped."""
        with self._lock:
            if self._rendered_for is None or self._rendered_for() is not published:
                body = landing_page(published, self.telemetry_path, self.grafana_url).encode()
                self._landing_gzip = gzip.compress(body, compresslevel=5, mtime=0)
                self._rendered_for = None if published is None else weakref.ref(published)
                self.renders += 1
            return self._landing_gzip

    def respond(self, target: str, published: Published | None, gzip_ok: bool = False) -> tuple[int, bytes, bool]:
        """(status, body, gzipped) for a request target (path and query) whose path ``handles``
        accepted."""
        path, _, query = target.partition("?")
        if path == "/":
            packed = self.landing_gzip(published)
            return (200, packed, True) if gzip_ok else (200, gzip.decompress(packed), False)
        name = unquote(path[len(UNIT_PREFIX):])
        uid_text = parse_qs(query).get("uid", [""])[-1]
        # "²".isdigit() too, which int() refuses; and a uid_t has at most 10 digits, where int()
        # raises on more than 4,300 (Python 3.11+), which a 64 KiB request line can carry.
        if uid_text and not (uid_text.isascii() and uid_text.isdigit() and len(uid_text) <= 10):
            return 400, _not_found(f"uid must be a number, not {uid_text[:20]!r}.").encode(), False
        uid = int(uid_text) if uid_text else None
        if published is None:
            return 503, _not_found("No sample yet: try again in a moment.").encode(), False
        sample = next((s for s in published.snapshot.units if s.unit.name == name and s.unit.uid == uid), None)
        if sample is None:
            whose = "" if uid is None else f" of user {uid}"
            return 404, _not_found(f"No unit{whose} named {name!r} in the latest sample.").encode(), False
        return 200, unit_page(reconcile(sample), self.grafana_url).encode(), False
