#!/usr/bin/env bash
# What moving the container's filesystem adds to a live migration's downtime, as root, on the
# two-host test bed. In one run, alternating, RUNS migrations of each of:
#   without   a container with MIB of checksummed memory under a write load (memcheck), its
#             root filesystem as built (busybox and memcheck, a few MiB)
#   with      the same, plus a LAYER_MIB writable layer (64 files of random data written at
#             start) and a process appending random data to a log at APPEND_MB MB/s
# Each host has its own root filesystem, so the layer travels (pclive's default). The report
# gives each run's downtime (pause → the tasks run on the destination, as the source saw it),
# the frozen round's filesystem work and every round's filesystem bytes, then the medians and
# their ratio (the target: at most 1.2). Installs jq and gnuplot-nox if missing.
#
#   scripts/bench-layer.sh [--runs N] [--mib N] [--layer-mib N] [--append-mb N]
#                          [--rate 1gbit|10gbit|none] [--out DIR] [--no-setup]
#
# Defaults: 3 runs each, 256 MiB of memory, a 1024 MiB layer, 10 MB/s of appends, 10gbit.
# Output in --out (default bench-results/layer-DATE): results.jsonl (one line per migration,
# with its report), results.md (the table), layer-rounds.png (filesystem MiB per round, when
# gnuplot could be installed). Everything it creates is removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
mib=256
layer_mib=1024
append_mb=10
rate=10gbit
out=""
setup=1
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=${2:?--runs needs a number}; shift 2 ;;
    --mib) mib=${2:?--mib needs a number}; shift 2 ;;
    --layer-mib) layer_mib=${2:?--layer-mib needs a number}; shift 2 ;;
    --append-mb) append_mb=${2:?--append-mb needs a number}; shift 2 ;;
    --rate) rate=${2:?--rate needs 1gbit, 10gbit or none}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --no-setup) setup=0; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-layer: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
out=${out:-bench-results/layer-$(date +%Y%m%d-%H%M%S)}

if [ "$setup" = 1 ]; then
  bash scripts/setup.sh
  cargo build --release --locked -q -p pclive-workloads
fi
memcheck=$PWD/target/release/memcheck
[ -x "$memcheck" ] || { echo "bench-layer: $memcheck is missing: run without --no-setup" >&2; exit 1; }
command -v jq >/dev/null || apt-get install -y -qq jq >/dev/null
command -v gnuplot >/dev/null || apt-get install -y -qq gnuplot-nox >/dev/null

bed=pclayer
work=$(mktemp -d /tmp/pclive-bench-layer.XXXXXX)
receiver=""
cleanup() {
  set +e
  [ -n "$receiver" ] && kill "$receiver" 2>/dev/null
  bash scripts/testbed.sh down --name "$bed" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$out"
out=$(cd "$out" && pwd)

bash scripts/testbed.sh up --name "$bed" --rate "$rate" >/dev/null
state=/run/pclive-testbed/$bed
addr_of() { bash scripts/testbed.sh env --name "$bed" | awk -v h="$1:" '$1 == h { sub(",", "", $5); print $5 }'; }
ctr_on() { local host=$1; shift; ctr --address "$state/$host/containerd.sock" -n "layer-$host" "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

# The container: memcheck, and with a layer the files and the appending log.
script() { # with|without
  local run="/usr/local/bin/memcheck $mib --status /status --writes-per-tick 256"
  if [ "$1" = with ]; then
    local per=$(( layer_mib / 64 ))
    echo "mkdir -p /data; for i in \$(seq 64); do head -c $(( per * 1048576 )) /dev/urandom > /data/file-\$i; done; \
      touch /layer-ready; \
      (while :; do head -c $(( append_mb * 1024 * 1024 / 10 )) /dev/urandom >> /var-app.log; sleep 0.1; done) & \
      exec $run"
  else
    echo "touch /layer-ready; exec $run"
  fi
}

: > "$out/results.jsonl"
for n in $(seq "$runs"); do
  for kind in without with; do
    id=app-$kind-$n
    for host in src dst; do
      rm -rf "$work/rootfs-$host"
      bash testdata/build-rootfs.sh "$work/rootfs-$host" "$memcheck" >/dev/null
    done
    say "run $n: $kind the layer"
    ctr_on src run -d --null-io --runtime io.containerd.pclive.v2 --rootfs "$work/rootfs-src" "$id" \
      /bin/sh -c "$(script "$kind")" >/dev/null
    for _ in $(seq 1200); do
      [ -e "$work/rootfs-src/layer-ready" ] && grep -q '^pass=1' "$work/rootfs-src/status" 2>/dev/null && break
      sleep 0.1
    done
    grep -q '^pass=' "$work/rootfs-src/status" || { echo "bench-layer: memcheck did not start" >&2; exit 1; }
    sleep 3
    listen="$(addr_of dst):7411"
    pclive receive "$id" --listen "$listen" --key-file "$state/dst/migration.key" --rootfs "$work/rootfs-dst" \
      --address "$state/dst/containerd.sock" --namespace layer-dst --state-dir "$state/dst/pclive" \
      > "$work/receive.log" 2>&1 &
    receiver=$!
    for _ in $(seq 200); do
      bash scripts/testbed.sh exec dst --name "$bed" ss -Hltn "sport = :7411" | grep -q . && break
      sleep 0.05
    done
    if ! pclive migrate "$id" "$listen" --key-file "$state/src/migration.key" \
        --address "$state/src/containerd.sock" --namespace layer-src --state-dir "$state/src/pclive" \
        --json > "$work/report.json" 2> "$work/migrate.log"; then
      echo "bench-layer: the migration failed:" >&2; cat "$work/migrate.log" "$work/receive.log" >&2; exit 1
    fi
    wait "$receiver"; receiver=""
    jq -c --arg kind "$kind" --argjson run "$n" --argjson layer_mib "$layer_mib" --argjson append_mb "$append_mb" \
      '{kind: $kind, run: $run, layer_mib: (if $kind == "with" then $layer_mib else 0 end),
        append_mb: (if $kind == "with" then $append_mb else 0 end),
        downtime_seconds, last_round_seconds, final_dump_seconds, images_seconds,
        rounds: [.precopy.rounds[] | {round, frozen, seconds, bytes, layer_bytes: (.layer.bytes // 0),
                 layer_entries: (.layer.entries // 0), layer_seconds: (.layer.seconds // 0)}]}' \
      "$work/report.json" >> "$out/results.jsonl"
    tail -1 "$out/results.jsonl" | jq -r '"  downtime \(.downtime_seconds)s, frozen round \(.rounds[-1].seconds)s (filesystem \(.rounds[-1].layer_seconds)s, \(.rounds[-1].layer_bytes) bytes)"' >&2
    for host in src dst; do
      ctr_on "$host" task rm -f "$id" >/dev/null 2>&1 || true
      ctr_on "$host" container rm "$id" >/dev/null 2>&1 || true
    done
  done
done

# The table and the ratio of the medians.
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
without=$(jq -r 'select(.kind == "without") | .downtime_seconds' "$out/results.jsonl" | median)
with=$(jq -r 'select(.kind == "with") | .downtime_seconds' "$out/results.jsonl" | median)
ratio=$(awk -v a="$with" -v b="$without" 'BEGIN { printf "%.2f", a / b }')
verdict=$(awk -v r="$ratio" 'BEGIN { print (r <= 1.2) ? "met" : "missed" }')
{
  echo "# Downtime with and without a ${layer_mib} MiB writable layer"
  echo
  echo "$mib MiB of memory under memcheck's write load, $rate, $runs runs each (alternating), $(date -u +%Y-%m-%d)."
  echo "With the layer: 64 files of random data and a log appended at $append_mb MB/s."
  echo
  echo "| run | layer | downtime s | frozen round s | frozen filesystem s | frozen filesystem bytes | filesystem bytes per round (MiB) |"
  echo "|---|---|---|---|---|---|---|"
  jq -r '"| \(.run) | \(.kind) | \(.downtime_seconds * 1000 | round / 1000) | \(.rounds[-1].seconds * 1000 | round / 1000) | \(.rounds[-1].layer_seconds * 1000 | round / 1000) | \(.rounds[-1].layer_bytes) | \([.rounds[].layer_bytes / 1048576 * 10 | round / 10] | map(tostring) | join(", ")) |"' "$out/results.jsonl"
  echo
  echo "Median downtime: without ${without}s, with ${with}s: ratio **${ratio}** (target ≤ 1.2: $verdict)."
} > "$out/results.md"
cat "$out/results.md"

if command -v gnuplot >/dev/null; then
  jq -r 'select(.kind == "with") | .run as $r | .rounds[] | "\($r) \(.round) \(.layer_bytes / 1048576)"' "$out/results.jsonl" > "$work/rounds.dat"
  gnuplot <<EOF
set terminal pngcairo size 800,450
set output "$out/layer-rounds.png"
set title "Filesystem data per pre-copy round (${layer_mib} MiB layer, ${append_mb} MB/s appends)"
set xlabel "round (the last is frozen)"
set ylabel "MiB"
set logscale y
set xtics 1
plot for [r=1:$runs] "$work/rounds.dat" using (\$1 == r ? \$2 : 1/0):(\$3 > 0 ? \$3 : 0.01) with linespoints title sprintf("run %d", r)
EOF
fi
