# Private containerd daemons for pclive's scripts (sourced, not run).
#
#   containerd_config DIR                      the configuration containerd_start writes (stdout)
#   containerd_start DIR [COMMAND-PREFIX...]   config, shim link and daemon under DIR; the daemon
#                                              runs under COMMAND-PREFIX (e.g. nsenter --net=…);
#                                              its pid goes to DIR/containerd.pid; with
#                                              CRI_SANDBOX_IMAGE set, its CRI plugin is on
#   containerd_remove_all SOCKET               every container of every namespace, cgroups too
#   containerd_stop DIR                        stops the daemon containerd_start started

# The configuration of a containerd whose root, state and socket are under DIR (stdout). With
# CRI_SANDBOX_IMAGE set: containerd's CRI plugin with the runtime handler pclive
# (docs/kubernetes.md), pods sandboxed by that image (import it into namespace k8s.io).
# The Rust tests' harness (shim/tests/common) writes its daemons' configuration with it too.
containerd_config() {
  local dir=$1
  local disabled='"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri", "io.containerd.podsandbox.controller.v1.podsandbox"'
  [ -n "${CRI_SANDBOX_IMAGE:-}" ] && disabled='"io.containerd.nri.v1.nri"'
  cat <<CONF
version = 3
root = "$dir/root"
state = "$dir/state"
disabled_plugins = [$disabled]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
CONF
  [ -n "${CRI_SANDBOX_IMAGE:-}" ] || return 0
  cat <<CONF
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$CRI_SANDBOX_IMAGE"
[plugins."io.containerd.cri.v1.runtime"]
  # Lowering a process's OOM score (the CRI gives sandboxes -998) needs CAP_SYS_RESOURCE,
  # which these machines' root lacks.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.pclive]
    runtime_type = "io.containerd.pclive.v2"
    pod_annotations = ["io.containerd.pclive.*"]
    container_annotations = ["io.containerd.pclive.*"]
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.pclive.options]
      SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$dir/cni/bin"]
    conf_dir = "$dir/cni/conf"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
CONF
}

containerd_start() {
  local dir=$1; shift
  mkdir -p "$dir/bin"
  ln -sf "$(command -v containerd-shim-pclive-v2)" "$dir/bin/containerd-shim-pclive-v2"
  containerd_config "$dir" > "$dir/config.toml"
  PATH="$dir/bin:$PATH" "$@" containerd --config "$dir/config.toml" >> "$dir/containerd.log" 2>&1 &
  echo $! > "$dir/containerd.pid"
  local _
  for _ in $(seq 100); do
    command ctr --address "$dir/containerd.sock" version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "containerd under $dir did not start; see $dir/containerd.log" >&2
  return 1
}

containerd_remove_all() {
  local sock=$1 ns id c _
  for ns in $(command ctr --address "$sock" namespace ls -q 2>/dev/null); do
    for id in $(command ctr --address "$sock" -n "$ns" container ls -q 2>/dev/null); do
      command ctr --address "$sock" -n "$ns" task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
      for _ in $(seq 50); do
        command ctr --address "$sock" -n "$ns" task rm -f "$id" >/dev/null 2>&1 && break
        sleep 0.1
      done
      command ctr --address "$sock" -n "$ns" container rm "$id" >/dev/null 2>&1 || true
    done
    for c in /sys/fs/cgroup/*/"$ns"; do
      if [ -d "$c" ]; then rmdir "$c"/* "$c" 2>/dev/null || true; fi
    done
  done
}

containerd_stop() {
  local dir=$1 pid _
  [ -f "$dir/containerd.pid" ] || return 0
  pid=$(cat "$dir/containerd.pid")
  # Only the daemon containerd_start started (checked by its command line).
  if grep -q "$dir/config.toml" "/proc/$pid/cmdline" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$dir/containerd.pid"
}
