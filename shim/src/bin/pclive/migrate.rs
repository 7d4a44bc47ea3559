//! `pclive migrate CONTAINER HOST:PORT`: moves a running container to a receiving host, through
//! containerd's Tasks API (a Checkpoint whose options carry the migration request). The outcome
//! is read from the migration's record, which the source shim writes before each step: so the
//! command reports the truth even when its call to containerd broke (containerd restarted).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use containerd_client::services::v1::{tasks_client::TasksClient, CheckpointTaskRequest};
use containerd_shim::protos::protobuf::Message as _;
use containerd_shim::protos::shim::oci::CheckpointOptions;
use containerd_shim_pclive::migrate::{progress_path, report_path, MigrateRequest, MIGRATE_FIELD};
use restore_engine::record::{self, Phase, Record, Role, Store};

use crate::options::{exit, runtime, Containerd, KeyArgs};
use crate::progress::Progress;

#[derive(Args, Debug)]
#[command(
    about = "Move a running container to another host",
    long_about = "Moves a running container to the host where `pclive receive` listens on \
HOST:PORT: its memory is copied while it runs (pre-copy rounds), then it is paused briefly for \
the last changes and CRIU's final dump, and restored there. Until the destination could run it, \
any failure resumes it here; after that it never resumes here on its own: if the outcome \
cannot be learnt, it stays frozen, in doubt (exit code 4), until `pclive resolve` ends it."
)]
pub struct MigrateArgs {
    /// The container to move (its containerd id)
    pub container: String,
    /// Where the receiving container listens (see `pclive receive` on that host)
    #[arg(value_name = "HOST:PORT")]
    pub destination: String,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub containerd: Containerd,
    /// Pre-copy rounds at most
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub max_rounds: u32,
    /// Stop pre-copy when the rest fits this pause
    #[arg(long, default_value_t = 300, value_name = "MS")]
    pub target_downtime_ms: u32,
    /// Dirty-page tracking (default: the best this kernel offers; `pclive check` says which).
    /// uffd-wp: the kernel reports the pages written since the last round (userfaultfd
    /// write-protect, Linux 6.7+, x86-64); soft-dirty: the same through soft-dirty bits, in a
    /// short freeze per round; content-hash: every round reads all resident memory
    #[arg(long, value_parser = restore_engine::memory::TRACKERS)]
    pub tracker: Option<String>,
    /// LZ4-compress pre-copy pages (pays on slow links with compressible memory; each run goes
    /// raw if it saves less than 1/8)
    #[arg(long)]
    pub compress: bool,
    /// Bound what the live pre-copy rounds send, in bytes per second with k, M or G (powers
    /// of 1000): 100M is 800 Mbit/s. Leaves the link and the CPU to the host's other work; the
    /// frozen last round is not bound (it is downtime), as with QEMU's max-bandwidth
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Bound the CPU the live pre-copy rounds use, in percent of one core, counted over all
    /// their threads (--streams included): 50 leaves half a core of it to the host's other
    /// work. The frozen last round is not bound (it is downtime); each round's CPU is in the
    /// report
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(5..=100))]
    pub max_cpu: Option<u32>,
    /// Send the memory's pages on N connections of their own, each encrypted and sent by a
    /// thread of its own while the source reads on (as QEMU's multifd): for links faster than
    /// one core can encrypt and send, on hosts with cores to spare on both ends. 1 sends them
    /// on the migration's connection, from the reading thread. Default: 1 on hosts with fewer
    /// than 4 cores, else half the cores, at most 4. The receiver takes up to 16
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub streams: Option<u32>,
    /// If the connection is lost after the images went out, how long to keep asking the
    /// destination how the migration ended before declaring it in doubt
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub resolve_timeout: u32,
    /// Both hosts see the container's root filesystem on the same storage (the receiver says
    /// --shared-rootfs too): do not copy it. Without it the filesystem's changes (an image
    /// container's writable layer, or a --rootfs container's whole directory) travel with the
    /// memory, the last ones while paused
    #[arg(long)]
    pub shared_rootfs: bool,
    /// The container's bind mounts from this host exist on the destination too: migrate
    /// without copying them (without this flag a container with any is refused, naming them)
    #[arg(long)]
    pub external_mounts_ok: bool,
    /// The container's address moves with it and its TCP connections continue on the
    /// destination. For a container that joins a network namespace its network plugin prepared
    /// on each host with the same address (a CNI pod network with a fixed IP; `ctr run --with-ns
    /// network:PATH`); the receiver says --move-address too. Its interfaces go down here just
    /// before the final dump and come up there, announced, before the tasks resume; a failed
    /// migration brings them up here again
    #[arg(long)]
    pub move_address: bool,
    /// Keep the final dump's CRIU logs, images and report in DIR (default: a private temporary
    /// directory, removed at the end)
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Print the migration report as JSON
    #[arg(long)]
    pub json: bool,
}

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
    let layer = &round["layer"];
    if layer.is_object() {
        line += &format!(
            ", filesystem {} path(s) {:.1} MiB",
            layer["entries"].as_u64().unwrap_or(0),
            layer["bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
        );
    }
    if let Some(dirty) = mb(&round["dirty_bytes_per_second"]) {
        line += &format!(", dirtied {dirty:.1} MB/s");
    }
    if let Some(eta) = round["eta_seconds"].as_f64() {
        line += &format!(", pause in ~{eta:.1}s");
    }
    line
}

/// A rate in bytes per second: a number with an optional k, M or G (powers of 1000).
fn parse_rate(text: &str) -> Result<u64, String> {
    let (number, scale) = match text.char_indices().last() {
        Some((at, 'k' | 'K')) => (&text[..at], 1e3),
        Some((at, 'M')) => (&text[..at], 1e6),
        Some((at, 'G')) => (&text[..at], 1e9),
        _ => (text, 1.0),
    };
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n * scale >= 1e6 => Ok((n * scale) as u64),
        Ok(_) => Err(format!(
            "{text} is below 1M (1 MB/s): a migration would never end"
        )),
        Err(_) => Err(format!(
            "{text} is not a rate: give bytes per second, e.g. 100M or 1.5G"
        )),
    }
}

/// What the source did for its clients at the switchover, for people (None: nothing to say).
fn describe_clients(report: &serde_json::Value) -> Option<String> {
    let released = report.get("clients_released")?;
    if let Some(error) = released["error"].as_str() {
        return Some(format!(
            "clients: NOT released at the switchover ({error}): they waited on the frozen source until the commit"
        ));
    }
    let ports: Vec<String> = released["ports"]
        .as_array()?
        .iter()
        .map(|p| p.to_string())
        .collect();
    if ports.is_empty() {
        return None;
    }
    Some(format!(
        "clients: when the destination ran it, this host refused new connections to port(s) {} and reset {} connection(s) (in {:.3}s), so clients moved on instead of waiting for the commit",
        ports.join(","),
        released["connections_reset"].as_u64().unwrap_or(0),
        released["seconds"].as_f64().unwrap_or(0.0)
    ))
}

/// How the container's filesystem travelled, for people.
fn describe_filesystem(report: &serde_json::Value) -> String {
    let rounds = report["precopy"]["rounds"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let sum = |field: &str| -> u64 {
        rounds
            .iter()
            .map(|r| r["layer"][field].as_u64().unwrap_or(0))
            .sum()
    };
    let mut line = match report["filesystem"].as_str() {
        Some("copied") => format!(
            "filesystem: copied ({} path(s), {:.1} MiB of file data; {} path(s) while paused)",
            sum("entries"),
            sum("bytes") as f64 / (1 << 20) as f64,
            rounds
                .last()
                .and_then(|r| r["layer"]["entries"].as_u64())
                .unwrap_or(0)
        ),
        Some("shared") => {
            "filesystem: shared storage, not copied (the destination checked it sees the same tree)"
                .into()
        }
        _ => "filesystem: not moved".into(),
    };
    if let Some(mounts) = report["external_mounts"]
        .as_array()
        .filter(|m| !m.is_empty())
    {
        let names: Vec<&str> = mounts.iter().filter_map(|m| m.as_str()).collect();
        line += &format!("; not copied (--external-mounts-ok): {}", names.join(", "));
    }
    line
}

/// Prints the rounds the source shim appends to `progress` until `done`.
fn follow_rounds(progress: PathBuf, done: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut shown = 0usize;
        let status = Progress::new("pre-copy: round 1, the container runs");
        loop {
            let finished = done.load(Ordering::SeqCst);
            let text = std::fs::read_to_string(&progress).unwrap_or_default();
            for line in text.lines().skip(shown) {
                shown += 1;
                let Ok(round) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                status.line(&format!("  {}", describe_round(&round)));
                if round["frozen"].as_bool().unwrap_or(false) {
                    status.line("  final dump, image files, restore on the destination...");
                    status.status("paused: final dump, images, restore on the destination");
                } else {
                    status.status(&format!(
                        "pre-copy: round {}, the container runs",
                        round["round"].as_u64().unwrap_or(0) + 1
                    ));
                }
            }
            if finished {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
    })
}

/// Where the migration stands now, by its record.
fn record_of(store: &Store, id: &str) -> Option<Record> {
    store.read(id, Role::Source).ok().flatten()
}

/// Follows the record until the migration ended or is in doubt (the shim goes on when
/// containerd's call broke).
fn follow_record(store: &Store, id: &str) -> Option<Record> {
    let mut last = None;
    loop {
        let record = record_of(store, id);
        match &record {
            Some(r) if r.phase.is_final() && r.phase != Phase::Committed => return record,
            Some(r) if r.in_doubt() => return record,
            Some(r) if last != Some(r.phase) => {
                eprintln!("  the migration is {}", r.phase);
                last = Some(r.phase);
            }
            None => return None,
            _ => {}
        }
        thread::sleep(Duration::from_millis(500));
    }
}

pub fn run(args: MigrateArgs) -> ExitCode {
    let fail = |code: u8, message: String| {
        eprintln!("pclive migrate: {message}");
        ExitCode::from(code)
    };
    let key_file = match args.key.key_path() {
        Ok(k) => k,
        Err(e) => return fail(2, e),
    };
    let migration_id = match record::new_migration_id() {
        Ok(id) => id,
        Err(e) => return fail(exit::FAILED, format!("choosing a migration id: {e}")),
    };
    let request = MigrateRequest {
        destination: args.destination.clone(),
        key_file: key_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        insecure: args.key.insecure,
        max_rounds: args.max_rounds,
        target_downtime_ms: args.target_downtime_ms,
        tracker: args.tracker.clone().unwrap_or_default(),
        compress: args.compress,
        max_bandwidth: args.max_bandwidth.unwrap_or(0),
        max_cpu_percent: args.max_cpu.unwrap_or(0),
        streams: args.streams.unwrap_or(0),
        migration_id: migration_id.clone(),
        resolve_timeout_seconds: args.resolve_timeout,
        shared_rootfs: args.shared_rootfs,
        external_mounts_ok: args.external_mounts_ok,
        move_address: args.move_address,
    };
    // containerd writes no checkpoint image when CheckpointOptions names an image path; the
    // shim writes the final dump's logs and the migration report into the work path, which must
    // be absolute (the shim runs elsewhere) and private (mkdtemp, 0700).
    let (work, _temporary) = match &args.work_dir {
        Some(dir) => match std::path::absolute(dir)
            .map_err(|e| e.to_string())
            .and_then(|dir| private_dir(&dir).map(|()| dir))
        {
            Ok(dir) => (dir, None),
            Err(e) => return fail(2, format!("--work-dir {}: {e}", dir.display())),
        },
        None => match crate::options::private_tempdir("pclive-migrate-", &std::env::temp_dir()) {
            Ok(t) => (t.path().to_owned(), Some(t)),
            Err(e) => return fail(exit::FAILED, format!("cannot create a work directory: {e}")),
        },
    };
    if let Err(e) = std::fs::create_dir_all(work.join("images")) {
        return fail(
            exit::FAILED,
            format!("cannot create {}: {e}", work.display()),
        );
    }
    let mut checkpoint = CheckpointOptions {
        image_path: work.join("images").display().to_string(),
        work_path: work.display().to_string(),
        ..Default::default()
    };
    checkpoint
        .special_fields
        .mut_unknown_fields()
        .add_length_delimited(MIGRATE_FIELD, prost::Message::encode_to_vec(&request));
    let value = match checkpoint.write_to_bytes() {
        Ok(v) => v,
        Err(e) => return fail(exit::FAILED, e.to_string()),
    };
    eprintln!(
        "pclive: migrating {} to {} (migration {migration_id})",
        args.container, args.destination
    );
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let follower = follow_rounds(progress_path(&work), Arc::clone(&done));
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => return fail(exit::FAILED, e),
    };
    let call: Result<(), (bool, String)> = runtime.block_on(async {
        let channel = args.containerd.connect().await.map_err(|e| (true, e))?;
        let request = args
            .containerd
            .request(CheckpointTaskRequest {
                container_id: args.container.clone(),
                parent_checkpoint: String::new(),
                options: Some(prost_types::Any {
                    type_url: "containerd.runc.v1.CheckpointOptions".into(),
                    value,
                }),
            })
            .map_err(|e| (true, e))?;
        TasksClient::new(channel)
            .checkpoint(request)
            .await
            .map(drop)
            .map_err(|status| (false, status.message().to_string()))
    });
    let store = args.containerd.store();
    // What the shim recorded is the truth; containerd's answer may have been lost.
    let record = match &call {
        Err((false, message))
            if record_of(&store, &migration_id)
                .is_some_and(|r| !r.phase.is_final() && !r.in_doubt()) =>
        {
            eprintln!(
                "pclive migrate: lost containerd's answer ({message}); the migration goes on in the source shim, following its record"
            );
            follow_record(&store, &migration_id)
        }
        _ => record_of(&store, &migration_id),
    };
    done.store(true, Ordering::SeqCst);
    let _ = follower.join();
    let report: serde_json::Value = std::fs::read(report_path(&work))
        .ok()
        .and_then(|r| serde_json::from_slice(&r).ok())
        .unwrap_or_default();
    if call.is_ok() && record.is_none() {
        eprintln!(
            "pclive migrate: warning: no record of migration {migration_id} in {} (does --state-dir match the shim's PCLIVE_STATE_DIR?)",
            store.dir().display()
        );
    }
    match (&call, record.as_ref().map(|r| r.phase)) {
        (_, Some(Phase::Done)) | (Ok(()), Some(Phase::Committed) | None) => {
            if args.json {
                println!("{report:#}");
            } else {
                println!(
                    "migrated {} to {} in {:.1}s: downtime {:.3}s (last round {:.3}s, final dump {:.3}s, images {:.3}s, then restore), source frozen until commit {:.3}s, {} rounds",
                    args.container,
                    args.destination,
                    started.elapsed().as_secs_f64(),
                    report["downtime_seconds"].as_f64().unwrap_or(0.0),
                    report["last_round_seconds"].as_f64().unwrap_or(0.0),
                    report["final_dump_seconds"].as_f64().unwrap_or(0.0),
                    report["images_seconds"].as_f64().unwrap_or(0.0),
                    report["frozen_until_commit_seconds"].as_f64().unwrap_or(0.0),
                    report["precopy"]["rounds"].as_array().map(Vec::len).unwrap_or(0)
                );
                println!("{}", describe_filesystem(&report));
                if let Some(line) = describe_clients(&report) {
                    println!("{line}");
                }
                println!(
                    "link: {}{}",
                    match report["encryption"].as_str() {
                        Some("AES-256-GCM") => "encrypted and authenticated (AES-256-GCM)".into(),
                        Some(other) => format!("NOT encrypted: {other}"),
                        None => "protection unknown".into(),
                    },
                    restore_engine::source::streams::describe(
                        report["page_streams"].as_u64().unwrap_or(1) as u32
                    )
                );
            }
            ExitCode::SUCCESS
        }
        (_, Some(Phase::InDoubt)) => {
            let reason = record
                .and_then(|r| r.reason)
                .unwrap_or_else(|| "the outcome is unknown".into());
            fail(
                exit::IN_DOUBT,
                format!(
                    "the migration is in doubt: {reason}. {} stays frozen here so that it never runs twice. `pclive status {}` shows the migration; end it with `pclive resolve {} --resume-source` or `--discard-source` once you know where it should run",
                    args.container, args.container, args.container
                ),
            )
        }
        (Err((true, message)), None) => {
            fail(exit::UNREACHABLE, format!("{message}: nothing was done"))
        }
        (Err((_, message)), _) => fail(exit::FAILED, message.clone()),
        (Ok(()), phase) => fail(
            exit::FAILED,
            format!("containerd reported success but the migration's record says {phase:?}"),
        ),
    }
}

/// A work directory given by the user: created 0700 if missing; if it exists, a directory (not
/// a link) of our own that nobody else may write to, since the shim writes into it as root and
/// someone else's directory could hold links planted there.
fn private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create it: {e}")),
        Err(e) => Err(e.to_string()),
        Ok(meta) if !meta.is_dir() => Err("not a directory (a symbolic link is not accepted)".into()),
        Ok(meta) if meta.uid() != nix::unistd::geteuid().as_raw() => Err(format!(
            "owned by uid {}, not by us: use a directory of your own, or none (pclive makes a private one)",
            meta.uid()
        )),
        Ok(meta) if meta.mode() & 0o022 != 0 => Err(format!(
            "mode {:04o} lets others write into it: chmod 700 it, or give none (pclive makes a private one)",
            meta.mode() & 0o7777
        )),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_take_decimal_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_rate("2000k"), Ok(2_000_000));
        assert_eq!(parse_rate("5000000"), Ok(5_000_000));
        assert!(parse_rate("10k").unwrap_err().contains("below 1M"));
        assert!(parse_rate("fast").unwrap_err().contains("not a rate"));
        assert!(parse_rate("").is_err());
    }
}
