#!/usr/bin/env bash
# pclive demo, as root on Debian 12/13: installs what it needs (scripts/setup.sh), starts a
# private containerd, runs a container with the pclive runtime that holds checksummed memory,
# checkpoints it, restores it lazily (the tasks resume at once; pclive's lazy-pages server
# installs their memory with userfaultfd), and shows that it continued where it stopped.
#
#   scripts/demo-restore.sh [--mib N]     memory of the workload (default 256)
#
# Everything it creates (containerd, container, files, cgroups) is removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

mib=256
while [ $# -gt 0 ]; do
  case "$1" in
    --mib) mib=${2:?--mib needs a number}; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo-restore.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh
cargo build --release --locked -q -p pclive-workloads

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

. scripts/lib/containerd.sh
work=$(mktemp -d /tmp/pclive-demo.XXXXXX)
ns=pclive-demo
addr=$work/containerd.sock
ctr() { command ctr --address "$addr" --namespace "$ns" "$@"; }
cleanup() {
  set +e
  containerd_remove_all "$addr"
  containerd_stop "$work"
  rm -rf "$work"
}
trap cleanup EXIT

say "starting a private containerd ($addr)"
containerd_start "$work"

say "building a rootfs (busybox + memcheck) and running it with --runtime io.containerd.pclive.v2"
rootfs=$work/rootfs
bash testdata/build-rootfs.sh "$rootfs" target/release/memcheck
ctr run -d --null-io --runtime io.containerd.pclive.v2 --rootfs "$rootfs" memdemo \
  /usr/local/bin/memcheck "$mib" --status /status
for _ in $(seq 600); do grep -q 'pass=2 ' "$rootfs/status" 2>/dev/null && break; sleep 0.1; done
ctr task ls
echo "memcheck: $(cat "$rootfs/status")"

say "checkpoint (ctr task checkpoint --exit --image-path …)"
t0=$(now)
ctr task checkpoint --exit --image-path "$work/images" --work-path "$work/criu-work" memdemo
t1=$(now)
before=$(cat "$rootfs/status")
echo "checkpointed in $(elapsed "$t0" "$t1") s; image: $(du -sh "$work/images" | cut -f1)"
echo "memcheck at checkpoint: $before"
ctr task rm memdemo >/dev/null
ctr container rm memdemo

say "lazy restore (annotations io.containerd.pclive.restore.image-path, …lazy-pages=true)"
t0=$(now)
ctr run -d --null-io --runtime io.containerd.pclive.v2 \
  --annotation "io.containerd.pclive.restore.image-path=$work/images" \
  --annotation io.containerd.pclive.restore.lazy-pages=true \
  --rootfs "$rootfs" memdemo-restored /bin/true
t1=$(now)
echo "restored and running in $(elapsed "$t0" "$t1") s (memory is installed while it runs)"
ctr task ls
pass_before=$(sed -n 's/.*pass=\([0-9]*\).*/\1/p' <<<"$before")
want=$((pass_before + 2))
for _ in $(seq 600); do
  pass=$(sed -n 's/.*pass=\([0-9]*\).*/\1/p' "$rootfs/status" 2>/dev/null || true)
  [ -n "$pass" ] && [ "$pass" -ge "$want" ] && break
  grep -q CORRUPT "$rootfs/status" && break
  sleep 0.1
done
after=$(cat "$rootfs/status")
echo "memcheck after restore: $after"
if grep -q CORRUPT <<<"$after" || [ "${pass:-0}" -lt "$want" ]; then
  echo "FAILED: the restored container did not verify its memory" >&2
  exit 1
fi

report=$work/state/io.containerd.runtime.v2.task/$ns/memdemo-restored/criu-work/pclive-lazy-restore.json
for _ in $(seq 300); do [ -s "$report" ] && break; sleep 0.1; done
echo "lazy-pages server report:"
jq . "$report"

say "result"
cat <<EOF
The container was checkpointed with CRIU and restored by the pclive shim; the restored process
continued (verification pass ${pass_before} -> ${pass}) and found all $((mib * 256)) pages of its
${mib} MiB intact, installed by pclive's lazy-pages server ($(jq -r .fill.pages_by_fault "$report") pages on
demand, $(jq -r .fill.pages_in_background "$report") in the background). Next: live migration between two hosts.
EOF
