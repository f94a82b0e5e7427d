"""Fixtures for the cgroup-v2 QEMU guest tests (see NOTES.md)."""
import os
import time
from pathlib import Path

import pytest

from . import image
from .guest import Guest

TIMINGS = {}  # step -> seconds, printed at the end of the run


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test against a real system (slow)")
    config.addinivalue_line("markers", "vm: uses the QEMU cgroup-v2 guest harness in tests/vm")


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in TIMINGS.items())
        terminalreporter.write_line(f"vm harness timings: {steps}")


@pytest.fixture(scope="session")
def kernel():
    """The host's Debian kernel; fails (in CI) or skips when the harness can't run."""
    missing = image.missing_prerequisites()
    if missing:
        message = (f"VM harness prerequisites missing: {', '.join(missing)}; run as root after "
                   f"apt-get install --no-install-recommends {image.APT_PACKAGES}")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return image.find_kernel()


@pytest.fixture(scope="session")
def vm_image(kernel):
    started = time.monotonic()
    path = image.build()
    TIMINGS["image (build or cache)"] = time.monotonic() - started
    return path


@pytest.fixture(scope="session")
def vm(vm_image, kernel, tmp_path_factory):
    """One booted guest for the whole session."""
    guest = Guest(vm_image, kernel, tmp_path_factory.mktemp("vm"))
    with guest:
        TIMINGS["boot"] = guest.boot_seconds
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
