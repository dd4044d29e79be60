#!/usr/bin/env bash
# Installs every Debian 12 package livemig's build, tests and benchmarks need.
# Idempotent: packages already present are left alone; `apt-get update` runs
# at most once per invocation and only when something is missing.
set -euo pipefail

PACKAGES=(
  # build
  build-essential cmake pkg-config git
  nbdkit nbdkit-plugin-dev libnbd-dev
  libboost-dev libboost-system-dev libfmt-dev nlohmann-json3-dev
  libcli11-dev libssl-dev libxxhash-dev libzstd-dev libsqlite3-dev
  catch2 libfuse3-dev
  prometheus-cpp-dev # livemigd's metrics (--metrics-listen): the pull exposer
  perl               # pod2man, podchecker: the man pages (docs/man)
  # tests and benchmarks
  libnbd-bin python3-libnbd fio qemu-utils iproute2 jq   # libnbd-bin has nbdfuse
  procps util-linux socat
  systemd            # systemd-analyze: the units' hardening test (test_units); systemd.pc (unit dir)
  # tests/packaging: man and groff render the pages; bash-completion's .pc
  # names the completions directory (the build's too) and it has the loader
  man-db groff-base bash-completion
  # the Python integration tests' runner (tests/integration, ctest -R integration)
  python3-pytest
  # a real Prometheus server (and promtool) scrapes livemigd in test_livemigd_metrics
  prometheus
  # TLS test credentials (x509 certificates, good and bad)
  python3-cryptography
  # faultfs (tests/faults): the FUSE file system that fails on command
  fuse3
  # fuzzing (tests/fuzz/run): clang and its runtime, which has libFuzzer.
  # (The sanitizer builds use g++'s libasan, libubsan, libtsan: build-essential.)
  clang-14 libclang-rt-14-dev
  # QEMU contenders and the hypervisor end-to-end test; charts
  qemu-system-x86 qemu-system-common gnuplot-nox
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  SUDO=sudo
else
  SUDO=
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
