# Private containerd daemons for pclive's scripts (sourced, not run).
#
#   containerd_start DIR [COMMAND-PREFIX...]   config, shim link and daemon under DIR; the daemon
#                                              runs under COMMAND-PREFIX (e.g. nsenter --net=…);
#                                              its pid goes to DIR/containerd.pid
#   containerd_remove_all SOCKET               every container of every namespace, cgroups too
#   containerd_stop DIR                        stops the daemon containerd_start started

containerd_start() {
  local dir=$1; shift
  mkdir -p "$dir/bin"
  ln -sf "$(command -v containerd-shim-pclive-v2)" "$dir/bin/containerd-shim-pclive-v2"
  cat > "$dir/config.toml" <<CONF
version = 3
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri", "io.containerd.podsandbox.controller.v1.podsandbox"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
CONF
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
