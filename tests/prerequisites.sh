#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine, as root. Idempotent.
#   libsystemd-dev, pkg-config, gcc: pystemd builds from source against libsystemd
#   prometheus: promtool and a real Prometheus for the end-to-end tests
#   dbus, systemd: the real systemd test host (tests/testhost)
#   openssl: certificates for the TLS tests
#   qemu-system-x86, linux-image-amd64, debootstrap, e2fsprogs: the cgroup v2 guest (tests/vm)
#   chromium: the landing page in a real browser (tests/test_page_browser.py), apt line below
#   strace, prometheus-node-exporter, prometheus-process-exporter: the benchmark's file list
#     and its peers (tests/bench; CI runs its smoke size)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
# Packages must not start their daemons on this machine (node_exporter would listen on
# :9100): policy-rc.d tells invoke-rc.d to start nothing while we install.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -q
apt-get install -y -q --no-install-recommends \
  libsystemd-dev pkg-config gcc \
  prometheus \
  dbus systemd util-linux procps curl openssl \
  qemu-system-x86 linux-image-amd64 debootstrap e2fsprogs \
  strace prometheus-node-exporter prometheus-process-exporter
# chromium: headless, it loads the exporter's landing page in tests/test_page_browser.py
apt-get install -y -q --no-install-recommends chromium
# Packaging (tests/test_debian_package.py, tests/test_rpm.py): the .deb built with
# dpkg-buildpackage (dh + pybuild; help2man writes the manual page) and checked by lintian;
# the RPM spec built with rpmbuild (python3-build and python3-installer stand in for Fedora's
# pyproject macros, cpio unpacks the result), and python3-rpm, the bindings that rpmlint
# (from PyPI, in the test extra) loads.
apt-get install -y -q --no-install-recommends \
  dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
  python3-build python3-installer lintian help2man \
  rpm python3-rpm cpio
# libvirt for tests/test_libvirt.py: libvirtd runs inside the test host (the policy-rc.d guard
# above keeps it from starting on this machine); qemu-system-x86 above is its emulator.
apt-get install -y -q --no-install-recommends libvirt-daemon-system libvirt-clients
python3 -m pip install -q -e "$(dirname "$0")/..[test]"
