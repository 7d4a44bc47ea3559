#!/usr/bin/env bash
# The whole pclive test suite, as root on Debian 12/13: installs what it needs (scripts/setup.sh,
# idempotent), checks formatting and lints, then runs the unit tests and the end-to-end tests
# (real containerd, runc, CRIU; each test starts and removes its own containerd).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "[test] cargo fmt --check"
cargo fmt --all -- --check
# The tests run with the fault-injection points compiled in (restore-engine/src/fault.rs);
# without a configuration they do nothing. Clippy checks both builds.
echo "[test] cargo clippy -D warnings"
cargo clippy --release --workspace --all-targets --locked -q -- -D warnings
cargo clippy --release --workspace --all-targets --locked -q --features containerd-shim-pclive/failpoints -- -D warnings
echo "[test] cargo test"
cargo test --release --workspace --locked --features containerd-shim-pclive/failpoints
