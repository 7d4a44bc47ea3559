# A standard host's /run for pclive's benchmarks (sourced, not run).
#
#   standard_run SCRIPT ARGS...   returns at once where /run is a tmpfs (or --host-run was
#                                 given, or it already ran); otherwise runs SCRIPT ARGS again in
#                                 a mount namespace of its own whose /run is a tmpfs holding a
#                                 copy of the host's, and does not return
#
# CRIU keeps what it probes of the kernel (/run/criu.kdat) only where /run is a tmpfs, as on any
# systemd host; elsewhere every CRIU run probes again (a network namespace with a veth pair, the
# vDSO...: about 50 ms here), and a migration's pause holds two runs, the dump and the restore.
# `pclive check` reports it as criu-kdat-cache. A benchmark of pauses on a machine without it
# would measure that machine's set-up, not pclive's: this gives it the standard /run. Its mounts
# (network namespaces, containerd's) stay in that namespace and go with it.
standard_run() {
  local script=$1
  shift
  [ "$(stat -f -c %T /run)" = tmpfs ] && return 0
  [ -n "${PCLIVE_STANDARD_RUN:-}" ] && return 0
  local arg
  for arg in "$@"; do case "$arg" in --host-run|-h|--help) return 0 ;; esac; done
  echo "$(basename "$script"): /run is not a tmpfs on this machine, so CRIU would probe the kernel" \
    "again in every run (about 50 ms, twice per pause; pclive check: criu-kdat-cache). Running" \
    "in a mount namespace of its own whose /run is a tmpfs, as on a standard (systemd) host;" \
    "--host-run measures this machine as it is." >&2
  exec unshare --mount --propagation private env PCLIVE_STANDARD_RUN=1 bash -c '
    set -euo pipefail
    run=$(mktemp -d)
    mount -t tmpfs -o mode=755 tmpfs "$run"
    # Sockets, and files under mounts (network namespaces), cannot be copied: nothing here
    # uses the host'"'"'s.
    cp -a /run/. "$run"/ 2>/dev/null || true
    rm -rf "$run/netns" "$run/criu.kdat" "$run/criu.kdat.tmp"
    mount --move "$run" /run
    rmdir "$run"
    exec bash "$@"' bash "$script" "$@"
}
