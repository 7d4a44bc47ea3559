#!/usr/bin/env bash
# Live migration of Redis under load, pclive against stop-and-copy CRIU, in one run, on the
# two-host test bed (scripts/testbed.sh). As root on Debian 12/13; installs what it needs.
#
#   scripts/bench-migration.sh [--records N] [--sweep N,N] [--links 1gbit,10gbit]
#                              [--mixes 90:10,10:90] [--modes baseline,pclive-eager,pclive,pclive-moving]
#                              [--rate OPS] [--out DIR] [--quick] [--no-setup]
#                              [--testbed NAME] [--copier-threads N] [--idle-connections N,N]
#                              [--host-run]
#
# For every link rate, read:write mix and mode: a Redis container on the source host holding
# N records of 1 KiB random (incompressible) values, a YCSB-like client load at --rate ops/s
# from a client namespace outside both hosts, and a probe that measures the service's downtime
# as the longest gap between successful replies, following the service to the destination
# (one probe gives up on an endpoint after 20 ms; a patient one stays on its connection until
# it fails, as most clients do, and shows how long the old endpoint keeps it waiting).
# Modes:
#   baseline      runc checkpoint streaming memory to a CRIU page server on the destination,
#                 the image files copied over, then runc restore (what users do today)
#   pclive-eager  pclive pre-copy, then a normal restore from the assembled images
#   pclive        pclive pre-copy, then a lazy restore from the destination's staging store
#   pclive-moving pclive, with Redis in a pod network namespace whose address moves with it
#                 (--move-address): the clients' connections continue on the destination
#   pclive-lz4    pclive with --compress (not in the default set: random values do not compress,
#                 so it measures what compression costs when it cannot pay)
#   pclive-hash   pclive with --tracker content-hash (not in the default set)
#   pclive-wp     pclive with --tracker uffd-wp (not in the default set; pclive's default where
#                 the kernel has it, named here so that a run says which it measured):
#                 with pclive-hash, the trackers' CPU per round side by side
#   pclive-sN     pclive with --streams N (pages on N connections and threads of their own;
#                 not in the default set): against pclive, which uses this host's default
# --sweep adds runs at other record counts (10gbit, first mix) for restore time vs size.
# Every run checks the data (every record, against what the client acknowledged).
#
# Output in --out (default bench-results/DATE): results.jsonl (one line per run), results.md
# (tables, ratios against the baseline of the same run, targets met or missed), PNG plots,
# and runs/<run>/ with each run's raw files. --quick: 100k records, 10gbit, one mix.
# --testbed: the test bed's name (default pcbench), so several runs can coexist.
# --copier-threads: threads of the receiver's lazy-pages server that copy the background fill
#                 (pclive receive --copier-threads; default the server's, 1).
# --idle-connections: besides the load, the client holds this many idle connections to Redis
#                 (each answered a PING), which the final dump must lock and carry; a list runs
#                 every mode at each count (the downtime against the number of connections).
#                 Results carry idle_connections; runs with more than 0 have -cN in their name.
#                 containerd's default open-file limit (1024) caps Redis at 992 clients, the
#                 load's included: at most about 980 here.
# --no-setup: skip scripts/setup.sh and the build (the tests run it this way); the client and
# report programs then come from $PCLIVE_BENCH_CLIENT / $PCLIVE_BENCH_REPORT or target/release.
#
# Redis runs on its host's network (the container keeps no address of its own), so established
# client connections are restored closed (--tcp-close) and clients reconnect to the destination;
# in pclive-moving it has an address of its own on the test bed's pod network, which moves.
# Everything created is removed on exit, also on failure.
# --host-run: measure this machine's /run as it is (see scripts/lib/standard-run.sh: where /run
# is not a tmpfs, CRIU re-probes the kernel in every run, and the benchmark otherwise runs with a
# tmpfs /run of its own, as on a standard host). Results carry criu_kdat_cached.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/standard-run.sh
standard_run "$0" "$@"

records=1000000
sweep=100000,2000000
links=1gbit,10gbit
mixes=90:10,10:90
modes=baseline,pclive-eager,pclive,pclive-moving
rate=5000
out=""
setup=1
bed=pcbench
copier_threads=
idle_list=0
while [ $# -gt 0 ]; do
  case "$1" in
    --records) records=${2:?--records needs a number}; shift 2 ;;
    --sweep) sweep=${2?--sweep needs a list (or "")}; shift 2 ;;
    --links) links=${2:?--links needs a list}; shift 2 ;;
    --mixes) mixes=${2:?--mixes needs a list}; shift 2 ;;
    --modes) modes=${2:?--modes needs a list}; shift 2 ;;
    --rate) rate=${2:?--rate needs a number}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --quick) records=100000; sweep=""; links=10gbit; mixes=90:10; shift ;;
    --no-setup) setup=0; shift ;;
    --testbed) bed=${2:?--testbed needs a name}; shift 2 ;;
    --copier-threads) copier_threads=${2:?--copier-threads needs a number}; shift 2 ;;
    --idle-connections) idle_list=${2:?--idle-connections needs a list of numbers}; shift 2 ;;
    --host-run) shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-migration: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
for mode in ${modes//,/ }; do
  case "$mode" in baseline|pclive-eager|pclive|pclive-moving|pclive-lz4|pclive-hash|pclive-wp|pclive-s[1-9]|pclive-s1[0-6]) ;; *) echo "bench-migration: unknown mode '$mode'" >&2; exit 2 ;; esac
done
for n in ${idle_list//,/ }; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "bench-migration: --idle-connections takes numbers, e.g. 1,100,900 (got '$n')" >&2; exit 2; }
  [ "$n" -le 980 ] || { echo "bench-migration: --idle-connections $n: containerd's default open-file limit (1024) caps Redis at 992 clients, the load's included (at most 980)" >&2; exit 2; }
done
for mix in ${mixes//,/ }; do
  [[ "$mix" =~ ^[0-9]+:[0-9]+$ ]] || { echo "bench-migration: a mix is READ:WRITE, e.g. 90:10 (got '$mix')" >&2; exit 2; }
done
out=${out:-bench-results/$(date +%Y%m%d-%H%M%S)}
# Whether CRIU keeps its kernel probe between runs here (pclive check: criu-kdat-cache).
kdat_cached=false
[ "$(stat -f -c %T /run)" = tmpfs ] && kdat_cached=true

if [ "$setup" = 1 ]; then
  bash scripts/setup.sh
  cargo build --release --locked -q -p pclive-bench
fi
client=${PCLIVE_BENCH_CLIENT:-$PWD/target/release/pclive-bench-client}
reporter=${PCLIVE_BENCH_REPORT:-$PWD/target/release/pclive-bench-report}
for program in "$client" "$reporter" "$(command -v pclive || echo pclive)"; do
  [ -x "$program" ] || { echo "bench-migration: $program is missing: run without --no-setup (or scripts/setup.sh)" >&2; exit 1; }
done

say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
now() { date +%s.%N; }
tb() { bash scripts/testbed.sh "$@"; }
on() { local host=$1; shift; tb exec "$host" --name "$bed" "$@"; }
# Containers' cgroups are /<namespace>/<id> on this one machine: per-test-bed namespaces keep
# two benchmarks (or a benchmark and the tests) apart.
src_ns=$bed-src
dst_ns=$bed-dst
port=6379
seed=7
work=$(mktemp -d /tmp/pclive-bench.XXXXXX)
# The baseline's images on the destination host go where its pclive settings let annotations
# name files (README, "Trust"): /var/lib/pclive.
mkdir -p /var/lib/pclive
dst_images=$(mktemp -d /var/lib/pclive/bench.XXXXXX)
mkdir -p "$out/runs"
out=$(cd "$out" && pwd)
background=()
cleanup() {
  set +e
  local pid
  for pid in "${background[@]}"; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
  tb down --name "$bed" >/dev/null 2>&1
  rm -rf "$work" "$dst_images"
}
trap cleanup EXIT

# Each host has its own root filesystem, as two machines do (pclive copies the source's
# changes; the baseline relies on both having the same files).
rootfs=$work/rootfs-src
dst_rootfs=$work/rootfs-dst
bash testdata/build-rootfs.sh "$rootfs" "$(command -v redis-server)" >/dev/null
bash testdata/build-rootfs.sh "$dst_rootfs" "$(command -v redis-server)" >/dev/null

ctr_src() { tb ctr src --name "$bed" -n "$src_ns" "$@"; }
ctr_dst() { tb ctr dst --name "$bed" -n "$dst_ns" "$@"; }
cgroup() { echo "/sys/fs/cgroup/$1/pclive-testbed-$bed-$2"; }
cpu_ns() { cat "$(cgroup cpuacct "$1")/cpuacct.usage"; }
# Resident memory of a host's own processes (containerd, shims, CRIU, staging), without the
# container (which runc puts in cgroups of its own).
host_rss() { awk '$1 == "total_rss" { print $2 }' "$(cgroup memory "$1")/memory.stat"; }
# Resident memory of the destination as a whole while a migration runs: its host processes
# (shim, lazy-pages server, staging store) and the container (in its own cgroup, named after
# its namespace and id), sampled every 0.1 s until $2.stop appears; the peak goes to $2. Only
# the sum shows a page held twice: installed in the container and still in the staging store.
sample_dst_total() {
  local id=$1 outfile=$2 peak=0 total c
  while [ ! -e "$outfile.stop" ]; do
    c=$(awk '$1 == "total_rss" { print $2 }' "/sys/fs/cgroup/memory/$dst_ns/$id/memory.stat" 2>/dev/null || true)
    total=$(( $(host_rss dst) + ${c:-0} ))
    [ "$total" -gt "$peak" ] && peak=$total
    sleep 0.1
  done
  echo "$peak" > "$outfile"
}
# Resident memory of a container's processes.
container_rss() {
  local host=$1 id=$2 total=0 pid kb
  for pid in $(tb ctr "$host" --name "$bed" -n "$bed-$host" task ps "$id" 2>/dev/null | awk 'NR > 1 { print $1 }'); do
    kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${kb:-0}))
  done
  echo $((total * 1024))
}
wait_listening() { # host port
  local _
  for _ in $(seq 200); do
    on "$1" ss -ltnH "sport = :$2" | grep -q . && return 0
    sleep 0.05
  done
  echo "bench-migration: nothing listens on port $2 on $1" >&2
  return 1
}
remove_container() { # host id
  tb ctr "$1" --name "$bed" -n "$bed-$1" task rm -f "$2" >/dev/null 2>&1 || true
  tb ctr "$1" --name "$bed" -n "$bed-$1" container rm "$2" >/dev/null 2>&1 || true
}
redis_cmd=(/usr/local/bin/redis-server --bind 0.0.0.0 --port "$port" --protected-mode no
  --save "" --appendonly no)

# One migration of a loaded Redis; appends its result line to results.jsonl.
run_one() {
  local link=$1 records=$2 mix=$3 mode=$4
  local read_pct=${mix%%:*} write_pct=${mix##*:}
  local read_ratio
  read_ratio=$(awk -v r="$read_pct" -v w="$write_pct" 'BEGIN { printf "%.3f", r / (r + w) }')
  local tag=$link-$records-r$read_pct-$mode
  [ "$idle" -gt 0 ] && tag=$tag-c$idle
  local dir=$out/runs/$tag id=redis
  rm -rf "$dir"; mkdir -p "$dir"
  say "$tag: $records records, $mix reads:writes at $rate ops/s, $link, $mode"

  local src_ep=$src_client_addr:$port dst_ep=$dst_client_addr:$port endpoints after_gap=1
  local network=(--net-host)
  if [ "$mode" = pclive-moving ]; then
    # One address on the pod network, on the source's pod (up) and the destination's (down).
    tb pod src --name "$bed" redis "$pod_net.20" >/dev/null
    tb pod dst --name "$bed" redis "$pod_net.20" --down >/dev/null
    network=(--with-ns "network:/run/netns/$bed-src-redis")
    src_ep=$pod_net.20:$port dst_ep=$src_ep after_gap=0
  fi
  endpoints=$src_ep,$dst_ep
  [ "$mode" = pclive-moving ] && endpoints=$src_ep
  ctr_src run -d --null-io "${network[@]}" --runtime io.containerd.pclive.v2 --rootfs "$rootfs" \
    "$id" "${redis_cmd[@]}"
  local _
  for _ in $(seq 100); do on cli redis-cli -h "${src_ep%:*}" -p "$port" PING 2>/dev/null | grep -q PONG && break; sleep 0.1; done
  on cli "$client" load --endpoint "$src_ep" --records "$records" --value-size 1024 --seed "$seed" > "$dir/load.json"
  local rss
  rss=$(container_rss src "$id")

  on cli "$client" run --endpoints "$endpoints" --records "$records" --value-size 1024 \
    --seed "$seed" --read-ratio "$read_ratio" --rate "$rate" --stop-file "$dir/stop" \
    --idle-connections "$idle" \
    --timeline "$dir/timeline.jsonl" --state "$dir/client.state" > "$dir/client.json" 2> "$dir/client.log" &
  local client_pid=$!
  background+=("$client_pid")
  sleep 3

  local cpu_src0 cpu_dst0 start restored images_unix dump_s=0 freeze_s=0 transfer_s=0 rounds='[]' precopy_bytes=0
  # Peak memory is reported as the growth over what each host held before (its page cache of
  # earlier runs included): what the migration itself needed.
  local mem_src0 mem_dst0
  for host in src dst; do echo 0 > "$(cgroup memory $host)/memory.max_usage_in_bytes"; done
  mem_src0=$(cat "$(cgroup memory src)/memory.usage_in_bytes")
  mem_dst0=$(cat "$(cgroup memory dst)/memory.usage_in_bytes")
  cpu_src0=$(cpu_ns src); cpu_dst0=$(cpu_ns dst)
  local dst_total0 dst_total_peak=null
  dst_total0=$(host_rss dst)
  rm -f "$dir/dst-total-peak" "$dir/dst-total-peak.stop"
  sample_dst_total "$id" "$dir/dst-total-peak" &
  local sampler=$!
  background+=("$sampler")
  start=$(now)
  case "$mode" in
    baseline)
      local simg=$work/$tag-src dimg=$dst_images/$tag ps_port=7412 img_port=7413 t0 t1
      mkdir -p "$simg" "$dimg"
      on dst criu page-server --images-dir "$dimg" --address "$dst_addr" --port "$ps_port" \
        -o "$dimg/page-server.log" -v2 &
      local page_server=$!
      background+=("$page_server")
      on dst sh -c "nc -l -p $img_port | tar -C '$dimg' -xf -" &
      local receiver=$!
      background+=("$receiver")
      wait_listening dst "$ps_port"; wait_listening dst "$img_port"
      local runc_root
      runc_root=$(dirname "$(ls -d /run/pclive/runc/*/"$src_ns"/"$id")")
      t0=$(now)
      on src runc --root "$runc_root" checkpoint --image-path "$simg" --work-path "$simg" \
        --page-server "$dst_addr:$ps_port" --tcp-established --tcp-skip-in-flight --ext-unix-sk \
        --file-locks "$id"
      t1=$(now)
      dump_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
      wait "$page_server" || { echo "bench-migration: CRIU's page server failed: $(tail -3 "$dimg/page-server.log")" >&2; return 1; }
      on src sh -c "tar -C '$simg' -cf - --exclude page-server.log . | nc -N $dst_addr $img_port"
      wait "$receiver"
      images_unix=$(now)
      transfer_s=$(awk -v a="$t1" -v b="$images_unix" 'BEGIN { print b - a }')
      ctr_dst run -d --null-io --net-host --runtime io.containerd.pclive.v2 \
        --annotation "io.containerd.pclive.restore.image-path=$dimg" \
        --annotation "io.containerd.pclive.restore.work-path=$dimg" \
        --annotation io.containerd.pclive.restore.tcp-close=true \
        --rootfs "$dst_rootfs" "$id" "${redis_cmd[@]}"
      restored=$(now)
      remove_container src "$id"
      ;;
    pclive|pclive-eager|pclive-lz4|pclive-moving|pclive-hash|pclive-wp|pclive-s*)
      local listen=$dst_addr:7411 extra=(--net-host --tcp-close) send=()
      [ "$mode" = pclive-eager ] && extra+=(--eager)
      [ -n "$copier_threads" ] && [ "$mode" != pclive-eager ] && extra+=(--copier-threads "$copier_threads")
      [ "$mode" = pclive-lz4 ] && send=(--compress)
      [ "$mode" = pclive-hash ] && send=(--tracker content-hash)
      [ "$mode" = pclive-wp ] && send=(--tracker uffd-wp)
      case "$mode" in pclive-s*) send=(--streams "${mode#pclive-s}") ;; esac
      if [ "$mode" = pclive-moving ]; then
        extra=(--netns "/run/netns/$bed-dst-redis" --move-address)
        send=(--move-address)
      fi
      pclive receive "$id" --listen "$listen" --key-file "/run/pclive-testbed/$bed/dst/migration.key" --rootfs "$dst_rootfs" \
        --address "/run/pclive-testbed/$bed/dst/containerd.sock" --namespace "$dst_ns" \
        --state-dir "/run/pclive-testbed/$bed/dst/pclive" "${extra[@]}" > "$dir/receive.log" 2>&1 &
      local receiver=$!
      background+=("$receiver")
      wait_listening dst 7411
      pclive migrate "$id" "$listen" --key-file "/run/pclive-testbed/$bed/src/migration.key" "${send[@]}" \
        --address "/run/pclive-testbed/$bed/src/containerd.sock" --namespace "$src_ns" \
        --state-dir "/run/pclive-testbed/$bed/src/pclive" \
        --work-dir "$dir/source-work" --json > "$dir/migration.json" 2> "$dir/migrate.log"
      wait "$receiver"
      restored=$(now)
      touch "$dir/dst-total-peak.stop"
      wait "$sampler" || true
      if [ -s "$dir/dst-total-peak" ]; then
        dst_total_peak=$(( $(cat "$dir/dst-total-peak") - dst_total0 ))
      fi
      images_unix=$(jq -r .images_sent_unix "$dir/migration.json")
      freeze_s=$(jq -r .last_round_seconds "$dir/migration.json")
      dump_s=$(jq -r .final_dump_seconds "$dir/migration.json")
      transfer_s=$(jq -r .images_seconds "$dir/migration.json")
      rounds=$(jq -c '[.precopy.rounds[] | {round, bytes, wire_bytes, seconds, cpu_seconds, frozen}]' "$dir/migration.json")
      precopy_bytes=$(jq '[.precopy.rounds[].wire_bytes] | add' "$dir/migration.json")
      ;;
  esac
  touch "$dir/dst-total-peak.stop"
  local cpu_src1 cpu_dst1 peak_src peak_dst
  cpu_src1=$(cpu_ns src); cpu_dst1=$(cpu_ns dst)
  peak_src=$(( $(cat "$(cgroup memory src)/memory.max_usage_in_bytes") - mem_src0 ))
  peak_dst=$(( $(cat "$(cgroup memory dst)/memory.max_usage_in_bytes") - mem_dst0 ))
  # Let the load run on the destination (the latency after resume), then stop and check it.
  sleep 3
  local dst_mem
  dst_mem=$(( $(container_rss dst "$id") + $(host_rss dst) ))
  touch "$dir/stop"
  wait "$client_pid" || true
  on cli "$client" verify --endpoint "$dst_ep" --records "$records" --value-size 1024 \
    --seed "$seed" --state "$dir/client.state" > "$dir/verify.json" || true
  # CRIU's restore log (timestamped, as source-work/dump.log) goes with the bundle.
  cp "/run/pclive-testbed/$bed/dst/state/io.containerd.runtime.v2.task/$dst_ns/$id/criu-work/restore.log" \
    "$dir/restore.log" 2>/dev/null || true
  remove_container dst "$id"
  remove_container src "$id"
  ip netns del "$bed-src-redis" 2>/dev/null || true
  ip netns del "$bed-dst-redis" 2>/dev/null || true
  rm -rf "$work/$tag-src" "$dst_images/$tag"

  jq -nc \
    --arg mode "$mode" --arg link "$link" --argjson records "$records" --argjson read_ratio "$read_ratio" \
    --argjson rate "$rate" --argjson start "$start" --argjson images "$images_unix" \
    --argjson restored "$restored" --argjson freeze "$freeze_s" --argjson dump "$dump_s" \
    --argjson transfer "$transfer_s" --argjson rounds "$rounds" --argjson precopy "$precopy_bytes" \
    --argjson cpu_src "$(( cpu_src1 - cpu_src0 ))" --argjson cpu_dst "$(( cpu_dst1 - cpu_dst0 ))" \
    --argjson peak_src "$peak_src" --argjson peak_dst "$peak_dst" --argjson dst_mem "$dst_mem" \
    --argjson dst_total_peak "$dst_total_peak" --argjson idle "$idle" --argjson kdat "$kdat_cached" \
    --argjson rss "$rss" --slurpfile client "$dir/client.json" --slurpfile verify "$dir/verify.json" \
    --arg timeline "runs/$tag/timeline.jsonl" --slurpfile migration <(cat "$dir/migration.json" 2>/dev/null || echo '{}') '
    ($client[0]) as $c | ($verify[0]) as $v | ($migration[0]) as $m |
    {mode: $mode, link: $link, records: $records, value_size: 1024, read_ratio: $read_ratio,
     rate_ops: $rate, idle_connections: $idle, criu_kdat_cached: $kdat,
     downtime_s: $c.longest_gap_s,
     patient_downtime_s: $c.patient_longest_gap_s,
     patient_recovered: $c.patient_recovered,
     patient_connection_kept: ($c.patient_reconnects == 0 and $c.patient_recovered == true),
     address_moved: ($m.address_moved // null),
     tracker: ($m.precopy.tracker // null),
     reported_downtime_s: ($m.downtime_seconds // null),
     phases: {freeze_s: $freeze, final_dump_s: $dump, transfer_s: $transfer,
              restore_s: ($c.gap_end_unix - $images)},
     restore_s: ($c.gap_end_unix - $images),
     migration_s: (($m.committed_unix // $restored) - $start),
     rounds: $rounds, precopy_bytes: $precopy,
     cpu_s: {src: ($cpu_src / 1e9), dst: ($cpu_dst / 1e9)},
     peak_mem_bytes: {src: $peak_src, dst: $peak_dst},
     dst_total_peak_bytes: $dst_total_peak,
     dst_mem_after_commit_bytes: $dst_mem, container_rss_bytes: $rss,
     integrity: {ok: ($v.mismatches == 0 and $v.missing == 0 and $c.read_mismatches == 0),
                 checked: $v.checked, mismatches: $v.mismatches, missing: $v.missing,
                 read_mismatches: $c.read_mismatches},
     after_resume_latency_us: $c.after_resume_latency_us,
     endpoint_after_gap: $c.endpoint_after_gap,
     timeline: $timeline, start_unix: $start, pause_unix: ($m.paused_unix // $start),
     resume_unix: $c.gap_end_unix}' >> "$out/results.jsonl"
  tail -1 "$out/results.jsonl" | jq -c '{mode, downtime_s, restore_s, integrity: .integrity.ok}' >&2
  if [ "$(tail -1 "$out/results.jsonl" | jq .integrity.ok)" != true ]; then
    echo "bench-migration: DATA INTEGRITY FAILED in $tag (see $dir)" >&2
    return 1
  fi
  if [ "$(tail -1 "$out/results.jsonl" | jq .endpoint_after_gap)" != "$after_gap" ]; then
    echo "bench-migration: the longest gap in $tag was not the migration (see $dir/client.json)" >&2
    return 1
  fi
}

: > "$out/results.jsonl"
first_mix=${mixes%%,*}
for link in ${links//,/ }; do
  say "test bed: two hosts and a client namespace, a $link link"
  tb up --name "$bed" --rate "$link" >&2
  # The migration goes over the hosts' link; clients reach each host over links of their own.
  dst_addr=$(tb env --name "$bed" | awk '/^dst/ { sub(",", "", $5); print $5 }')
  src_client_addr=$(tb env --name "$bed" | awk '/^src/ { sub(",", "", $12); print $12 }')
  dst_client_addr=$(tb env --name "$bed" | awk '/^dst/ { sub(",", "", $12); print $12 }')
  pod_net=$(tb env --name "$bed" | awk '/^pods/ { sub(".0/24", "", $3); print $3 }')
  for idle in ${idle_list//,/ }; do
    for mix in ${mixes//,/ }; do
      for mode in ${modes//,/ }; do
        run_one "$link" "$records" "$mix" "$mode"
      done
    done
  done
  idle=0
  if [ "$link" = 10gbit ] && [ -n "$sweep" ]; then
    for n in ${sweep//,/ }; do
      for mode in ${modes//,/ }; do run_one "$link" "$n" "$first_mix" "$mode"; done
    done
  fi
  tb down --name "$bed" >&2
done
"$reporter" --input "$out/results.jsonl" --out-dir "$out"
say "results: $out/results.md"
cat "$out/results.md"
