"""Command line: `systemd-memory-exporter [flags]` serves; `... explain [UNIT...]` prints once.

Flags follow node_exporter's spelling. Bad flags print a clear message and exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import urllib.parse

from . import __version__
from .render import DEFAULT_FIELDS, SeriesBudget
from .sampler import SamplerConfig
from .systemd import CGROUP_UNIT_TYPES, DEFAULT_DBUS_TIMEOUT, DEFAULT_PRIVATE_SOCKET, UnitFilter

log = logging.getLogger("exporter")

# 9100-9999 (the Prometheus wiki's exporter port range) is fully allocated; this port is
# outside it and outside the well-known exporter and kubelet ports.
DEFAULT_LISTEN = ":10073"
# The sampler's defaults (paths, interval, PSS bounds) are SamplerConfig's own.
DEFAULTS = SamplerConfig()


# Longer than any useful interval or timeout, and far inside threading.TIMEOUT_MAX (~292
# years): 1e10 s passed the check and then made the sampler's Event.wait raise OverflowError,
# ending the sample loop after its first cycle.
MAX_SECONDS = 86400.0


def _seconds(text: str, least: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value != value or value < 0 or (least == "> 0" and value == 0):
        raise argparse.ArgumentTypeError(f"must be {least} seconds: {text!r}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SECONDS:.0f} seconds (a day): {text!r}")
    return value


def _interval(text: str) -> float:
    return _seconds(text, ">= 0")


def _positive(text: str) -> float:
    return _seconds(text, "> 0")


_SIZE_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
               "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def _size(text: str) -> int:
    """A byte count: 4294967296, 4GiB, 512MiB, 4GB (case-insensitive)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size in bytes (e.g. 4GiB): {text!r}")
    try:
        return int(float(match.group(1)) * _SIZE_UNITS[unit])
    except OverflowError:  # so many digits that float() gives inf
        raise argparse.ArgumentTypeError(f"too large a size: {text[:40]!r}...") from None


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {e}") from None
    return text


def _fields(field: str):
    """A --collector.<field>.fields regex: it must compile and name at least one known field,
    so a typo does not silently drop series; '' exports none."""
    names = SeriesBudget.FIELDS[field]

    def parse(text: str) -> str:
        pattern = re.compile(_regex(text))
        if text and not any(pattern.fullmatch(name) for name in names):
            raise argparse.ArgumentTypeError(f"{text!r} matches none of {','.join(names)} (use '' for none)")
        return text

    return parse


def _types(text: str) -> list[str]:
    types = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(types) - set(CGROUP_UNIT_TYPES))
    if unknown or not types:
        raise argparse.ArgumentTypeError(
            f"unknown unit type(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(CGROUP_UNIT_TYPES)}"
        )
    return types


def _grafana_url(text: str) -> str:
    if not text:  # the default: no links
        return ""
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.netloc or url.query or url.fragment:
        raise argparse.ArgumentTypeError(f"want an http(s) URL of Grafana, e.g. https://grafana.example:3000: {text!r}")
    return text.rstrip("/")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path.procfs", dest="procfs", default=DEFAULTS.procfs, metavar="DIR", help="procfs mount point (default %(default)s)")
    parser.add_argument(
        "--path.cgroupfs", dest="cgroupfs", default=DEFAULTS.cgroupfs, metavar="DIR", help="cgroup mount point (default %(default)s)"
    )
    parser.add_argument(
        "--unit.include", dest="include", type=_regex, default=".+", metavar="REGEX",
        help="only units whose whole name matches (default %(default)s)",
    )
    parser.add_argument(
        "--unit.exclude", dest="exclude", type=_regex, default="", metavar="REGEX", help="drop units whose whole name matches"
    )
    parser.add_argument(
        "--unit.types", dest="types", type=_types, default=list(CGROUP_UNIT_TYPES), metavar="LIST",
        help=f"comma-separated unit types to report (default {','.join(CGROUP_UNIT_TYPES)})",
    )
    parser.add_argument(
        "--dbus.timeout", dest="dbus_timeout", type=_positive, default=DEFAULT_DBUS_TIMEOUT, metavar="SECONDS",
        help="timeout of every D-Bus call (default %(default)s)",
    )
    parser.add_argument(
        "--systemd.private-socket", dest="private_socket", default=DEFAULT_PRIVATE_SOCKET, metavar="PATH",
        help="systemd's own socket, used when no D-Bus daemon answers (default %(default)s)",
    )
    # On by default, like node_exporter's default collectors; --no-collector.user-units turns
    # it off. Read from the cgroup tree, not the users' buses (exporter/systemd.py says why).
    parser.add_argument(
        "--collector.user-units", dest="user_units", action=argparse.BooleanOptionalAction, default=True,
        help="also report the units of every running user manager (user@UID.service), labelled uid (default: on)",
    )
    parser.add_argument(
        "--log.level", dest="log_level", default="info", choices=("debug", "info", "warn", "error"),
        help="log level (default %(default)s)",
    )


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"want a whole number >= 0, got {text!r}")
    return int(text)


def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    serve = argparse.ArgumentParser(
        prog="systemd-memory-exporter",
        description="Per-unit memory of systemd units for Prometheus: the cgroup figure systemctl shows, "
        "the RSS top shows, and the parts that reconcile them. "
        "Run 'systemd-memory-exporter explain --help' for the one-shot report.",
    )
    serve.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    serve.add_argument(
        "--web.listen-address", dest="listen", default=DEFAULT_LISTEN, metavar="ADDR",
        help="address to listen on: host:port, [ipv6]:port or :port (default %(default)s)",
    )
    serve.add_argument(
        "--web.telemetry-path", dest="telemetry_path", default="/metrics", metavar="PATH",
        help="path of the metrics (default %(default)s)",
    )
    serve.add_argument(
        "--web.config.file", dest="web_config_file", default="", metavar="FILE",
        help="TLS and basic auth configuration, in the Prometheus exporter-toolkit format (needs pyyaml, bcrypt)",
    )
    serve.add_argument(
        "--sample.interval", dest="interval", type=_interval, default=DEFAULTS.interval, metavar="SECONDS",
        help="seconds between samples; 0 samples on each scrape (default %(default)s)",
    )
    serve.add_argument(
        "--web.grafana-url", dest="grafana_url", type=_grafana_url, default="", metavar="URL",
        help="Grafana that has the shipped dashboards: unit pages link to them (default: no links)",
    )
    serve.add_argument(
        "--sample.kept-files", dest="kept_files", type=_count, default=DEFAULTS.kept_files, metavar="N",
        help="keep up to N cgroup and /proc status files open across cycles and read them again from offset 0: "
        "less CPU per cycle, about 4.5 KiB of kernel memory each, charged to the exporter's cgroup; "
        "0 opens and closes every file (default %(default)s)",
    )
    # --collector.pss (exporter/pss.py): opt-in, because smaps_rollup holds each process's mmap_lock.
    serve.add_argument(
        "--collector.pss", dest="pss", action="store_true",
        help="also export per-unit pss and uss from /proc/PID/smaps_rollup (costly: see --collector.pss.*)",
    )
    serve.add_argument(
        "--collector.pss.budget", dest="pss_budget", type=_positive, default=DEFAULTS.pss_budget, metavar="SECONDS",
        help="stop reading smaps_rollup after this long in a cycle; the rest of the units wait for the next (default %(default)s)",
    )
    serve.add_argument(
        "--collector.pss.max-rss", dest="pss_max_rss", type=_size, default=DEFAULTS.pss_max_rss, metavar="BYTES",
        help=f"do not read smaps_rollup of processes with a larger RSS, e.g. 4GiB (default {DEFAULTS.pss_max_rss >> 30}GiB)",
    )
    # The series budget (render.SeriesBudget; README "Running it on a fleet" has each cost).
    for field, what in (("stat", "memory.stat items"), ("events", "memory events"), ("limits", "memory limits"),
                        ("pressure", "memory pressure kinds")):
        serve.add_argument(
            f"--collector.{field}.fields", dest=f"{field}_fields", type=_fields(field), default=DEFAULT_FIELDS[field],
            metavar="REGEX",
            help=f"{what} to export, a regex matching whole names among {','.join(SeriesBudget.FIELDS[field])} "
            "(default %(default)s; .+ for all)",
        )
    serve.add_argument(
        "--collector.peak", dest="peak", action=argparse.BooleanOptionalAction, default=False,
        help="export systemd_unit_memory_peak_bytes (v1 memory.max_usage_in_bytes, v2 memory.peak; default off)",
    )
    _add_common(serve)

    explain = argparse.ArgumentParser(
        prog="systemd-memory-exporter explain",
        description="Sample once and print, per unit, what systemctl says, what top says, and the breakdown "
        "that reconciles them. No server is started.",
    )
    explain.add_argument("units", nargs="*", metavar="UNIT", help="units to explain (default: the top ones by cgroup usage)")
    explain.add_argument("--top", type=int, default=10, metavar="N", help="how many units without UNIT arguments (default %(default)s)")
    explain.add_argument(
        "--format", choices=("text", "json"), default="text",
        help="text for people, json for scripts: one object with every figure in bytes (default %(default)s)",
    )
    _add_common(explain)
    return serve, explain


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level={"warn": logging.WARNING}.get(level, getattr(logging, level.upper())),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _unit_filter(args: argparse.Namespace, names: list[str] | None = None) -> UnitFilter:
    include = "|".join(re.escape(n) for n in names) if names else args.include
    return UnitFilter.build(include, args.exclude, args.types)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_parser, explain_parser = build_parsers()
    if argv[:1] == ["explain"]:
        return run_explain(parse_explain(explain_parser, argv[1:]), explain_parser)
    return run_server(serve_parser.parse_args(argv), serve_parser)


# The root slice and the root mount are the only unit names that start with "-", which
# argparse takes for an option: `explain -.slice` said "unrecognized arguments".
ROOT_UNIT = re.compile(r"-\.(slice|mount)")


def parse_explain(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args, extras = parser.parse_known_args(argv)
    unknown = [token for token in extras if not ROOT_UNIT.fullmatch(token)]
    if unknown:
        parser.error("unrecognized arguments: " + " ".join(unknown))
    if extras:  # in the order they were given
        named = set(args.units) | set(extras)
        args.units = list(dict.fromkeys(token for token in argv if token in named))
    return args


def run_explain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .explain import explain
    from .sampler import Sampler
    from .systemd import Discovery, DiscoveryError, DiscoveryResult

    _setup_logging(args.log_level if args.log_level != "info" else "warn")
    if args.top < 1:
        parser.error("--top must be at least 1")
    cgroup_root, user_units_root = _unit_roots(args, parser)
    discovery = Discovery(_unit_filter(args, args.units), args.private_socket, args.dbus_timeout, user_units_root,
                          cgroup_root)

    def discover() -> DiscoveryResult:
        try:
            units = discovery.refresh()
            return DiscoveryResult(units, True, "", None, discovery.transport, tree_failures=tuple(discovery.tree_failures))
        except DiscoveryError as e:
            return DiscoveryResult((), False, str(e), None, "none", "unavailable")

    snapshot = Sampler(SamplerConfig(args.procfs, args.cgroupfs, 0, kept_files=0), discover).sample()
    discovery.close()
    if not snapshot.sources["dbus"].up:
        print(f"systemd-memory-exporter: {snapshot.sources['dbus'].message}", file=sys.stderr)
        return 1
    missing = [n for n in args.units if snapshot.unit(n) is None]
    sys.stdout.write(explain(snapshot, args.units, args.top, args.format))
    if missing:
        print(f"systemd-memory-exporter: no loaded unit with a control group named: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def _unit_roots(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str | None, str | None]:
    """For discovery: the hierarchy in which systemd names units (None without any), where it
    checks that a cached ControlGroup still exists; and the same for user managers' units, or
    None with --no-collector.user-units."""
    from .cgroupfs import detect_layout

    try:
        procs_root = detect_layout(args.cgroupfs).procs_root
    except OSError as e:  # a flag naming a file, or a directory we may not read
        parser.error(f"--path.cgroupfs={args.cgroupfs}: cannot read it: {e.strerror}")
    return procs_root, procs_root if args.user_units else None


def _return_big_buffers_to_the_kernel() -> None:
    """Each cycle renders a 2 MB text (1,000 units) and frees it. glibc raises its mmap
    threshold to the size of the first such buffer freed, so later ones land in the sampler
    thread's heap, whose freed space stays resident: RSS swung 33.8-41 MiB between cycles
    (tests/bench/RESULTS.md). A fixed threshold keeps them mmapped and returned at free, as
    MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ would. File reads stay below it (64 KiB);
    the discovery pipe's 1 MiB read buffer is mmapped once per cycle."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        libc.mallopt(m_mmap_threshold, 128 << 10)
        libc.mallopt(m_trim_threshold, 128 << 10)
    except (ImportError, OSError, AttributeError):  # no _ctypes, or not glibc: defaults stand
        pass


def series_budget(args: argparse.Namespace) -> SeriesBudget:
    return SeriesBudget.of(args.stat_fields, args.events_fields, args.limits_fields, args.pressure_fields, args.peak)


def run_server(args: argparse.Namespace, parser: argparse.ArgumentParser, discovery=None) -> int:
    """``discovery``: tests only (tests/fleet_exporter.py), units from elsewhere than D-Bus; an
    object with DiscoveryProcess's request/interrupt/stop."""
    from .discovery_process import DiscoveryProcess
    from .keptfiles import raise_descriptor_limit

    if not args.telemetry_path.startswith("/") or args.telemetry_path == "/":
        parser.error(f"--web.telemetry-path must start with / and not be / itself: {args.telemetry_path!r}")
    _setup_logging(args.log_level)
    _return_big_buffers_to_the_kernel()  # before the fork: the child's malloc gets it too
    if discovery is None:
        cgroup_root, user_units_root = _unit_roots(args, parser)
        discovery = DiscoveryProcess(args.include, args.exclude, args.types, args.private_socket, args.dbus_timeout,
                                     user_units_root, cgroup_root)
        # Now, while this process has one thread and before the imports the child has no use for
        # (HTTP server, client_python, TLS): the child shares what it has of our pages.
        discovery.fork_first_child()
    from .service import SampleLoop
    from .web import parse_listen_address, serve

    try:
        parse_listen_address(args.listen)
    except ValueError as e:
        discovery.stop()
        parser.error(str(e))
    web_config_file = None
    if args.web_config_file:
        from .webconfig import WebConfigError, WebConfigFile

        try:
            web_config_file = WebConfigFile(args.web_config_file)
        except WebConfigError as e:
            print(f"systemd-memory-exporter: --web.config.file: {e}", file=sys.stderr)
            discovery.stop()
            return 1
    raise_descriptor_limit()  # up to the unit's LimitNOFILE, for --sample.kept-files
    config = SamplerConfig(args.procfs, args.cgroupfs, args.interval, args.pss, args.pss_budget, args.pss_max_rss,
                           kept_files=args.kept_files)
    loop = SampleLoop(config, discovery, args.dbus_timeout, series_budget(args))
    server = None

    def reload(_signum, _frame):  # systemctl reload (the unit's ExecReload)
        if web_config_file is None or server is None:
            log.info("received SIGHUP: %s, nothing to reload", "not serving yet" if server is None else "no --web.config.file")
            return
        # Off the main thread: reading the file and bcrypt's decoy hash take a while.
        threading.Thread(target=web_config_file.reload, args=(lambda c: setattr(server, "web_config", c),),
                         name="reload", daemon=True).start()

    # Before the port opens: SIGHUP's default action would end the process.
    signal.signal(signal.SIGHUP, reload)
    try:
        server = serve(loop, args.listen, args.telemetry_path, web_config_file and web_config_file.config,
                       args.grafana_url)
    except OSError as e:
        print(f"systemd-memory-exporter: cannot listen on {args.listen}: {e.strerror or e}", file=sys.stderr)
        discovery.stop()
        return 1
    # A scrape that arrives mid-cycle waits for the sampler thread to yield the GIL once (then
    # the sampler waits for it: service.ScrapesFirst); a 0.5 ms switch interval (default 5 ms)
    # bounds that wait (tests/bench measures scrape p99, and inner.py gil where it waits).
    sys.setswitchinterval(0.0005)
    loop.start()
    log.info(
        "systemd-memory-exporter %s listening on %s%s, sampling every %gs",
        __version__, args.listen, args.telemetry_path, args.interval,
    )

    def shutdown(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    if web_config_file is not None:
        server.self_registry.register(web_config_file)
    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        server.serve_forever()
    finally:
        loop.stop()
        server.server_close()
    return 0
