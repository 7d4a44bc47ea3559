//! What pre-copy costs per GiB, without containerd, runc or CRIU: a child process holds N GiB
//! of incompressible memory, the source reads and sends it over a TCP connection on loopback
//! (one round while it runs, then the frozen round), and a receiver thread stages it.
//!
//! It prints one JSON line: each side's CPU seconds per GiB (the source is the sending thread,
//! which also hashes; the destination is the receiving thread), the first round's rate, and the
//! receiver's peak resident memory growth against the memory moved.
//!
//! The destination must put what it receives into memory it did not hold before, and touching
//! fresh memory has a cost of its own that depends on the host: on a VM whose balloon reports
//! free pages, the hypervisor populates every page at the first touch (2-4 CPU-s per GiB here,
//! varying from run to run). So the run first touches as much fresh memory as the staging store
//! will take, in the same 4 MiB mappings of 4 KiB pages, and reports that cost
//! (`population_cpu_s_per_gib`); it frees it just before the transfer, so the staging store
//! gets memory the hypervisor still backs (page reporting waits 2 s), and the destination's CPU
//! is its own work. A real destination pays both.
//!
//! `scripts/bench-precopy.sh` runs it against an older build; the full benchmark
//! (`scripts/bench-migration.sh`) measures the same path through the shim, with a real container
//! and a real link.
//!
//! Usage: `precopy_cost [GIB] [--insecure] [--max-cpu CORES] [--tracker NAME] [--streams N]`
//! (the tracker: content-hash by default, so that builds before the write-protect tracker
//! compare alike). With `--streams N` (N > 1) the pages go on N connections and threads of
//! their own on each side: the per-side figures, which count one thread each, are then null,
//! and `process_cpu_s_per_gib` (both sides, all threads) is what compares.

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use restore_engine::cancel::Cancel;
use restore_engine::clock::{process_cpu_seconds, thread_cpu_seconds};
use restore_engine::destination::receive::receive_rounds;
use restore_engine::destination::{Limits, ReceiveStreams};
use restore_engine::memory::NoQuiesce;
use restore_engine::policy::ConvergencePolicy;
use restore_engine::source::rounds::{Sender, TaskIds};
use restore_engine::source::streams::PageStreams;
use restore_engine::staging::StagingStore;
use restore_engine::wire::{accept, connect, Auth, Intent};

/// Peak and current resident memory of this process, in bytes (VmHWM, VmRSS).
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A child that fills `bytes` of anonymous memory with pseudo-random words, says so on a pipe
/// and waits to be killed.
fn spawn_holder(bytes: usize) -> libc::pid_t {
    let mut fds = [0; 2];
    // SAFETY: creates a pipe into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only touches its own memory and the pipe, then pauses.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: a private anonymous mapping the child owns.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the mapping is `bytes` long and 8-byte aligned.
        let words = unsafe { std::slice::from_raw_parts_mut(p.cast::<u64>(), bytes / 8) };
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for w in words.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = x;
        }
        // SAFETY: one byte to the parent, then wait for SIGKILL.
        unsafe {
            libc::write(fds[1], b"r".as_ptr().cast(), 1);
            loop {
                libc::pause();
            }
        }
    }
    let mut byte = [0u8];
    // SAFETY: waits for the child's byte on our end of the pipe.
    unsafe {
        libc::close(fds[1]);
        libc::read(fds[0], byte.as_mut_ptr().cast(), 1);
        libc::close(fds[0]);
    }
    pid
}

/// CPU seconds this thread spends touching `bytes` of fresh memory, in mappings like the
/// staging store's slabs (4 MiB, 4 KiB pages).
fn population_cpu_seconds(bytes: usize) -> f64 {
    const SLAB: usize = 4 << 20;
    let cpu = thread_cpu_seconds();
    let mut slabs = Vec::new();
    for _ in 0..bytes / SLAB {
        let mut slab = memmap2::MmapMut::map_anon(SLAB).unwrap();
        for page in slab.chunks_mut(4096) {
            page[0] = 1;
        }
        slabs.push(slab);
    }
    let cpu = thread_cpu_seconds() - cpu;
    drop(slabs);
    cpu
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let gib: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let auth = if args.iter().any(|a| a == "--insecure") {
        Auth::Insecure
    } else {
        Auth::Key(vec![7; 32])
    };
    let tracker_name = args
        .iter()
        .position(|a| a == "--tracker")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "content-hash".into());
    let max_cpu: Option<f64> = args
        .iter()
        .position(|a| a == "--max-cpu")
        .and_then(|i| args.get(i + 1)?.parse().ok());
    let streams: u32 = args
        .iter()
        .position(|a| a == "--streams")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1);
    let extra = if streams > 1 { streams } else { 0 };
    let bytes = ((gib * (1u64 << 30) as f64) as usize) & !4095;
    let holder = spawn_holder(bytes);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_auth = auth.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let receiver = std::thread::Builder::new()
        .name("receiver".into())
        .spawn(move || {
            let population = population_cpu_seconds(bytes + bytes / 32);
            // Peak resident memory from here on (clear_refs 5 resets VmHWM).
            let _ = std::fs::write("/proc/self/clear_refs", "5");
            let (_, rss_before) = rss();
            ready_tx.send(()).unwrap();
            let (stream, _) = listener.accept().unwrap();
            let cpu = thread_cpu_seconds();
            let mut session = accept(stream, &server_auth).unwrap();
            // The source connects its streams one after the other, in order.
            let lanes = (0..extra)
                .map(|_| accept(listener.accept().unwrap().0, &server_auth).unwrap())
                .collect();
            let streams =
                ReceiveStreams::start(lanes, &Limits::unlimited(), &Cancel::default()).unwrap();
            let mut store = StagingStore::default();
            let report = receive_rounds(
                &mut session,
                Some(&streams),
                &mut store,
                &Limits::unlimited(),
            )
            .unwrap();
            let cpu = thread_cpu_seconds() - cpu;
            let (peak, _) = rss();
            (
                cpu,
                report,
                store.footprint(),
                peak.saturating_sub(rss_before),
                population,
            )
        })
        .unwrap();

    ready.recv().unwrap();
    let stream = TcpStream::connect(addr).unwrap();
    let mut session = connect(stream, &auth, &Intent::default()).unwrap();
    let lanes: Vec<_> = (0..extra)
        .map(|i| {
            let stream = TcpStream::connect(addr).unwrap();
            connect(stream, &auth, &Intent::stream("", i)).unwrap()
        })
        .collect();
    let lanes = (!lanes.is_empty()).then(|| PageStreams::start(lanes).unwrap());
    let mut tracker = restore_engine::memory::tracker(Some(&tracker_name)).unwrap();
    let tasks = [TaskIds {
        host_pid: holder as u32,
        ns_pid: 1,
    }];
    let policy = ConvergencePolicy {
        max_rounds: 1,
        ..Default::default()
    };
    let started = Instant::now();
    let cpu = thread_cpu_seconds();
    let process_cpu = process_cpu_seconds();
    let report = Sender::new(&mut session)
        .max_cpu(max_cpu)
        .streams(lanes)
        .run(
            || Ok(tasks.to_vec()),
            tracker.as_mut(),
            &mut NoQuiesce,
            &policy,
            || {
                // SAFETY: stops our own child.
                unsafe { libc::kill(holder, libc::SIGSTOP) };
                std::thread::sleep(Duration::from_millis(20));
                Ok(())
            },
            |_| {},
        )
        .unwrap();
    let source_cpu = thread_cpu_seconds() - cpu;
    let wall = started.elapsed().as_secs_f64();
    let (dest_cpu, received, footprint, dest_peak_growth, population) = receiver.join().unwrap();
    let process_cpu = process_cpu_seconds() - process_cpu;
    // SAFETY: kills and reaps our own child.
    unsafe {
        libc::kill(holder, libc::SIGKILL);
        libc::waitpid(holder, std::ptr::null_mut(), 0);
    }
    let moved = bytes as f64 / (1u64 << 30) as f64;
    let first = &report.rounds[0];
    println!(
        "{}",
        serde_json::json!({
            "gib": moved,
            "encryption": if matches!(auth, Auth::Insecure) { "none" } else { "AES-256-GCM" },
            "tracker": report.tracker,
            "frozen_round_cpu_s": report.rounds.last().map(|r| r.cpu_seconds),
            "streams": streams.max(1),
            "source_cpu_s_per_gib": (extra == 0).then_some(source_cpu / moved),
            "destination_cpu_s_per_gib": (extra == 0).then_some(dest_cpu / moved),
            "process_cpu_s_per_gib": process_cpu / moved,
            "population_cpu_s_per_gib": population / moved,
            "first_round_mb_per_s": first.bytes as f64 / first.seconds / 1e6,
            "first_round_seconds": first.seconds,
            "wall_seconds": wall,
            "source_cores": source_cpu / wall,
            "staged_bytes": received.bytes,
            "staging_footprint_bytes": footprint,
            "destination_peak_growth_over_moved": dest_peak_growth as f64 / bytes as f64,
        })
    );
}
