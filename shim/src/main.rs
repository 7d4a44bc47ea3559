//! containerd-shim-pclive-v2: the containerd shim v2 of runtime `io.containerd.pclive.v2`.
//!
//! containerd starts it; users do not. It runs containers with runc as the runc shim does and
//! adds checkpoint/restore (and, through the restore engine, live migration).

use containerd_shim_pclive::{annotations, service};

fn main() {
    let args: Vec<String> = std::env::args().collect();
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
