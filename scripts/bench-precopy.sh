#!/usr/bin/env bash
# Benchmark: what pre-copy costs per GiB on each side, this build against an older one, in the
# same run.
#
#   scripts/bench-precopy.sh [--gib 1] [--runs 3] [--against REV] [--out DIR]
#
# Runs the engine's precopy_cost example (restore-engine/examples/precopy_cost.rs): a process
# holding --gib GiB of incompressible memory is read, encrypted and sent over TCP on loopback by
# the source's round code, and staged by the destination's receive code, with no container
# around it. Each side's CPU per GiB (the destination's on memory the hypervisor already backs,
# and, apart, what touching as much fresh memory cost in the same run: a real destination pays
# both), its peak memory growth over the memory moved and the first round's rate. With --against, the example is built at REV too (in a temporary worktree) and the
# two builds run alternately, --runs times each. Prints a Markdown table of medians and writes
# JSON lines to DIR/bench-precopy.jsonl. Nothing here needs root or containerd.
set -euo pipefail
cd "$(dirname "$0")/.."

gib=1
runs=3
against=
out=target/bench
while [ $# -gt 0 ]; do
  case "$1" in
    --gib) gib=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --against) against=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-precopy.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$out"
jsonl=$(realpath "$out")/bench-precopy.jsonl
: > "$jsonl"
cargo build --release --locked -q -p pclive-restore-engine --example precopy_cost
here=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- restore-engine || echo +)
builds=("$here=target/release/examples/precopy_cost")

tree=
cleanup() { [ -n "$tree" ] && git worktree remove --force "$tree" >/dev/null 2>&1 || true; }
trap cleanup EXIT
if [ -n "$against" ]; then
  tree=$(mktemp -d /tmp/pclive-precopy-ab.XXXXXX)
  git worktree add --detach "$tree" "$against" >/dev/null
  # The example uses only interfaces the older engine has too.
  mkdir -p "$tree/restore-engine/examples"
  cp restore-engine/examples/precopy_cost.rs "$tree/restore-engine/examples/"
  (cd "$tree" && CARGO_TARGET_DIR=$PWD/target cargo build --release --locked -q \
    -p pclive-restore-engine --example precopy_cost)
  builds+=("$(git rev-parse --short "$against")=$tree/target/release/examples/precopy_cost")
fi

for run in $(seq "$runs"); do
  for b in "${builds[@]}"; do
    name=${b%%=*} bin=${b#*=}
    line=$("$bin" "$gib")
    echo "{\"build\":\"$name\",\"run\":$run,${line#\{}" | tee -a "$jsonl"
  done
done

python3 - "$jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cols = [("source_cpu_s_per_gib", "Source CPU-s/GiB"),
        ("destination_cpu_s_per_gib", "Destination CPU-s/GiB"),
        ("population_cpu_s_per_gib", "Touching as much fresh memory (same run)"),
        ("destination_peak_growth_over_moved", "Destination peak growth / moved"),
        ("first_round_mb_per_s", "First round MB/s")]
print("| Build | Runs | " + " | ".join(c[1] for c in cols) + " |")
print("|---|---|" + "---|" * len(cols))
for build in dict.fromkeys(r["build"] for r in rows):
    mine = [r for r in rows if r["build"] == build]
    cells = []
    for key, _ in cols:
        vals = [r[key] for r in mine if key in r]
        cells.append(f"{statistics.median(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})" if vals else "–")
    print(f"| {build} | {len(mine)} | " + " | ".join(cells) + " |")
EOF
