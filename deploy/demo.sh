#!/usr/bin/env bash
# The main job, end to end on one machine: builds livemig if needed, serves a
# 1 GiB sparse image with livemig.so, drives 10 s of 4k random I/O (70% reads,
# 30% writes, iodepth 16) through fio's nbd engine, prints what fio measured,
# then asks the plugin's control socket for its request counters and the five
# hottest segments, and cleans up.
#
#   deploy/demo.sh                 # from any directory
#   LIVEMIG_PLUGIN=/path/livemig.so deploy/demo.sh
#
# Everything lives in a temporary directory that is removed at the end; the
# nbdkit and fio it starts are stopped by PID on exit, on error and on Ctrl-C.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
build=${LIVEMIG_BUILD_DIR:-$root/build}
plugin=${LIVEMIG_PLUGIN:-$build/plugin/livemig.so}
readonly RUNTIME=10

die() {
  echo "demo: $*" >&2
  exit 1
}

if [[ ! -f $plugin ]]; then
  [[ -z ${LIVEMIG_PLUGIN:-} ]] || die "LIVEMIG_PLUGIN=$LIVEMIG_PLUGIN does not exist"
  echo "demo: $plugin is missing, building it first"
  if [[ -f $root/deploy/setup.sh ]]; then
    bash "$root/deploy/setup.sh"
  else
    cmake -S "$root" -B "$build"
    cmake --build "$build" -j2
  fi
  [[ -f $plugin ]] || die "the build did not produce $plugin"
fi

python=/usr/bin/python3
[[ -x $python ]] || python=$(command -v python3) || die "python3 is not installed"
for tool in nbdkit fio jq ps; do
  command -v "$tool" >/dev/null || die "$tool is not installed (deploy/install-deps.sh installs it)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/livemig-demo.XXXXXX")
img=$work/demo.img
sock=$work/nbd.sock
ctrl=$work/control.sock
pidfile=$work/nbdkit.pid
server_pid=""
fio_pid=""

# True while PID is a live (not zombie) process.
alive() {
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $stat != Z* ]]
}

# Stops one child by PID: SIGTERM, up to 5 s grace, then SIGKILL; reaps it.
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $fio_pid ]]; then stop_pid "$fio_pid"; fi
  if [[ -n $server_pid ]]; then stop_pid "$server_pid"; fi
  rm -rf -- "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

truncate -s 1G -- "$img"
echo "demo: serving a 1 GiB sparse image with livemig"
echo "  nbdkit -f -U $sock $plugin image=$img control=$ctrl"
nbdkit -f --exit-with-parent -U "$sock" -P "$pidfile" \
  "$plugin" "image=$img" "control=$ctrl" >"$work/nbdkit.log" 2>&1 &
server_pid=$!
# nbdkit writes the pidfile once it accepts connections.
for ((i = 0; i < 100; i++)); do
  [[ -s $pidfile ]] && break
  if ! alive "$server_pid"; then
    cat -- "$work/nbdkit.log" >&2
    die "nbdkit exited during start-up (log above)"
  fi
  sleep 0.1
done
[[ -s $pidfile ]] || die "nbdkit was not ready after 10 s"
[[ -S $ctrl ]] || die "no control socket at $ctrl"

echo "demo: fio, $RUNTIME s of 4k random I/O (70% read / 30% write, iodepth 16) over nbd+unix"
fio --name=demo --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
  --rw=randrw --rwmixread=70 --bs=4k --iodepth=16 --time_based --runtime="$RUNTIME" \
  --output-format=json --output="$work/fio.json" >"$work/fio.log" 2>&1 &
fio_pid=$!
rc=0
wait "$fio_pid" || rc=$?
fio_pid=""
if ((rc != 0)); then
  cat -- "$work/fio.log" >&2
  die "fio failed (exit $rc, log above)"
fi

echo
echo "What fio measured:"
jq -r '.jobs[0] as $j | ("read", "write") as $d | $j[$d]
  | [$d, .iops, .bw_bytes / 1048576, .clat_ns.percentile["50.000000"] / 1000,
     .clat_ns.percentile["99.000000"] / 1000, .total_ios] | @tsv' "$work/fio.json" |
  while IFS=$'\t' read -r dir iops mibs p50 p99 ios; do
    printf '  %-5s %7.0f IOPS  %6.1f MiB/s  latency p50 %6.0f us, p99 %6.0f us  (%s requests)\n' \
      "$dir" "$iops" "$mibs" "$p50" "$p99" "$ios"
  done
fio_reads=$(jq '.jobs[0].read.total_ios' "$work/fio.json")
fio_writes=$(jq '.jobs[0].write.total_ios' "$work/fio.json")

echo
echo "What livemig counted (control socket, {\"op\":\"stats\",\"top\":5}):"
"$python" - "$ctrl" "$fio_reads" "$fio_writes" <<'EOF'
import json
import socket
import sys

with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.settimeout(5)
    s.connect(sys.argv[1])
    s.sendall(b'{"op":"stats","top":5}\n')
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
reply = json.loads(buf)
if not reply.get("ok"):
    sys.exit(f"demo: stats failed: {reply.get('error')}")

req = reply["requests"]
print(f"  uptime {reply['uptime_seconds']:.1f} s, clients connected now: {reply['connections']}")
for op in ("pread", "pwrite", "flush", "trim", "zero", "extents", "cache"):
    c = req[op]
    line = f"  {op:<8} {c['count']:>9} requests"
    if "bytes" in c:
        line += f"  {c['bytes'] / 1048576:>10.1f} MiB"
    print(line)
print(f"  {'errors':<8} {req['errors']:>9}")
fio_reads, fio_writes = int(sys.argv[2]), int(sys.argv[3])
if (req["pread"]["count"], req["pwrite"]["count"]) == (fio_reads, fio_writes):
    print("  (the same numbers of reads and writes that fio issued)")
else:
    print(f"  (fio issued {fio_reads} reads and {fio_writes} writes)")

heat = reply["heat"]
mib = heat["segment_size"] / 1048576
print()
print(f"Hottest segments ({mib:g} MiB each; score = (w_r*reads + w_w*writes)/2 "
      f"with weights {heat['weights']['read']}/{heat['weights']['write']}, "
      f"decayed with a {heat['half_life_seconds']:g} s half-life):")
print(f"  {'segment':>7}  {'offset':>10}  {'reads':>7}  {'writes':>7}  {'score':>8}")
for seg in heat["segments"]:
    print(f"  {seg['segment']:>7}  {seg['offset'] / 1048576:>6.0f} MiB  {seg['reads']:>7}  "
          f"{seg['writes']:>7}  {seg['score']:>8.1f}")
EOF
echo
echo "demo: done; stopping nbdkit and removing $work"
