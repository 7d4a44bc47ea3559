//! The Task API through a real containerd, ctr, runc: every method the shim serves, with the
//! behaviour users expect from the runc shim.

mod common;

use std::fs;
use std::process::Stdio;
use std::thread::sleep;
use std::time::Duration;

use common::*;

const COUNTER: &[&str] = &[
    "/bin/sh",
    "-c",
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done",
];

#[test]
fn exit_code_and_output_of_an_attached_container() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("exit7");
    let rootfs_arg = rootfs.display().to_string();
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--rootfs",
        &rootfs_arg,
        "exit7",
        "/bin/sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "to-stdout");
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "to-stderr");
}

#[test]
fn stdin_reaches_the_container_and_close_io_ends_it() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("cat");
    let rootfs_arg = rootfs.display().to_string();
    let mut cmd = ctd.ctr_command(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--rootfs",
        &rootfs_arg,
        "cat",
        "/bin/cat",
    ]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = Guarded(Some(cmd.spawn().unwrap()));
    child.write_stdin(b"line one\nline two\n");
    let mut stdout = child.0.as_mut().unwrap().stdout.take().unwrap();
    // cat exits only when CloseIO closed its stdin.
    let code = child.wait_code(Duration::from_secs(30));
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
    assert_eq!(code, 0);
    assert_eq!(text, "line one\nline two\n");
}

#[test]
fn kill_reports_128_plus_signal_for_init_and_exec() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("killme");
    let rootfs_arg = rootfs.display().to_string();
    let attached = Guarded(Some(
        ctd.ctr_command(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--rootfs",
            &rootfs_arg,
            "killme",
            "/bin/sleep",
            "1000",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap(),
    ));
    ctd.wait_status("killme", "RUNNING");

    // An exec process killed by SIGTERM reports 143.
    let exec = Guarded(Some(
        ctd.ctr_command(&[
            "task",
            "exec",
            "--exec-id",
            "sleeper",
            "killme",
            "/bin/sleep",
            "1000",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap(),
    ));
    wait_for("the exec to appear in ps", Duration::from_secs(20), || {
        ctd.ctr_ok(&["task", "ps", "killme"]).contains("sleeper")
    });
    ctd.ctr_ok(&[
        "task",
        "kill",
        "--exec-id",
        "sleeper",
        "-s",
        "SIGTERM",
        "killme",
    ]);
    assert_eq!(exec.wait_code(Duration::from_secs(20)), 128 + 15);

    // The init killed by SIGKILL reports 137.
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "killme"]);
    assert_eq!(attached.wait_code(Duration::from_secs(20)), 128 + 9);
}

#[test]
fn exec_output_pids_stats_update_and_events() {
    let ctd = Containerd::start();
    let events = ctd.record_events();

    let rootfs = ctd.rootfs("svc");
    ctd.run_detached("svc", &rootfs, &[], COUNTER);
    ctd.wait_status("svc", "RUNNING");

    // Exec: output captured, exit status returned.
    let out = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "probe",
        "svc",
        "/bin/sh",
        "-c",
        "echo exec-says-hi; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "exec-says-hi");

    // Pids: the init and the running exec, which is labelled with its exec id.
    let exec = Guarded(Some(
        ctd.ctr_command(&[
            "task",
            "exec",
            "--exec-id",
            "long",
            "svc",
            "/bin/sleep",
            "1000",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap(),
    ));
    wait_for("ps to show the exec", Duration::from_secs(20), || {
        ctd.ctr_ok(&["task", "ps", "svc"]).contains("long")
    });
    let (init_pid, _) = ctd.task("svc").unwrap();
    let ps = ctd.ctr_ok(&["task", "ps", "svc"]);
    assert!(ps.contains(&init_pid.to_string()), "{ps}");
    ctd.ctr_ok(&["task", "kill", "--exec-id", "long", "-s", "SIGKILL", "svc"]);
    assert_eq!(exec.wait_code(Duration::from_secs(20)), 137);

    // Stats from the container's cgroup.
    let metrics = ctd.ctr_ok(&["task", "metrics", "svc"]);
    let usage: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("memory.usage_in_bytes"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no memory usage in metrics:\n{metrics}"));
    assert!(usage > 0);
    assert!(metrics.contains("pids.current"), "{metrics}");

    // Update: a new memory limit lands in the container's cgroup. ctr 2.1 has no `task update`;
    // send containerd's UpdateTaskRequest to the shim's own ttrpc socket.
    update_memory_limit(&ctd, "svc", 67_108_864);
    let limit =
        fs::read_to_string(ctd.memory_limit_file("svc")).expect("the container's memory cgroup");
    assert_eq!(limit.trim(), "67108864");

    // Pause / resume, then kill and delete.
    ctd.ctr_ok(&["task", "pause", "svc"]);
    ctd.ctr_ok(&["task", "resume", "svc"]);
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "svc"]);
    ctd.wait_status("svc", "STOPPED");
    ctd.ctr_ok(&["task", "rm", "svc"]);
    ctd.ctr_ok(&["container", "rm", "svc"]);

    let topics = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ];
    events.wait_for_topics(&topics);
}

fn update_memory_limit(ctd: &Containerd, id: &str, limit: u64) {
    use containerd_shim::api::UpdateTaskRequest;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;
    use containerd_shim::protos::protobuf::MessageField;
    use containerd_shim::protos::shim::shim_ttrpc::TaskClient;
    use containerd_shim::protos::ttrpc::{context, Client};

    let address = fs::read_to_string(ctd.bundle(id).join("address")).expect("shim address file");
    let client = TaskClient::new(Client::connect(address.trim()).expect("connect to the shim"));
    let request = UpdateTaskRequest {
        id: id.into(),
        resources: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: format!(r#"{{"memory":{{"limit":{limit}}}}}"#).into_bytes(),
            ..Default::default()
        }),
        ..Default::default()
    };
    client
        .update(context::with_timeout(10_000_000_000), &request)
        .expect("Update through the shim's task API");
}

#[test]
fn pause_stops_a_counter_and_resume_continues_it() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("pausable");
    let count = rootfs.join("tmp/count");
    ctd.run_detached("pausable", &rootfs, &[], COUNTER);
    wait_for("the counter to run", Duration::from_secs(20), || {
        read_number(&count).is_some_and(|n| n > 3)
    });
    ctd.ctr_ok(&["task", "pause", "pausable"]);
    assert_eq!(ctd.task("pausable").unwrap().1, "PAUSED");
    sleep(Duration::from_millis(200));
    let frozen = read_number(&count).unwrap();
    sleep(Duration::from_millis(500));
    assert_eq!(
        read_number(&count).unwrap(),
        frozen,
        "a paused container kept counting"
    );
    ctd.ctr_ok(&["task", "resume", "pausable"]);
    assert_eq!(ctd.task("pausable").unwrap().1, "RUNNING");
    wait_for("the counter to continue", Duration::from_secs(20), || {
        read_number(&count).is_some_and(|n| n > frozen + 3)
    });
}

#[test]
fn exec_with_a_terminal() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("tty");
    ctd.run_detached("tty", &rootfs, &[], &["/bin/sleep", "1000"]);
    ctd.wait_status("tty", "RUNNING");
    // ctr needs a terminal of its own for -t: give it one with script(1). ctr resizes the
    // container's pty to its own size (ResizePty) before the command prints it.
    let ctr = find_on_path("ctr");
    let command = format!(
        "stty cols 91 rows 17; {} --address {} --namespace {} task exec -t --exec-id term tty /bin/sh -c 'sleep 0.5; tty; stty size'",
        ctr.display(),
        ctd.address,
        ctd.namespace
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script(1) from util-linux");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("/dev/pts/"),
        "no terminal in the exec: {text}"
    );
    assert!(text.contains("17 91"), "pty was not resized: {text}");
}

#[test]
fn out_of_memory_is_reported() {
    let ctd = Containerd::start();
    let events = ctd.record_events();
    let rootfs = ctd.rootfs("oom");
    ctd.run_detached(
        "oom",
        &rootfs,
        &["--memory-limit", "33554432"],
        &["/usr/local/bin/memcheck", "128"],
    );
    ctd.wait_status("oom", "STOPPED");
    events.wait_for_topics(&["/tasks/oom"]);
}

#[test]
fn tasks_survive_a_containerd_restart_and_the_shim_exits_after_delete() {
    let mut ctd = Containerd::start();
    let rootfs = ctd.rootfs("durable");
    let count = rootfs.join("tmp/count");
    ctd.run_detached("durable", &rootfs, &[], COUNTER);
    ctd.wait_status("durable", "RUNNING");
    let (pid_before, _) = ctd.task("durable").unwrap();

    ctd.restart();
    // containerd reconnects (Connect) to the running shim.
    let (pid_after, status) = ctd.task("durable").expect("task after restart");
    assert_eq!((pid_after, status.as_str()), (pid_before, "RUNNING"));
    let now = read_number(&count).unwrap_or(0);
    wait_for("the counter after restart", Duration::from_secs(20), || {
        read_number(&count).is_some_and(|n| n > now)
    });
    let out = ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        "durable",
        "/bin/echo",
        "ok",
    ]);
    assert_eq!(out.trim(), "ok");

    assert_eq!(ctd.live_shims().len(), 1, "one shim per container");
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "durable"]);
    ctd.wait_status("durable", "STOPPED");
    ctd.ctr_ok(&["task", "rm", "durable"]);
    ctd.ctr_ok(&["container", "rm", "durable"]);
    // Shutdown: the shim exits once its last container is gone.
    wait_for("the shim to exit", Duration::from_secs(10), || {
        ctd.live_shims().is_empty()
    });
}

#[test]
fn a_missing_runc_is_named_with_the_fix() {
    let ctd = Containerd::start_with(Tools::ShimOnly);
    let rootfs = ctd.rootfs("norunc");
    let rootfs_arg = rootfs.display().to_string();
    let err = ctd.ctr_err(&[
        "run",
        "-d",
        "--null-io",
        "--runtime",
        RUNTIME,
        "--rootfs",
        &rootfs_arg,
        "norunc",
        "/bin/true",
    ]);
    assert!(
        err.contains("runc") && err.contains("install runc >= 1.3"),
        "unclear error: {err}"
    );
}

#[test]
fn a_binary_log_uri_delivers_output_to_the_logger_as_containerd_runs_it() {
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("logged");
    let logs = ctd.dir.join("logger-out");
    fs::create_dir_all(&logs).unwrap();
    // A logger as containerd's runc shim runs one: fd 3 stdout, fd 4 stderr, fd 5 closed when
    // ready; arguments from the URI's query; CONTAINER_ID and CONTAINER_NAMESPACE only. It
    // finishes its files on EOF and ignores the SIGTERM that follows the EOF at once (as
    // containerd sends it): a logger that died of it would lose what it had not written yet.
    let logger = ctd.dir.join("logger.sh");
    fs::write(
        &logger,
        "#!/bin/sh\ntrap '' TERM\nexec 5>&-\n\
         echo \"$CONTAINER_ID $CONTAINER_NAMESPACE $1\" > \"$2/env\"\n\
         /bin/cat <&3 > \"$2/stdout.tmp\" & /bin/cat <&4 > \"$2/stderr.tmp\" & wait\n\
         mv \"$2/stdout.tmp\" \"$2/stdout\"; mv \"$2/stderr.tmp\" \"$2/stderr\"\n",
    )
    .unwrap();
    fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uri = format!("binary://{}?--out={}", logger.display(), logs.display());
    let rootfs_arg = rootfs.display().to_string();
    ctd.ctr_ok(&[
        "run",
        "-d",
        "--log-uri",
        &uri,
        "--runtime",
        RUNTIME,
        "--rootfs",
        &rootfs_arg,
        "logged",
        "/bin/sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; sleep 0.2",
    ]);
    // The task ends, the logger gets EOF on both streams and finishes its files.
    wait_for(
        "the logger to write its files",
        Duration::from_secs(30),
        || logs.join("stdout").exists() && logs.join("stderr").exists(),
    );
    assert_eq!(
        fs::read_to_string(logs.join("stdout")).unwrap(),
        "to-stdout\n"
    );
    assert_eq!(
        fs::read_to_string(logs.join("stderr")).unwrap(),
        "to-stderr\n"
    );
    assert_eq!(
        fs::read_to_string(logs.join("env")).unwrap().trim(),
        format!("logged {} --out", ctd.namespace)
    );
    wait_for("the logger to exit", Duration::from_secs(20), || {
        processes_with_args(&[&logger.display().to_string()]).is_empty()
    });
    ctd.ctr_ok(&["task", "delete", "logged"]);
    ctd.ctr_ok(&["container", "delete", "logged"]);
}

#[test]
fn a_waiting_receive_is_listed_as_created_and_kill_ends_it_within_a_second() {
    use containerd_shim_pclive::annotations;
    use std::time::Instant;
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs("recv");
    let port = common::migration::free_port();
    let listen = format!("127.0.0.1:{port}");
    let rootfs_arg = rootfs.display().to_string();
    let listen_annotation = format!("{}={listen}", annotations::RECEIVE_LISTEN);
    let insecure = format!("{}=true", annotations::RECEIVE_INSECURE);
    let receiving = ctd
        .ctr_command(&[
            "run",
            "-d",
            "--null-io",
            "--runtime",
            RUNTIME,
            "--annotation",
            &listen_annotation,
            "--annotation",
            &insecure,
            "--rootfs",
            &rootfs_arg,
            "recv",
            "/bin/true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let receiving = Guarded(Some(receiving));
    wait_for("the receiver to listen", Duration::from_secs(30), || {
        ctd.log().contains("receiving a migration on")
    });
    // The shim answers while it waits: the task is listed, as CREATED, at once.
    let asked = Instant::now();
    let listed = ctd.ctr_ok(&["task", "ls"]);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "ctr task ls took {:?}",
        asked.elapsed()
    );
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("recv ") && l.trim_end().ends_with("CREATED")),
        "the waiting receive is not listed as CREATED: {listed}"
    );
    // Kill cancels the receive: ctr run fails within a second, the server is gone, the port
    // is free, and deleting the container leaves no bundle.
    let killed = Instant::now();
    ctd.ctr_ok(&["task", "kill", "recv"]);
    let code = receiving.wait_code(Duration::from_secs(10));
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "the receive ended {:?} after the kill",
        killed.elapsed()
    );
    assert_ne!(code, 0, "ctr run of a cancelled receive succeeded");
    wait_for(
        "the receiving server to exit",
        Duration::from_secs(5),
        || processes_with_args(&["--receive", &listen]).is_empty(),
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "the receive's port is still taken"
    );
    let _ = ctd.ctr(&["task", "delete", "recv"]);
    let _ = ctd.ctr(&["container", "delete", "recv"]);
    assert!(!ctd.bundle("recv").exists(), "the bundle is left behind");
}
