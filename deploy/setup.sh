#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a built livemig:
# installs every dependency (deploy/install-deps.sh), then configures and builds
# with CMake into ./build (or $LIVEMIG_BUILD_DIR).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${LIVEMIG_BUILD_DIR:-$root/build}

bash "$root/deploy/install-deps.sh"
# $LIVEMIG_CMAKE_ARGS: more configure arguments, e.g. "-DCMAKE_UNITY_BUILD=ON"
# (CI: about half the compile time of a fresh build, slower rebuilds after an edit).
# shellcheck disable=SC2086
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-RelWithDebInfo} ${LIVEMIG_CMAKE_ARGS:-}
cmake --build "$build" -j "$(nproc)"
echo "setup: built into $build (plugin: $build/plugin/livemig.so)"
