"""python3 -m tests.vm [--suite S] [--layout L] build | run SCRIPT | capture OUT_DIR  (from the checkout root; see NOTES.md)."""
import argparse
import sys
import tempfile
import time

from . import image
from .guest import Guest


def main():
    parser = argparse.ArgumentParser(prog="python3 -m tests.vm")
    parser.add_argument("--suite", choices=sorted(image.SUITES), default=image.DEFAULT_SUITE)
    parser.add_argument("--layout", choices=("unified", "hybrid", "legacy"), default="unified",
                        help="cgroup layout the guest boots (kernel arguments)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the guest image, or find it in the cache")
    run = commands.add_parser("run", help="boot a guest, run a shell script in it, stop it")
    run.add_argument("script", help="e.g. 'cd /project && python3 -m exporter --help'")
    run.add_argument("--timeout", type=float, default=600)
    capture = commands.add_parser(
        "capture", help="boot a guest, start the sample workloads, capture a v2 fixture tree")
    capture.add_argument("out", help="e.g. tests/fixtures/v2 (its metrics.golden is kept)")
    args = parser.parse_args()

    missing = image.missing_prerequisites()
    if missing:
        sys.exit(f"missing: {', '.join(missing)} "
                 f"(apt-get install --no-install-recommends {image.APT_PACKAGES})")
    started = time.monotonic()
    if args.layout not in image.SUITES[args.suite].layouts:
        sys.exit(f"{args.suite} cannot boot the {args.layout} layout")
    path = image.build(args.suite)
    print(f"image {path} ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    if args.command == "capture":
        from .capture_fixture import capture as capture_tree
        with Guest(path, image.boot_kernel(args.suite, path), tempfile.mkdtemp(prefix="smx-vm-"),
                   layout=args.layout) as vm:
            captured = capture_tree(vm, args.out)
        print(f"captured {args.out} with {', '.join(captured.values())}; now run "
              "UPDATE_GOLDEN=1 python3 -m pytest tests/test_sampler.py -k v2", file=sys.stderr)
    if args.command == "run":
        # Kept after the run: its console.log is what to read when boot fails.
        workdir = tempfile.mkdtemp(prefix="smx-vm-")
        with Guest(path, image.boot_kernel(args.suite, path), workdir, layout=args.layout) as vm:
            print(f"booted in {vm.boot_seconds} s; console log {vm.console_log}",
                  file=sys.stderr)
            result = vm.run(["sh", "-c", args.script], timeout=args.timeout)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        sys.exit(result.returncode)


if __name__ == "__main__":
    main()
