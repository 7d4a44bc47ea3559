#!/usr/bin/env bash
# Two emulated hosts on this machine for migration tests and demos: two network namespaces joined
# by a veth pair (rate-limited with tc), each running its own containerd (own root, state and
# socket) with the pclive shim, its own pclive settings (NAME's directory under
# /run/pclive-testbed/NAME/HOST may be named by annotations; receiving is allowed) and a copy of
# one migration key (HOST/migration.key).
#
#   scripts/testbed.sh up [--name NAME] [--rate 1gbit|10gbit|none] [--cri SANDBOX_IMAGE]
#                                                  (--cri: containerd's CRI plugin on, runtime
#                                                  handler pclive, namespace k8s.io; import the
#                                                  sandbox image on each host)
#   scripts/testbed.sh down [--name NAME]
#   scripts/testbed.sh ctr src|dst [--name NAME] CTR-ARGS...
#   scripts/testbed.sh exec src|dst|cli [--name NAME] COMMAND...   run on a host (its network
#                                                  namespace and, for src/dst, its cgroups)
#   scripts/testbed.sh env [--name NAME]          print the hosts' addresses and sockets
#   scripts/testbed.sh restart src|dst [--name NAME]   restart a host's containerd (its shims,
#                                                  and so its containers, go on running)
#   scripts/testbed.sh pod src|dst [--name NAME] POD ADDRESS [--down]
#                                                  a pod network namespace NAME-HOST-POD on the
#                                                  pod network, with ADDRESS/24 on its eth0 (the
#                                                  MAC follows from the address, as a CNI with
#                                                  fixed IPs gives), down with --down
#
# Hosts: NAME-src (10.213.N.1) and NAME-dst (10.213.N.2); NAME defaults to pclive. A third
# namespace, NAME-cli, stands for the service's clients: it reaches src at 10.214.N.1 and dst at
# 10.215.N.1 over links of their own (not rate-limited: migration traffic and client traffic do
# not share a NIC). Each host's containerd (with its shims, runc and CRIU) runs in cgroups
# pclive-testbed-NAME-src|dst under cpuacct and memory, so benchmarks can read each host's CPU
# time and memory. Only the namespaces, links, addresses and cgroups created here are touched;
# `down` removes all of it, containers included, and stops only the containerd daemons `up`
# started.
#
# The pod network (for containers whose address moves with them, pclive migrate --move-address):
# one L2 segment, 10.216.N.0/24, as a cluster's pod network on a shared switch. A bridge in the
# client namespace is the switch (its own address 10.216.N.254 is the clients'); each host has a
# bridge of its own, uplinked to it, and a pod's eth0 hangs on its host's bridge.
set -euo pipefail
. "$(dirname "$0")/lib/containerd.sh"

cmd=${1:-}
[ -n "$cmd" ] && shift
name=pclive
rate=1gbit
cri=
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --cri) cri=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$name" in *[!a-z0-9]*|"") echo "testbed: --name takes lower-case letters and digits" >&2; exit 2 ;; esac
[ ${#name} -le 10 ] || { echo "testbed: --name is at most 10 characters (interface names are short)" >&2; exit 2; }

state=/run/pclive-testbed/$name
# A /24 per testbed name, so several test beds can coexist.
net=$(( $(printf '%s' "$name" | cksum | cut -d' ' -f1) % 200 + 20 ))
addr_of() { [ "$1" = src ] && echo "10.213.$net.1" || echo "10.213.$net.2"; }
# The address clients use for a host, and the client's own address on that link.
client_addr_of() { [ "$1" = src ] && echo "10.214.$net.1" || echo "10.215.$net.1"; }
client_side_of() { [ "$1" = src ] && echo "10.214.$net.2" || echo "10.215.$net.2"; }
pod_net() { echo "10.216.$net"; }
ns_of() { echo "$name-$1"; }
sock_of() { echo "$state/$1/containerd.sock"; }
cgroup_of() { echo "/sys/fs/cgroup/$1/pclive-testbed-$name-$2"; }

# Runs COMMAND in host $1's network namespace and (src/dst) cgroups. nsenter --net, not
# `ip netns exec`: the latter remounts /sys and hides the cgroups runc needs.
on_host() {
  local host=$1; shift
  if [ "$host" != cli ]; then
    local controller
    for controller in cpuacct memory; do
      echo "$BASHPID" > "$(cgroup_of $controller "$host")/cgroup.procs"
    done
  fi
  exec nsenter --net="/run/netns/$(ns_of "$host")" "$@"
}

start_containerd() {
  # Each host records its migrations in its own state directory, as two machines would, and has
  # settings of its own (/etc/pclive/config.toml on a real host): annotations may name files in
  # the host's directory, and containers may receive migrations (without a key too: the
  # test bed's link reaches nobody else).
  mkdir -p "$state/$1"
  cat > "$state/$1/pclive-config.toml" <<CONF
[annotations]
read_dirs = ["/etc/pclive", "/var/lib/pclive", "$state/$1"]
write_dirs = ["/var/lib/pclive", "$state/$1"]
allow_receive = true
allow_insecure = true
CONF
  local sandbox=""
  [ -f "$state/cri-sandbox-image" ] && sandbox=$(cat "$state/cri-sandbox-image")
  CRI_SANDBOX_IMAGE="$sandbox" PCLIVE_CONFIG="$state/$1/pclive-config.toml" PCLIVE_STATE_DIR="$state/$1/pclive" \
    containerd_start "$state/$1" on_host "$1"
}

up() {
  [ "$(id -u)" = 0 ] || { echo "testbed: run as root" >&2; exit 1; }
  command -v containerd-shim-pclive-v2 >/dev/null || { echo "testbed: containerd-shim-pclive-v2 not installed: run scripts/setup.sh" >&2; exit 1; }
  if [ -d "$state" ]; then echo "testbed $name is already up (scripts/testbed.sh down --name $name)" >&2; exit 1; fi
  mkdir -p "$state"
  [ -n "$cri" ] && echo "$cri" > "$state/cri-sandbox-image"
  trap 'down >/dev/null 2>&1' ERR
  for host in src dst cli; do ip netns add "$(ns_of $host)"; done
  for host in src dst; do
    local controller
    for controller in cpuacct memory; do mkdir -p "$(cgroup_of $controller $host)"; done
  done
  ip link add "${name}s" type veth peer name "${name}d"
  for host in src dst; do
    local dev ns
    dev=$name$([ $host = src ] && echo s || echo d)
    ns=$(ns_of $host)
    ip link set "$dev" netns "$ns"
    ip -n "$ns" addr add "$(addr_of $host)/24" dev "$dev"
    ip -n "$ns" link set "$dev" up
    ip -n "$ns" link set lo up
    if [ "$rate" != none ]; then
      ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$rate" burst 4mb latency 50ms
    fi
  done
  ip -n "$(ns_of cli)" link set lo up
  for host in src dst; do
    local hdev cdev
    hdev=$name$([ $host = src ] && echo cs || echo cd)
    cdev=$name$([ $host = src ] && echo sc || echo dc)
    ip link add "$hdev" type veth peer name "$cdev"
    ip link set "$hdev" netns "$(ns_of $host)"
    ip link set "$cdev" netns "$(ns_of cli)"
    ip -n "$(ns_of $host)" addr add "$(client_addr_of $host)/24" dev "$hdev"
    ip -n "$(ns_of cli)" addr add "$(client_side_of $host)/24" dev "$cdev"
    ip -n "$(ns_of $host)" link set "$hdev" up
    ip -n "$(ns_of cli)" link set "$cdev" up
  done
  # The pod network: the switch in the client namespace, a bridge per host uplinked to it.
  local cli_ns; cli_ns=$(ns_of cli)
  ip -n "$cli_ns" link add "${name}sw" type bridge
  ip -n "$cli_ns" addr add "$(pod_net).254/24" dev "${name}sw"
  ip -n "$cli_ns" link set "${name}sw" up
  for host in src dst; do
    local up_dev; up_dev=${name}u$([ $host = src ] && echo s || echo d)
    ip -n "$(ns_of $host)" link add "${name}br" type bridge
    ip -n "$(ns_of $host)" link add "${name}up" type veth peer name "$up_dev" netns "$cli_ns"
    ip -n "$(ns_of $host)" link set "${name}up" master "${name}br" up
    ip -n "$(ns_of $host)" link set "${name}br" up
    ip -n "$cli_ns" link set "$up_dev" master "${name}sw" up
  done
  # One migration key, copied to each host (root's, 0600), as an administrator would.
  mkdir -p "$state/src" "$state/dst"
  (umask 077; head -c 32 /dev/urandom > "$state/src/migration.key")
  (umask 077; cp "$state/src/migration.key" "$state/dst/migration.key")
  for host in src dst; do start_containerd "$host"; done
  trap - ERR
  env_info
}

down() {
  # Best effort to the end: every step runs even if an earlier one found nothing to do.
  set +e
  for host in src dst; do
    if [ -f "$state/$host/containerd.pid" ]; then
      containerd_remove_all "$(sock_of $host)"
      containerd_stop "$state/$host"
    fi
    local pod
    for pod in $(ip netns list | awk '{print $1}' | grep "^$(ns_of $host)-" || true); do
      ip netns del "$pod" 2>/dev/null || true
    done
    ip netns del "$(ns_of $host)" 2>/dev/null || true
  done
  ip netns del "$(ns_of cli)" 2>/dev/null || true
  for host in src dst; do
    # The host's cgroup in every hierarchy, with what CRI pods made below it.
    # The host's shims may still be exiting (containerd is stopped): each directory gets up
    # to five seconds to empty.
    local dir _
    for dir in /sys/fs/cgroup/*/"pclive-testbed-$name-$host"; do
      [ -d "$dir" ] || continue
      for _ in $(seq 50); do
        find "$dir" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null
        rmdir "$dir" 2>/dev/null && break
        sleep 0.1
      done
    done
  done
  if [ -d "$state" ]; then
    grep " $state" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$state"
  fi
  set -e
}

env_info() {
  for host in src dst; do
    printf '%s: netns %s, address %s, containerd %s, clients reach it at %s, cgroups %s, pclive state %s, key %s, settings %s\n' "$host" "$(ns_of $host)" "$(addr_of $host)" "$(sock_of $host)" "$(client_addr_of $host)" "pclive-testbed-$name-$host" "$state/$host/pclive" "$state/$host/migration.key" "$state/$host/pclive-config.toml"
  done
  printf 'cli: netns %s\n' "$(ns_of cli)"
  printf 'pods: network %s.0/24 (clients at %s.254), scripts/testbed.sh pod src|dst POD ADDRESS\n' "$(pod_net)" "$(pod_net)"
  printf 'link: %s\n' "$rate"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  env) env_info ;;
  restart)
    host=${args[0]:-}
    case "$host" in src|dst) ;; *) echo "testbed: restart src|dst" >&2; exit 2 ;; esac
    [ -d "$state" ] || { echo "testbed $name is not up (scripts/testbed.sh up --name $name)" >&2; exit 1; }
    containerd_stop "$state/$host"
    start_containerd "$host" ;;
  ctr)
    host=${args[0]:-}
    case "$host" in src|dst) ;; *) echo "testbed: ctr src|dst ARGS..." >&2; exit 2 ;; esac
    exec ctr --address "$(sock_of "$host")" "${args[@]:1}" ;;
  exec)
    host=${args[0]:-}
    case "$host" in src|dst|cli) ;; *) echo "testbed: exec src|dst|cli COMMAND..." >&2; exit 2 ;; esac
    [ -d "$state" ] || { echo "testbed $name is not up (scripts/testbed.sh up --name $name)" >&2; exit 1; }
    on_host "$host" "${args[@]:1}" ;;
  pod)
    host=${args[0]:-} pod=${args[1]:-} address=${args[2]:-} state_flag=${args[3]:-}
    case "$host" in src|dst) ;; *) echo "testbed: pod src|dst POD ADDRESS [--down]" >&2; exit 2 ;; esac
    case "$pod" in *[!a-z0-9]*|"") echo "testbed: POD is lower-case letters and digits" >&2; exit 2 ;; esac
    [ ${#pod} -le 12 ] || { echo "testbed: POD is at most 12 characters" >&2; exit 2; }
    case "$address" in "$(pod_net)".*) ;; *) echo "testbed: ADDRESS must be in the pod network $(pod_net).0/24" >&2; exit 2 ;; esac
    [ -d "$state" ] || { echo "testbed $name is not up (scripts/testbed.sh up --name $name)" >&2; exit 1; }
    pod_ns="$(ns_of "$host")-$pod"
    mac=$(printf '02:00:%02x:%02x:%02x:%02x' $(echo "$address" | tr . ' '))
    ip netns add "$pod_ns"
    ip -n "$(ns_of "$host")" link add "p-$pod" type veth peer name eth0 netns "$pod_ns" address "$mac"
    ip -n "$(ns_of "$host")" link set "p-$pod" master "${name}br" up
    ip -n "$pod_ns" link set lo up
    ip -n "$pod_ns" addr add "$address/24" dev eth0
    [ "$state_flag" = --down ] || ip -n "$pod_ns" link set eth0 up
    echo "pod: netns /run/netns/$pod_ns, address $address, mac $mac" ;;
  -h|--help|"") awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "testbed: unknown command '$cmd' (try --help)" >&2; exit 2 ;;
esac
