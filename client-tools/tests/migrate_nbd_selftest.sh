#!/bin/bash
# Self-test of migrate-nbd against real nbdkit processes running the livemig
# plugin on loopback: a whole pre-copy migration, verify (equal, then one
# flipped byte), status --json, handover, cancel, a running migration refused,
# wrong secrets, unreachable ports, bad options and every --help.
#
#   client-tools/tests/migrate_nbd_selftest.sh build/plugin/livemig.so build/client-tools/migrate-nbd
#
# Everything lives in a fresh temporary directory; the EXIT trap kills every
# process this script started (by PID) and removes the directory, also when a
# check fails.
set -u

PLUGIN=${1:?usage: $0 PLUGIN MIGRATE_NBD}
TOOL=${2:?usage: $0 PLUGIN MIGRATE_NBD}
MB=$((1024 * 1024))
SIZE_MB=32

T=$(mktemp -d /tmp/migrate-nbd-test.XXXXXX)
# The key of the plugins started below (there is no built-in key).
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$T/psk"
chmod 600 "$T/psk"
export LIVEMIG_SECRET_FILE=$T/psk
PIDS=()

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

CHECK="setup"
fail() {
  echo "FAIL ($CHECK): $*" >&2
  for f in "$T"/*.out "$T"/*.err "$T"/*.log; do
    [ -s "$f" ] && { echo "--- $f"; tail -n 30 "$f"; } >&2
  done
  exit 1
}
check() { CHECK=$1; }
ok() { echo "PASS: $CHECK"; }

for cmd in nbdkit jq python3; do
  command -v "$cmd" >/dev/null || fail "$cmd is not installed"
done
[ -f "$PLUGIN" ] || fail "no plugin at $PLUGIN"
[ -x "$TOOL" ] || fail "no migrate-nbd at $TOOL"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# run NAME ARGS...: migrate-nbd with output in $T/NAME.out / .err, status in $RC.
run() {
  local name=$1; shift
  "$TOOL" "$@" >"$T/$name.out" 2>"$T/$name.err"
  RC=$?
}
expect_rc() { [ "$RC" -eq "$1" ] || fail "exit status $RC, expected $1"; }
expect_in() { grep -qF -- "$2" "$T/$1" || fail "$1 does not contain: $2"; }
expect_lines() {
  local n
  n=$(wc -l <"$T/$1")
  [ "$n" -eq "$2" ] || fail "$1 has $n lines, expected $2"
}

# start_plugin NAME IMAGE [KEY=VALUE...]: nbdkit with the plugin, peer port
# in PORT_NAME, control socket $T/NAME.ctl, key $T/psk unless a secret= is
# given. Waits until the port answers.
start_plugin() {
  local name=$1 image=$2; shift 2
  local port
  port=$(free_port)
  eval "PORT_$name=$port"
  nbdkit -f -U "$T/$name.nbd" -P "$T/$name.pid" "$PLUGIN" image="$image" \
    listen="127.0.0.1:$port" control="$T/$name.ctl" secret="$T/psk" "$@" >"$T/nbdkit-$name.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do
    if [ -S "$T/$name.ctl" ] && python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$port" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  fail "nbdkit $name did not start"
}

# make_source IMAGE: random data and holes (the holes cross as zero notes).
make_source() {
  truncate -s "${SIZE_MB}M" "$1"
  local at
  for at in 0 5 6 7 20; do
    head -c $MB /dev/urandom | dd of="$1" bs=$MB seek="$at" conv=notrunc status=none
  done
  head -c 4096 /dev/urandom | dd of="$1" bs=4096 seek=$(((SIZE_MB * MB - 4096) / 4096)) conv=notrunc status=none
}

# flip_byte IMAGE OFFSET
flip_byte() {
  python3 - "$1" "$2" <<'EOF'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2]))
    b = f.read(1)
    f.seek(int(sys.argv[2]))
    f.write(bytes([b[0] ^ 0xFF]))
EOF
}

# wait_phase NAME PHASE: until the plugin's control socket reports PHASE.
wait_phase() {
  for _ in $(seq 300); do
    "$TOOL" status --socket "$T/$1.ctl" --json >"$T/phase.out" 2>/dev/null &&
      [ "$(jq -r .from.phase "$T/phase.out")" = "$2" ] && return 0
    sleep 0.1
  done
  fail "$1 did not reach phase $2 (last: $(jq -c '.from | {phase, last_error}' "$T/phase.out" 2>/dev/null))"
}

# ------------------------------------------------------------------ no plugin needed

check "every --help starts with an example command line"
run help --help
expect_rc 0
head -n 1 "$T/help.out" | grep -q '^Example: migrate-nbd ' || fail "top-level --help starts with: $(head -n 1 "$T/help.out")"
for sub in start status watch handover cancel release verify; do
  run help "$sub" --help
  expect_rc 0
  head -n 1 "$T/help.out" | grep -q "^Example: migrate-nbd $sub " ||
    fail "$sub --help starts with: $(head -n 1 "$T/help.out")"
done
ok

check "a bad --mode is refused with one line and status 2"
run badmode start --from 127.0.0.1:1 --to 127.0.0.1:2 --mode fastest
expect_rc 2
expect_in badmode.err "--mode 'fastest': must be precopy, postcopy, livefs, hybrid or auto"
expect_lines badmode.err 1
ok

check "a bad size or rate is refused with one line and status 2"
run badsize start --from 127.0.0.1:1 --to 127.0.0.1:2 --mode precopy --handover-size 12Q
expect_rc 2
expect_in badsize.err "--handover-size '12Q'"
expect_lines badsize.err 1
run badrate start --from 127.0.0.1:1 --to 127.0.0.1:2 --mode precopy --max-rate fast
expect_rc 2
expect_in badrate.err "--max-rate 'fast'"
run badzstd start --from 127.0.0.1:1 --to 127.0.0.1:2 --mode precopy --compression zstd:99
expect_rc 2
expect_in badzstd.err '--compression: compression "zstd:99" must be auto, off, zstd or zstd:LEVEL (LEVEL from -7 to 19)'
expect_lines badzstd.err 1
run badaddr status --from nowhere
expect_rc 2
expect_in badaddr.err "--from"
run noside status
expect_rc 2
expect_in noside.err "--from HOST:PORT (or --socket PATH) is required"
run unknown status --from 127.0.0.1:1 --frobnicate
expect_rc 2
expect_lines unknown.err 1
ok

check "an unreachable port fails clearly"
DEAD=$(free_port)
run dead status --from "127.0.0.1:$DEAD"
expect_rc 1
expect_in dead.err "migrate-nbd: cannot reach 127.0.0.1:$DEAD: Connection refused"
expect_lines dead.err 1
run deadsock status --socket "$T/nothing.ctl"
expect_rc 1
expect_in deadsock.err "cannot reach control socket $T/nothing.ctl"
ok

# ------------------------------------------------------------------ a whole migration

make_source "$T/a.img"
: >"$T/b.img"
start_plugin A "$T/a.img"
start_plugin B "$T/b.img"
FROM=127.0.0.1:$PORT_A
TO=127.0.0.1:$PORT_B

check "status of an idle plugin, remote and through the control socket"
run idle status --from "$FROM" --to "$TO"
expect_rc 0
expect_in idle.out "phase           Idle"
expect_in idle.out "migration       none"
run idlesock status --socket "$T/A.ctl" --json
expect_rc 0
[ "$(jq -r .from.phase "$T/idlesock.out")" = Idle ] || fail "status --socket --json: $(cat "$T/idlesock.out")"
ok

check "--version: migrate-nbd's is the plugin's (both from CMake's project version)"
run version --version
expect_rc 0
expect_lines version.out 1
plugin_version=$(jq -r .from.version "$T/idlesock.out")
[ -n "$plugin_version" ] && [ "$plugin_version" != null ] || fail "status has no version: $(cat "$T/idlesock.out")"
expect_in version.out "migrate-nbd $plugin_version"
ok

check "start --mode precopy --handover auto --wait finishes with Done"
run start start --from "$FROM" --to "$TO" --mode precopy --handover auto --handover-size 1M \
  --max-rate 1Gbit --transfer-unit 256K --compression zstd:3 --wait --interval 0.2 --timeout 60
expect_rc 0
expect_in start.out "started: precopy from $FROM to $TO"
expect_in start.out " Done: total time "
ok

check "verify says equal and exits 0"
run verify verify --from "$FROM" --to "$TO" --range-size 1M
expect_rc 0
expect_in verify.out "images are equal ($SIZE_MB ranges of 1 MiB, xxh3-64)"
run verify64 verify --from "$FROM" --to "$TO"
expect_rc 0
expect_in verify64.out "images are equal (1 ranges of 64 MiB, xxh3-64)"
ok

check "status --json parses and shows phase Done on both sides"
run json status --from "$FROM" --to "$TO" --json
expect_rc 0
jq -e '.from.phase == "Done" and .to.phase == "Done" and .from.role == "source" and .to.role == "destination"' \
  "$T/json.out" >/dev/null || fail "status --json: $(jq -c '{from: .from.phase, to: .to.phase}' "$T/json.out")"
jq -e '.from.migration.blocks_left == 0 and .from.migration.total_time_ms >= 0' "$T/json.out" >/dev/null ||
  fail "status --json migration block: $(jq -c .from.migration "$T/json.out")"
run human status --from "$FROM" --to "$TO"
expect_rc 0
expect_in human.out "phase           Done"
expect_in human.out "blocks left     0 of 8192 (100.0% done)"
expect_in human.out "handover pause  "
expect_in human.out "compression     zstd:3: compressing at level 3"  # random data: every frame crossed plain
jq -e '.from.migration.compression.setting == "zstd:3" and (.from.migration.compression.frames // 0) == 0' \
  "$T/json.out" >/dev/null || fail "status --json compression: $(jq -c .from.migration.compression "$T/json.out")"
ok

check "watch of a finished migration prints one line and exits 0"
run watch watch --from "$FROM" --to "$TO"
expect_rc 0
expect_in watch.out "Done"
ok

check "a flipped byte in the destination makes verify exit 1 naming the range"
flip_byte "$T/b.img" $((6 * MB + 12345))
run differ verify --from "$FROM" --to "$TO" --range-size 1M
expect_rc 1
expect_in differ.out "images differ in 1 of $SIZE_MB ranges of 1 MiB"
expect_in differ.out "offset $((6 * MB)) (6 MiB), length $MB (1 MiB)"
run differjson verify --from "$FROM" --to "$TO" --range-size 1M --json
expect_rc 1
jq -e ".equal == false and .differing == [{\"offset\": $((6 * MB)), \"length\": $MB}]" "$T/differjson.out" >/dev/null ||
  fail "verify --json: $(cat "$T/differjson.out")"
ok

check "verify of images of different sizes says so"
truncate -s 4M "$T/c.img"
start_plugin C "$T/c.img"
run sizes verify --from "$FROM" --to "127.0.0.1:$PORT_C"
expect_rc 1
expect_in sizes.out "images differ in size"
ok

# ------------------------------------------------------------------ a running migration

make_source "$T/d.img"
: >"$T/e.img"
start_plugin D "$T/d.img"
start_plugin E "$T/e.img"
FROM=127.0.0.1:$PORT_D
TO=127.0.0.1:$PORT_E

check "start while a migration is running fails with the plugin's message"
run slow start --from "$FROM" --to "$TO" --mode precopy --handover explicit --max-rate 2M
expect_rc 0
run again start --from "$FROM" --to "$TO" --mode precopy
expect_rc 1
expect_in again.err "migrate-nbd: $FROM: a migration is already running here (source in phase"
expect_lines again.err 1
ok

check "cancel stops a running migration; the source keeps its image"
run cancel cancel --from "$FROM"
expect_rc 0
expect_in cancel.out "migration cancelled (phase Cancelled)"
run cancelled status --from "$FROM" --json
expect_rc 0
jq -e '.from.phase == "Cancelled" and .from.authoritative == true' "$T/cancelled.out" >/dev/null ||
  fail "after cancel: $(jq -c '.from | {phase, authoritative, io_mode}' "$T/cancelled.out")"
run cancel2 cancel --from "$FROM"
expect_rc 1
expect_in cancel2.err "no migration to cancel"
ok

check "release forgets the cancelled migration at both sides"
run release release --from "$FROM" --to "$TO"
expect_rc 0
expect_in release.out "released $FROM (was Cancelled)"
ok

check "handover of a migration that waits for it prints the pause, then Done"
run again2 start --from "$FROM" --to "$TO" --mode precopy --handover explicit --handover-size 1M
expect_rc 0
wait_phase D Sync
for _ in $(seq 100); do
  "$TOOL" status --socket "$T/D.ctl" --json >"$T/ready.out" 2>/dev/null
  [ "$(jq -r .from.migration.ready "$T/ready.out")" = true ] && break
  sleep 0.1
done
run handover handover --from "$FROM"
expect_rc 0
expect_in handover.out "handover done: storage paused for "
run watch2 watch --from "$FROM" --to "$TO" --interval 0.2
expect_rc 0
expect_in watch2.out "Done: total time"
run verify2 verify --socket "$T/D.ctl" --to "$TO" --range-size 4M
expect_rc 0
expect_in verify2.out "images are equal (8 ranges of 4 MiB, xxh3-64)"
run rel2 release --to "$TO"
expect_rc 0
expect_in rel2.out "released $TO (was Done)"
run rel3 release --socket "$T/D.ctl" --json
expect_rc 0
jq -e '.from.was == "Done" and .from.fenced == true' "$T/rel3.out" >/dev/null || fail "release --json: $(cat "$T/rel3.out")"
ok

# ------------------------------------------------------------------ secrets

head -c 32 /dev/urandom | base64 >"$T/key1"
head -c 32 /dev/urandom | base64 >"$T/key2"
chmod 600 "$T/key1" "$T/key2"
make_source "$T/g.img"
: >"$T/h.img"
start_plugin G "$T/g.img" secret="$T/key1"
start_plugin H "$T/h.img" secret="$T/key1"
FROM=127.0.0.1:$PORT_G
TO=127.0.0.1:$PORT_H

check "a wrong secret fails with an authentication error"
run wrong status --from "$FROM" --secret "$T/key2"
expect_rc 1
expect_in wrong.err "authentication failed at $FROM: wrong secret"
expect_lines wrong.err 1
LIVEMIG_SECRET_FILE= run nokey start --from "$FROM" --to "$TO" --mode precopy
expect_rc 1
expect_in nokey.err "no key to authenticate to $FROM: give --secret FILE or set LIVEMIG_SECRET_FILE"
run nofile status --from "$FROM" --secret "$T/missing-key"
expect_rc 1
expect_in nofile.err "$T/missing-key"
ok

check "a plugin without secret= makes its own random key, mode 0600, and only it works"
: >"$T/k.img"
nbdkit -f -U "$T/K.nbd" "$PLUGIN" image="$T/k.img" listen="127.0.0.1:$(free_port)" control="$T/K.ctl" \
  >"$T/nbdkit-K.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$T/K.ctl" ] && break; sleep 0.1; done
run kstatus status --socket "$T/K.ctl" --json
expect_rc 0
KEYFILE=$(jq -r .from.secret_file "$T/kstatus.out")
[ "$KEYFILE" = "$T/k.img.livemig-key" ] || fail "secret_file is '$KEYFILE'"
[ "$(stat -c %a "$KEYFILE")" = 600 ] || fail "$KEYFILE has mode $(stat -c %a "$KEYFILE")"
KPORT=$(jq -r .from.peer_port "$T/kstatus.out")
run kown status --from "127.0.0.1:$KPORT" --secret "$KEYFILE"
expect_rc 0
run kother status --from "127.0.0.1:$KPORT" --secret "$T/psk"
expect_rc 1
expect_in kother.err "wrong secret"
ok

check "the right secret, from --secret or LIVEMIG_SECRET_FILE, migrates"
run right status --from "$FROM" --to "$TO" --secret "$T/key1"
expect_rc 0
LIVEMIG_SECRET_FILE=$T/key1 run envkey start --from "$FROM" --to "$TO" --mode postcopy --handover auto --wait --json
expect_rc 0
jq -e '.result == "Done" and .from.phase == "Done" and (.migration.migration_id | length) > 0' "$T/envkey.out" >/dev/null ||
  fail "start --wait --json: $(jq -c '{result, from: .from.phase}' "$T/envkey.out")"
LIVEMIG_SECRET_FILE=$T/key1 run verify3 verify --from "$FROM" --to "$TO"
expect_rc 0
expect_in verify3.out "images are equal"
ok

echo "PASS: all migrate-nbd checks"
