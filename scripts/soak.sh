#!/usr/bin/env bash
# Soak test of live migration, as root: a container with checksummed memory (memcheck) under a
# write load migrates back and forth between the two emulated hosts (each with its own root
# filesystem, containerd and records) HOPS times. After each hop its memory must verify on the
# new host; at the end nothing may have leaked on either host: file descriptors of containerd and
# the shims, mounts, network namespaces, cgroups, bundles and staging directories, listening
# sockets, processes.
#
#   scripts/soak.sh [--hops N] [--mib N] [--rate 1gbit|10gbit|none] [--streams N] [--out FILE]
#                   [--no-setup]
#
# Defaults: 50 hops of 256 MiB over 10gbit; --streams N migrates with pages on N connections
# of their own (pclive migrate --streams; default: the host's). Prints one JSON line per hop and a summary (also
# written to FILE, default docs/soak-results.jsonl). Everything it creates is removed on exit.
# --no-setup skips scripts/setup.sh (what it installs must be there already).
set -euo pipefail
cd "$(dirname "$0")/.."

hops=50
mib=256
rate=10gbit
out=docs/soak-results.jsonl
setup=1
streams=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hops) hops=${2:?}; shift 2 ;;
    --mib) mib=${2:?}; shift 2 ;;
    --rate) rate=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    --streams) streams=(--streams "${2:?}"); shift 2 ;;
    --no-setup) setup=0; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "soak.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

if [ "$setup" = 1 ]; then bash scripts/setup.sh; fi
cargo build --release --locked -q -p pclive-workloads
memcheck=$PWD/target/release/memcheck

bed=pclivesoak
work=$(mktemp -d /tmp/pclive-soak.XXXXXX)
receiver=""
cleanup() {
  set +e
  [ -n "$receiver" ] && kill "$receiver" 2>/dev/null
  bash scripts/testbed.sh down --name "$bed" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

bash scripts/testbed.sh up --name "$bed" --rate "$rate" >/dev/null
state=/run/pclive-testbed/$bed
addr_of() { bash scripts/testbed.sh env --name "$bed" | awk -v h="$1:" '$1 == h { sub(",", "", $5); print $5 }'; }
sock_of() { echo "$state/$1/containerd.sock"; }
ns_of() { echo "soak-$1"; }
ctr_on() { local host=$1; shift; ctr --address "$(sock_of "$host")" -n "$(ns_of "$host")" "$@"; }
other() { [ "$1" = src ] && echo dst || echo src; }

# Each host has its own root filesystem, as two machines would.
for host in src dst; do
  bash testdata/build-rootfs.sh "$work/rootfs-$host" "$memcheck" >/dev/null
done

status_of() { cat "$work/rootfs-$1/status" 2>/dev/null || true; }
pass_of() { status_of "$1" | sed -n 's/^pass=\([0-9]*\).*/\1/p'; }
wait_passes() { # host passes-after
  local host=$1 want=$2 _ p
  for _ in $(seq 1200); do
    case "$(status_of "$host")" in CORRUPT*) echo "soak: memcheck found corrupt memory on $host: $(status_of "$host")" >&2; exit 1 ;; esac
    p=$(pass_of "$host"); [ -n "$p" ] && [ "$p" -ge "$want" ] && return 0
    sleep 0.1
  done
  echo "soak: memcheck did not verify on $host (status: $(status_of "$host"))" >&2; exit 1
}

# What a host holds that a migration could leak.
snapshot() {
  local host=$1 pids pid fds=0
  pids=$(cat "$state/$host/containerd.pid"; pgrep -f "containerd-shim-pclive-v2.*-namespace $(ns_of "$host")" || true)
  for pid in $pids; do fds=$(( fds + $(ls "/proc/$pid/fd" 2>/dev/null | wc -l) )); done
  printf 'processes=%s fds=%s mounts=%s cgroups=%s bundles=%s listeners=%s\n' \
    "$(pgrep -fc "containerd-shim-pclive-v2.*(-namespace $(ns_of "$host")|--state-dir $state/$host)" || true)" \
    "$fds" \
    "$(grep -c " $state/$host/" /proc/mounts || true)" \
    "$(find /sys/fs/cgroup/*/"$(ns_of "$host")" -mindepth 1 -type d 2>/dev/null | wc -l)" \
    "$(ls "$state/$host/state/io.containerd.runtime.v2.task/$(ns_of "$host")" 2>/dev/null | wc -l)" \
    "$(bash scripts/testbed.sh exec "$host" --name "$bed" ss -Hltn 2>/dev/null | wc -l)"
}

here=src
ctr_on src run -d --null-io --runtime io.containerd.pclive.v2 --rootfs "$work/rootfs-src" app \
  "$(echo /usr/local/bin/memcheck)" "$mib" --status /status --writes-per-tick 256 >/dev/null
wait_passes src 2
before_src=$(snapshot src); before_dst=$(snapshot dst); netns_before=$(ip netns list | wc -l)
# pclive's temporary directories (find, not ls: no match is 0, not an error under pipefail).
pclive_tmp_dirs() { find /tmp -maxdepth 1 \( -name 'pclive-migrate-*' -o -name 'pclive-receive-*' \) | wc -l; }
tmp_before=$(pclive_tmp_dirs)
echo "soak: $hops hops of $mib MiB over $rate; before: src {$before_src} dst {$before_dst}" >&2

: > "$work/results.jsonl"
for hop in $(seq "$hops"); do
  there=$(other "$here")
  listen="$(addr_of "$there"):7411"
  started=$(date +%s.%N)
  pclive receive app --listen "$listen" --key-file "$state/$there/migration.key" --rootfs "$work/rootfs-$there" \
    --address "$(sock_of "$there")" --namespace "$(ns_of "$there")" \
    --state-dir "$state/$there/pclive" > "$work/receive.log" 2>&1 &
  receiver=$!
  for _ in $(seq 200); do
    bash scripts/testbed.sh exec "$there" --name "$bed" ss -Hltn "sport = :7411" | grep -q . && break
    sleep 0.05
  done
  if ! pclive migrate app "$listen" --key-file "$state/$here/migration.key" --address "$(sock_of "$here")" \
      --namespace "$(ns_of "$here")" --state-dir "$state/$here/pclive" --json ${streams[@]+"${streams[@]}"} \
      > "$work/report.json" 2> "$work/migrate.log"; then
    echo "soak: hop $hop ($here → $there) failed:" >&2; cat "$work/migrate.log" "$work/receive.log" >&2; exit 1
  fi
  wait "$receiver" || { echo "soak: pclive receive failed on hop $hop" >&2; cat "$work/receive.log" >&2; exit 1; }
  receiver=""
  # The source's copy is gone: remove what containerd keeps of it.
  ctr_on "$here" task delete app >/dev/null 2>&1 || true
  ctr_on "$here" container delete app >/dev/null
  wait_passes "$there" $(( $(pass_of "$there") + 2 ))
  jq -c --argjson hop "$hop" --arg from "$here" --arg to "$there" \
    --argjson seconds "$(echo "$(date +%s.%N) - $started" | bc)" \
    '{hop: $hop, from: $from, to: $to, seconds: $seconds, downtime_s: .downtime_seconds,
      rounds: (.precopy.rounds | length), frozen_until_commit_s: .frozen_until_commit_seconds,
      page_streams: .page_streams, last_round_s: .last_round_seconds,
      frozen_round_sent_s: .dump_overlap.sent_seconds, dump_s: .dump_overlap.dump_seconds}' \
    "$work/report.json" | tee -a "$work/results.jsonl"
  here=$there
done

# Back where it started (an even number of hops) or not, the hosts must hold what they held
# with one container and nothing else.
after_src=$(snapshot src); after_dst=$(snapshot dst)
if [ "$here" = dst ]; then a=$before_src; before_src=$before_dst; before_dst=$a; fi
netns_after=$(ip netns list | wc -l)
tmp_after=$(pclive_tmp_dirs)
leaks=""
[ "$after_src" = "$before_src" ] || leaks="$leaks src: {$before_src} → {$after_src};"
[ "$after_dst" = "$before_dst" ] || leaks="$leaks dst: {$before_dst} → {$after_dst};"
[ "$netns_after" = "$netns_before" ] || leaks="$leaks network namespaces $netns_before → $netns_after;"
[ "$tmp_after" = "$tmp_before" ] || leaks="$leaks temporary directories $tmp_before → $tmp_after;"
summary=$(jq -sc --arg leaks "$leaks" --arg rate "$rate" --argjson mib "$mib" '{
  hops: length, mib: $mib, rate: $rate,
  downtime_s: {min: (map(.downtime_s) | min), median: (map(.downtime_s) | sort | .[length/2|floor]), max: (map(.downtime_s) | max)},
  hop_s: {median: (map(.seconds) | sort | .[length/2|floor]), max: (map(.seconds) | max)},
  leaks: (if $leaks == "" then "none" else $leaks end)}' "$work/results.jsonl")
echo "$summary"
cat "$work/results.jsonl" > "$out"
echo "$summary" >> "$out"
[ -z "$leaks" ] || { echo "soak: leaked:$leaks" >&2; exit 1; }
echo "soak: $hops hops, memory verified after each, nothing leaked" >&2
