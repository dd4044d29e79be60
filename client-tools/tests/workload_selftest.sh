#!/bin/bash
# Self-tests of lm-workload against plain nbdkit servers (file, memory, the
# error filter standing in for a fenced livemig source, and the cache filter in
# writeback mode standing in for a server that loses unflushed writes).
#
#   client-tools/tests/workload_selftest.sh build/client-tools/lm-workload "verify catches a stale block"
#
# Every case starts its own servers in a fresh temporary directory; the EXIT
# trap kills every process it started (by PID) and removes the directory, also
# when a check fails.
set -u

WL=${1:?usage: $0 LM_WORKLOAD CASE}
CASE=${2:?usage: $0 LM_WORKLOAD CASE}
BS=4096

T=$(mktemp -d /tmp/lm-workload-test.XXXXXX)
PIDS=()
declare -A SERVER_PID  # name -> PID of the running nbdkit

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

fail() {
  echo "FAIL ($CASE): $*" >&2
  for f in "$T"/*.out "$T"/*.err; do
    [ -s "$f" ] && { echo "--- $f"; tail -n 30 "$f"; } >&2
  done
  exit 1
}
pass() { echo "PASS: $CASE"; exit 0; }

command -v nbdkit >/dev/null || fail "nbdkit is not installed"

uri() { echo "nbd+unix:///?socket=$T/$1.sock"; }

# start_server NAME NBDKIT-ARGS...: nbdkit serving on $T/NAME.sock.
start_server() {
  local name=$1; shift
  nbdkit -f -U "$T/$name.sock" "$@" >"$T/nbdkit-$name.out" 2>&1 &
  PIDS+=($!)
  SERVER_PID[$name]=$!
  for _ in $(seq 100); do
    [ -S "$T/$name.sock" ] && return 0
    sleep 0.1
  done
  fail "nbdkit $name did not start: $(cat "$T/nbdkit-$name.out")"
}

# kill_server NAME: kill -9 the nbdkit serving NAME (the PID start_server
# started), reap it, forget its PID (it may be reused) and remove its socket.
kill_server() {
  local pid=${SERVER_PID[$1]} p rest=()
  kill -9 "$pid"
  wait "$pid" 2>/dev/null
  for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || rest+=("$p"); done
  PIDS=("${rest[@]}")
  unset "SERVER_PID[$1]"
  rm -f "$T/$1.sock"
}

# The cache filter in writeback mode keeps writes in an unlinked temporary
# file and writes them to the image only on flush or FUA: kill -9 loses
# exactly the acknowledged writes that no completed flush or FUA covered.
LOSSY=(--filter=cache file "$T/img" cache=writeback)

# start_writer ARGS...: lm-workload write ARGS in the background, output in
# $T/write.out / .err, PID in $WPID.
start_writer() {
  "$WL" write "$@" >"$T/write.out" 2>"$T/write.err" &
  WPID=$!
  PIDS+=($WPID)
}

# run NAME ARGS...: run lm-workload, output in $T/NAME.out / .err, status in $RC.
run() {
  local name=$1; shift
  "$WL" "$@" >"$T/$name.out" 2>"$T/$name.err"
  RC=$?
}

expect_rc() { [ "$RC" -eq "$1" ] || fail "$2: exit status $RC, expected $1"; }
expect_in() { grep -qF -- "$2" "$T/$1" || fail "$1 does not contain: $2"; }
expect_not_in() { ! grep -qF -- "$2" "$T/$1" || fail "$1 contains: $2"; }

# json_field FILE KEY: a top-level (or block.KEY) number from --json output.
json_field() {
  python3 -c 'import json,sys
d=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): d=d[k]
print(d)' "$1" "$2"
}

# switch_to NAME: point the switch file at server NAME, atomically.
switch_to() {
  printf '%s\n' "$(uri "$1")" >"$T/switch.tmp"
  mv "$T/switch.tmp" "$T/switch"
}

# wait_for_count NAME TEXT N: until $T/NAME has N lines containing TEXT.
wait_for_count() {
  for _ in $(seq 150); do
    [ "$(grep -cF -- "$2" "$T/$1" 2>/dev/null || true)" -ge "$3" ] 2>/dev/null && return 0
    sleep 0.1
  done
  fail "$1 does not have $3 lines containing: $2"
}

# wait_for_lines FILE N: until FILE has N lines.
wait_for_lines() {
  for _ in $(seq 150); do
    [ -f "$1" ] && [ "$(wc -l <"$1")" -ge "$2" ] && return 0
    sleep 0.1
  done
  fail "$1 does not have $2 lines"
}

truncate -s 64M "$T/img"

case "$CASE" in

"write survives a server switch and verify passes")
  # Two servers on the same image: the switch is the hypervisor's handover.
  start_server a file "$T/img"
  start_server b file "$T/img"
  "$WL" write --uri "$(uri a)" --journal "$T/j" --blocks 2048 --duration 4 --queue-depth 8 \
    --flush-every 200 --fua-every 50 --stats-interval 0.5 --switch-file "$T/switch" \
    --json-out "$T/write.json" >"$T/write.out" 2>"$T/write.err" &
  WPID=$!
  PIDS+=($WPID)
  sleep 1.2
  switch_to b
  wait_for_lines "$T/switch.done" 1
  # Back to a, announced by SIGUSR1, the URI written without a newline.
  sleep 0.5
  printf '%s' "$(uri a)" >"$T/switch.tmp"
  mv "$T/switch.tmp" "$T/switch"
  kill -USR1 "$WPID"
  wait_for_lines "$T/switch.done" 2
  # SIGUSR1 when the switch file names the current server: no switch, no death.
  sleep 0.3
  kill -USR1 "$WPID"
  wait "$WPID"
  RC=$?
  expect_rc 0 "write"
  expect_in write.out "switched to $(uri b) (pause "
  expect_in write.out "switched to $(uri a) (pause "
  expect_in write.out "uri $(uri a)"
  expect_in write.out "uri $(uri b)"
  expect_in write.out "SIGUSR1: switch file names no new server"
  expect_in write.out "done in "
  [ "$(cat "$T/switch.done")" = "switched $(uri b)
switched $(uri a)" ] || fail "switch.done: $(cat "$T/switch.done")"
  [ "$(json_field "$T/write.json" ok)" = True ] || fail "write.json: ok is not true"
  [ "$(json_field "$T/write.json" writes_acked)" -gt 1000 ] || fail "too few writes acknowledged"
  python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))["switches"]; assert len(s)==2 and s[0]["pause_ms"]>=0' \
    "$T/write.json" || fail "write.json: switches"
  run journal journal --journal "$T/j" --json
  expect_rc 0 "journal"
  [ "$(json_field "$T/journal.out" switches)" = 2 ] || fail "journal: switches != 2"
  [ "$(json_field "$T/journal.out" runs_failed)" = 0 ] || fail "journal: a run failed"
  run verify verify --uri "$(uri b)" --journal "$T/j" --blocks 4096
  expect_rc 0 "verify"
  expect_in verify.out "checked 4096 blocks (2048 written, 2048 never written): 4096 ok, 0 mismatched"
  expect_in verify.out "verify OK"
  run durable verify --uri "$(uri b)" --journal "$T/j" --durable-only --json
  expect_rc 0 "verify --durable-only"
  [ "$(json_field "$T/durable.out" mismatched)" = 0 ] || fail "durable-only: mismatches"
  [ "$(json_field "$T/durable.out" mode)" = durable-only ] || fail "durable-only: mode"
  pass
  ;;

"verify catches a stale block")
  start_server a file "$T/img"
  run write write --uri "$(uri a)" --journal "$T/j" --blocks 256 --count 3000 --seed 42 --stats-interval 0
  expect_rc 0 "write"
  run j7 journal --journal "$T/j" --block 7 --json
  OLD=$(json_field "$T/j7.out" block.acked)
  [ "$OLD" -ge 1 ] || fail "block 7 was never written"
  dd if="$T/img" of="$T/block7.old" bs=$BS skip=7 count=1 status=none || fail "dd"
  # Three more writes of block 7 only: its generation moves on.
  run write2 write --uri "$(uri a)" --journal "$T/j" --append --region $((7 * BS)):$BS --count 3 \
    --queue-depth 1 --stats-interval 0
  expect_rc 0 "write --append"
  run j7b journal --journal "$T/j" --block 7 --json
  NEW=$(json_field "$T/j7b.out" block.acked)
  [ "$NEW" -eq $((OLD + 3)) ] || fail "block 7: generation $NEW after 3 more writes of $OLD"
  run verify verify --uri "$(uri a)" --journal "$T/j"
  expect_rc 0 "verify before the corruption"
  # Put the old generation back: a stale block, as a lost write would leave it.
  dd if="$T/block7.old" of="$T/img" bs=$BS seek=7 conv=notrunc status=none || fail "dd"
  run verify2 verify --uri "$(uri a)" --journal "$T/j"
  expect_rc 1 "verify of a stale block"
  expect_in verify2.out "MISMATCH block 7 (offset $((7 * BS))): expected generation $NEW, found generation $OLD"
  expect_in verify2.out ": 255 ok, 1 mismatched"
  expect_in verify2.out "verify FAILED"
  run verify3 verify --uri "$(uri a)" --journal "$T/j" --json
  expect_rc 1 "verify --json"
  python3 -c 'import json,sys
d=json.load(open(sys.argv[1])); m=d["mismatches"]
assert d["ok"] is False and d["mismatched"]==1 and len(m)==1, d
assert m[0]["block"]==7 and m[0]["expected"]["generation_min"]==int(sys.argv[2]), m
assert m[0]["found"]=={"kind":"valid","block":7,"generation":int(sys.argv[3]),"seed":42}, m' \
    "$T/verify3.out" "$NEW" "$OLD" || fail "verify --json does not name block 7"
  pass
  ;;

"verify catches zeroed, misplaced and stray blocks")
  start_server a file "$T/img"
  run write write --uri "$(uri a)" --journal "$T/j" --blocks 256 --count 4000 --stats-interval 0
  expect_rc 0 "write"
  run verify verify --uri "$(uri a)" --journal "$T/j" --blocks 512
  expect_rc 0 "verify before the corruption"
  for b in 3 10 11 20 40; do
    run jb journal --journal "$T/j" --block $b --json
    [ "$(json_field "$T/jb.out" block.acked)" -ge 1 ] || fail "block $b was never written"
  done
  G40=$(json_field "$T/jb.out" block.acked)
  dd if=/dev/zero of="$T/img" bs=$BS seek=3 count=1 conv=notrunc status=none                      # lost
  dd if="$T/img" bs=$BS skip=10 count=1 status=none | dd of="$T/img" bs=$BS seek=11 conv=notrunc status=none  # misplaced
  dd if="$T/img" bs=$BS skip=20 count=1 status=none | dd of="$T/img" bs=$BS seek=300 conv=notrunc status=none # stray
  dd if=/dev/zero of="$T/img" bs=512 seek=$((40 * 8 + 4)) count=4 conv=notrunc status=none        # torn
  run verify2 verify --uri "$(uri a)" --journal "$T/j" --blocks 512
  expect_rc 1 "verify"
  expect_in verify2.out "MISMATCH block 3 (offset $((3 * BS))): expected generation"
  expect_in verify2.out "found zeros"
  expect_in verify2.out "MISMATCH block 11 "
  expect_in verify2.out "found the content of block 10 generation"
  expect_in verify2.out "MISMATCH block 300 (offset $((300 * BS))): expected zeros (never written), found the content of block 20"
  expect_in verify2.out "MISMATCH block 40 "
  expect_in verify2.out "found torn or corrupt (sectors 0-3: block 40 generation $G40; sectors 4-7: zeros)"
  expect_in verify2.out "checked 512 blocks (256 written, 256 never written): 508 ok, 4 mismatched"
  # Without a range only the journal's blocks are read: the stray block is not seen.
  run verify3 verify --uri "$(uri a)" --journal "$T/j"
  expect_rc 1 "verify without a range"
  expect_in verify3.out "253 ok, 3 mismatched"
  # --initial any still rejects this run's data in a never-written block.
  run verify4 verify --uri "$(uri a)" --journal "$T/j" --region $((256 * BS)):$((256 * BS)) --initial any
  expect_rc 1 "verify --initial any"
  expect_in verify4.out "MISMATCH block 300 "
  pass
  ;;

"refused writes are retried after the switch")
  # Server c refuses writes (EPERM) once $T/fence exists, as a fenced source
  # does just before the hypervisor is told to switch.
  start_server c --filter=error file "$T/img" error=EPERM error-pwrite-rate=100% error-file="$T/fence"
  start_server b file "$T/img"
  "$WL" write --uri "$(uri c)" --journal "$T/j" --blocks 1024 --duration 4 --flush-every 100 \
    --stats-interval 0.5 --switch-file "$T/switch" --retry-timeout 30 >"$T/write.out" 2>"$T/write.err" &
  WPID=$!
  PIDS+=($WPID)
  sleep 1
  touch "$T/fence"
  sleep 1
  switch_to b
  wait "$WPID"
  RC=$?
  expect_rc 0 "write"
  expect_in write.out "$(uri c) refuses writes (Operation not permitted)"
  expect_in write.out "switched to $(uri b)"
  expect_in write.out "retrying"
  run journal journal --journal "$T/j" --json
  [ "$(json_field "$T/journal.out" failed_writes)" -gt 0 ] || fail "no refused write was journalled"
  [ "$(json_field "$T/journal.out" runs_failed)" = 0 ] || fail "the run failed"
  run verify verify --uri "$(uri b)" --journal "$T/j" --blocks 1024
  expect_rc 0 "verify"
  expect_in verify.out "0 mismatched"
  pass
  ;;

"refused writes fail loudly after the retry timeout")
  touch "$T/fence"
  start_server c --filter=error file "$T/img" error=EPERM error-pwrite-rate=100% error-file="$T/fence"
  SECONDS=0
  run write write --uri "$(uri c)" --journal "$T/j" --blocks 64 --count 100 --retry-timeout 1.5 --stats-interval 0
  expect_rc 1 "write to a server that always refuses"
  [ "$SECONDS" -lt 20 ] || fail "took $SECONDS s to give up"
  expect_in write.err "not acknowledged after 1.5 s of retries: Operation not permitted"
  run journal journal --journal "$T/j" --json
  [ "$(json_field "$T/journal.out" acks)" = 0 ] || fail "a refused write was journalled as acknowledged"
  [ "$(json_field "$T/journal.out" runs_failed)" = 1 ] || fail "the run is not marked failed"
  # Nothing was acknowledged and nothing landed: every block still reads as zeros.
  rm -f "$T/fence"
  run verify verify --uri "$(uri c)" --journal "$T/j" --blocks 64
  expect_rc 0 "verify"
  pass
  ;;

"durable-only accepts any generation between flushed and issued")
  start_server a file "$T/img"
  run write write --uri "$(uri a)" --journal "$T/j" --blocks 64 --count 500 --stats-interval 0
  expect_rc 0 "write"
  run j5 journal --journal "$T/j" --block 5 --json
  OLD=$(json_field "$T/j5.out" block.acked)
  [ "$(json_field "$T/j5.out" block.durable)" = "$OLD" ] || fail "block 5 not durable after the final flush"
  dd if="$T/img" of="$T/block5.old" bs=$BS skip=5 count=1 status=none
  # Two more writes of block 5, acknowledged but never flushed.
  run write2 write --uri "$(uri a)" --journal "$T/j" --append --region $((5 * BS)):$BS --count 2 \
    --queue-depth 1 --no-final-flush --stats-interval 0
  expect_rc 0 "write --no-final-flush"
  run j5b journal --journal "$T/j" --block 5 --json
  [ "$(json_field "$T/j5b.out" block.acked)" -eq $((OLD + 2)) ] || fail "block 5 acked generation"
  [ "$(json_field "$T/j5b.out" block.durable)" -eq "$OLD" ] || fail "block 5 durable generation"
  # The server "lost" the unflushed writes: the block holds the last durable generation.
  dd if="$T/block5.old" of="$T/img" bs=$BS seek=5 conv=notrunc status=none
  run exact verify --uri "$(uri a)" --journal "$T/j"
  expect_rc 1 "exact verify of an unflushed, lost write"
  expect_in exact.out "MISMATCH block 5 (offset $((5 * BS))): expected generation $((OLD + 2)), found generation $OLD"
  run durable verify --uri "$(uri a)" --journal "$T/j" --durable-only
  expect_rc 0 "durable-only verify"
  # Below the durable generation is a real loss even for --durable-only.
  dd if=/dev/zero of="$T/img" bs=$BS seek=5 count=1 conv=notrunc status=none
  run durable2 verify --uri "$(uri a)" --journal "$T/j" --durable-only
  expect_rc 1 "durable-only verify of a lost durable write"
  expect_in durable2.out "MISMATCH block 5 (offset $((5 * BS))): expected a generation in $OLD..$((OLD + 2)), found zeros"
  pass
  ;;

"a killed and restarted server is reconnected to")
  start_server a file "$T/img"
  start_writer --uri "$(uri a)" --journal "$T/j" --blocks 1024 --duration 4 --flush-every 100 \
    --stats-interval 0.5 --retry-timeout 20
  sleep 1.2
  kill_server a
  sleep 0.5
  start_server a file "$T/img"
  wait "$WPID"
  RC=$?
  expect_rc 0 "write across a server restart"
  expect_in write.err "connection to $(uri a) lost"
  expect_in write.out "reconnected to $(uri a)"
  expect_in write.out "(disconnected)"
  run journal journal --journal "$T/j" --json
  [ "$(json_field "$T/journal.out" failed_writes)" -gt 0 ] || fail "no write was lost with the connection"
  # What the killed server had acknowledged and flushed is there; the rest was
  # retried with the same generation and acknowledged by the new server.
  run durable verify --uri "$(uri a)" --journal "$T/j" --durable-only --blocks 1024
  expect_rc 0 "verify --durable-only"
  pass
  ;;

"durable-only verify does not demand a write acked by a killed server before any flush")
  # The issue: writes acknowledged by a server killed before any flush, then
  # a flush to the restarted server (here the final one) completes. That flush
  # covers only what the restarted server acknowledged.
  start_server a "${LOSSY[@]}"
  start_writer --uri "$(uri a)" --journal "$T/j" --blocks 1024 --rate 200 --duration 3 \
    --stats-interval 0.5 --retry-timeout 20
  sleep 1
  kill_server a
  start_server a "${LOSSY[@]}"
  wait_for_count write.out "reconnected to $(uri a)" 1
  wait "$WPID"
  RC=$?
  expect_rc 0 "write across a server kill"
  run journal journal --journal "$T/j" --json
  [ "$(json_field "$T/journal.out" connections)" = 2 ] || fail "journal: connections != 2"
  [ "$(json_field "$T/journal.out" flushes_done)" = 1 ] || fail "journal: not only the final flush completed"
  # Not vacuous: the killed server lost writes it had acknowledged.
  run exact verify --uri "$(uri a)" --journal "$T/j"
  expect_rc 1 "exact verify after losing unflushed writes"
  expect_in exact.out "found zeros"
  run durable verify --uri "$(uri a)" --journal "$T/j" --durable-only
  expect_rc 0 "verify --durable-only"
  expect_in durable.out " 0 mismatched"
  pass
  ;;

"durable-only verify after a server that loses unflushed writes")
  # Five kill -9 and restarts during one run with periodic flushes and FUA.
  # Throttled over the whole image, so that few lost writes are hidden by a
  # later write of the same block.
  start_server a "${LOSSY[@]}"
  start_writer --uri "$(uri a)" --journal "$T/j" --blocks 16384 --rate 2000 --queue-depth 8 \
    --flush-every 400 --fua-every 61 --stats-interval 0.5 --retry-timeout 20
  for kill in 1 2 3 4 5; do
    sleep 0.6
    kill_server a
    start_server a "${LOSSY[@]}"
    wait_for_count write.out "reconnected to $(uri a)" $kill
  done
  sleep 0.5
  kill -INT "$WPID"
  wait "$WPID"
  RC=$?
  expect_rc 0 "write across 5 server kills"
  run journal journal --journal "$T/j" --json
  [ "$(json_field "$T/journal.out" connections)" = 6 ] || fail "journal: connections != 6"
  [ "$(json_field "$T/journal.out" flushes_done)" -ge 6 ] || fail "journal: too few flushes completed"
  [ "$(json_field "$T/journal.out" fua_acks)" -gt 0 ] || fail "journal: no FUA write"
  run exact verify --uri "$(uri a)" --journal "$T/j" --blocks 16384 --json
  expect_rc 1 "exact verify after losing unflushed writes"
  [ "$(json_field "$T/exact.out" mismatched)" -gt 0 ] || fail "exact verify: no lost write"
  run durable verify --uri "$(uri a)" --journal "$T/j" --blocks 16384 --durable-only --json
  expect_rc 0 "verify --durable-only"
  [ "$(json_field "$T/durable.out" mismatched)" = 0 ] || fail "durable-only: mismatches"
  pass
  ;;

"bad input gives a one-line error")
  start_server a file "$T/img"
  # one_line NAME EXPECTED-TEXT ARGS...: exit status 2 and exactly one line on stderr.
  one_line() {
    local name=$1 text=$2; shift 2
    run "$name" "$@"
    expect_rc 2 "$name"
    [ "$(wc -l <"$T/$name.err")" -eq 1 ] || fail "$name: stderr is not one line: $(cat "$T/$name.err")"
    expect_in "$name.err" "lm-workload: error: "
    expect_in "$name.err" "$text"
  }
  one_line unreachable "cannot connect to $(uri nope)" \
    write --uri "$(uri nope)" --journal "$T/j1" --count 1
  one_line nojournal "cannot create journal $T/no/such/dir/j" \
    write --uri "$(uri a)" --journal "$T/no/such/dir/j" --count 1
  one_line qd "--queue-depth" write --uri "$(uri a)" --journal "$T/j2" --queue-depth 0
  one_line bs "--block-size" write --uri "$(uri a)" --journal "$T/j2" --block-size 1000
  one_line pattern "--pattern hot:2:0.5" write --uri "$(uri a)" --journal "$T/j2" --pattern hot:2:0.5
  one_line region "--region 512:4096: offset and length must be multiples" \
    write --uri "$(uri a)" --journal "$T/j2" --region 512:4096 --count 1
  one_line toobig "--blocks 100000: the export holds only 16384 whole blocks" \
    write --uri "$(uri a)" --journal "$T/j2" --blocks 100000 --count 1
  one_line missing "--uri is required" write --journal "$T/j2"
  one_line nosub "A subcommand is required"
  one_line nojournalfile "cannot open journal $T/none" verify --uri "$(uri a)" --journal "$T/none"
  run ok write --uri "$(uri a)" --journal "$T/j3" --count 10 --stats-interval 0
  expect_rc 0 "write"
  one_line exists "journal $T/j3 already exists" write --uri "$(uri a)" --journal "$T/j3" --count 1
  printf 'garbage that is not a journal, long enough to hold a header.......' >"$T/bad"
  one_line badjournal "is not an lm-workload journal" verify --uri "$(uri a)" --journal "$T/bad"
  # An export that is not a whole number of blocks: the tail is skipped, and said so.
  start_server odd memory $((64 * 1024 * 1024 + 1000))
  run odd write --uri "$(uri odd)" --journal "$T/j4" --count 100 --stats-interval 0
  expect_rc 0 "write to an export with a partial last block"
  expect_in odd.err "the last partial block (1000 bytes at offset 67108864) is skipped"
  # Every --help starts with an example command line.
  for sub in write verify journal; do
    "$WL" $sub --help >"$T/help.out" || fail "$sub --help"
    [ "$(head -n 1 "$T/help.out")" = "Example:" ] || fail "$sub --help does not start with an example"
    sed -n 2p "$T/help.out" | grep -q "^  lm-workload $sub --" || fail "$sub --help: example is not for $sub"
  done
  "$WL" --help >"$T/help.out" || fail "--help"
  for sub in write verify journal; do expect_in help.out "  lm-workload $sub --"; done
  pass
  ;;

*)
  fail "unknown case"
  ;;
esac
