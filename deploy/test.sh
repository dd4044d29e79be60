#!/usr/bin/env bash
# Installs, builds and runs the whole test suite (unit and integration tests)
# with CTest. Extra arguments go to ctest (e.g. -R integration).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${LIVEMIG_BUILD_DIR:-$root/build}

bash "$root/deploy/setup.sh"
cd "$build"
ctest --output-on-failure --timeout 600 -j "$(nproc)" "$@"
