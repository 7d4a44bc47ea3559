//! The workload suite (testdata/workloads/src/statecheck): one small program per kind of process
//! state, each verifying its own state in a loop, migrated live across the two hosts.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::migration::*;
use common::*;

/// The kinds of the suite (`statecheck --list`), or those in $PCLIVE_TEST_KINDS (space
/// separated) when a developer narrows a failure down.
fn suite_kinds() -> Vec<String> {
    if let Ok(kinds) = std::env::var("PCLIVE_TEST_KINDS") {
        return kinds.split_whitespace().map(str::to_string).collect();
    }
    let out = Command::new(workload_binary("statecheck"))
        .arg("--list")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Each kind's rounds so far; panics on a `FAIL` line.
fn rounds(status: &Path, kinds: &[String]) -> Vec<Option<u64>> {
    kinds
        .iter()
        .map(|k| {
            let text = fs::read_to_string(status.join(k)).ok()?;
            assert!(!text.starts_with("FAIL"), "{}", text.trim());
            text.trim().strip_prefix("ok rounds=")?.parse().ok()
        })
        .collect()
}

/// Waits until each kind made at least `min[i]` rounds; on timeout, names the ones behind.
fn wait_rounds(what: &str, status: &Path, kinds: &[String], min: &[u64]) {
    wait_rounds_or(what, status, kinds, min, &String::new)
}

/// [`wait_rounds`]; on timeout the message ends with `diagnose()`.
fn wait_rounds_or(
    what: &str,
    status: &Path,
    kinds: &[String],
    min: &[u64],
    diagnose: &dyn Fn() -> String,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = rounds(status, kinds);
        let behind: Vec<String> = kinds
            .iter()
            .zip(&now)
            .zip(min)
            .filter(|((_, r), m)| r.unwrap_or(0) < **m)
            .map(|((k, r), m)| format!("{k}: {r:?} rounds, needs {m}"))
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {}{}",
            behind.join("; "),
            diagnose()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn migration_failed(hosts: &TwoHosts, e: &str) -> ! {
    let _ = fs::write("/tmp/last-dst.log", hosts.dst.log());
    panic!(
        "migration failed: {e}\n--- source log ---\n{}\n--- destination log ---\n{}",
        tail(&hosts.src.log(), 40),
        tail(&hosts.dst.log(), 40)
    )
}

/// A container whose statecheck programs write their status to a volume both hosts mount.
struct Checked<'a> {
    hosts: &'a TwoHosts,
    id: &'static str,
    binaries: Vec<std::path::PathBuf>,
    status: std::path::PathBuf,
    volume: String,
    kinds: Vec<String>,
}

impl<'a> Checked<'a> {
    /// Runs `script` (a shell command line that starts the `kinds`) in container `id` on the
    /// source, with `binaries` in its root filesystem; returns once every kind verified once.
    fn start(
        hosts: &'a TwoHosts,
        id: &'static str,
        binaries: &[&Path],
        kinds: Vec<String>,
        script: &str,
    ) -> Self {
        let rootfs = hosts.src.rootfs_with(id, binaries);
        // The status files live on a volume both hosts mount (as shared storage would be): the
        // programs rewrite them all the time, so one is open whenever the container freezes.
        let status = hosts.src.dir.join(format!("{id}-status"));
        fs::create_dir_all(&status).unwrap();
        fs::create_dir_all(rootfs.join("status")).unwrap();
        let volume = format!(
            "type=bind,src={},dst=/status,options=rbind:rw",
            status.display()
        );
        hosts.src.run_detached(
            id,
            &rootfs,
            &["--mount", &volume],
            &["/bin/sh", "-c", script],
        );
        let checked = Checked {
            hosts,
            id,
            binaries: binaries.iter().map(|b| b.to_path_buf()).collect(),
            status,
            volume,
            kinds,
        };
        checked.wait(&format!("every program of {id} to verify once"), 0, None);
        checked
    }

    /// What the container's processes do, on each host that has its task (pid, command, state
    /// and where in the kernel they wait), and the destination's log: for a program that stopped
    /// making rounds without failing.
    fn processes(&self) -> String {
        let mut text = String::new();
        for (host, containerd) in [
            ("source", &self.hosts.src),
            ("destination", &self.hosts.dst),
        ] {
            let ps = containerd.ctr(&["task", "ps", self.id]);
            text.push_str(&format!("\n--- {host}'s processes ---\n"));
            for pid in String::from_utf8_lossy(&ps.stdout)
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next())
            {
                let read =
                    |f: &str| fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
                let stat = read("stat");
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                text.push_str(&format!(
                    "{pid} {} state {} wchan {} cmd {}\n",
                    read("comm").trim(),
                    state.unwrap_or("?"),
                    read("wchan"),
                    read("cmdline").replace('\0', " ").trim()
                ));
            }
        }
        text + "--- destination log ---\n" + &tail(&self.hosts.dst.log(), 30)
    }

    /// Panics, with both hosts' logs, if a program wrote a FAIL line.
    fn no_failure(&self, when: &str) {
        for kind in &self.kinds {
            let text = fs::read_to_string(self.status.join(kind)).unwrap_or_default();
            if text.starts_with("FAIL") {
                panic!(
                    "{when}: {}\n--- source log ---\n{}\n--- destination log ---\n{}",
                    text.trim(),
                    tail(&self.hosts.src.log(), 60),
                    tail(&self.hosts.dst.log(), 60)
                );
            }
        }
    }

    /// Checks the journal to which every program appends "NETNS KIND ROUND" after each round
    /// (20 ms apart): in the file's order, once a line from the destination's network
    /// namespace appears, none from the source's may follow. One would mean that the source's
    /// copy ran again after the destination's had started: two copies at once, the worst
    /// outcome of a migration (a source thawed to be killed ran a round, all its sleeps having
    /// expired during the freeze).
    fn one_copy_at_a_time(&self) {
        let journal = fs::read_to_string(self.status.join("journal")).unwrap();
        let lines: Vec<(&str, &str)> = journal
            .lines()
            .map(|l| (l.split_whitespace().next().unwrap_or(""), l))
            .collect();
        let source = lines.first().expect("an empty journal").0;
        let first_destination = lines
            .iter()
            .position(|(ns, _)| *ns != source)
            .expect("no program journaled a round from the destination");
        let late: Vec<&str> = lines[first_destination..]
            .iter()
            .filter(|(ns, _)| *ns == source)
            .map(|(_, line)| *line)
            .collect();
        assert!(
            late.is_empty(),
            "the source's copy ran after the destination's had started (source {source}, first destination line {:?}): {late:?}\n--- source log ---\n{}",
            lines[first_destination].1,
            tail(&self.hosts.src.log(), 40)
        );
    }

    /// Waits until each kind made `more` rounds beyond `since` (or at least one).
    fn wait(&self, what: &str, more: u64, since: Option<&[Option<u64>]>) {
        let wanted: Vec<u64> = match since {
            Some(since) => since.iter().map(|r| r.unwrap_or(0) + more).collect(),
            None => vec![1; self.kinds.len()],
        };
        wait_rounds_or(what, &self.status, &self.kinds, &wanted, &|| {
            self.processes()
        });
    }

    /// Migrates the container to the destination (whose root filesystem is its own, built
    /// there: the source's files travel with the migration) and checks that every program
    /// goes on verifying its state there. The status volume is bind-mounted from the host: the
    /// migration is refused, naming it, until `--external-mounts-ok` says the destination has
    /// it too.
    fn migrate(&self) {
        let (src, dst) = (&self.hosts.src, &self.hosts.dst);
        let binaries: Vec<&Path> = self.binaries.iter().map(|b| b.as_path()).collect();
        let dst_rootfs = dst.rootfs_with(self.id, &binaries);
        fs::create_dir_all(dst_rootfs.join("status")).unwrap();
        let listen = format!("{}:{}", self.hosts.dst_ip, free_port());
        let receiver = receive_with(
            dst,
            self.id,
            &dst_rootfs,
            &listen,
            &dst.key(),
            &["--mount", &self.volume],
        );
        let refused = migrate(src, self.id, &listen, &src.key()).unwrap_err();
        assert!(
            refused.contains("/status (from ")
                && refused.contains("--external-mounts-ok")
                && refused.contains("keeps running"),
            "the refusal does not name the bind mount and the way out: {refused}"
        );
        assert_eq!(src.task(self.id).unwrap().1, "RUNNING");
        let before = rounds(&self.status, &self.kinds);
        migrate_with(src, self.id, &listen, &src.key(), &["--external-mounts-ok"])
            .unwrap_or_else(|e| migration_failed(self.hosts, &e));
        let code = receiver.wait_code(Duration::from_secs(60));
        assert_eq!(
            code,
            0,
            "the receiving ctr failed\n--- destination log ---\n{}",
            tail(&dst.log(), 40)
        );
        self.no_failure("right after the migration");
        assert_eq!(dst.task(self.id).unwrap().1, "RUNNING");
        // Every program goes on verifying its state on the destination (rounds are 20 ms
        // apart: 25 more is half a second of work after the restore).
        self.wait(
            "every program to verify its state 25 more times on the destination",
            25,
            Some(&before),
        );
        self.one_copy_at_a_time();
        let source = src.task(self.id);
        assert!(
            source
                .as_ref()
                .is_none_or(|(_, status)| status == "STOPPED"),
            "the source copy still runs: {source:?}"
        );
    }
}

/// The two migrations of this file run one at a time (Redis's population and the suite's
/// fork churn together load a 2-core host more than a migration needs to be tested under).
static ONE_MIGRATION_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn every_program_of_the_workload_suite_verifies_its_state_after_a_migration() {
    let _one = ONE_MIGRATION_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let hosts = TwoHosts::up("10gbit");
    let kinds = suite_kinds();
    let script = format!(
        "cd /usr/local/bin; for k in {}; do ./statecheck $k --status /status & done; wait",
        kinds.join(" ")
    );
    let statecheck = workload_binary("statecheck");
    Checked::start(&hosts, "suite", &[&statecheck], kinds, &script).migrate();
}

#[test]
fn redis_and_a_client_on_one_loopback_connection_migrate_and_the_connection_keeps_working() {
    let _one = ONE_MIGRATION_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let hosts = TwoHosts::up("10gbit");
    let (server, cli) = (find_on_path("redis-server"), find_on_path("redis-cli"));
    let statecheck = workload_binary("statecheck");
    // Redis with 200k keys, and in the same container a client that keeps one TCP connection
    // to it over 127.0.0.1: INCR on its own key must count on, and CLIENT ID stay the same
    // (a reconnect would get another), or statecheck fails.
    let script = "cd /usr/local/bin; \
        ./redis-server --save '' --appendonly no --bind 127.0.0.1 --port 6379 \
          --enable-debug-command yes >/dev/null & \
        until ./redis-cli PING 2>/dev/null | grep -q PONG; do sleep 0.1; done; \
        ./redis-cli DEBUG POPULATE 200000 key 256 >/dev/null; \
        ./statecheck redis-conn 6379 --status /status & wait";
    let checked = Checked::start(
        &hosts,
        "redis",
        &[&server, &cli, &statecheck],
        vec!["redis-conn".to_string()],
        script,
    );
    checked.migrate();
    let keys = hosts.dst.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "n",
        "redis",
        "/usr/local/bin/redis-cli",
        "DBSIZE",
    ]);
    // 200000 populated keys and the client's counter.
    assert_eq!(keys.trim(), "200001");
}

/// A container on `src` running one statecheck `kind` (with `args`); its status directory once
/// the check verified once.
fn run_one(src: &Containerd, id: &str, kind: &str, args: &str) -> std::path::PathBuf {
    let status = start_one(src, id, kind, args);
    let kinds = [kind.to_string()];
    wait_rounds(&format!("{kind} to verify once"), &status, &kinds, &[1]);
    status
}

/// [`run_one`] without waiting.
fn start_one(src: &Containerd, id: &str, kind: &str, args: &str) -> std::path::PathBuf {
    let rootfs = src.rootfs_with(id, &[&workload_binary("statecheck")]);
    let status = rootfs.join("status");
    fs::create_dir_all(&status).unwrap();
    let script = format!("exec /usr/local/bin/statecheck {kind} {args} --status /status");
    src.run_detached(id, &rootfs, &[], &["/bin/sh", "-c", &script]);
    status
}

/// Asserts that `kind` in `status` keeps making rounds (its container runs).
fn assert_keeps_verifying(status: &Path, kind: &str) {
    let kinds = [kind.to_string()];
    let now = rounds(status, &kinds)[0].unwrap_or(0);
    wait_rounds(
        &format!("{kind} to go on verifying"),
        status,
        &kinds,
        &[now + 10],
    );
}

#[test]
fn a_stopped_task_or_one_blocked_in_vfork_is_refused_up_front_and_keeps_running() {
    let hosts = TwoHosts::up("10gbit");
    let src = &hosts.src;
    let key = src.key();
    // Nothing listens there: the refusal comes before pclive connects.
    let nowhere = format!("{}:{}", hosts.dst_ip, free_port());

    // A child stopped with SIGSTOP (cgroup v1: CRIU would hang attaching to it).
    let stopped = run_one(src, "stopped", "stopped", "");
    if containerd_shim_pclive::cgroups::host_cgroup_version()
        == containerd_shim_pclive::cgroups::CgroupVersion::V1
    {
        let err = migrate(src, "stopped", &nowhere, &key).unwrap_err();
        assert!(
            err.contains("is stopped")
                && err.contains("kill -CONT")
                && err.contains("keeps running"),
            "the refusal does not name the stopped task, the cause and the way out: {err}"
        );
        assert_eq!(src.task("stopped").unwrap().1, "RUNNING");
        assert_keeps_verifying(&stopped, "stopped");
        // A local checkpoint refuses it the same way instead of hanging in CRIU.
        let out = src.ctr(&["task", "checkpoint", "stopped"]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && text.contains("is stopped"),
            "ctr task checkpoint: {text}"
        );
        assert_keeps_verifying(&stopped, "stopped");
    } else {
        eprintln!("SKIPPED (cgroup v2 host): the stopped-task refusal applies to cgroup v1 only");
    }

    // A parent blocked in vfork for an hour (its child sleeps before it execs).
    start_one(src, "vfork", "vfork-hold", "3600");
    wait_for("the vfork child", Duration::from_secs(30), || {
        src.ctr_ok(&["task", "ps", "vfork"]).lines().count() >= 3
    });
    let started = std::time::Instant::now();
    let err = migrate(src, "vfork", &nowhere, &key).unwrap_err();
    assert!(
        err.contains("blocked in vfork") && err.contains("keeps running"),
        "the refusal does not name the vfork wait: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refusal took {:?}",
        started.elapsed()
    );
    assert_eq!(src.task("vfork").unwrap().1, "RUNNING");
}

#[test]
fn a_task_stopped_just_before_the_freeze_fails_the_migration_and_the_source_resumes() {
    // The migration stalls for 4 s between its rounds and the freeze.
    let (failpoints, _cleanup) = failpoints_file("source::before-freeze=sleep(4000)\n");
    let hosts = TwoHosts::up_with_env("10gbit", &[("PCLIVE_FAILPOINTS", &failpoints)]);
    let (src, dst) = (&hosts.src, &hosts.dst);
    if containerd_shim_pclive::cgroups::host_cgroup_version()
        != containerd_shim_pclive::cgroups::CgroupVersion::V1
    {
        eprintln!("SKIPPED (cgroup v2 host): the stopped-task refusal applies to cgroup v1 only");
        return;
    }
    let status = run_one(src, "app", "pipe", "");
    let key = src.key();
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let dst_rootfs = dst.rootfs_with("app", &[&workload_binary("statecheck")]);
    let receiver = receive_with(dst, "app", &dst_rootfs, &listen, &dst.key(), &[]);
    let migration = migrate_in_background(src, "app", &listen, &key, &[]);
    // After the first round (the up-front check passed), stop the container's process.
    wait_for("the first round", Duration::from_secs(30), || {
        src.log().contains("app: round 1:")
    });
    let (pid, _) = src.task("app").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let (out, _) = migration.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is stopped") && err.contains("keeps running"),
        "the failure does not name the stopped task: {err}"
    );
    assert_ne!(receiver.wait_code(Duration::from_secs(60)), 0);
    // Thawed (runc says RUNNING), the process still stopped as its user left it; continued, it
    // goes on verifying.
    assert_eq!(src.task("app").unwrap().1, "RUNNING");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    assert_keeps_verifying(&status, "pipe");
}
