#!/usr/bin/env bash
# Test bed: two "hosts" on one machine (DESIGN.md, "Test bed"). Two network
# namespaces, PREFIX-src and PREFIX-dst, joined by a veth pair whose both ends
# are capped with a tbf qdisc at RATE (default 1gbit, the papers' network).
#
#   deploy/testbed.sh up --name lm-$$ --rate 1gbit    # prints the two addresses
#   deploy/testbed.sh status --name lm-$$
#   deploy/testbed.sh down --name lm-$$
#
# From another script:
#
#   eval "$(deploy/testbed.sh up --name lm-$$ --print-env)"
#   trap 'deploy/testbed.sh down --name lm-$$' EXIT
#   ip netns exec "$LM_TB_SRC_NS" nbdkit ... listen="$LM_TB_SRC_ADDR:10809" secret=...
#
# --print-env prints shell assignments (and nothing else on stdout):
#   LM_TB_NAME     the prefix
#   LM_TB_SRC_NS   PREFIX-src          LM_TB_DST_NS   PREFIX-dst
#   LM_TB_SRC_ADDR 10.250.X.1          LM_TB_DST_ADDR 10.250.X.2
#   LM_TB_SRC_DEV  the veth end in PREFIX-src (lmv-src), LM_TB_DST_DEV (lmv-dst)
#   LM_TB_RATE     the tbf rate as given (e.g. 1gbit)
#
# Everything lives inside the two namespaces: the veth pair is created with
# its ends directly in them, so no interface, address or route appears in the
# caller's namespace, and parallel test beds with different names never
# collide. X is derived from the name (or given with --subnet X); it only has
# to be unique per pair, since each pair has network stacks of its own.
#
# up is idempotent: it creates what is missing and (re)applies addresses and
# qdiscs. down deletes both namespaces (which deletes the veth pair and its
# qdiscs with them); it is safe to run twice and on a half-made test bed.
# It does not kill processes still running inside a namespace (it did not
# start them): it names them on stderr; the namespace goes away when they exit.
#
# Requires root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2 with tc.
set -euo pipefail

prog=testbed.sh

usage() {
  cat <<'EOF'
usage: deploy/testbed.sh up|down|status [--name PREFIX] [--rate RATE] [--subnet X] [--print-env]
  up          create PREFIX-src and PREFIX-dst, joined by a veth pair capped at RATE
              on both ends; prints the two addresses
  down        delete both namespaces (and so the veth pair); safe to repeat
  status      show namespaces, addresses and qdisc counters
  --name P    namespace prefix (default lmtb); use a unique one, e.g. lm-$$
  --rate R    tbf rate, tc syntax (default 1gbit; e.g. 100mbit, 10gbit)
  --subnet X  use 10.250.X.0/30 (0-255); default: derived from the name
  --print-env print shell assignments (LM_TB_*) for eval instead of the summary
example:
  eval "$(deploy/testbed.sh up --name lm-$$ --print-env)"; trap 'deploy/testbed.sh down --name lm-$$' EXIT
EOF
}

die() {
  echo "$prog: $*" >&2
  exit 1
}

cmd=""
name=lmtb
rate=1gbit
subnet=""
print_env=false

while (($# > 0)); do
  case $1 in
    up | down | status)
      [[ -z $cmd ]] || die "more than one command ('$cmd' and '$1')"
      cmd=$1
      shift
      ;;
    --name | --rate | --subnet)
      (($# >= 2)) || die "$1 needs a value (see --help)"
      case $1 in
        --name) name=$2 ;;
        --rate) rate=$2 ;;
        --subnet) subnet=$2 ;;
      esac
      shift 2
      ;;
    --name=* | --rate=* | --subnet=*)
      v=${1#*=}
      case $1 in
        --name=*) name=$v ;;
        --rate=*) rate=$v ;;
        --subnet=*) subnet=$v ;;
      esac
      shift
      ;;
    --print-env)
      print_env=true
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n $cmd ]] || {
  usage >&2
  exit 2
}

# Namespace names end up in /run/netns: keep them to a safe alphabet.
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$ ]] ||
  die "--name '$name': use 1-41 characters of A-Z a-z 0-9 _ . - (starting with a letter or digit)"
src_ns=$name-src
dst_ns=$name-dst
# Interface names live inside the namespaces, so fixed names cannot collide.
src_dev=lmv-src
dst_dev=lmv-dst

if [[ -z $subnet ]]; then
  subnet=$(($(printf '%s' "$name" | cksum | cut -d' ' -f1) % 256))
fi
if ! [[ $subnet =~ ^[0-9]+$ ]] || ((subnet > 255)); then
  die "--subnet must be from 0 to 255"
fi
src_addr=10.250.$subnet.1
dst_addr=10.250.$subnet.2

# Rate in bits per second, from tc's syntax (bit, kbit, mbit, gbit, tbit;
# bps, kbps, ... are bytes per second; binary prefixes kibit... too).
rate_bits() {
  local r=${1,,} num unit mult
  [[ $r =~ ^([0-9]+([.][0-9]+)?)([a-z]*)$ ]] || return 1
  num=${BASH_REMATCH[1]}
  unit=${BASH_REMATCH[3]}
  case $unit in
    "" | bit) mult=1 ;;
    kbit) mult=1000 ;;
    mbit) mult=1000000 ;;
    gbit) mult=1000000000 ;;
    tbit) mult=1000000000000 ;;
    kibit) mult=1024 ;;
    mibit) mult=1048576 ;;
    gibit) mult=1073741824 ;;
    bps) mult=8 ;;
    kbps) mult=8000 ;;
    mbps) mult=8000000 ;;
    gbps) mult=8000000000 ;;
    *) return 1 ;;
  esac
  awk -v n="$num" -v m="$mult" 'BEGIN { printf "%.0f\n", n * m }'
}

ns_exists() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF -- "$1"
}

in_ns() {
  local ns=$1
  shift
  ip netns exec "$ns" "$@"
}

# tbf parameters for a rate. burst: the bucket, at least 1 ms of traffic and
# at least two 64 KiB GSO super-packets (veth passes GSO packets; a packet
# larger than the bucket would be split by tbf at a CPU cost, or dropped).
# latency: how long a packet may wait in the queue; 10 ms is about what a
# 1 Gbit/s switch port buffers (1.25 MB), enough for TCP to fill the link
# without the bufferbloat of tc's usual 50 ms examples.
tbf_args() {
  local bits=$1 bytes_per_s burst
  bytes_per_s=$((bits / 8))
  burst=$((bytes_per_s / 1000))
  ((burst >= 131072)) || burst=131072
  echo "rate $rate burst $burst latency 10ms"
}

cmd_up() {
  local bits
  bits=$(rate_bits "$rate") || die "--rate '$rate': not a tc rate (e.g. 1gbit, 100mbit)"
  ((bits >= 8000)) || die "--rate '$rate' is below 1kbps"

  for ns in "$src_ns" "$dst_ns"; do
    ns_exists "$ns" || ip netns add "$ns" || die "cannot create namespace $ns (root needed)"
  done
  # The veth pair: both ends or none (a half pair is deleted and remade).
  local have_src=false have_dst=false
  in_ns "$src_ns" ip link show dev "$src_dev" >/dev/null 2>&1 && have_src=true
  in_ns "$dst_ns" ip link show dev "$dst_dev" >/dev/null 2>&1 && have_dst=true
  if [[ $have_src != "$have_dst" ]]; then
    in_ns "$src_ns" ip link del dev "$src_dev" 2>/dev/null || true
    in_ns "$dst_ns" ip link del dev "$dst_dev" 2>/dev/null || true
    have_src=false
  fi
  if [[ $have_src == false ]]; then
    # Created from inside src_ns, so not even a transient name appears in
    # the caller's namespace; the peer end goes straight into dst_ns.
    in_ns "$src_ns" ip link add "$src_dev" type veth peer name "$dst_dev" netns "$dst_ns" ||
      die "cannot create the veth pair in $src_ns / $dst_ns"
  fi
  local tbf
  tbf=$(tbf_args "$bits")
  # shellcheck disable=SC2086  # tbf holds several tc words on purpose
  for side in src dst; do
    local ns dev addr
    if [[ $side == src ]]; then ns=$src_ns dev=$src_dev addr=$src_addr; else ns=$dst_ns dev=$dst_dev addr=$dst_addr; fi
    in_ns "$ns" ip link set dev lo up
    in_ns "$ns" ip addr flush dev "$dev" scope global
    in_ns "$ns" ip addr add "$addr/30" dev "$dev"
    in_ns "$ns" ip link set dev "$dev" up
    in_ns "$ns" tc qdisc replace dev "$dev" root tbf $tbf || die "tc tbf on $dev in $ns failed"
  done
  # Both ends must be up before the link carries anything.
  local i
  for ((i = 0; i < 50; i++)); do
    if in_ns "$src_ns" ip -o link show dev "$src_dev" | grep -q 'state UP' &&
      in_ns "$dst_ns" ip -o link show dev "$dst_dev" | grep -q 'state UP'; then
      break
    fi
    sleep 0.05
  done

  if $print_env; then
    printf 'LM_TB_NAME=%q\n' "$name"
    printf 'LM_TB_SRC_NS=%q\nLM_TB_DST_NS=%q\n' "$src_ns" "$dst_ns"
    printf 'LM_TB_SRC_ADDR=%q\nLM_TB_DST_ADDR=%q\n' "$src_addr" "$dst_addr"
    printf 'LM_TB_SRC_DEV=%q\nLM_TB_DST_DEV=%q\n' "$src_dev" "$dst_dev"
    printf 'LM_TB_RATE=%q\n' "$rate"
  else
    echo "test bed '$name' up: link capped at $rate ($tbf) on both ends"
    echo "  source:      namespace $src_ns  address $src_addr  (dev $src_dev)"
    echo "  destination: namespace $dst_ns  address $dst_addr  (dev $dst_dev)"
    echo "  run a host's command with: ip netns exec $src_ns CMD..."
  fi
}

cmd_down() {
  local ns pids
  for ns in "$src_ns" "$dst_ns"; do
    ns_exists "$ns" || continue
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n ${pids// /} ]]; then
      echo "$prog: processes still in $ns: $pids(not killed; the namespace goes away when they exit)" >&2
    fi
    # Deleting a namespace deletes the veth end in it, and with it the peer.
    if ! ip netns del "$ns" 2>/dev/null && ns_exists "$ns"; then
      die "cannot delete namespace $ns"
    fi
  done
  $print_env || echo "test bed '$name' down"
}

cmd_status() {
  local ns dev rc=0
  for ns in "$src_ns" "$dst_ns"; do
    if [[ $ns == "$src_ns" ]]; then dev=$src_dev; else dev=$dst_dev; fi
    if ! ns_exists "$ns"; then
      echo "$ns: absent"
      rc=1
      continue
    fi
    echo "$ns:"
    in_ns "$ns" ip -br addr show dev "$dev" 2>/dev/null | sed 's/^/  /' || {
      echo "  $dev: absent"
      rc=1
    }
    in_ns "$ns" tc -s qdisc show dev "$dev" 2>/dev/null | sed 's/^/  /' || true
  done
  return $rc
}

case $cmd in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
esac
