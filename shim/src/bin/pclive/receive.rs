//! `pclive receive CONTAINER --listen ADDR`: creates the receiving container, which waits for
//! its source and then runs the migrated container.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Args;
use containerd_shim_pclive::annotations;
use restore_engine::events::ServerEvent;

use crate::options::{exit, Containerd, KeyArgs};
use crate::progress::Progress;

#[derive(Args, Debug)]
#[command(
    about = "Create the receiving container of a migration; returns once it runs here",
    long_about = "Creates a container that waits on --listen for its source (`pclive migrate` on \
the other host), receives its memory while it still runs there, then restores it here: lazily \
by default (the tasks resume at once and their memory is installed with userfaultfd), or with \
--eager (every page in place before the tasks resume). The destination decides the point of no \
return: it records that the restored tasks resume before they do, and answers the source's \
questions about the outcome for a while if the source lost its connection. A failed receive \
removes the container it created."
)]
#[command(group(clap::ArgGroup::new("root").required(true).args(["rootfs", "image"])))]
pub struct ReceiveArgs {
    /// The container's name here
    pub container: String,
    /// Where to listen for the source
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: String,
    #[command(flatten)]
    pub key: KeyArgs,
    /// The root filesystem directory (as the source's `ctr run --rootfs`)
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// The image (as the source's `ctr run IMAGE`; it must be in this host's image store)
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// Restore eagerly: complete the final dump's images with the pre-copied memory, then a
    /// plain restore (no lazy-pages server)
    #[arg(long)]
    pub eager: bool,
    /// The source container shares its host's network namespace (ctr run --net-host), so this
    /// one must too
    #[arg(long)]
    pub net_host: bool,
    /// Restore established TCP connections closed (when the container's address does not move
    /// with it, e.g. host networking: its clients reconnect). The source learns it in the
    /// handshake and its final dump neither reads nor locks the connections, which keeps the
    /// pause short for a server with many clients
    #[arg(long, conflicts_with = "move_address")]
    pub tcp_close: bool,
    /// Join this network namespace (`ctr run --with-ns network:PATH`), e.g. one a network
    /// plugin prepared with the source's address for --move-address
    #[arg(long, value_name = "PATH", conflicts_with = "net_host")]
    pub netns: Option<PathBuf>,
    /// Take the source's address: the namespace of --netns holds the same address as the
    /// source's (as a CNI gives a pod a fixed IP); its interfaces are held down until the
    /// switchover, then come up announcing the address (gratuitous ARP) before the tasks resume,
    /// and the source's TCP connections continue here. The source says --move-address too
    #[arg(long, requires = "netns")]
    pub move_address: bool,
    /// A mount as the source container's (`ctr run --mount`: type=bind,src=DIR,dst=PATH,
    /// options=rbind:rw); repeat for each. A bind mount's source must exist here with the
    /// files the container uses: pclive does not copy it
    #[arg(long = "mount", value_name = "SPEC")]
    pub mounts: Vec<String>,
    /// Both hosts see the container's root filesystem on the same storage (the source says
    /// --shared-rootfs too): nothing of it is copied, and the receive checks that this host's
    /// tree is the source's. Without it the source's filesystem changes (its writable layer,
    /// or the whole --rootfs directory) are copied into this container's
    #[arg(long)]
    pub shared_rootfs: bool,
    /// Threads that copy the memory in the background after the restore while the main one
    /// serves the container's faults (1-16; default 1). More fill faster where memory stays
    /// resident, but take CPU from the container; on a VM whose balloon reports freed memory
    /// (`pclive check`) the hypervisor's page population sets the pace instead
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16), conflicts_with = "eager")]
    pub copier_threads: Option<u16>,
    /// How long to wait for the source
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub accept_timeout: u64,
    /// Print the outcome and every event of the receiving side as JSON on stdout (progress
    /// still goes to stderr)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub containerd: Containerd,
}

/// What the receiving shim reported: its events, and the migration's conclusion (phase and
/// reason) if it came.
#[derive(Default)]
struct Followed {
    events: Vec<serde_json::Value>,
    concluded: Option<(String, Option<String>)>,
}

/// Prints the receiving shim's events (JSON lines in `path`) as they come, until the migration
/// concluded or `done`.
fn follow_receive_progress(path: &Path, done: &AtomicBool) -> Followed {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut shown = 0usize;
    let mut followed = Followed::default();
    let mut installed_said = false;
    let progress = Progress::new("waiting for the source");
    macro_rules! say {
        ($($t:tt)*) => { progress.line(&format!($($t)*)) };
    }
    loop {
        let finished = done.load(Ordering::SeqCst);
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines().skip(shown) {
            shown += 1;
            let Ok(event) = serde_json::from_str::<ServerEvent>(line) else {
                continue;
            };
            if let Ok(value) = serde_json::from_str(line) {
                followed.events.push(value);
            }
            match event {
                ServerEvent::Listening { address } => say!("  listening on {address}"),
                ServerEvent::SourceArrived {
                    migration_id,
                    container,
                    peer,
                    page_streams,
                } => {
                    say!(
                        "  source {peer} arrived: {container}, migration {migration_id}{}",
                        restore_engine::source::streams::describe(page_streams)
                    );
                    progress.status("receiving memory while the source runs");
                }
                ServerEvent::Refused { peer, reason } => {
                    say!("  refused a connection from {peer}: {reason}; still waiting")
                }
                ServerEvent::RoundReceived {
                    round,
                    bytes,
                    received_bytes,
                    resident_bytes,
                    cpu_seconds,
                    last,
                    ..
                } => say!(
                    "  round {round:>2}{}: {:>8.1} MiB received ({:.1} MiB in all), {:.1} MiB resident in the staging store, {cpu_seconds:.2} CPU-s",
                    if last { " (source paused)" } else { "" },
                    mib(bytes),
                    mib(received_bytes),
                    mib(resident_bytes)
                ),
                ServerEvent::ImagesReady { image_bytes, .. } => {
                    say!(
                        "  image files received ({:.1} KiB): restoring",
                        image_bytes as f64 / 1024.0
                    );
                    progress.status("restoring");
                }
                ServerEvent::Assembled(report) => say!(
                    "  images completed from the staged memory in {:.3}s",
                    report.seconds
                ),
                ServerEvent::RestoreFinished { after_seconds } => {
                    say!("  restored in {after_seconds:.3}s: the container runs here");
                    progress.status("installing the rest of the memory");
                }
                // The fill's end and the server's end both carry the totals: said once.
                ServerEvent::Done(stats) | ServerEvent::FillComplete(stats) if !installed_said => {
                    installed_said = true;
                    say!(
                        "  every page installed ({:.1} MiB: {} by fault, {} in the background)",
                        mib(stats.bytes),
                        stats.pages_by_fault,
                        stats.pages_in_background
                    )
                }
                ServerEvent::Done(_) | ServerEvent::FillComplete(_) => {}
                ServerEvent::Concluded { phase, reason } => {
                    match &reason {
                        Some(reason) => say!("  concluded: {phase}: {reason}"),
                        None => say!("  concluded: {phase}"),
                    }
                    followed.concluded = Some((phase, reason));
                    return followed;
                }
                ServerEvent::Error { message } => say!("  failed: {message}"),
                ServerEvent::Ready { .. } | ServerEvent::Task { .. } | ServerEvent::Committed => {}
            }
        }
        if finished {
            return followed;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// What ctr says when it loses its connection to containerd (a restart of containerd), as
/// opposed to an error of the task.
const LOST_CONTAINERD: [&str; 4] = [
    "error reading from server",
    "connection refused",
    "transport is closing",
    "Unavailable",
];

/// ctr, talking to the containerd and namespace the user chose.
fn ctr_command(address: &str, namespace: &str) -> Command {
    let mut command = Command::new("ctr");
    command.args(["--address", address, "--namespace", namespace]);
    command
}

/// How long to wait for containerd to answer again (a restart) before deciding about a task.
const CONTAINERD_PATIENCE: Duration = Duration::from_secs(60);

/// Whether container `id` has a task that is not stopped, waiting for containerd to answer
/// (it may be restarting) for up to [`CONTAINERD_PATIENCE`].
fn task_alive(address: &str, namespace: &str, id: &str) -> bool {
    let deadline = std::time::Instant::now() + CONTAINERD_PATIENCE;
    loop {
        let out = ctr_command(address, namespace)
            .args(["task", "ls"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => {
                return String::from_utf8_lossy(&out.stdout).lines().any(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    fields.first() == Some(&id) && fields.get(2).is_some_and(|s| *s != "STOPPED")
                })
            }
            _ if std::time::Instant::now() < deadline => thread::sleep(Duration::from_millis(500)),
            _ => return false,
        }
    }
}

pub fn run(args: ReceiveArgs) -> ExitCode {
    let fail = |code: u8, message: String| {
        eprintln!("pclive receive: {message}");
        ExitCode::from(code)
    };
    let auth = match args.key.key_path() {
        Ok(Some(key)) => format!("{}={}", annotations::RECEIVE_KEY_FILE, key.display()),
        Ok(None) => format!("{}=true", annotations::RECEIVE_INSECURE),
        Err(e) => return fail(2, e),
    };
    let (address, namespace) = (&args.containerd.address, &args.containerd.namespace);
    let ctr = |ctr_args: &[&str]| {
        ctr_command(address, namespace)
            .args(ctr_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // What a failed receive leaves must be removable without touching a container of the same
    // name that was there before.
    if ctr(&["container", "info", &args.container]) {
        return fail(
            2,
            format!(
                "a container named {} already exists in namespace {namespace}: remove it (ctr container rm) or receive under another name",
                args.container
            ),
        );
    }
    // The receiving shim appends its progress here; we follow it while ctr waits. A private
    // directory (mkdtemp, 0700) in the shim's state directory, where the host's settings let
    // annotations name files (README, "Trust").
    let state_dir = args.containerd.dir();
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state_dir)
    {
        return fail(
            exit::FAILED,
            format!("cannot create {}: {e}", state_dir.display()),
        );
    }
    let progress_dir = match crate::options::private_tempdir("receive-", &state_dir) {
        Ok(d) => d,
        Err(e) => {
            return fail(
                exit::FAILED,
                format!("cannot create a temporary directory: {e}"),
            )
        }
    };
    let progress_file = progress_dir.path().join("progress");
    // The receiving container is an ordinary containerd container with pclive's annotations;
    // ctr builds its spec exactly as `ctr run` would for the source.
    let mut command = ctr_command(address, namespace);
    command
        .args([
            "run",
            "-d",
            "--null-io",
            "--runtime",
            "io.containerd.pclive.v2",
        ])
        .args([
            "--annotation",
            &format!("{}={}", annotations::RECEIVE_LISTEN, args.listen),
        ])
        .args(["--annotation", &auth])
        .args([
            "--annotation",
            &format!(
                "{}={}",
                annotations::RECEIVE_ACCEPT_TIMEOUT,
                args.accept_timeout
            ),
        ])
        .args([
            "--annotation",
            &format!(
                "{}={}",
                annotations::RECEIVE_PROGRESS_FILE,
                progress_file.display()
            ),
        ]);
    // CRIU restores the source's namespaces as they were: a container that shared its host's
    // network must find its sockets' host network here too.
    if args.net_host {
        command.arg("--net-host");
    }
    if let Some(netns) = &args.netns {
        match std::path::absolute(netns) {
            Ok(path) => {
                command
                    .arg("--with-ns")
                    .arg(format!("network:{}", path.display()));
            }
            Err(e) => return fail(2, format!("--netns {}: {e}", netns.display())),
        }
    }
    if args.move_address {
        command.args([
            "--annotation",
            &format!("{}=true", annotations::RECEIVE_MOVE_ADDRESS),
        ]);
    }
    for mount in &args.mounts {
        command.args(["--mount", mount]);
    }
    if args.shared_rootfs {
        command.args([
            "--annotation",
            &format!("{}=true", annotations::RECEIVE_SHARED_ROOTFS),
        ]);
    }
    if args.tcp_close {
        command.args([
            "--annotation",
            &format!("{}=true", annotations::RESTORE_TCP_CLOSE),
        ]);
    }
    if let Some(threads) = args.copier_threads {
        command.args([
            "--annotation",
            &format!("{}={threads}", annotations::RESTORE_COPIER_THREADS),
        ]);
    }
    if args.eager {
        // The receiving container restores lazily unless told otherwise.
        command.args([
            "--annotation",
            &format!("{}=false", annotations::RESTORE_LAZY_PAGES),
        ]);
    }
    match (&args.rootfs, &args.image) {
        (Some(rootfs), None) => match std::path::absolute(rootfs) {
            Ok(rootfs) => {
                command.arg("--rootfs").arg(rootfs).arg(&args.container);
            }
            Err(e) => return fail(2, format!("--rootfs {}: {e}", rootfs.display())),
        },
        (None, Some(image)) => {
            command.args([image, &args.container]);
        }
        _ => unreachable!("clap requires exactly one of --rootfs and --image"),
    }
    command.arg("/bin/true");
    eprintln!(
        "pclive: {} listens on {} for its source; waiting for the migration",
        args.container, args.listen
    );
    let done = Arc::new(AtomicBool::new(false));
    let follower = {
        let done = Arc::clone(&done);
        let progress_file = progress_file.clone();
        thread::spawn(move || follow_receive_progress(&progress_file, &done))
    };
    let output = command.stderr(Stdio::piped()).output();
    let lost_containerd = output.as_ref().is_ok_and(|out| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprint!("{stderr}");
        LOST_CONTAINERD.iter().any(|sign| stderr.contains(sign))
    });
    let mut status = output.map(|out| out.status);
    // A lazy restore returns as soon as the tasks run: the outcome (every page installed in a
    // live container) comes later. Follow it until the shim concludes.
    if !status.as_ref().is_ok_and(|s| s.success()) {
        // ctr also fails when it loses containerd (a restart) while the receiving container
        // goes on in its shim: that container must not be removed under the migration.
        if lost_containerd && task_alive(address, namespace, &args.container) {
            eprintln!(
                "pclive: ctr lost containerd, but {} is still receiving in its shim: following the migration",
                args.container
            );
            status = Ok(std::process::ExitStatus::default());
            let (address, namespace, container) = (
                address.to_string(),
                namespace.to_string(),
                args.container.clone(),
            );
            let done = Arc::clone(&done);
            thread::spawn(move || {
                while task_alive(&address, &namespace, &container) {
                    thread::sleep(Duration::from_secs(1));
                }
                done.store(true, Ordering::SeqCst);
            });
        } else {
            done.store(true, Ordering::SeqCst);
        }
    }
    let followed = follower.join().unwrap_or_default();
    let concluded = followed.concluded.clone();
    // --json: the outcome and the events, whatever happened.
    let report = |outcome: &str, reason: Option<&str>| {
        if args.json {
            let value = serde_json::json!({
                "container": args.container,
                "listen": args.listen,
                "outcome": outcome,
                "reason": reason,
                "events": followed.events,
            });
            println!("{value:#}");
        }
    };
    let failed = |why: String| {
        report("failed", Some(&why));
        // The task never ran here (the source resumes, or is in doubt): remove what ctr
        // created.
        ctr(&["task", "delete", "--force", &args.container]);
        ctr(&["container", "delete", &args.container]);
        fail(exit::FAILED, why)
    };

    match status {
        Ok(status) if status.success() => match concluded {
            Some((phase, _)) if phase == "committed" => {
                let done = format!(
                    "received {}: it runs here now, every page installed",
                    args.container
                );
                if args.json {
                    eprintln!("{done}");
                    report("committed", None);
                } else {
                    println!("{done}");
                }
                ExitCode::SUCCESS
            }
            Some((phase, reason)) => failed(format!(
                    "{} was restored here but the migration is {phase}: {}. The source stays frozen, in doubt, for an operator (`pclive status`, `pclive resolve` there)",
                    args.container,
                    reason.unwrap_or_default()
            )),
            // Never deleted here: it may run.
            None => {
                report("unknown", None);
                fail(
                exit::FAILED,
                format!(
                    "{}: the migration's outcome was not reported; see `pclive status {}`",
                    args.container, args.container
                ),
            )
            }
        },
        Ok(status) => failed(format!(
            "the receiving container failed ({status}); see containerd's log and `pclive status {}`. It was removed.",
            args.container
        )),
        Err(e) => failed(format!("cannot run ctr: {e}")),
    }
}
