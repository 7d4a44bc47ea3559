//! statecheck: small programs, one per kind of process state, each of which keeps exercising its
//! state and verifies it in a loop, so that a checkpoint/restore or migration that loses or breaks
//! any of it cannot go unnoticed.
//!
//! ```text
//! statecheck KIND --status DIR     run one check; DIR/KIND says "ok rounds=N" after each round
//!                                  and DIR/journal gets "NETNS KIND N" appended
//! statecheck --list                the kinds of the migration suite, one per line
//! ```
//!
//! A round sets up nothing new: it uses the state made at start (sockets, timers, IPC objects,
//! children...) and checks that it still behaves as it did. On the first failure the status file
//! says `FAIL KIND: what went wrong` and the program exits with code 3. A check that stops making
//! rounds (data lost in flight, a peer that vanished) fails after a deadline instead of hanging.
//!
//! Kinds (see each module): loopback UDP and TCP, fork/exit churn, mmap/munmap churn across
//! threads, a stopped (SIGSTOP) child, vfork, a FIFO, pipes, unix sockets, timers, SysV IPC,
//! shared memory, epoll, inotify, signalfd; and `redis-conn PORT`, a client that keeps one TCP
//! connection to a Redis server on 127.0.0.1 and fails if it breaks.

mod fds;
mod ipc;
mod net;
mod procs;

use std::env;
use std::fs;
use std::io::Write;
use std::process::exit;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// What a round returns: nothing, or what went wrong.
pub type Checked = Result<(), String>;

/// One kind of state.
pub trait Check {
    /// Exercises the state once more and verifies it; `n` counts rounds from 1.
    fn round(&mut self, n: u64) -> Checked;
}

/// How long any single wait may take. A migration freezes the program for a second or two;
/// anything far beyond that is state that was lost.
pub const DEADLINE: Duration = Duration::from_secs(20);

type Setup = fn(&[String]) -> Result<Box<dyn Check>, String>;

/// The kinds, their setup, and whether they belong to the migration suite (`--list`).
const KINDS: &[(&str, Setup, bool)] = &[
    ("udp-loopback", net::udp_loopback, true),
    ("tcp-loopback", net::tcp_loopback, true),
    ("unix", net::unix_sockets, true),
    ("fork-churn", procs::fork_churn, true),
    ("mmap-churn", procs::mmap_churn, true),
    // Not in the migration suite: on a cgroup v1 host a migration refuses a stopped task
    // (shim/src/seizable.rs); shim/tests/workloads.rs tests that refusal.
    ("stopped", procs::stopped_child, false),
    ("vfork", procs::vfork_spawn, true),
    ("vfork-hold", procs::vfork_hold, false),
    ("fifo", ipc::fifo, true),
    ("pipe", ipc::pipes, true),
    ("sysv-ipc", ipc::sysv_ipc, true),
    ("shm", ipc::shared_memory, true),
    ("timers", fds::timers, true),
    ("epoll", fds::epoll, true),
    ("inotify", fds::inotify, true),
    ("signalfd", fds::signalfd, true),
    ("redis-conn", net::redis_connection, false),
];

fn usage() -> ! {
    eprintln!("usage: statecheck KIND --status DIR [ARGS...] | statecheck --list");
    eprintln!(
        "kinds: {}",
        KINDS.iter().map(|k| k.0).collect::<Vec<_>>().join(" ")
    );
    exit(2)
}

fn write_status(path: &str, line: &str) {
    let tmp = format!("{path}.tmp");
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .and_then(|_| fs::rename(&tmp, path));
    if let Err(e) = written {
        eprintln!("statecheck: cannot write status {path}: {e}");
    }
}

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--list") {
        for (name, _, suite) in KINDS {
            if *suite {
                println!("{name}");
            }
        }
        return;
    }
    let Some(kind) = args.first() else { usage() };
    let Some(&(name, setup, _)) = KINDS.iter().find(|k| k.0 == kind) else {
        eprintln!("statecheck: unknown kind {kind}");
        usage()
    };
    let mut dir = None;
    let mut rest = Vec::new();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        if a == "--status" {
            dir = it.next().cloned();
        } else {
            rest.push(a.clone());
        }
    }
    let Some(dir) = dir else { usage() };
    let status = format!("{dir}/{name}");
    let journal = format!("{dir}/{JOURNAL}");
    let fail = |what: String| -> ! {
        // Which copy failed, and when: a migration's source and destination write the same
        // status file (a shared volume), and only their network namespaces tell them apart.
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        write_status(
            &status,
            &format!(
                "FAIL {name}: {what} [pid {} {} at {at:.3}]\n",
                std::process::id(),
                network_namespace()
            ),
        );
        eprintln!("statecheck {name}: FAIL: {what}");
        exit(3)
    };
    let mut check = setup(&rest).unwrap_or_else(|e| fail(format!("setup: {e}")));
    for n in 1.. {
        if let Err(e) = check.round(n) {
            fail(format!("round {n}: {e}"));
        }
        write_status(&status, &format!("ok rounds={n}\n"));
        append_journal(&journal, &format!("{} {name} {n}\n", network_namespace()));
        sleep(Duration::from_millis(20));
    }
}

/// The file in the status directory to which every program appends a line per round, naming
/// its network namespace: a migration's source and destination copies have different ones, so
/// the file's order shows whether the source ran again after the destination started (two
/// copies running at once).
const JOURNAL: &str = "journal";

/// This process's network namespace (`net:[INODE]`), read anew each time: a restored process
/// lives in another one than the one it was dumped from.
pub fn network_namespace() -> String {
    fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Appends `line` to `path` in one write (O_APPEND: lines of concurrent writers do not mix).
fn append_journal(path: &str, line: &str) {
    let written = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("statecheck: cannot append to {path}: {e}");
    }
}

/// The last OS error, prefixed with what failed.
pub fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Fails with `what` unless `ok`.
pub fn ensure(ok: bool, what: impl FnOnce() -> String) -> Checked {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

/// Polls `done` until it holds or [`DEADLINE`] passes.
pub fn wait_until(what: &str, mut done: impl FnMut() -> Result<bool, String>) -> Checked {
    let start = Instant::now();
    loop {
        if done()? {
            return Ok(());
        }
        if start.elapsed() > DEADLINE {
            return Err(format!("{what}: not after {DEADLINE:?}"));
        }
        sleep(Duration::from_millis(2));
    }
}

/// Forks a child that runs `body` and exits with its code; returns the child's pid. The child
/// asks for SIGKILL when its parent dies, so no check leaves orphans behind.
pub fn fork_child(body: impl FnOnce() -> i32) -> Result<libc::pid_t, String> {
    // SAFETY: fork() takes no arguments; the child only runs `body` and then _exit()s.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(os_err("fork")),
        0 => {
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            let code = body();
            // SAFETY: _exit() ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        child => Ok(child),
    }
}

/// A pseudo-random but reproducible 64-bit value of `z` (splitmix64's finalizer).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The state letter of `pid` in /proc (R, S, D, T, t, Z...).
pub fn task_state(pid: libc::pid_t) -> Result<char, String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // "pid (comm) S ...": the comm may hold spaces and parentheses; the state follows the last ')'.
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .ok_or_else(|| format!("cannot parse /proc/{pid}/stat: {stat}"))
}
