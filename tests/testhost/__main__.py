"""Command line for humans: python -m tests.testhost {boot,exec,stop,demo-workloads,demo,list,cleanup}.

  boot [--name N] [--bind PATH] [--layout hybrid|legacy] [--workloads]   boot a host and keep it until ^C / SIGTERM / `stop`
  exec NAME [--] CMD...                          run CMD inside a booted host (stdio passed through)
  stop NAME                                      make the `boot` process of NAME tear it down
  demo-workloads NAME                            start the sample workloads in a booted host
  demo [--] [CMD...]                             boot, start sample workloads, run CMD (default:
                                                 python3 -m exporter explain), print its output, tear down
  list                                           hosts on this machine and whether their owner lives
  cleanup                                        remove leftovers of crashed runs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from . import workloads
from .host import PREFIX, STATE_ROOT, HostError, TestHost, _owner_alive

DEMO_COMMAND = ["python3", "-m", "exporter", "explain"]


def describe(host: TestHost, units: list[str]) -> str:
    """A small table of the units' memory as systemd and the cgroup see it."""
    rows = [f"{'unit':45} {'MemoryCurrent':>14} {'rss':>8} {'cache':>8} {'shmem':>8} {'tasks':>5}"]
    for unit in units:
        st = host.memory_stat(unit)
        props = host.show(unit, "MemoryCurrent", "TasksCurrent")
        rows.append(f"{unit:45} {props['MemoryCurrent']:>14} {st['total_rss'] >> 20:>7}M "
                    f"{st['total_cache'] >> 20:>7}M {st['total_shmem'] >> 20:>7}M {props['TasksCurrent']:>5}")
    return "\n".join(rows)


def cmd_boot(args) -> int:
    host = TestHost(name=args.name, extra_binds=args.bind, layout=args.layout)
    try:
        host.start()
        print(f"host {host.name} running (systemd pid {host.pid}, booted in {host.boot_seconds:.2f}s)\n"
              f"  checkout  {host.checkout}\n  data dir  {host.data_dir}\n  exchange  {host.exchange_dir}\n"
              f"  console   {host.console_log}\n"
              f"enter:  python3 -m tests.testhost exec {host.name} -- bash\n"
              f"stop:   ^C here, or python3 -m tests.testhost stop {host.name}", flush=True)
        if args.workloads:
            print(describe(host, workloads.sample_workloads(host)), flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        return 0
    finally:
        host.stop()


def cmd_exec(args) -> int:
    host = TestHost.attach(args.name)
    proc = host.popen(args.cmd, cwd=args.cwd)
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)  # like a terminal would, to the command inside
    return 128 - rc if rc < 0 else rc


def cmd_stop(args) -> int:
    info = json.loads((STATE_ROOT / args.name / "owner.json").read_text())
    owner = info["pid"]
    if not _owner_alive(args.name):
        print(f"owner of {args.name} is gone; removing leftovers: {TestHost.cleanup_stale()}")
        return 0
    cmdline = open(f"/proc/{owner}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    if "tests.testhost" not in cmdline:
        print(f"{args.name} belongs to pid {owner} ({cmdline.strip()}), not to a `tests.testhost boot`; "
              "stop it there", file=sys.stderr)
        return 1
    os.kill(owner, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{owner}") and time.monotonic() < deadline:
        time.sleep(0.1)
    return 0 if not (STATE_ROOT / args.name).exists() else 1


def cmd_demo_workloads(args) -> int:
    host = TestHost.attach(args.name)
    print(describe(host, workloads.sample_workloads(host)))
    return 0


def cmd_demo(args) -> int:
    command = args.cmd or DEMO_COMMAND
    with TestHost(name="demo") as host:
        print(f"host {host.name} booted in {host.boot_seconds:.2f}s; starting sample workloads...", flush=True)
        print(describe(host, workloads.sample_workloads(host)), flush=True)
        print(f"\n$ {' '.join(command)}", flush=True)
        result = host.run(command, check=False, timeout=args.timeout)
        print(result.stdout, end="")
        print(result.stderr, end="", file=sys.stderr)
        print(f"[exit status {result.returncode}]")
    return result.returncode


def cmd_list(args) -> int:
    for state in sorted(STATE_ROOT.glob(PREFIX + "*")):
        try:
            pid = json.loads((state / "host.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pid = "-"
        print(f"{state.name:40} systemd pid {pid!s:>8}  owner {'alive' if _owner_alive(state.name) else 'gone'}")
    return 0


def cmd_cleanup(args) -> int:
    print("removed:", " ".join(TestHost.cleanup_stale()) or "nothing")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.testhost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("boot", help="boot a host and keep it until ^C")
    p.add_argument("--name", default="dev")
    p.add_argument("--bind", action="append", default=[], help="extra path to bind into the host (same path)")
    p.add_argument("--layout", choices=("hybrid", "legacy"), default="hybrid", help="cgroup layout inside")
    p.add_argument("--workloads", action="store_true", help="also start the sample workloads")
    p.set_defaults(func=cmd_boot)
    p = sub.add_parser("exec", help="run a command inside a booted host")
    p.add_argument("name")
    p.add_argument("--cwd", help="working directory inside (default: the checkout)")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec)
    p = sub.add_parser("stop", help="tear down a host booted with `boot`")
    p.add_argument("name")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("demo-workloads", help="start the sample workloads in a booted host")
    p.add_argument("name")
    p.set_defaults(func=cmd_demo_workloads)
    p = sub.add_parser("demo", help="boot, start workloads, run a command, tear down")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_demo)
    sub.add_parser("list", help="list hosts").set_defaults(func=cmd_list)
    sub.add_parser("cleanup", help="remove leftovers of crashed runs").set_defaults(func=cmd_cleanup)
    args = parser.parse_args(argv)
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if args.command == "exec" and not args.cmd:
        parser.error("exec needs a command")
    try:
        return args.func(args)
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
