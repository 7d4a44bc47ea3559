//! containerd-shim-pclive-v2: the containerd shim v2 of runtime `io.containerd.pclive.v2`.
//!
//! containerd starts it; users do not. It runs containers with runc as the runc shim does and
//! adds checkpoint/restore (and, through the restore engine, live migration).

use containerd_shim_pclive::{annotations, service};

/// What the shim does as CRIU's action script during a restore:
/// - `setup-namespaces`: bring `lo` up in the restored container's new network namespace before
///   CRIU restores its sockets (runc leaves it down, and a connection over 127.0.0.1 cannot be
///   restored on a down interface: "Can't connect inet socket back: Network is unreachable");
///   for a received migration whose address moves here, its interfaces come up locked;
/// - `post-restore`: a received migration's resume gate (restore-engine/src/destination/gate.rs);
/// - `network-unlock`: the interfaces of a moved address are unlocked and announced (see
///   [`moved_address`]).
fn criu_action(action: &str) -> i32 {
    match action {
        "setup-namespaces" => {
            let Some(pid) = init_pid() else {
                eprintln!("pclive: CRTOOLS_INIT_PID is not set at setup-namespaces");
                return 1;
            };
            if let Err(e) = containerd_shim_pclive::netns::bring_up_loopback(pid) {
                eprintln!("pclive: cannot bring up lo in the restored network namespace: {e}");
                return 1;
            }
            moved_address(action, Some(pid))
        }
        "post-restore" => restore_engine::destination::gate::hook_main(),
        "network-unlock" => moved_address(action, init_pid()),
        _ => 0,
    }
}

/// For a received migration whose address moves here (the receiving server's gate says so):
/// at CRIU's `setup-namespaces`, the interfaces held down since the receiving container was
/// created come up locked (nothing in or out) so that CRIU can reconnect the TCP sockets; at
/// `network-unlock`, once the resume is recorded, they are unlocked and announce the address
/// before the tasks resume.
fn moved_address(action: &str, pid: Option<u32>) -> i32 {
    match raise_moved_address(action, pid) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pclive: the container's address cannot come up here: {e}");
            1
        }
    }
}

fn raise_moved_address(action: &str, pid: Option<u32>) -> Result<(), String> {
    use containerd_shim_pclive::netns;
    use restore_engine::destination::gate;
    let (request, yes) = match action {
        "setup-namespaces" => (gate::NETWORK_LOCK, "lock"),
        _ => (gate::NETWORK_UNLOCK, "raise"),
    };
    if !gate::ask_network(request, yes)? {
        return Ok(());
    }
    let pid = pid.ok_or_else(|| format!("CRTOOLS_INIT_PID is not set at {action}"))?;
    if action == "setup-namespaces" {
        let held = netns::down_links(pid).map_err(|e| format!("listing its interfaces: {e}"))?;
        netns::raise_locked(pid, &held)
    } else {
        let all = netns::link_names(&netns::of_pid(pid))
            .map_err(|e| format!("listing its interfaces: {e}"))?;
        netns::unlock_and_announce(pid, &all)
    }
}

/// The restored container's init (CRIU's `CRTOOLS_INIT_PID`).
fn init_pid() -> Option<u32> {
    std::env::var("CRTOOLS_INIT_PID").ok()?.parse().ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Run by CRIU as the action script of a restore.
    if args.len() == 1 {
        if let Ok(action) = std::env::var(restore_engine::destination::gate::ACTION_ENV) {
            std::process::exit(criu_action(&action));
        }
    }
    if args.get(1).map(String::as_str)
        == Some(containerd_shim_pclive::lazy_restore::SERVER_SUBCOMMAND)
    {
        std::process::exit(restore_engine::server::server_main(&args[2..]));
    }
    if args.iter().any(|a| a == "--version" || a == "-version") {
        println!(
            "containerd-shim-pclive-v2 {} (runtime {})",
            env!("CARGO_PKG_VERSION"),
            service::RUNTIME_ID
        );
        return;
    }
    if args
        .iter()
        .any(|a| a == "--help" || a == "-help" || a == "-h")
    {
        println!(
            "containerd-shim-pclive-v2 {}\n\n\
             The containerd shim v2 for runtime {}. containerd starts it; run containers with\n  \
             ctr run --runtime {} ...\n\
             It runs containers with runc (>= 1.3) and checkpoints/restores them with CRIU (>= 4.2).\n\
             Restore a checkpoint image directory with the OCI annotation\n  \
             {}=/path/to/images",
            env!("CARGO_PKG_VERSION"),
            service::RUNTIME_ID,
            service::RUNTIME_ID,
            annotations::RESTORE_IMAGE_PATH
        );
        return;
    }
    containerd_shim::run::<service::Service>(service::RUNTIME_ID, None);
}
