#!/usr/bin/env bash
# Prepare a Debian 12 (bookworm) or 13 (trixie) host for pclive, as root. Idempotent.
#
# Installs containerd >= 2.1, runc >= 1.3 and CRIU >= 4.2 (from Debian testing on bookworm, pinned so
# that only these and the dependencies they pull come from there), the tools the tests and demo use,
# writes a CRIU config for runc, builds the workspace in release mode and installs
# containerd-shim-pclive-v2 and pclive into /usr/local/bin, where containerd finds the shim.
#
#   scripts/setup.sh            everything
#   scripts/setup.sh --no-build packages and configuration only
set -euo pipefail

build=1
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (it installs packages)" >&2; exit 1; }
here=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '[setup] %s\n' "$*"; }

. /etc/os-release
codename=${VERSION_CODENAME:-}
case "$codename" in
  bookworm|trixie|forky) ;;
  *) echo "setup.sh: Debian 12 or 13 expected, found '${PRETTY_NAME:-unknown}'" >&2; exit 1 ;;
esac

export DEBIAN_FRONTEND=noninteractive
need_testing=0
[ "$codename" = bookworm ] && need_testing=1

if [ "$need_testing" = 1 ] && [ ! -f /etc/apt/sources.list.d/pclive-testing.sources ]; then
  log "adding Debian testing (forky) with a low pin priority: only the container runtime comes from it"
  cat > /etc/apt/sources.list.d/pclive-testing.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: forky
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat > /etc/apt/preferences.d/pclive-testing <<'PIN'
# pclive: never upgrade the system from testing; pick only what scripts/setup.sh asks for.
Package: *
Pin: release n=forky
Pin-Priority: 100
PIN
  rm -f /var/lib/apt/pclive-updated
fi

# Update package lists once a day at most (apt-cache lookups need them too).
if [ ! -f /var/lib/apt/pclive-updated ] || [ -n "$(find /var/lib/apt/pclive-updated -mmin +1440)" ]; then
  log "apt-get update"
  apt-get update -qq
  touch /var/lib/apt/pclive-updated
fi

version_ge() { dpkg --compare-versions "$1" ge "$2"; }
installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

runtime_pkgs=()
for want in containerd:2.1 runc:1.3 criu:4.2; do
  pkg=${want%%:*} min=${want##*:}
  have=$(installed_version "$pkg")
  if [ -z "$have" ] || ! version_ge "$have" "$min"; then runtime_pkgs+=("$pkg"); fi
done
if [ ${#runtime_pkgs[@]} -gt 0 ]; then
  log "installing ${runtime_pkgs[*]}"
  if [ "$need_testing" = 1 ]; then
    apt-get install -y -qq -t forky "${runtime_pkgs[@]}" >/dev/null
  else
    apt-get install -y -qq "${runtime_pkgs[@]}" >/dev/null
  fi
fi

# protobuf-compiler: the containerd API client (containerd-client) compiles containerd's protos.
# netcat-openbsd, fonts-dejavu-core: the migration benchmark copies the baseline's images with nc
# and draws its plots with DejaVu Sans.
# docker-registry: the CRI test (shim/tests/cri.rs) runs a registry of its own on a loopback
# port, since containerd restores a Kubernetes checkpoint on its base image pulled by digest.
base_pkgs=(iptables iproute2 busybox-static redis-server redis-tools jq psmisc procps util-linux protobuf-compiler netcat-openbsd fonts-dejavu-core docker-registry)
missing=()
for pkg in "${base_pkgs[@]}"; do
  [ -n "$(installed_version "$pkg")" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The distribution's units must not start a system containerd, redis or registry: pclive's scripts
# and tests run their own daemons with their own state, and a system one would be a process we did
# not start.
for unit in containerd redis-server docker-registry; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled "$unit" >/dev/null 2>&1; then
    systemctl disable --now "$unit" >/dev/null 2>&1 || true
  fi
done

# No CRIU options go into /etc/criu/runc.conf: runc uses that file for dumps as well, and CRIU 4.2
# refuses `mntns-compat-mode` on dump. The shim gives restores their own config (see shim/src/task/restore.rs).

for tool in containerd runc criu ctr; do
  command -v "$tool" >/dev/null || { echo "setup.sh: $tool not found after install" >&2; exit 1; }
done
log "containerd $(containerd --version | awk '{print $3}'), $(runc --version | head -1), criu $(criu --version | awk '/Version/{print $2}')"

# Kernel features: report what is missing now rather than failing late.
if [ -e /proc/self/pagemap ] && ! criu check --feature mem_dirty_track >/dev/null 2>&1; then
  log "note: kernel has no soft-dirty tracking; pclive tracks writes with uffd-wp where the kernel offers it (Linux 6.7+), else it hashes page contents ('pclive check' says which this host gets)"
fi
if ! criu check --feature uffd >/dev/null 2>&1; then
  log "WARNING: userfaultfd not usable by CRIU: lazy restore will not work on this host"
fi
if [ -d /sys/fs/cgroup/freezer ] || [ -f /sys/fs/cgroup/cgroup.controllers ]; then :; else
  log "WARNING: no cgroup freezer found: pause/checkpoint will fail"
fi

if [ "$build" = 1 ]; then
  command -v cargo >/dev/null || { echo "setup.sh: cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
  log "building pclive (release)"
  (cd "$here" && cargo build --release --locked --bins -q)
  install -m 0755 "$here/target/release/containerd-shim-pclive-v2" /usr/local/bin/
  install -m 0755 "$here/target/release/pclive" /usr/local/bin/
  log "installed /usr/local/bin/containerd-shim-pclive-v2 and /usr/local/bin/pclive"
  # Shell completion and man pages, generated from the command line's definition.
  mkdir -p /usr/share/bash-completion/completions /usr/local/share/man/man1
  /usr/local/bin/pclive completions bash > /usr/share/bash-completion/completions/pclive
  /usr/local/bin/pclive man /usr/local/share/man/man1
  log "installed bash completion (/usr/share/bash-completion/completions/pclive) and man pages (man pclive)"
fi
log "done"
