//! `pclive migrate CONTAINER HOST:PORT`: moves a running container to a receiving host, through
//! containerd's Tasks API (a Checkpoint whose options carry the migration request).

use std::process::ExitCode;

use crate::options::{common, parse_options};

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

pub fn run(args: &[String]) -> ExitCode {
    use containerd_client::services::v1::{tasks_client::TasksClient, CheckpointTaskRequest};
    use containerd_client::tonic::Request;
    use containerd_shim::protos::protobuf::Message as _;
    use containerd_shim::protos::shim::oci::CheckpointOptions;
    use containerd_shim_pclive::migrate::MigrateRequest;

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
            containerd_shim_pclive::migrate::MIGRATE_FIELD,
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
