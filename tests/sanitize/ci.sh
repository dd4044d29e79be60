#!/usr/bin/env bash
# CI's sanitizer check: builds only the unit-test programs and the fuzz
# corpus replayers with ASan+UBSan (build-asan/) and runs them. A few minutes
# on 2 cores from scratch; extra arguments go to ctest.
#
#   bash tests/sanitize/ci.sh
#
# The whole suite (integration tests with nbdkit, a migration under load)
# under ASan+UBSan is `tests/sanitize/run asan`, and under TSan
# `tests/sanitize/run tsan`: too long for every CI run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
start=$SECONDS
rc=0
"$root/tests/sanitize/run" asan --unit-only -j "$(nproc)" "$@" || rc=$?
echo "sanitize/ci.sh: ASan+UBSan unit tests: $([[ $rc == 0 ]] && echo clean || echo FAILED) in $((SECONDS - start)) s"
exit $rc
