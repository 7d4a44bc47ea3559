//! End to end against real `redis-server`s started by the test: load → run → verify, and a
//! failover from a frozen server to its replica in the middle of a run (a stand-in for a live
//! migration: freeze, last writes synced, service resumes at another endpoint).
//!
//! Needs `redis-server` (scripts/setup.sh installs it); fails without it.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pclive_bench::conn::Conn;
use pclive_bench::resp::{encode_command, Value};
use serde_json::Value as Json;

const CLIENT: &str = env!("CARGO_BIN_EXE_pclive-bench-client");

/// A redis-server on 127.0.0.1, killed when dropped (SIGKILL also ends a SIGSTOPped one).
struct Redis {
    child: Child,
    addr: SocketAddr,
    /// Its working directory: a replica's full sync writes an RDB file there.
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start(extra: &[&str]) -> Redis {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            // setup.sh installs it: its absence is a broken set-up, not a reason to skip.
            panic!(
                "redis-server is not on PATH: run scripts/setup.sh (apt-get install redis-server)"
            );
        }
        // The port is free now; another process could take it before redis binds it, but on a
        // test machine that is unlikely enough (and fails loudly below).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", dir.path().to_str().unwrap()])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = Redis {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.try_command(&["PING"]).is_none() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    fn try_command(&self, args: &[&str]) -> Option<Value> {
        let mut conn = Conn::connect(self.addr, Duration::from_millis(200)).ok()?;
        let mut bytes = Vec::new();
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        encode_command(&mut bytes, &args);
        conn.request(&bytes, Duration::from_secs(5)).ok()
    }

    fn command(&self, args: &[&str]) -> Value {
        self.try_command(args)
            .unwrap_or_else(|| panic!("{args:?} on {} failed", self.addr))
    }

    /// A field of `INFO replication`.
    fn replication_field(&self, name: &str) -> Option<String> {
        let Value::Bulk(Some(info)) = self.command(&["INFO", "replication"]) else {
            panic!("INFO did not return text");
        };
        String::from_utf8_lossy(&info).lines().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        })
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(args: &[&str]) -> Output {
    Command::new(CLIENT)
        .args(args)
        .output()
        .expect("run client")
}

fn json_of(output: &Output) -> Json {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

const WORKLOAD: [&str; 6] = ["--records", "2000", "--value-size", "256", "--seed", "7"];

fn with_workload<'a>(args: &[&'a str]) -> Vec<&'a str> {
    args.iter().copied().chain(WORKLOAD).collect()
}

/// Starts `run` and returns it with the stop file to create when done.
fn start_run(endpoints: &str, read_ratio: &str, dir: &Path) -> Child {
    let p = |name: &str| dir.join(name).display().to_string();
    Command::new(CLIENT)
        .args(["run", "--endpoints", endpoints, "--read-ratio", read_ratio])
        .args(["--rate", "2000", "--stop-file", &p("stop")])
        .args([
            "--timeline",
            &p("timeline.jsonl"),
            "--state",
            &p("run.state"),
        ])
        .args(WORKLOAD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start run")
}

fn stop_run(run: Child, dir: &Path) -> (Output, Json) {
    std::fs::write(dir.join("stop"), b"").unwrap();
    let output = run.wait_with_output().unwrap();
    let summary = json_of(&output);
    (output, summary)
}

#[test]
fn load_run_verify() {
    let redis = Redis::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let endpoint = redis.endpoint();

    let loaded = client(&with_workload(&["load", "--endpoint", &endpoint]));
    assert!(loaded.status.success(), "{loaded:?}");
    assert_eq!(json_of(&loaded)["records"], 2000);

    let verified = client(&with_workload(&["verify", "--endpoint", &endpoint]));
    assert!(verified.status.success(), "{verified:?}");
    let report = json_of(&verified);
    assert_eq!(
        (report["checked"].as_u64(), report["dbsize"].as_u64()),
        (Some(2000), Some(2000))
    );

    let run = start_run(&endpoint, "0.5", dir.path());
    std::thread::sleep(Duration::from_millis(1500));
    let (output, summary) = stop_run(run, dir.path());
    assert!(output.status.success(), "{output:?}");
    assert_eq!(summary["read_mismatches"], 0, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    assert!(summary["writes"].as_u64().unwrap() > 100, "{summary}");
    assert!(summary["reads"].as_u64().unwrap() > 100, "{summary}");
    let timeline = std::fs::read_to_string(dir.path().join("timeline.jsonl")).unwrap();
    let first: Json = serde_json::from_str(timeline.lines().next().unwrap()).unwrap();
    for field in [
        "t", "reads", "writes", "errors", "p50_us", "p99_us", "endpoint",
    ] {
        assert!(
            first.get(field).is_some(),
            "timeline lacks {field}: {first}"
        );
    }
    assert!(timeline.lines().count() >= 14);

    let state = dir.path().join("run.state").display().to_string();
    let verified = client(&with_workload(&[
        "verify",
        "--endpoint",
        &endpoint,
        "--state",
        &state,
    ]));
    assert!(verified.status.success(), "{verified:?}");
    assert_eq!(json_of(&verified)["mismatches"], 0);

    // Without the state file, the written keys no longer hold version 0.
    let stale = client(&with_workload(&["verify", "--endpoint", &endpoint]));
    assert_eq!(stale.status.code(), Some(1));
    assert!(json_of(&stale)["mismatches"].as_u64().unwrap() > 0);

    // A truncated state file is a clear error, not a wrong verdict.
    let bytes = std::fs::read(dir.path().join("run.state")).unwrap();
    std::fs::write(dir.path().join("run.state"), &bytes[..bytes.len() / 2]).unwrap();
    let truncated = client(&with_workload(&[
        "verify",
        "--endpoint",
        &endpoint,
        "--state",
        &state,
    ]));
    assert_eq!(truncated.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&truncated.stderr).contains("truncated"));
}

#[test]
fn follows_the_service_from_a_frozen_server_to_its_replica() {
    let source = Redis::start(&[]);
    let loaded = client(&with_workload(&["load", "--endpoint", &source.endpoint()]));
    assert!(loaded.status.success(), "{loaded:?}");
    let source_port = source.addr.port().to_string();
    let destination = Redis::start(&[
        "--replicaof",
        "127.0.0.1",
        &source_port,
        // Writes reach the replica once the client fails over (it is promoted just after).
        "--replica-read-only",
        "no",
    ]);
    wait_until("replica in sync", || {
        destination
            .replication_field("master_link_status")
            .as_deref()
            == Some("up")
    });

    let dir = tempfile::tempdir().unwrap();
    let endpoints = format!("{},{}", source.endpoint(), destination.endpoint());
    let run = start_run(&endpoints, "0.7", dir.path());
    std::thread::sleep(Duration::from_millis(1000));

    // "Migration": stop writes on the source, let the replica catch up, freeze both, resume
    // the destination after 300 ms as the only server.
    source.command(&["CLIENT", "PAUSE", "10000", "WRITE"]);
    let source_offset = source.replication_field("master_repl_offset").unwrap();
    wait_until("replica caught up", || {
        destination.replication_field("slave_repl_offset").as_ref() == Some(&source_offset)
    });
    source.signal("-STOP");
    destination.signal("-STOP");
    std::thread::sleep(Duration::from_millis(300));
    destination.signal("-CONT");
    destination.command(&["REPLICAOF", "NO", "ONE"]);
    std::thread::sleep(Duration::from_millis(1000));

    let (output, summary) = stop_run(run, dir.path());
    eprintln!("failover run summary: {summary}");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(summary["read_mismatches"], 0, "{summary}");
    assert_eq!(summary["endpoint_after_gap"], 1, "{summary}");
    let gap = summary["longest_gap_s"].as_f64().unwrap();
    assert!((0.25..3.0).contains(&gap), "gap {gap}: {summary}");
    assert!(
        summary["after_resume_latency_us"]["ops"].as_u64().unwrap() > 100,
        "{summary}"
    );
    let timeline = std::fs::read_to_string(dir.path().join("timeline.jsonl")).unwrap();
    let last: Json = serde_json::from_str(timeline.lines().last().unwrap()).unwrap();
    assert_eq!(last["endpoint"], 1, "{last}");

    let state = dir.path().join("run.state").display().to_string();
    let verified = client(&with_workload(&[
        "verify",
        "--endpoint",
        &destination.endpoint(),
        "--state",
        &state,
    ]));
    assert!(verified.status.success(), "{verified:?}");
    assert_eq!(json_of(&verified)["mismatches"], 0);
}

#[test]
fn usage_and_connection_errors_exit_2() {
    let help = client(&["--help"]);
    assert!(help.status.success());
    for command in ["load", "run", "verify"] {
        assert!(String::from_utf8_lossy(&help.stdout).contains(command));
    }
    let unknown = client(&["load", "--endpoint", "127.0.0.1:1", "--bogus", "1"]);
    assert_eq!(unknown.status.code(), Some(2));
    let missing = client(&["verify", "--endpoint", "127.0.0.1:1"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--records"));
    // Port 1 on localhost: connection refused.
    let refused = client(&with_workload(&["verify", "--endpoint", "127.0.0.1:1"]));
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot connect"));
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
