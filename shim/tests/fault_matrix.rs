//! The migration transaction under faults, through real containerd, runc and CRIU on the two
//! emulated hosts (each with its own root filesystem and records). Every cell migrates a
//! checksummed-memory container (memcheck) and breaks the migration one way: a fail point at a
//! phase boundary on either end, a killed process, a restarted containerd, a cut or stalled
//! link, a killed destination task, a failed restore, a full image directory.
//!
//! In every cell a watcher samples both hosts every 50 ms and fails the test if the container
//! ever runs on both at once. At the end exactly one copy runs, its memory verified by memcheck,
//! or the source is frozen in doubt, `pclive status` says so, and `pclive resolve` ends it
//! (then one copy runs, verified).

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use containerd_shim_pclive::annotations;

const ID: &str = "app";
/// memcheck's memory: small, so that a cell is quick.
const MIB: &str = "64";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a process is alive: not a zombie waiting to be reaped, and not already exiting
/// (a killed process keeps its pid a moment after its memory is gone: PF_EXITING).
fn alive(pid: &str) -> bool {
    const PF_EXITING: u64 = 0x4;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(fields) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
        return false;
    };
    let mut fields = fields.split_whitespace();
    let state = fields.next();
    // After the state: ppid, pgrp, session, tty_nr, tpgid, then flags.
    let flags = fields
        .nth(5)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    !matches!(state, None | Some("Z") | Some("X")) && flags & PF_EXITING == 0 && !killed(pid)
}

/// A SIGKILL is pending: the task never runs user code again. (The source kills its frozen copy
/// and then thaws it, as cgroup v1 needs; until each task reaches do_exit it is thawed, not
/// yet exiting, but already dead.)
fn killed(pid: &str) -> bool {
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .filter_map(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .any(|mask| mask & SIGKILL_BIT != 0)
}

/// Whether the container runs on a host: live processes in its cgroup that are not frozen
/// (tasks CRIU is restoring count: they are there to run).
fn running(namespace: &str) -> bool {
    let v1 = PathBuf::from(format!("/sys/fs/cgroup/freezer/{namespace}/{ID}"));
    let (procs, thawed) = if v1.exists() {
        (
            v1.join("cgroup.procs"),
            fs::read_to_string(v1.join("freezer.state"))
                .map(|s| s.trim() == "THAWED")
                .unwrap_or(false),
        )
    } else {
        let v2 = PathBuf::from(format!("/sys/fs/cgroup/{namespace}/{ID}"));
        (
            v2.join("cgroup.procs"),
            fs::read_to_string(v2.join("cgroup.freeze"))
                .map(|s| s.trim() == "0")
                .unwrap_or(false),
        )
    };
    thawed
        && fs::read_to_string(procs)
            .map(|p| p.split_whitespace().any(alive))
            .unwrap_or(false)
}

/// The processes in the container's cgroup on a host, for a failure message.
fn describe(namespace: &str) -> String {
    let procs = fs::read_to_string(format!(
        "/sys/fs/cgroup/freezer/{namespace}/{ID}/cgroup.procs"
    ))
    .or_else(|_| fs::read_to_string(format!("/sys/fs/cgroup/{namespace}/{ID}/cgroup.procs")))
    .unwrap_or_default();
    procs
        .split_whitespace()
        .map(|pid| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rfind(')')
                .and_then(|at| stat[at + 1..].split_whitespace().next())
                .unwrap_or("?")
                .to_string();
            format!(
                "{pid} ({}) state {state}{}",
                cmd.trim(),
                if killed(pid) { ", SIGKILL pending" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Samples both hosts every 50 ms; remembers the first moment both ran.
struct Watcher {
    stop: Arc<AtomicBool>,
    both: Arc<Mutex<Option<String>>>,
    thread: Option<thread::JoinHandle<u64>>,
}

impl Watcher {
    fn start(src_ns: &str, dst_ns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let both = Arc::new(Mutex::new(None));
        let (s, b) = (Arc::clone(&stop), Arc::clone(&both));
        let (src_ns, dst_ns) = (src_ns.to_string(), dst_ns.to_string());
        let started = Instant::now();
        let thread = thread::spawn(move || {
            let mut samples = 0u64;
            while !s.load(Ordering::SeqCst) {
                if running(&src_ns) && running(&dst_ns) {
                    b.lock().unwrap().get_or_insert_with(|| {
                        format!(
                            "the container ran on both hosts at once, {:.2}s into the cell: source {}; destination {}",
                            started.elapsed().as_secs_f64(),
                            describe(&src_ns),
                            describe(&dst_ns)
                        )
                    });
                }
                samples += 1;
                thread::sleep(Duration::from_millis(50));
            }
            samples
        });
        Watcher {
            stop,
            both,
            thread: Some(thread),
        }
    }

    /// Stops sampling; panics if two copies ever ran at once.
    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.thread.take().unwrap().join().unwrap();
        assert!(samples > 10, "the watcher sampled only {samples} times");
        if let Some(both) = self.both.lock().unwrap().take() {
            panic!("{both}");
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// When, in a migration, to act.
#[derive(Clone, Copy, Debug)]
enum When {
    /// The destination received the first pre-copy round.
    Precopy,
    /// The source's memory went over and the image files followed (its record says so).
    ImagesSent,
    /// The destination's tasks run and its memory is being installed.
    Filling,
}

/// What breaks the migration (besides fail points).
#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    KillSourceShim(When),
    KillDestinationShim(When),
    KillServer(When),
    KillMigrateCli(When),
    KillReceiveCli(When),
    RestartContainerd(Host, When),
    /// Cut the link for this long.
    CutLink(When, Duration),
    /// Stall the link (drop every packet) for this long.
    Stall(When, Duration),
    KillDestinationTask(When),
    /// The destination's root filesystem lacks the container's files: its restore fails.
    FailedRestore,
    /// The destination's bundles live on a tiny tmpfs: the image files do not fit.
    FullImageDir,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Host {
    Src,
    Dst,
}

/// How a cell must end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// The container runs on this host (and not the other), memory verified.
    Runs(Host),
    /// The source is frozen in doubt; `pclive resolve` with this decision ends it and the
    /// container then runs on the given host.
    InDoubt(&'static str, Host),
    /// The source's shim was killed before the destination could run the container:
    /// containerd stops a dead shim's container, so it runs nowhere, and both hosts' records
    /// say why.
    LostWithItsShim,
}

struct Cell {
    failpoints: &'static str,
    hold_commit: bool,
    fault: Fault,
    /// Limit the destination's background fill (MiB/s) so that "during the fill" lasts.
    fill_rate_mib: Option<u64>,
    expect: Expect,
}

impl Cell {
    fn new(expect: Expect) -> Self {
        Cell {
            failpoints: "",
            hold_commit: false,
            fault: Fault::None,
            fill_rate_mib: None,
            expect,
        }
    }
    fn failpoints(mut self, f: &'static str) -> Self {
        self.failpoints = f;
        self
    }
    fn fault(mut self, f: Fault) -> Self {
        self.fault = f;
        self
    }
    /// Makes "during the fill" last: the background fill is limited, and the commit is held
    /// back 4 s by a fail point (memcheck itself faults its whole memory in within a second),
    /// so a fault injected once the restored tasks run lands before the commit.
    fn slow_fill(mut self) -> Self {
        self.fill_rate_mib = Some(8);
        self.hold_commit = true;
        self
    }
}

/// The running parts of a cell.
struct Run {
    hosts: TwoHosts,
    failpoints: PathBuf,
    src_rootfs: PathBuf,
    dst_rootfs: PathBuf,
    key: PathBuf,
    listen: String,
}

impl Run {
    /// `pclive` on a host (in its network namespace: `resolve` talks to the other host).
    fn pclive(&self, host: Host) -> Command {
        self.hosts.pclive(host == Host::Src)
    }

    fn status(&self, host: Host) -> (i32, serde_json::Value) {
        let out = self
            .pclive(host)
            .args(["status", ID, "--json"])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            serde_json::from_slice(&out.stdout).unwrap_or_default(),
        )
    }

    fn source_phase(&self) -> String {
        let (_, status) = self.status(Host::Src);
        status
            .as_array()
            .and_then(|a| a.iter().find(|r| r["role"] == "source"))
            .and_then(|r| r["phase"].as_str())
            .unwrap_or("")
            .to_string()
    }

    fn log(&self, host: Host) -> String {
        match host {
            Host::Src => self.hosts.src.log(),
            Host::Dst => self.hosts.dst.log(),
        }
    }

    fn wait_until(&self, when: When) {
        let timeout = Duration::from_secs(90);
        match when {
            When::Precopy => wait_for("the first round", timeout, || {
                self.log(Host::Dst).contains("round 1 received")
            }),
            When::ImagesSent => wait_for("the images", timeout, || {
                matches!(
                    self.source_phase().as_str(),
                    "images-sent" | "destination-running" | "committed" | "done" | "in-doubt"
                )
            }),
            When::Filling => wait_for("the fill", timeout, || {
                self.log(Host::Dst).contains("lazy restore: tasks resume")
            }),
        }
    }

    fn set_failpoints(&self, lines: &str) {
        fs::write(&self.failpoints, lines).unwrap();
    }
}

/// pids of the shim of `ID` on a host (found by its containerd address and id).
fn shim_pids(c: &Containerd) -> Vec<i32> {
    let ours = processes_with_args(&["-namespace", &c.namespace]);
    processes_with_args(&["-id", ID])
        .into_iter()
        .filter(|pid| ours.contains(pid))
        .collect()
}

fn kill(pids: &[i32]) {
    assert!(!pids.is_empty(), "nothing to kill");
    for &pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn testbed(run: &Run, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/testbed.sh");
    let status = Command::new("bash")
        .arg(script)
        .args(args)
        .args(["--name", run.hosts.name()])
        .env("PCLIVE_FAILPOINTS", &run.failpoints)
        .env(
            "PATH",
            format!(
                "{}:{}",
                run.hosts.bin_dir().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .status()
        .unwrap();
    assert!(status.success(), "testbed.sh {args:?} failed");
}

/// Drops every packet on the link (both directions, at the source's end) or lets them pass.
fn stall(run: &Run, on: bool) {
    let ns = format!("{}-src", run.hosts.name());
    let dev = format!("{}s", run.hosts.name());
    let args: Vec<&str> = if on {
        vec!["-n", &ns, "link", "set", &dev, "down"]
    } else {
        vec!["-n", &ns, "link", "set", &dev, "up"]
    };
    // A down link loses its route until it is up again; a 2 s stall is what TCP rides out.
    let status = Command::new("ip").args(&args).status().unwrap();
    assert!(status.success());
}

/// memcheck's status in a rootfs: passes completed; panics on corrupt memory.
fn verified_passes(rootfs: &Path) -> Option<u64> {
    memcheck_status(&rootfs.join("status")).map(|s| {
        assert_eq!(s.errors, 0, "memcheck found errors");
        s.pass
    })
}

/// The container runs on `host` (only), and its memory keeps verifying there.
fn assert_runs_verified(run: &Run, host: Host) {
    let (c, other, rootfs) = match host {
        Host::Src => (&run.hosts.src, &run.hosts.dst, &run.src_rootfs),
        Host::Dst => (&run.hosts.dst, &run.hosts.src, &run.dst_rootfs),
    };
    wait_for("the container to run", Duration::from_secs(30), || {
        running(&c.namespace)
    });
    // A copy just discarded may take a moment to die (the watcher would have seen overlap).
    wait_for(
        "the other host's copy to be gone",
        Duration::from_secs(10),
        || !running(&other.namespace),
    );
    let before = verified_passes(rootfs).unwrap_or(0);
    wait_for(
        "two more verified passes of its memory",
        Duration::from_secs(60),
        || verified_passes(rootfs).is_some_and(|p| p >= before + 2),
    );
}

fn run_cell(cell: Cell) {
    let (failpoints, _cleanup) = failpoints_file("");
    let hosts = TwoHosts::up_with_env("10gbit", &[("PCLIVE_FAILPOINTS", &failpoints)]);
    let memcheck = workload_binary("memcheck");
    let src_rootfs = hosts.src.rootfs_with(ID, &[&memcheck]);
    let dst_rootfs = hosts.dst.rootfs_with(ID, &[&memcheck]);
    // FailedRestore: the container holds a file open on a volume from its host, and the
    // destination's volume lacks it (the user said --external-mounts-ok, wrongly): CRIU cannot
    // reopen it, and the restore fails.
    let failed_restore = matches!(cell.fault, Fault::FailedRestore);
    let volume = |host: &Containerd| {
        let dir = host.dir.join("volume");
        fs::create_dir_all(&dir).unwrap();
        format!("type=bind,src={},dst=/data,options=rbind:rw", dir.display())
    };
    let (src_volume, dst_volume) = (volume(&hosts.src), volume(&hosts.dst));
    fs::write(hosts.src.dir.join("volume/held"), b"data").unwrap();
    let _tiny = matches!(cell.fault, Fault::FullImageDir).then(|| TinyBundles::mount(&hosts.dst));
    // Each host has its own copy of the key (annotations may only name the host's files).
    let key = PathBuf::from(hosts.src.key());
    hosts.dst.key();
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let run = Run {
        hosts,
        failpoints,
        src_rootfs,
        dst_rootfs,
        key,
        listen,
    };
    if failed_restore {
        let script =
            format!("exec 3</data/held; exec /usr/local/bin/memcheck {MIB} --status /status");
        run.hosts.src.run_detached(
            ID,
            &run.src_rootfs,
            &["--mount", &src_volume],
            &["/bin/sh", "-c", &script],
        );
    } else {
        run.hosts.src.run_detached(
            ID,
            &run.src_rootfs,
            &[],
            &["/usr/local/bin/memcheck", MIB, "--status", "/status"],
        );
    }
    wait_for("memcheck to verify", Duration::from_secs(60), || {
        verified_passes(&run.src_rootfs).is_some_and(|p| p >= 1)
    });
    let mut failpoints = cell.failpoints.to_string();
    if cell.hold_commit {
        failpoints.push_str("\ndestination::before-commit=sleep(4000)");
    }
    run.set_failpoints(&failpoints);
    let watcher = Watcher::start(&run.hosts.src.namespace, &run.hosts.dst.namespace);

    // Destination: the receiving container (ctr, as `pclive receive` does).
    let mut receive = run.pclive(Host::Dst);
    receive
        .args(["receive", ID, "--listen", &run.listen, "--key-file"])
        .arg(run.hosts.dst.key())
        .arg("--rootfs")
        .arg(&run.dst_rootfs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if failed_restore {
        receive.args(["--mount", &dst_volume]);
    }
    let receiver = if let Some(rate) = cell.fill_rate_mib {
        // pclive receive has no fill limit: the annotation, with ctr.
        let _ = receive;
        Guarded(Some(
            run.hosts
                .dst
                .ctr_command(&[
                    "run",
                    "-d",
                    "--null-io",
                    "--runtime",
                    RUNTIME,
                    "--annotation",
                    &format!("{}={}", annotations::RECEIVE_LISTEN, run.listen),
                    "--annotation",
                    &format!("{}={}", annotations::RECEIVE_KEY_FILE, run.hosts.dst.key()),
                    "--annotation",
                    &format!("{}={rate}", annotations::RESTORE_FILL_RATE_MIB),
                    "--annotation",
                    &format!("{}=true", annotations::RESTORE_LAZY_PAGES),
                    "--rootfs",
                    &run.dst_rootfs.display().to_string(),
                    ID,
                    "/bin/true",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    } else {
        Guarded(Some(receive.spawn().unwrap()))
    };
    wait_for("the receiver to listen", Duration::from_secs(30), || {
        run.log(Host::Dst).contains("receiving a migration on")
    });
    let migrate = Guarded(Some(
        run.pclive(Host::Src)
            .args(["migrate", ID, &run.listen, "--key-file"])
            .arg(&run.key)
            // In the host's directory (removed with it): a killed CLI cannot remove its own.
            .arg("--work-dir")
            .arg(run.hosts.src.dir.join("migrate-work"))
            .args(["--resolve-timeout", "15"])
            .args(failed_restore.then_some("--external-mounts-ok"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));

    // The fault.
    match cell.fault {
        Fault::None | Fault::FailedRestore | Fault::FullImageDir => {}
        Fault::KillSourceShim(when) => {
            run.wait_until(when);
            kill(&shim_pids(&run.hosts.src));
        }
        Fault::KillDestinationShim(when) => {
            run.wait_until(when);
            kill(&shim_pids(&run.hosts.dst));
        }
        Fault::KillServer(when) => {
            run.wait_until(when);
            kill(&processes_with_args(&["--receive", &run.listen]));
        }
        Fault::KillMigrateCli(when) => {
            run.wait_until(when);
            kill(&[migrate.0.as_ref().unwrap().id() as i32]);
        }
        Fault::KillReceiveCli(when) => {
            run.wait_until(when);
            kill(&[receiver.0.as_ref().unwrap().id() as i32]);
        }
        Fault::RestartContainerd(host, when) => {
            run.wait_until(when);
            testbed(
                &run,
                &[
                    "restart",
                    match host {
                        Host::Src => "src",
                        Host::Dst => "dst",
                    },
                ],
            );
        }
        Fault::CutLink(when, length) | Fault::Stall(when, length) => {
            run.wait_until(when);
            stall(&run, true);
            thread::sleep(length);
            stall(&run, false);
        }
        Fault::KillDestinationTask(when) => {
            run.wait_until(when);
            let out = run
                .hosts
                .dst
                .ctr(&["task", "kill", "--signal", "SIGKILL", ID]);
            assert!(out.status.success(), "{out:?}");
        }
    }

    let migrated = wait_output(migrate, Duration::from_secs(180));
    let received = wait_output(receiver, Duration::from_secs(180));
    let context = || {
        format!(
            "\n--- pclive migrate ({:?}) ---\n{}\n--- pclive receive ({:?}) ---\n{}\n--- source status ---\n{:#}\n--- destination status ---\n{:#}\n--- source log ---\n{}\n--- destination log ---\n{}\n--- receiving server's log ---\n{}",
            migrated.as_ref().map(|o| o.status),
            migrated.as_ref().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default(),
            received.as_ref().map(|o| o.status),
            received.as_ref().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default(),
            run.status(Host::Src).1,
            run.status(Host::Dst).1,
            tail(&run.log(Host::Src), 25),
            tail(&run.log(Host::Dst), 25),
            tail(
                &fs::read_to_string(
                    run.hosts
                        .dst
                        .bundle(ID)
                        .join("criu-work/lazy-pages-server.log")
                )
                .unwrap_or_default(),
                25
            ),
        )
    };
    match cell.expect {
        Expect::Runs(host) => {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                assert_runs_verified(&run, host)
            }));
            if ok.is_err() {
                panic!("expected the container to run on {host:?}{}", context());
            }
            if host == Host::Dst {
                let phase = run.source_phase();
                assert!(
                    matches!(phase.as_str(), "done" | "source-lost"),
                    "source record: {phase}{}",
                    context()
                );
            }
        }
        Expect::InDoubt(decision, host) => {
            let (code, status) = run.status(Host::Src);
            assert_eq!(code, 4, "pclive status must say in doubt{}", context());
            assert_eq!(run.source_phase(), "in-doubt", "{status:#}");
            assert!(
                !running(&run.hosts.src.namespace),
                "an in-doubt source is frozen"
            );
            let out = run
                .pclive(Host::Src)
                .args(["resolve", ID, decision])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "pclive resolve {decision}: {}\nreceiving servers alive: {:?}{}",
                String::from_utf8_lossy(&out.stderr),
                processes_with_args(&["--receive", &run.listen]),
                context()
            );
            assert_runs_verified(&run, host);
            let (code, _) = run.status(Host::Src);
            assert_eq!(code, 0, "resolved: no longer in doubt");
        }
        Expect::LostWithItsShim => {
            wait_for("containerd to clean up", Duration::from_secs(30), || {
                run.source_phase() == "source-lost"
            });
            assert!(!running(&run.hosts.src.namespace) && !running(&run.hosts.dst.namespace));
            let (_, dst) = run.status(Host::Dst);
            assert!(
                dst.as_array()
                    .is_some_and(|a| a.iter().any(|r| r["phase"] == "aborted")),
                "{dst:#}"
            );
        }
    }
    watcher.finish();
}

/// Waits for a child's output, killing it after `timeout`.
fn wait_output(mut guarded: Guarded, timeout: Duration) -> Option<Output> {
    let mut child = guarded.0.take()?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().ok();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait_with_output().ok();
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A tiny tmpfs under the destination containerd's task directory, so that a receiving
/// container's bundle (and its image files) cannot grow past it. Unmounted on drop.
struct TinyBundles(PathBuf);

impl TinyBundles {
    fn mount(dst: &Containerd) -> Self {
        let dir = dst
            .dir
            .join("state/io.containerd.runtime.v2.task")
            .join(&dst.namespace);
        fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=96k", "pclive-tiny"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        TinyBundles(dir)
    }
}

impl Drop for TinyBundles {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

// ---- The matrix. ----

use Expect::*;
use Host::*;

#[test]
fn no_fault_moves_the_container() {
    run_cell(Cell::new(Runs(Dst)));
}

#[test]
fn source_fails_after_the_freeze() {
    run_cell(Cell::new(Runs(Src)).failpoints("source::after-freeze=return(error)"));
}

#[test]
fn source_fails_after_the_final_dump() {
    run_cell(Cell::new(Runs(Src)).failpoints("source::after-dump=return(error)"));
}

#[test]
fn source_fails_before_the_last_image_message() {
    run_cell(Cell::new(Runs(Src)).failpoints("source::before-images-done=return(error)"));
}

#[test]
fn source_loses_the_connection_after_the_images_and_learns_the_commit_by_asking() {
    run_cell(Cell::new(Runs(Dst)).failpoints("source::after-images-done=return(error)"));
}

#[test]
fn source_loses_the_connection_after_restored_and_learns_the_commit_by_asking() {
    run_cell(Cell::new(Runs(Dst)).failpoints("source::after-restored=return(error)"));
}

#[test]
fn source_shim_killed_after_the_commit_leaves_the_destination_running() {
    run_cell(Cell::new(Runs(Dst)).failpoints("source::after-commit=return(kill)"));
}

#[test]
fn destination_fails_after_the_rounds() {
    run_cell(Cell::new(Runs(Src)).failpoints("destination::after-rounds=return(error)"));
}

#[test]
fn destination_fails_after_the_images() {
    run_cell(Cell::new(Runs(Src)).failpoints("destination::after-images=return(error)"));
}

#[test]
fn destination_refuses_at_the_resume_gate() {
    run_cell(Cell::new(Runs(Src)).failpoints("destination::before-resume=return(error)"));
}

#[test]
fn destination_server_dies_right_after_restored() {
    run_cell(
        Cell::new(InDoubt("--resume-source", Src))
            .failpoints("destination::after-restored=return(kill)")
            .slow_fill(),
    );
}

#[test]
fn destination_fails_before_the_commit() {
    run_cell(
        Cell::new(InDoubt("--resume-source", Src))
            .failpoints("destination::before-commit=return(error)"),
    );
}

#[test]
fn source_shim_killed_during_precopy_is_lost_with_it_and_says_so() {
    run_cell(Cell::new(LostWithItsShim).fault(Fault::KillSourceShim(When::Precopy)));
}

#[test]
fn source_shim_killed_after_the_images_leaves_the_destination_running() {
    run_cell(
        Cell::new(Runs(Dst))
            .fault(Fault::KillSourceShim(When::ImagesSent))
            .failpoints("destination::after-images=sleep(1000)"),
    );
}

#[test]
fn destination_shim_killed_during_precopy_resumes_the_source() {
    run_cell(Cell::new(Runs(Src)).fault(Fault::KillDestinationShim(When::Precopy)));
}

#[test]
fn destination_shim_killed_during_the_fill_leaves_the_source_in_doubt() {
    run_cell(
        Cell::new(InDoubt("--resume-source", Src))
            .fault(Fault::KillDestinationShim(When::Filling))
            .slow_fill(),
    );
}

#[test]
fn lazy_pages_server_killed_during_the_fill_leaves_the_source_in_doubt() {
    run_cell(
        Cell::new(InDoubt("--resume-source", Src))
            .fault(Fault::KillServer(When::Filling))
            .slow_fill(),
    );
}

#[test]
fn migrate_cli_killed_during_precopy_does_not_stop_the_migration() {
    run_cell(Cell::new(Runs(Dst)).fault(Fault::KillMigrateCli(When::Precopy)));
}

#[test]
fn receive_cli_killed_during_precopy_does_not_stop_the_migration() {
    run_cell(Cell::new(Runs(Dst)).fault(Fault::KillReceiveCli(When::Precopy)));
}

#[test]
fn source_containerd_restarted_during_precopy() {
    run_cell(Cell::new(Runs(Dst)).fault(Fault::RestartContainerd(Src, When::Precopy)));
}

#[test]
fn destination_containerd_restarted_during_precopy() {
    run_cell(Cell::new(Runs(Dst)).fault(Fault::RestartContainerd(Dst, When::Precopy)));
}

#[test]
fn link_cut_during_the_fill_leaves_the_source_in_doubt_until_resolved() {
    run_cell(
        Cell::new(InDoubt("--discard-source", Dst))
            .fault(Fault::CutLink(When::Filling, Duration::from_secs(30)))
            .slow_fill(),
    );
}

#[test]
fn a_two_second_stall_during_precopy_is_ridden_out() {
    run_cell(Cell::new(Runs(Dst)).fault(Fault::Stall(When::Precopy, Duration::from_secs(2))));
}

#[test]
fn a_two_second_stall_after_the_images_is_ridden_out() {
    run_cell(Cell::new(Runs(Dst)).fault(Fault::Stall(When::ImagesSent, Duration::from_secs(2))));
}

#[test]
fn destination_task_killed_during_the_fill_is_reported_and_the_source_kept() {
    run_cell(
        Cell::new(InDoubt("--resume-source", Src))
            .fault(Fault::KillDestinationTask(When::Filling))
            .slow_fill(),
    );
}

#[test]
fn a_failed_restore_resumes_the_source() {
    run_cell(Cell::new(Runs(Src)).fault(Fault::FailedRestore));
}

#[test]
fn a_full_image_directory_resumes_the_source() {
    run_cell(Cell::new(Runs(Src)).fault(Fault::FullImageDir));
}
