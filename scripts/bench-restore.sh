#!/usr/bin/env bash
# Benchmark: eager vs lazy restore time as container memory grows, measured in the same run.
#
#   scripts/bench-restore.sh [--sizes "256 1024 2048"] [--runs 3] [--out DIR] [--host-run]
#
# For each size (MiB) a container holding that much checksummed private memory (memcheck) is
# checkpointed once; then it is restored eagerly (CRIU fills memory before the tasks resume) and
# lazily (tasks resume at once, pclive's lazy-pages server installs memory with userfaultfd),
# alternately, --runs times each. Restore time = wall time of `ctr run -d` of the restoring
# container (containerd → shim → runc restore → task running). Every restore is verified: memcheck
# must complete a full pass over its memory afterwards. Prints a Markdown table and writes JSON
# lines to DIR/bench-restore.jsonl. Run as root; installs what it needs (scripts/setup.sh).
# Where /run is not a tmpfs it runs with a tmpfs /run of its own, as on a standard host, so that
# CRIU keeps its kernel probe between runs (scripts/lib/standard-run.sh); --host-run does not.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/standard-run.sh
standard_run "$0" "$@"

sizes="256 1024 2048"
runs=3
out=target/bench
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) sizes=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --host-run) shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-restore.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh >/dev/null
cargo build --release --locked -q -p pclive-workloads
mkdir -p "$out"
jsonl=$(realpath "$out")/bench-restore.jsonl
: > "$jsonl"

. scripts/lib/containerd.sh
work=$(mktemp -d /tmp/pclive-bench.XXXXXX)
ns=pclive-bench
addr=$work/containerd.sock
ctr() { command ctr --address "$addr" --namespace "$ns" "$@"; }
cleanup() {
  set +e
  containerd_remove_all "$addr"
  containerd_stop "$work"
  [ -n "${KEEP_LOG:-}" ] && cp "$work/containerd.log" "$KEEP_LOG"
  rm -rf "$work"
}
trap cleanup EXIT
containerd_start "$work"

rootfs=$work/rootfs
bash testdata/build-rootfs.sh "$rootfs" target/release/memcheck
status=$rootfs/status
pass_of() { sed -n 's/.*pass=\([0-9]*\).*/\1/p' "$status" 2>/dev/null || true; }
wait_pass() { # wait until memcheck's pass counter reaches $1
  local want=$1
  for _ in $(seq 1200); do
    grep -q CORRUPT "$status" 2>/dev/null && { echo "memcheck: $(cat "$status")" >&2; exit 1; }
    local p; p=$(pass_of)
    [ -n "$p" ] && [ "$p" -ge "$want" ] && return 0
    sleep 0.1
  done
  echo "memcheck did not reach pass $want" >&2; exit 1
}
remove() { ctr task kill -s SIGKILL "$1" >/dev/null 2>&1 || true
  for _ in $(seq 100); do ctr task rm -f "$1" >/dev/null 2>&1 && break; sleep 0.05; done
  ctr container rm "$1" >/dev/null; }
now() { date +%s.%N; }

printf '\n| memory | eager restore (s) | lazy restore (s) | eager / lazy | runc restore eager / lazy (s) | eager / lazy | background fill (s) | fill rate (GB/s) |\n'
printf '|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for mib in $sizes; do
  rm -f "$status"
  ctr run -d --null-io --runtime io.containerd.pclive.v2 --rootfs "$rootfs" src \
    /usr/local/bin/memcheck "$mib" --status /status
  wait_pass 1
  images=$work/images-$mib
  ctr task checkpoint --exit --image-path "$images" --work-path "$images-work" src
  remove src
  base_pass=$(pass_of)
  eager_times=() lazy_times=() fills=() rates=() eager_runc=() lazy_runc=()
  for run in $(seq "$runs"); do
    for mode in eager lazy; do
      extra=()
      [ "$mode" = lazy ] && extra=(--annotation io.containerd.pclive.restore.lazy-pages=true)
      t0=$(now)
      ctr run -d --null-io --runtime io.containerd.pclive.v2 \
        --annotation "io.containerd.pclive.restore.image-path=$images" "${extra[@]}" \
        --rootfs "$rootfs" "r-$mode" /bin/true
      t1=$(now)
      seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
      # The shim's own measure: runc restore alone (containerd and ctr excluded).
      runc_s=$(grep "r-$mode: restored from" "$work/containerd.log" | tail -1 | sed -n 's/.* in \([0-9.]*\)s .*/\1/p')
      # Verified: a full pass after the restore (the restored process counts on from base_pass).
      wait_pass $((base_pass + 2))
      fill_s=null gbps=null
      if [ "$mode" = lazy ]; then
        report=$work/state/io.containerd.runtime.v2.task/$ns/r-lazy/criu-work/pclive-lazy-restore.json
        for _ in $(seq 600); do [ -s "$report" ] && break; sleep 0.1; done
        [ "$(jq -r .status "$report")" = done ] || { echo "lazy fill failed: $(cat "$report")" >&2; exit 1; }
        fill_s=$(jq -r '.fill.fill_seconds' "$report")
        gbps=$(jq -r '.fill.fill_gb_per_s' "$report")
        lazy_times+=("$seconds") fills+=("$fill_s") rates+=("$gbps") lazy_runc+=("$runc_s")
      else
        eager_times+=("$seconds") eager_runc+=("$runc_s")
      fi
      remove "r-$mode"
      printf '{"mib":%s,"mode":"%s","run":%s,"restore_seconds":%s,"runc_restore_seconds":%s,"fill_seconds":%s,"fill_gb_per_s":%s}\n' \
        "$mib" "$mode" "$run" "$seconds" "$runc_s" "$fill_s" "$gbps" >> "$jsonl"
    done
  done
  median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
  e=$(median "${eager_times[@]}") l=$(median "${lazy_times[@]}")
  re=$(median "${eager_runc[@]}") rl=$(median "${lazy_runc[@]}")
  f=$(median "${fills[@]}") r=$(median "${rates[@]}")
  printf '| %s MiB | %s | %s | %.1fx | %s / %s | %.1fx | %.3f | %.2f |\n' "$mib" "$e" "$l" \
    "$(awk -v a="$e" -v b="$l" 'BEGIN { print a / b }')" "$re" "$rl" \
    "$(awk -v a="$re" -v b="$rl" 'BEGIN { print a / b }')" "$f" "$r"
  rm -rf "$images" "$images-work"
done
printf '\nmedians of %s runs each; restore = wall time of ctr run -d (the task is running when it returns);\n' "$runs"
printf 'runc restore = the shim'"'"'s measure of runc restore alone (containerd, ctr and shim start excluded).\n'
printf 'JSON lines: %s\n' "$jsonl"
