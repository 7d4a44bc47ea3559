#!/usr/bin/env bash
# Build a minimal container root filesystem from Debian's busybox-static, plus host binaries
# (with the shared libraries they need) for workloads such as redis-server or memcheck.
#
#   testdata/build-rootfs.sh OUT_DIR [BINARY ...]
#
# Each BINARY is copied to OUT_DIR/usr/local/bin/; its libraries (per ldd) keep their host paths.
# Idempotent: rebuilding into an existing OUT_DIR refreshes it.
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR [BINARY ...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
out=$1; shift

busybox=/bin/busybox
[ -x "$busybox" ] || { echo "build-rootfs: $busybox missing: apt-get install busybox-static (scripts/setup.sh does)" >&2; exit 1; }
if ldd "$busybox" >/dev/null 2>&1; then
  echo "build-rootfs: $busybox is dynamically linked: install busybox-static, not busybox" >&2; exit 1
fi

mkdir -p "$out"/{bin,dev,etc,proc,sys,tmp,root,run,usr/local/bin,var/lib}
chmod 1777 "$out/tmp"
install -m 0755 "$busybox" "$out/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$out/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$out/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$out/etc/group"
echo pclive-test > "$out/etc/hostname"
: > "$out/etc/resolv.conf"

copy_with_libs() {
  local bin=$1
  [ -x "$bin" ] || { echo "build-rootfs: $bin is not an executable file" >&2; exit 1; }
  install -m 0755 "$bin" "$out/usr/local/bin/$(basename "$bin")"
  # ldd lines: "libx.so => /lib/x86_64-linux-gnu/libx.so (0x..)" or "/lib64/ld-linux-x86-64.so.2 (0x..)"
  ldd "$bin" 2>/dev/null | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | while read -r lib; do
    local real; real=$(readlink -f "$lib")
    mkdir -p "$out$(dirname "$lib")"
    install -m 0755 "$real" "$out$lib"
  done
}
for bin in "$@"; do copy_with_libs "$bin"; done
