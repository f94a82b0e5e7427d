#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine, as root. Idempotent.
#   libsystemd-dev, pkg-config, gcc: pystemd builds from source against libsystemd
#   prometheus: promtool and a real Prometheus for the end-to-end tests
#   dbus, systemd: the real systemd test host (tests/testhost)
#   openssl: certificates for the TLS tests
#   qemu-system-x86, linux-image-amd64, debootstrap, e2fsprogs: the cgroup v2 guest (tests/vm)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  libsystemd-dev pkg-config gcc \
  prometheus \
  dbus systemd util-linux procps curl openssl \
  qemu-system-x86 linux-image-amd64 debootstrap e2fsprogs
python3 -m pip install -q -e "$(dirname "$0")/..[test]"
