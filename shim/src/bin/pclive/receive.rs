//! `pclive receive CONTAINER --listen ADDR`: creates the receiving container, which waits for
//! its source and then runs the migrated container.

use std::process::ExitCode;

use containerd_shim_pclive::annotations;

use crate::options::{common, parse_options};

/// Prints the receiving shim's events (JSON lines in `path`) as they come, until `done`.
fn follow_receive_progress(path: &std::path::Path, done: &std::sync::atomic::AtomicBool) {
    use restore_engine::events::ServerEvent;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut shown = 0usize;
    loop {
        let finished = done.load(std::sync::atomic::Ordering::SeqCst);
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines().skip(shown) {
            shown += 1;
            let Ok(event) = serde_json::from_str::<ServerEvent>(line) else {
                continue;
            };
            match event {
                ServerEvent::Listening { address } => eprintln!("  listening on {address}"),
                ServerEvent::RoundReceived {
                    round,
                    bytes,
                    staged_bytes,
                    last,
                    ..
                } => eprintln!(
                    "  round {round:>2}{}: {:>8.1} MiB received, {:.1} MiB staged",
                    if last { " (source paused)" } else { "" },
                    mib(bytes),
                    mib(staged_bytes)
                ),
                ServerEvent::ImagesReady { image_bytes, .. } => eprintln!(
                    "  image files received ({:.1} KiB): restoring",
                    image_bytes as f64 / 1024.0
                ),
                ServerEvent::Assembled(report) => eprintln!(
                    "  images completed from the staged memory in {:.3}s",
                    report.seconds
                ),
                ServerEvent::RestoreFinished { after_seconds } => {
                    eprintln!("  restored in {after_seconds:.3}s: the container runs here")
                }
                ServerEvent::Done(stats) => eprintln!(
                    "  every page installed ({:.1} MiB: {} by fault, {} in the background)",
                    mib(stats.bytes),
                    stats.pages_by_fault,
                    stats.pages_in_background
                ),
                ServerEvent::Error { message } => eprintln!("  failed: {message}"),
                ServerEvent::Ready { .. } | ServerEvent::Task { .. } | ServerEvent::Committed => {}
            }
        }
        if finished {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

pub fn run(args: &[String]) -> ExitCode {
    let usage = "usage: pclive receive CONTAINER --listen ADDR:PORT (--key-file FILE | --insecure) (--rootfs DIR | --image REF) [--eager] [--address SOCKET] [--namespace NS] [--net-host] [--tcp-close]";
    let (positional, options) =
        match parse_options(args, &["insecure", "eager", "net-host", "tcp-close"]) {
            Ok(parsed) => parsed,
            Err(e) => {
                eprintln!("pclive receive: {e}\n{usage}");
                return ExitCode::from(2);
            }
        };
    let ([container], Some(listen)) = (positional.as_slice(), options.get("listen")) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let auth = match (options.get("key-file"), options.contains_key("insecure")) {
        (Some(key), false) => format!("{}={key}", annotations::RECEIVE_KEY_FILE),
        (None, true) => format!("{}=true", annotations::RECEIVE_INSECURE),
        _ => {
            eprintln!("pclive receive: give exactly one of --key-file FILE and --insecure");
            return ExitCode::from(2);
        }
    };
    let common = common(&options);
    // The receiving container is an ordinary containerd container with pclive's annotations;
    // ctr builds its spec exactly as `ctr run` would for the source.
    let mut command = std::process::Command::new("ctr");
    command
        .args([
            "--address",
            &common.address,
            "--namespace",
            &common.namespace,
        ])
        .args([
            "run",
            "-d",
            "--null-io",
            "--runtime",
            "io.containerd.pclive.v2",
        ])
        .args([
            "--annotation",
            &format!("{}={listen}", annotations::RECEIVE_LISTEN),
        ])
        .args(["--annotation", &auth]);
    // CRIU restores the source's namespaces as they were: a container that shared its host's
    // network must find its sockets' host network here too.
    if options.contains_key("net-host") {
        command.arg("--net-host");
    }
    if options.contains_key("tcp-close") {
        command.args([
            "--annotation",
            &format!("{}=true", annotations::RESTORE_TCP_CLOSE),
        ]);
    }
    if options.contains_key("eager") {
        // The receiving container restores lazily unless told otherwise.
        command.args([
            "--annotation",
            &format!("{}=false", annotations::RESTORE_LAZY_PAGES),
        ]);
    }
    // The receiving shim appends its progress here; we follow it while ctr waits.
    let progress_dir = std::env::temp_dir().join(format!("pclive-receive-{}", std::process::id()));
    let progress_file = progress_dir.join("progress");
    command.args([
        "--annotation",
        &format!(
            "{}={}",
            annotations::RECEIVE_PROGRESS_FILE,
            progress_file.display()
        ),
    ]);
    match (options.get("rootfs"), options.get("image")) {
        (Some(rootfs), None) => {
            command.args(["--rootfs", rootfs, container]);
        }
        (None, Some(image)) => {
            command.args([image, container]);
        }
        _ => {
            eprintln!("pclive receive: give exactly one of --rootfs DIR and --image REF");
            return ExitCode::from(2);
        }
    }
    command.arg("/bin/true");
    let ctr = |args: &[&str]| {
        std::process::Command::new("ctr")
            .args([
                "--address",
                &common.address,
                "--namespace",
                &common.namespace,
            ])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // What a failed receive leaves must be removable without touching a container of the same
    // name that was there before.
    if ctr(&["container", "info", container]) {
        eprintln!(
            "pclive receive: a container named {container} already exists in namespace {}: \
             remove it (ctr container rm) or receive under another name",
            common.namespace
        );
        return ExitCode::from(2);
    }
    if let Err(e) = std::fs::create_dir_all(&progress_dir) {
        eprintln!(
            "pclive receive: cannot create {}: {e}",
            progress_dir.display()
        );
        return ExitCode::FAILURE;
    }
    eprintln!("pclive: {container} listens on {listen} for its source; waiting for the migration");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = {
        let done = std::sync::Arc::clone(&done);
        let progress_file = progress_file.clone();
        std::thread::spawn(move || follow_receive_progress(&progress_file, &done))
    };
    let status = command.status();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = follower.join();
    let _ = std::fs::remove_dir_all(&progress_dir);
    let failed = |why: String| {
        eprintln!("pclive receive: {why}");
        // The task never ran here (the source resumed): remove what ctr created.
        ctr(&["task", "delete", "--force", container]);
        ctr(&["container", "delete", container]);
        ExitCode::FAILURE
    };
    match status {
        Ok(status) if status.success() => {
            println!("received {container}: it runs here now");
            ExitCode::SUCCESS
        }
        Ok(status) => failed(format!(
            "the receiving container failed ({status}); see containerd's log. It was removed."
        )),
        Err(e) => failed(format!("cannot run ctr: {e}")),
    }
}
