#!/usr/bin/env bash
# pclive's main demo, as root on Debian 12/13: installs what it needs (scripts/setup.sh), makes
# two emulated hosts (network namespaces joined by a 1 Gbit/s link, a containerd on each), runs a
# container holding checksummed memory that keeps changing on the source host, and live-migrates
# it to the destination host with `pclive receive` / `pclive migrate`. Then it shows the report
# (rounds, downtime breakdown) and that the container runs on, its memory intact.
#
#   scripts/demo.sh [--mib N] [--rate 1gbit|10gbit|none]
#
# Everything it creates is removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

mib=512
rate=1gbit
while [ $# -gt 0 ]; do
  case "$1" in
    --mib) mib=${2:?--mib needs a number}; shift 2 ;;
    --rate) rate=${2:?--rate needs a value}; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh
cargo build --release --locked -q -p pclive-workloads

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
bed=pclivedemo
work=$(mktemp -d /tmp/pclive-demo.XXXXXX)
cleanup() {
  set +e
  [ -n "${receiver:-}" ] && kill "$receiver" 2>/dev/null
  bash scripts/testbed.sh down --name "$bed"
  rm -rf "$work"
}
trap cleanup EXIT

# The two "hosts" share this machine's cgroup tree: distinct containerd namespaces keep the
# containers' cgroups (/<namespace>/<id>) apart, as separate machines would.
say "two hosts: network namespaces $bed-src and $bed-dst, a $rate link, a containerd on each"
bash scripts/testbed.sh up --name "$bed" --rate "$rate"
src_sock=/run/pclive-testbed/$bed/src/containerd.sock
dst_sock=/run/pclive-testbed/$bed/dst/containerd.sock
dst_addr=$(bash scripts/testbed.sh env --name "$bed" | awk '/^dst/ { sub(",", "", $5); print $5 }')

say "source host: a container with $mib MiB of checksummed memory that keeps changing"
# Each host has a root filesystem of its own, as two machines would.
rootfs=$work/rootfs-src
dst_rootfs=$work/rootfs-dst
bash testdata/build-rootfs.sh "$rootfs" target/release/memcheck
bash testdata/build-rootfs.sh "$dst_rootfs" target/release/memcheck
ctr --address "$src_sock" -n demo-src run -d --null-io --runtime io.containerd.pclive.v2 \
  --rootfs "$rootfs" app /usr/local/bin/memcheck "$mib" --status /status
for _ in $(seq 600); do grep -q 'pass=1 ' "$rootfs/status" 2>/dev/null && break; sleep 0.1; done
echo "memcheck: $(cat "$rootfs/status")"

say "destination host: pclive receive (listening on $dst_addr:7411)"
pclive receive app --listen "$dst_addr:7411" --key-file "/run/pclive-testbed/$bed/dst/migration.key" \
  --rootfs "$dst_rootfs" --address "$dst_sock" --namespace demo-dst \
  --state-dir "/run/pclive-testbed/$bed/dst/pclive" &
receiver=$!
for _ in $(seq 200); do
  bash scripts/testbed.sh exec dst --name "$bed" ss -Hltn "sport = :7411" | grep -q . && break
  sleep 0.05
done

say "pclive migrate app $dst_addr:7411"
before=$(cat "$rootfs/status")
pclive migrate app "$dst_addr:7411" --key-file "/run/pclive-testbed/$bed/src/migration.key" --address "$src_sock" --namespace demo-src \
  --state-dir "/run/pclive-testbed/$bed/src/pclive" --json > "$work/report.json"
wait "$receiver"; receiver=""
jq '{downtime_seconds, last_round_seconds, final_dump_seconds, dump_overlap, images_seconds, commit_wait_seconds,
     rounds: [.precopy.rounds[] | {round, pages, bytes, seconds, frozen}]}' "$work/report.json"

say "after the migration"
for _ in $(seq 100); do
  ctr --address "$src_sock" -n demo-src task ls | grep -q RUNNING || break
  sleep 0.1
done
echo "source host:";      ctr --address "$src_sock" -n demo-src task ls
echo "destination host:"; ctr --address "$dst_sock" -n demo-dst task ls
# memcheck's pass counter goes on on the destination: two more passes there verify every page.
pass_before=$(sed -n 's/.*pass=\([0-9]*\).*/\1/p' <<<"$before")
want=$((pass_before + 2))
for _ in $(seq 600); do
  pass=$(sed -n 's/.*pass=\([0-9]*\).*/\1/p' "$dst_rootfs/status" 2>/dev/null || true)
  [ -n "$pass" ] && [ "$pass" -ge "$want" ] && break
  grep -q CORRUPT "$dst_rootfs/status" && break
  sleep 0.1
done
echo "memcheck (destination): $(cat "$dst_rootfs/status")"
if grep -q CORRUPT "$dst_rootfs/status" || [ "${pass:-0}" -lt "$want" ]; then
  echo "FAILED: the migrated container did not verify its memory" >&2
  exit 1
fi
cat <<END

The container moved from $bed-src to $bed-dst over a $rate link while it ran: $(jq '.precopy.rounds | length' "$work/report.json") rounds of
pre-copy, then a pause of $(jq -r '.downtime_seconds | . * 1000 | floor' "$work/report.json") ms. On the destination it verified all $((mib * 256)) pages of its
$mib MiB (pass $pass_before -> $pass) and runs on. The source's copy was killed once the destination
committed: its task shows STOPPED, as after any exit, until it is deleted (ctr task delete; Kubernetes
sees the source's container exited). The migration's record on each host (pclive status):
END
pclive status app --address "$src_sock" -n demo-src --state-dir "/run/pclive-testbed/$bed/src/pclive" || true
pclive status app --address "$dst_sock" -n demo-dst --state-dir "/run/pclive-testbed/$bed/dst/pclive" || true
