//! `pclive`: the command-line side of pclive.

use std::process::ExitCode;

use restore_engine::host;

const HELP: &str = "\
pclive — live migration of containers between containerd hosts

USAGE:
    pclive migrate CONTAINER HOST:PORT (--key-file FILE | --insecure) [OPTIONS]
                              move a running container to the host listening on HOST:PORT
                              (see `pclive receive` there): pre-copy while it runs, a short
                              pause, restore there; on any failure it keeps running here
        --address SOCKET          containerd socket (default /run/containerd/containerd.sock)
        --namespace NS            containerd namespace (default default)
        --max-rounds N            pre-copy rounds at most (default 10)
        --target-downtime-ms MS   stop pre-copy when the rest fits this (default 300)
        --tracker content-hash|soft-dirty   dirty tracking (default: the best available)
        --work-dir DIR            keep the final dump's CRIU logs, images and report in DIR
                                  (default: a temporary directory, removed at the end)
        --compress                LZ4-compress pre-copy pages (pays on slow links with
                                  compressible memory; each run goes raw if it saves < 1/8)
        --json                    print the migration report as JSON
    pclive receive CONTAINER --listen ADDR:PORT (--key-file FILE | --insecure)
                   (--rootfs DIR | --image REF) [--eager] [--address SOCKET] [--namespace NS]
                   [--net-host] [--tcp-close]
                              create the receiving container; returns once the migrated
                              container runs here
        --eager                   restore eagerly: complete the final dump's images with the
                                  pre-copied memory, then a plain restore (every page in place
                                  before the tasks resume, no lazy-pages server). Default: lazy
                                  (the tasks resume at once, memory installed with userfaultfd)
        --net-host                the source container shares its host's network namespace
                                  (ctr run --net-host), so this one must too
        --tcp-close               restore established TCP connections closed (needed when the
                                  container's address does not move with it, e.g. host
                                  networking: its clients reconnect)
    pclive check [--json]     what this host offers pclive (tool versions, kernel features)
    pclive dirty-rate PID [--rounds N] [--interval-ms MS] [--tracker content-hash|soft-dirty] [--json]
                              how fast a process dirties its memory, measured with the tracker
                              pre-copy uses: tells whether a migration will converge
    pclive version            print the version
    pclive help               this text

Containers run with `ctr run --runtime io.containerd.pclive.v2 ...`. Checkpoint with
`ctr task checkpoint --image-path DIR [--exit] ID`; restore by creating a container with the
annotation io.containerd.pclive.restore.image-path=DIR, lazily (tasks resume at once, memory is
installed with userfaultfd) with io.containerd.pclive.restore.lazy-pages=true as well.

EXIT CODES:
    0  success
    1  failure; the message says what. A failed migration leaves the container running on the
       source (it resumes whatever went wrong before the destination committed)
    2  usage error
    3  containerd could not be reached: nothing was done";

/// One progress line for a round the source shim reported: size, link rate, how fast the
/// workload dirties memory and the projected time until the pause.
fn describe_round(round: &serde_json::Value) -> String {
    let mb = |v: &serde_json::Value| v.as_f64().map(|b| b / 1e6);
    let bytes = round["bytes"].as_f64().unwrap_or(0.0);
    let seconds = round["seconds"].as_f64().unwrap_or(0.0);
    let mut line = format!(
        "round {:>2}{}: {:>8.1} MiB in {:>6.3}s ({:>7.1} MB/s), {} zero pages, cpu {:.2}s",
        round["round"].as_u64().unwrap_or(0),
        if round["frozen"].as_bool().unwrap_or(false) {
            " (paused)"
        } else {
            ""
        },
        bytes / (1 << 20) as f64,
        seconds,
        mb(&round["link_bytes_per_second"]).unwrap_or(0.0),
        round["zero_pages"].as_u64().unwrap_or(0),
        round["cpu_seconds"].as_f64().unwrap_or(0.0),
    );
    if let Some(dirty) = mb(&round["dirty_bytes_per_second"]) {
        line += &format!(", dirtied {dirty:.1} MB/s");
    }
    if let Some(eta) = round["eta_seconds"].as_f64() {
        line += &format!(", pause in ~{eta:.1}s");
    }
    line
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help" | "--help" | "-h") => {
            println!("{HELP}");
            ExitCode::SUCCESS
        }
        Some("version" | "--version" | "-V") => {
            println!("pclive {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("check") => check(&args[1..]),
        Some("migrate") => migrate(&args[1..]),
        Some("receive") => receive(&args[1..]),
        Some("dirty-rate") => dirty_rate(&args[1..]),
        Some(other) => {
            eprintln!("pclive: unknown command '{other}'\n\n{HELP}");
            ExitCode::from(2)
        }
    }
}

fn check(args: &[String]) -> ExitCode {
    let json = match args {
        [] => false,
        [flag] if flag == "--json" => true,
        _ => {
            eprintln!("usage: pclive check [--json]");
            return ExitCode::from(2);
        }
    };
    let report = host::inspect();
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("pclive: cannot encode the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("kernel {}", report.kernel);
        for f in &report.findings {
            let mark = if f.ok { "ok  " } else { "FAIL" };
            println!("{mark} {:<12} {:<40} {}", f.name, f.detail, f.meaning);
        }
    }
    if report.ready() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn dirty_rate(args: &[String]) -> ExitCode {
    use restore_engine::memory;
    use std::time::{Duration, Instant};

    let usage = "usage: pclive dirty-rate PID [--rounds N] [--interval-ms MS] [--tracker content-hash|soft-dirty] [--json]";
    let Some(pid) = args.first().and_then(|p| p.parse::<u32>().ok()) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let mut rounds = 5u32;
    let mut interval = Duration::from_millis(1000);
    let mut tracker_name: Option<String> = None;
    let mut json = false;
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--json" => json = true,
            "--rounds" | "--interval-ms" | "--tracker" => {
                let Some(value) = it.next() else {
                    eprintln!("{usage}");
                    return ExitCode::from(2);
                };
                match flag.as_str() {
                    "--rounds" => rounds = value.parse().unwrap_or(0),
                    "--interval-ms" => {
                        interval = Duration::from_millis(value.parse().unwrap_or(1000))
                    }
                    _ => tracker_name = Some(value.clone()),
                }
            }
            _ => {
                eprintln!("{usage}");
                return ExitCode::from(2);
            }
        }
    }
    if rounds == 0 {
        eprintln!("{usage}");
        return ExitCode::from(2);
    }
    let mut tracker = match memory::tracker(tracker_name.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pclive: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !json {
        println!(
            "tracker {}; round 0 is the full copy, later rounds what changed in between",
            tracker.name()
        );
        println!("round  dirty MiB  zero pages  scan s   scanned GB/s");
    }
    let mut scanned_before = 0u64;
    for round in 0..=rounds {
        let started = Instant::now();
        // Counted piece by piece: a whole round of a large process is never held.
        let (mut dirty, mut zero_pages) = (0u64, 0usize);
        if let Err(e) = tracker.round_into(pid, &mut |piece: memory::Delta| {
            dirty += piece.data_pages() * memory::PAGE;
            zero_pages += piece.zero.len();
            Ok(())
        }) {
            eprintln!("pclive: {e}");
            return ExitCode::FAILURE;
        }
        let seconds = started.elapsed().as_secs_f64();
        if round == 0 {
            scanned_before = dirty;
        }
        let gbps = scanned_before as f64 / seconds.max(1e-9) / 1e9;
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "round": round, "dirty_bytes": dirty, "zero_pages": zero_pages,
                    "scan_seconds": seconds, "scanned_gb_per_s": gbps,
                    "interval_seconds": interval.as_secs_f64(), "tracker": tracker.name(),
                })
            );
        } else {
            println!(
                "{round:>5}  {:>9.1}  {:>10}  {seconds:>6.3}  {gbps:>12.2}",
                dirty as f64 / (1 << 20) as f64,
                zero_pages
            );
        }
        if round < rounds {
            std::thread::sleep(interval);
        }
    }
    ExitCode::SUCCESS
}

/// Options shared by migrate and receive.
struct Common {
    address: String,
    namespace: String,
}

/// Splits `args` into positional arguments and `--flag value` / `--switch` options.
fn parse_options(
    args: &[String],
    switches: &[&str],
) -> Result<(Vec<String>, std::collections::HashMap<String, String>), String> {
    let mut positional = Vec::new();
    let mut options = std::collections::HashMap::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if let Some(name) = arg.strip_prefix("--") {
            if switches.contains(&name) {
                options.insert(name.to_string(), "true".to_string());
            } else {
                let value = it.next().ok_or(format!("--{name} needs a value"))?;
                options.insert(name.to_string(), value.clone());
            }
        } else {
            positional.push(arg.clone());
        }
    }
    Ok((positional, options))
}

fn common(options: &std::collections::HashMap<String, String>) -> Common {
    Common {
        address: options
            .get("address")
            .cloned()
            .unwrap_or_else(|| "/run/containerd/containerd.sock".into()),
        namespace: options
            .get("namespace")
            .cloned()
            .unwrap_or_else(|| "default".into()),
    }
}

fn migrate(args: &[String]) -> ExitCode {
    use containerd_client::services::v1::{tasks_client::TasksClient, CheckpointTaskRequest};
    use containerd_client::tonic::Request;
    use containerd_shim::protos::protobuf::Message as _;
    use containerd_shim::protos::shim::oci::CheckpointOptions;
    use restore_engine::precopy::MigrateRequest;

    let usage = "usage: pclive migrate CONTAINER HOST:PORT (--key-file FILE | --insecure) [--address SOCKET] [--namespace NS] [--max-rounds N] [--target-downtime-ms MS] [--tracker NAME] [--compress] [--work-dir DIR] [--json]";
    let (positional, options) = match parse_options(args, &["insecure", "json", "compress"]) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("pclive migrate: {e}\n{usage}");
            return ExitCode::from(2);
        }
    };
    let [container, destination] = positional.as_slice() else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let number = |name: &str| -> Result<u32, String> {
        options
            .get(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("--{name} takes a number, not {v}"))
            })
            .unwrap_or(Ok(0))
    };
    let request = match (number("max-rounds"), number("target-downtime-ms")) {
        (Ok(max_rounds), Ok(target_downtime_ms)) => MigrateRequest {
            destination: destination.clone(),
            key_file: options.get("key-file").cloned().unwrap_or_default(),
            insecure: options.contains_key("insecure"),
            max_rounds,
            target_downtime_ms,
            tracker: options.get("tracker").cloned().unwrap_or_default(),
            compress: options.contains_key("compress"),
        },
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("pclive migrate: {e}");
            return ExitCode::from(2);
        }
    };
    if request.key_file.is_empty() != request.insecure {
        eprintln!("pclive migrate: give exactly one of --key-file FILE and --insecure");
        return ExitCode::from(2);
    }
    let common = common(&options);
    // containerd writes no checkpoint image when CheckpointOptions names an image path; the
    // shim writes the final dump's logs and the migration report into the work path.
    // The shim runs elsewhere (containerd's working directory): it needs an absolute path.
    let keep_work = match options.get("work-dir").map(std::path::absolute).transpose() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("pclive migrate: --work-dir: {e}");
            return ExitCode::from(2);
        }
    };
    let work = keep_work.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pclive-migrate-{}", std::process::id()))
    });
    if let Err(e) = std::fs::create_dir_all(work.join("images")) {
        eprintln!("pclive migrate: cannot create {}: {e}", work.display());
        return ExitCode::FAILURE;
    }
    let mut checkpoint = CheckpointOptions {
        image_path: work.join("images").display().to_string(),
        work_path: work.display().to_string(),
        ..Default::default()
    };
    checkpoint
        .special_fields
        .mut_unknown_fields()
        .add_length_delimited(
            containerd_shim_pclive::service::MIGRATE_FIELD,
            prost::Message::encode_to_vec(&request),
        );
    let value = match checkpoint.write_to_bytes() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pclive migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("pclive: migrating {container} to {destination}");
    let started = std::time::Instant::now();
    // Follow the rounds as the source shim reports them.
    let progress_file = containerd_shim_pclive::migrate::progress_path(&work);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let mut shown = 0usize;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let text = std::fs::read_to_string(&progress_file).unwrap_or_default();
                for line in text.lines().skip(shown) {
                    shown += 1;
                    let Ok(round) = serde_json::from_str::<serde_json::Value>(line) else {
                        continue;
                    };
                    eprintln!("  {}", describe_round(&round));
                    if round["frozen"].as_bool().unwrap_or(false) {
                        eprintln!("  final dump, image files, restore on the destination...");
                    }
                }
                if finished {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pclive migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async {
        let channel = containerd_client::connect(&common.address)
            .await
            .map_err(|e| {
                format!(
                    "{UNREACHABLE}cannot reach containerd at {}: {e}",
                    common.address
                )
            })?;
        let mut tasks = TasksClient::new(channel);
        let mut req = Request::new(CheckpointTaskRequest {
            container_id: container.clone(),
            parent_checkpoint: String::new(),
            options: Some(prost_types::Any {
                type_url: "containerd.runc.v1.CheckpointOptions".into(),
                value,
            }),
        });
        req.metadata_mut().insert(
            "containerd-namespace",
            common
                .namespace
                .parse()
                .map_err(|_| format!("bad namespace {}", common.namespace))?,
        );
        tasks
            .checkpoint(req)
            .await
            .map(drop)
            .map_err(|status| status.message().to_string())
    });
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = follower.join();
    let report = std::fs::read(work.join("pclive-migration.json"));
    if keep_work.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    match result {
        Ok(()) => {
            let report: serde_json::Value = report
                .ok()
                .and_then(|r| serde_json::from_slice(&r).ok())
                .unwrap_or_default();
            if options.contains_key("json") {
                println!("{report:#}");
            } else {
                println!(
                    "migrated {container} to {destination} in {:.1}s: downtime {:.3}s (last round {:.3}s, final dump {:.3}s, images {:.3}s, then restore), source frozen until commit {:.3}s, {} rounds",
                    started.elapsed().as_secs_f64(),
                    report["downtime_seconds"].as_f64().unwrap_or(0.0),
                    report["last_round_seconds"].as_f64().unwrap_or(0.0),
                    report["final_dump_seconds"].as_f64().unwrap_or(0.0),
                    report["images_seconds"].as_f64().unwrap_or(0.0),
                    report["frozen_until_commit_seconds"].as_f64().unwrap_or(0.0),
                    report["precopy"]["rounds"].as_array().map(Vec::len).unwrap_or(0)
                );
            }
            ExitCode::SUCCESS
        }
        Err(message) => match message.strip_prefix(UNREACHABLE) {
            Some(message) => {
                eprintln!("pclive migrate: {message}");
                ExitCode::from(3)
            }
            None => {
                eprintln!("pclive migrate: {message}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Marks errors that happened before anything was asked of the source (exit code 3).
const UNREACHABLE: &str = "\u{0}unreachable:";

/// Prints the receiving shim's events (JSON lines in `path`) as they come, until `done`.
fn follow_receive_progress(path: &std::path::Path, done: &std::sync::atomic::AtomicBool) {
    use restore_engine::lazy::LazyEvent;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut shown = 0usize;
    loop {
        let finished = done.load(std::sync::atomic::Ordering::SeqCst);
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines().skip(shown) {
            shown += 1;
            let Ok(event) = serde_json::from_str::<LazyEvent>(line) else {
                continue;
            };
            match event {
                LazyEvent::Listening { address } => eprintln!("  listening on {address}"),
                LazyEvent::RoundReceived {
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
                LazyEvent::ImagesReady { image_bytes, .. } => eprintln!(
                    "  image files received ({:.1} KiB): restoring",
                    image_bytes as f64 / 1024.0
                ),
                LazyEvent::Assembled(report) => eprintln!(
                    "  images completed from the staged memory in {:.3}s",
                    report.seconds
                ),
                LazyEvent::RestoreFinished { after_seconds } => {
                    eprintln!("  restored in {after_seconds:.3}s: the container runs here")
                }
                LazyEvent::Done(stats) => eprintln!(
                    "  every page installed ({:.1} MiB: {} by fault, {} in the background)",
                    mib(stats.bytes),
                    stats.pages_by_fault,
                    stats.pages_in_background
                ),
                LazyEvent::Error { message } => eprintln!("  failed: {message}"),
                LazyEvent::Ready { .. } | LazyEvent::Task { .. } | LazyEvent::Committed => {}
            }
        }
        if finished {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn receive(args: &[String]) -> ExitCode {
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
        (Some(key), false) => format!("io.containerd.pclive.receive.key-file={key}"),
        (None, true) => "io.containerd.pclive.receive.insecure=true".to_string(),
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
            &format!("io.containerd.pclive.receive.listen={listen}"),
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
            "io.containerd.pclive.restore.tcp-close=true",
        ]);
    }
    if options.contains_key("eager") {
        // The receiving container restores lazily unless told otherwise.
        command.args([
            "--annotation",
            &format!(
                "{}=false",
                containerd_shim_pclive::task::RESTORE_LAZY_ANNOTATION
            ),
        ]);
    }
    // The receiving shim appends its progress here; we follow it while ctr waits.
    let progress_dir = std::env::temp_dir().join(format!("pclive-receive-{}", std::process::id()));
    let progress_file = progress_dir.join("progress");
    command.args([
        "--annotation",
        &format!(
            "{}={}",
            containerd_shim_pclive::task::RECEIVE_PROGRESS_ANNOTATION,
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
