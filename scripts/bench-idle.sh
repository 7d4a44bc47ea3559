#!/usr/bin/env bash
# The pause of small, idle containers: pclive's fixed costs, with nothing to copy in the pause.
# As root on Debian 12/13; installs what it needs.
#
#   scripts/bench-idle.sh [--mib 16,256] [--runs 5] [--rate 1gbit|10gbit] [--out DIR]
#                         [--no-setup] [--testbed NAME] [--host-run]
#
# For each size, --runs times: a container holding that many MiB of checksummed memory that it
# only reads (memcheck --writes-per-tick 0) is migrated live from the test bed's source host to
# its destination host (scripts/testbed.sh, a --rate link), and must verify its memory there.
# The pause is pclive's report's downtime (source paused until the destination runs it), with
# its parts: the last round, CRIU's final dump, and the wait for the destination's restore.
# Writes DIR/idle-results.jsonl (one line per run) and prints a table with medians; the target
# (issue 12) is a pause of at most 0.3 s for 16 MiB.
# Where /run is not a tmpfs it runs with a tmpfs /run of its own, as on a standard host, so that
# CRIU keeps its kernel probe between runs (scripts/lib/standard-run.sh); --host-run does not.
# Everything created is removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/standard-run.sh
standard_run "$0" "$@"

sizes=16
runs=5
rate=1gbit
out=""
setup=1
bed=pcidle
while [ $# -gt 0 ]; do
  case "$1" in
    --mib) sizes=${2:?--mib needs a list of sizes}; shift 2 ;;
    --runs) runs=${2:?--runs needs a number}; shift 2 ;;
    --rate) rate=${2:?--rate needs 1gbit, 10gbit or none}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --no-setup) setup=0; shift ;;
    --testbed) bed=${2:?--testbed needs a name}; shift 2 ;;
    --host-run) shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-idle: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
for n in ${sizes//,/ } "$runs"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench-idle: '$n' is not a positive number" >&2; exit 2; }
done
out=${out:-bench-results/idle-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
kdat_cached=false
[ "$(stat -f -c %T /run)" = tmpfs ] && kdat_cached=true

if [ "$setup" = 1 ]; then
  bash scripts/setup.sh
fi
cargo build --release --locked -q -p pclive-workloads

work=$(mktemp -d /tmp/pclive-idle.XXXXXX)
receiver=""
cleanup() {
  set +e
  [ -n "$receiver" ] && kill "$receiver" 2>/dev/null && wait "$receiver" 2>/dev/null
  bash scripts/testbed.sh down --name "$bed" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

bash scripts/testbed.sh up --name "$bed" --rate "$rate" >/dev/null
run_dir=/run/pclive-testbed/$bed
dst_addr=$(bash scripts/testbed.sh env --name "$bed" | awk '/^dst/ { sub(",", "", $5); print $5 }')
ctr_on() { local host=$1; shift; ctr --address "$run_dir/$host/containerd.sock" -n "$bed-$host" "$@"; }

results=$out/idle-results.jsonl
: > "$results"
port=7411
for mib in ${sizes//,/ }; do
  for run in $(seq "$runs"); do
    id=idle-$mib-$run
    port=$((port + 1))
    rootfs=$work/$id-src
    dst_rootfs=$work/$id-dst
    bash testdata/build-rootfs.sh "$rootfs" target/release/memcheck >/dev/null
    bash testdata/build-rootfs.sh "$dst_rootfs" target/release/memcheck >/dev/null
    ctr_on src run -d --null-io --runtime io.containerd.pclive.v2 --rootfs "$rootfs" "$id" \
      /usr/local/bin/memcheck "$mib" --status /status --writes-per-tick 0
    for _ in $(seq 600); do grep -q 'pass=1 ' "$rootfs/status" 2>/dev/null && break; sleep 0.1; done
    grep -q 'pass=1 ' "$rootfs/status" || { echo "bench-idle: $id did not verify its memory on the source" >&2; exit 1; }
    pclive receive "$id" --listen "$dst_addr:$port" --key-file "$run_dir/dst/migration.key" \
      --rootfs "$dst_rootfs" --address "$run_dir/dst/containerd.sock" --namespace "$bed-dst" \
      --state-dir "$run_dir/dst/pclive" > "$work/$id-receive.log" 2>&1 &
    receiver=$!
    for _ in $(seq 200); do
      bash scripts/testbed.sh exec dst --name "$bed" ss -Hltn "sport = :$port" | grep -q . && break
      sleep 0.05
    done
    pclive migrate "$id" "$dst_addr:$port" --key-file "$run_dir/src/migration.key" \
      --address "$run_dir/src/containerd.sock" --namespace "$bed-src" \
      --state-dir "$run_dir/src/pclive" --json > "$work/$id.json" 2> "$work/$id-migrate.log" || {
      echo "bench-idle: migrating $id failed:" >&2; tail -20 "$work/$id-migrate.log" >&2; exit 1; }
    wait "$receiver" || { echo "bench-idle: pclive receive $id failed:" >&2; tail -20 "$work/$id-receive.log" >&2; exit 1; }
    receiver=""
    # Verified on the destination: a full pass over its memory there.
    before=$(sed -n 's/.*pass=\([0-9]*\).*/\1/p' "$rootfs/status")
    verified=false
    for _ in $(seq 300); do
      pass=$(sed -n 's/.*pass=\([0-9]*\).*/\1/p' "$dst_rootfs/status" 2>/dev/null || true)
      if grep -q CORRUPT "$dst_rootfs/status" 2>/dev/null; then break; fi
      if [ -n "$pass" ] && [ "$pass" -ge $((before + 1)) ]; then verified=true; break; fi
      sleep 0.1
    done
    [ "$verified" = true ] || { echo "bench-idle: $id did not verify its memory on the destination: $(cat "$dst_rootfs/status" 2>/dev/null)" >&2; exit 1; }
    jq -c --argjson mib "$mib" --arg rate "$rate" --argjson kdat "$kdat_cached" '
      {mib: $mib, link: $rate, criu_kdat_cached: $kdat, tracker: .precopy.tracker,
       downtime_s: .downtime_seconds, last_round_s: .last_round_seconds,
       final_dump_s: .final_dump_seconds, images_s: .images_seconds,
       commit_wait_s: .commit_wait_seconds, rounds: (.precopy.rounds | length)}' \
      "$work/$id.json" | tee -a "$results"
    ctr_on dst task kill -s KILL "$id" >/dev/null 2>&1 || true
    for _ in $(seq 50); do ctr_on dst task delete "$id" >/dev/null 2>&1 && break; sleep 0.1; done
    ctr_on dst container delete "$id" >/dev/null 2>&1 || true
  done
done

echo
echo "| MiB | runs | pause (median) | min | max | final dump (median) | restore wait (median) | target |"
echo "|---|---|---|---|---|---|---|---|"
for mib in ${sizes//,/ }; do
  jq -rs --argjson mib "$mib" '
    def median: sort | if length % 2 == 1 then .[length / 2 | floor]
                       else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    def s: . * 1000 | round / 1000 | tostring + " s";
    [.[] | select(.mib == $mib)] as $r |
    ($r | map(.downtime_s) | median) as $m |
    "| \($mib) | \($r | length) | \($m | s) | \($r | map(.downtime_s) | min | s) | \($r | map(.downtime_s) | max | s) | \($r | map(.final_dump_s) | median | s) | \($r | map(.commit_wait_s) | median | s) | \(if $mib == 16 then (if $m <= 0.3 then "met (<= 0.3 s)" else "missed (<= 0.3 s)" end) else "-" end) |"' \
    "$results"
done
echo
echo "CRIU's kernel probe kept between runs: $kdat_cached. Raw lines: $results"
