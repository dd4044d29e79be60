#!/usr/bin/env bash
# The main job, end to end on one machine: a live migration under load.
#
#   deploy/demo.sh [--mode precopy|postcopy|livefs|hybrid|auto] [--seconds 20]
#
# Builds livemig if needed, then:
#   1. serves a 1 GiB image (256 MiB of data, the rest a hole) with a source
#      livemig plugin, and starts a destination plugin on a missing image;
#   2. runs the verifying writer (lm-workload: 4k random writes over a 256 MiB
#      hot region, queue depth 16) alone for a few seconds: the baseline;
#   3. runs it again and migrates the image under it with migrate-nbd; at
#      handover the writer switches to the destination, as a hypervisor does;
#   4. prints the measures: total migration time, handover pause, bytes on the
#      wire, rounds, the writer's IOPS during migration against without, and
#      checks that every acknowledged write is at the destination and every
#      other byte is the source's.
# Both plugins run on loopback; everything lives in a temporary directory
# that is removed at the end; every process is stopped by PID on exit.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
build=${LIVEMIG_BUILD_DIR:-$root/build}
plugin=$build/plugin/livemig.so
migrate=$build/client-tools/migrate-nbd
workload=$build/client-tools/lm-workload
mode=precopy
seconds=20

while (($#)); do
  case $1 in
    --mode) mode=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

die() {
  echo "demo: $*" >&2
  exit 1
}

if [[ ! -f $plugin || ! -x $migrate || ! -x $workload ]]; then
  echo "demo: building livemig first (deploy/setup.sh)"
  bash "$root/deploy/setup.sh"
fi
for f in "$plugin" "$migrate" "$workload"; do [[ -e $f ]] || die "the build did not produce $f"; done
for tool in nbdkit jq; do
  command -v "$tool" >/dev/null || die "$tool is not installed (deploy/install-deps.sh installs it)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/livemig-demo.XXXXXX")
pids=()

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf -- "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The key both plugins share (there is no built-in key).
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/psk"
chmod 600 "$work/psk"

# Starts a plugin: $1 name, $2 image. Sets ${name}_port.
start_plugin() {
  local name=$1 image=$2 i
  nbdkit -f --exit-with-parent -U "$work/$name.sock" -P "$work/$name.pid" "$plugin" \
    "image=$image" "listen=127.0.0.1:0" "secret=$work/psk" "control=$work/$name.ctl" >"$work/$name.log" 2>&1 &
  pids+=($!)
  for ((i = 0; i < 100; i++)); do
    [[ -s $work/$name.pid ]] && break
    sleep 0.1
  done
  [[ -s $work/$name.pid ]] || { cat "$work/$name.log" >&2; die "the $name plugin did not start"; }
  local port
  port=$("$migrate" status --socket "$work/$name.ctl" --json | jq -r '.from.peer_port')
  printf -v "${name}_port" '%s' "$port"
}

echo "demo: making a 1 GiB source image (256 MiB of data, the rest a hole)"
truncate -s 1G "$work/src.img"
head -c 256M /dev/urandom | dd of="$work/src.img" conv=notrunc bs=1M status=none
cp --sparse=always "$work/src.img" "$work/original.img"   # what the untouched bytes must be

start_plugin src "$work/src.img"
start_plugin dst "$work/dst.img"
echo "demo: source plugin on 127.0.0.1:$src_port, destination plugin on 127.0.0.1:$dst_port (empty image)"

region=$((512 << 20)):$((256 << 20))   # the hot region: 256 MiB inside the hole
run_writer() {  # $1 journal, $2 seconds, $3 json-out, rest: extra args
  local journal=$1 secs=$2 out=$3
  shift 3
  "$workload" write --uri "nbd+unix:///?socket=$work/src.sock" --journal "$journal" --region "$region" \
    --pattern random --queue-depth 16 --duration "$secs" --flush-every 256 --stats-interval 0 \
    --json-out "$out" "$@"
}

echo "demo: baseline: the writer alone for 5 s"
run_writer "$work/journal" 5 "$work/baseline.json" --overwrite >"$work/baseline.log" 2>&1 ||
  { cat "$work/baseline.log" >&2; die "the baseline writer failed"; }

echo "demo: migrating ($mode) while the writer runs for $seconds s"
run_writer "$work/journal" "$seconds" "$work/during.json" --switch-file "$work/switch" --append \
  >"$work/writer.log" 2>&1 &
writer=$!
pids+=("$writer")
sleep 1
"$migrate" start --socket "$work/src.ctl" --to "127.0.0.1:$dst_port" \
  --mode "$mode" --handover auto --handover-size 16M
# The hypervisor's part: when the source has handed over, point the guest at
# the destination.
while :; do
  phase=$("$migrate" status --socket "$work/src.ctl" --json | jq -r '.from.phase')
  case $phase in
    PostCopy|Done) break ;;
    Failed|Cancelled) "$migrate" status --socket "$work/src.ctl"; die "migration $phase" ;;
  esac
  sleep 0.05
done
echo "nbd+unix:///?socket=$work/dst.sock" >"$work/switch"
"$migrate" watch --socket "$work/dst.ctl" --interval 1 >/dev/null || die "the migration did not finish"
wait "$writer" || { cat "$work/writer.log" >&2; die "the writer failed"; }

echo
"$migrate" status --socket "$work/src.ctl"
src_json=$("$migrate" status --socket "$work/src.ctl" --json)
m() { jq -r ".from.migration.$1" <<<"$src_json"; }
base_iops=$(jq -r '.iops' "$work/baseline.json")
during_iops=$(jq -r '.iops' "$work/during.json")
echo
echo "Measures ($mode, loopback, no rate cap):"
awk -v t="$(m total_time_ms)" -v p="$(m handover_pause_ms)" -v w="$(m wire_bytes)" \
    -v r="$(m rounds)" -v why="$(m ready_reason)" -v d="$during_iops" -v b="$base_iops" 'BEGIN {
  printf "  total migration time   %8.2f s\n", t / 1000
  printf "  handover pause         %8d ms\n", p
  printf "  bytes on the wire      %8.1f MiB (256 MiB of data + the 256 MiB the writer wrote, + re-sends)\n", w / 1048576
  printf "  pre-copy rounds        %8d  (%s)\n", r, why
  printf "  writer IOPS            %8.0f during migration, %.0f without (ratio %.2f)\n", d, b, (b > 0 ? d / b : 0)
}'

echo
echo "demo: checking every acknowledged write at the destination"
"$workload" verify --uri "nbd+unix:///?socket=$work/dst.sock" --journal "$work/journal" --region "$region"
echo "demo: checking the bytes the writer never touched"
cmp -n $((512 << 20)) "$work/original.img" "$work/dst.img" ||
  die "the destination differs from the source outside the writer's region"
echo "demo: the destination holds the source's data and every acknowledged write"
