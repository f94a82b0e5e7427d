"""Fixtures for the QEMU guest tests (see NOTES.md): one guest per (Debian suite, cgroup layout)
in GUESTS, booted one after another (pytest groups the tests by the session-scoped guest)."""
import os
import time
from pathlib import Path

import pytest

from . import image
from .guest import Guest, build_exporter_wheel

# What CI runs: bullseye on legacy (systemd 247, Python 3.9: the nearest Debian gets to
# openEuler 22.03), bookworm (systemd 252, Python 3.11) and trixie (systemd 257, Python 3.13)
# on unified, all on the host's 6.1 kernel; then bullseye510, bullseye on its own 5.10 kernel, on
# unified: cgroup v2 as Debian 11, openEuler 22.03 and (5.15) Ubuntu 22.04 have it, before
# memory.stat's "kernel" (5.18) and memory.peak (5.19).
# Last, bullseye510 again with PSI off (psi=0, as openEuler's kernels boot without psi=1): 5.10
# keeps the cgroup pressure files and refuses their reads (6.1 does not make them). A layout with
# a "+kernel-argument" runs only the tests whose layouts marker names it.
# SMX_VM_GUESTS="bookworm:unified,bullseye:hybrid" picks others.
GUESTS = (("bullseye", "legacy"), ("bookworm", "unified"), ("trixie", "unified"), ("bullseye510", "unified"),
          ("bullseye510", "unified+psi=0"))
TIMINGS = {}  # step -> seconds, printed at the end of the run


def selected_guests():
    chosen = os.environ.get("SMX_VM_GUESTS")
    if not chosen:
        return GUESTS
    guests = tuple(tuple(item.split(":", 1)) for item in chosen.split(",") if item)
    for suite, layout in guests:
        if suite not in image.SUITES or layout.partition("+")[0] not in image.SUITES[suite].layouts:
            raise pytest.UsageError(f"SMX_VM_GUESTS: {suite}:{layout} is not a guest we can boot")
    return guests


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test against a real system (slow)")
    config.addinivalue_line("markers", "vm: uses the QEMU guest harness in tests/vm")
    config.addinivalue_line("markers", "layouts(*names): run only on guests booted with one of these cgroup layouts")
    config.addinivalue_line("markers", "suites(*names): run only on guests of these Debian suites")


def pytest_generate_tests(metafunc):
    """Every test that needs a guest runs once per selected guest its layouts marker admits."""
    if "guest_config" not in metafunc.fixturenames:
        return
    layouts = metafunc.definition.get_closest_marker("layouts")
    suites = metafunc.definition.get_closest_marker("suites")
    guests = [g for g in selected_guests() if (g[1] in layouts.args if layouts else "+" not in g[1])
              and (suites is None or g[0] in suites.args)]
    metafunc.parametrize("guest_config", guests, ids=[f"{s}-{l}" for s, l in guests],
                         indirect=True, scope="session")


def _guest_of(item):
    return getattr(getattr(item, "callspec", None), "params", {}).get("guest_config")


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture parameters
def pytest_collection_modifyitems(config, items):
    """A test whose layouts no selected guest has is deselected, not skipped (CI fails on a skip).
    Then every guest's tests run together, guest after guest in GUESTS order: pytest's own
    grouping alternates between guests when tests admit different ones, and each switch is a
    boot; each guest's tests by module, in file order."""
    # (pytest parametrizes an empty list with a NOTSET placeholder and a skip mark)
    unplaced = [item for item in items if "guest_config" in getattr(item, "fixturenames", ())
                and not isinstance(_guest_of(item), tuple)]
    if unplaced:
        config.hook.pytest_deselected(items=unplaced)
        items[:] = [item for item in items if item not in unplaced]
    order = {guest: i for i, guest in enumerate(selected_guests())}
    first = min((i for i, item in enumerate(items) if _guest_of(item) is not None), default=None)
    if first is not None:
        # and each module's tests together (its module-scoped exporter and workloads start once)
        modules = {}
        for item in items:
            modules.setdefault(item.module.__name__, len(modules))
        guests = sorted((item for item in items if _guest_of(item) is not None),
                        key=lambda item: (order[_guest_of(item)], modules[item.module.__name__],
                                          item.location[1]))  # file order: some tests must come last
        others = [item for item in items if _guest_of(item) is None]
        items[:] = others[:first] + guests + others[first:]


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in TIMINGS.items())
        terminalreporter.write_line(f"vm harness timings: {steps}")


@pytest.fixture(scope="session")
def guest_config(request):
    """(suite, layout) of the guest a test runs on."""
    return request.param


@pytest.fixture(scope="session")
def kernel():
    """The host's Debian kernel; fails (in CI) or skips when the harness can't run. (A suite
    with its own kernel boots that: image.boot_kernel.)"""
    missing = image.missing_prerequisites()
    if missing:
        message = (f"VM harness prerequisites missing: {', '.join(missing)}; run as root after "
                   f"apt-get install --no-install-recommends {image.APT_PACKAGES}")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return image.find_kernel()


@pytest.fixture(scope="session")
def vm_image(kernel, guest_config):
    suite = guest_config[0]
    started = time.monotonic()
    path = image.build(suite)
    TIMINGS[f"{suite} image (build or cache)"] = time.monotonic() - started
    return path


@pytest.fixture(scope="session")
def exporter_wheel(tmp_path_factory):
    """The checkout as a wheel, built once per session on the host."""
    return build_exporter_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def vm(vm_image, kernel, guest_config, exporter_wheel, tmp_path_factory):
    """One booted guest per (suite, layout), with the exporter pip-installed into its venv."""
    suite, layout = guest_config
    guest = Guest(vm_image, image.boot_kernel(suite, vm_image), tmp_path_factory.mktemp(f"vm-{suite}-{layout}"),
                  layout=layout, suite=image.SUITES[suite])
    with guest:
        TIMINGS[f"{suite}-{layout} boot"] = guest.boot_seconds
        started = time.monotonic()
        guest.install_exporter(exporter_wheel)
        TIMINGS[f"{suite}-{layout} pip install"] = time.monotonic() - started
        yield guest
    # Tear-down must not leave the QEMU we started behind.
    assert guest.proc.returncode is not None
    assert not Path(f"/proc/{guest.proc.pid}").exists(), f"QEMU {guest.proc.pid} still there"


@pytest.fixture
def unit(vm):
    """Start transient services in the guest; they are stopped after the test."""
    started = []

    def start(name, argv, properties=()):
        vm.start_unit(name, argv, properties)
        started.append(name)
        return name

    yield start
    for name in started:
        vm.stop_unit(name)
