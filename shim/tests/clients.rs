//! What a migrated service's clients see at the switchover: once the destination runs the
//! container, the source's frozen copy sends its clients away (their connections reset, new
//! connections refused) instead of leaving them waiting on it until the commit.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::migration::*;
use common::*;
use containerd_shim_pclive::annotations;

const PORT: u16 = 7777;

/// How the client's connection ended, and what a new connection attempt found right after.
#[derive(Debug)]
struct ClientEnd {
    failed_unix: f64,
    error: String,
    replies: u64,
    reconnect: std::io::ErrorKind,
}

/// A client that sends a line every millisecond on one connection and waits for its echo, as
/// long as the connection lasts (no timeout of its own but a long one), as most clients do.
/// `echoed` counts the echoes as they come.
fn client(address: SocketAddr, ready: mpsc::Sender<()>, echoed: Arc<AtomicU64>) -> ClientEnd {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut replies = 0u64;
    let mut reply = [0u8; 5];
    let error = loop {
        let step = stream
            .write_all(b"ping\n")
            .and_then(|()| stream.read_exact(&mut reply));
        match step {
            Ok(()) => {
                assert_eq!(&reply, b"ping\n");
                replies += 1;
                echoed.store(replies, Ordering::SeqCst);
                if replies == 10 {
                    ready.send(()).unwrap();
                }
            }
            Err(e) => break e,
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let failed_unix = unix_now();
    let reconnect = match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
        Ok(_) => std::io::ErrorKind::Other,
        Err(e) => e.kind(),
    };
    ClientEnd {
        failed_unix,
        error: error.to_string(),
        replies,
        reconnect,
    }
}

/// The echo service on the source host's network, a client on one connection to it, and a
/// receiving container waiting on the destination.
struct Setup {
    src_address: SocketAddr,
    dst_address: SocketAddr,
    cli: String,
    client: std::thread::JoinHandle<ClientEnd>,
    /// The client's echoes so far.
    echoed: Arc<AtomicU64>,
    receiver: Guarded,
    listen: String,
}

fn set_up(hosts: &TwoHosts) -> Setup {
    let (src, dst) = (&hosts.src, &hosts.dst);
    let service = ["/bin/nc", "-ll", "-p", "7777", "-e", "/bin/cat"];
    let src_rootfs = src.rootfs("echo");
    src.run_detached("echo", &src_rootfs, &["--net-host"], &service);
    src.wait_status("echo", "RUNNING");
    // The test bed's client namespace reaches src at 10.214.N.1 and dst at 10.215.N.1.
    let n = hosts.dst_ip.split('.').nth(2).unwrap().to_string();
    let src_address: SocketAddr = format!("10.214.{n}.1:{PORT}").parse().unwrap();
    let dst_address: SocketAddr = format!("10.215.{n}.1:{PORT}").parse().unwrap();
    let cli = format!("{}-cli", hosts.name());
    wait_reachable("the echo service to listen", &cli, src_address);
    let (ready, is_ready) = mpsc::channel();
    let echoed = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&echoed);
    let client = in_netns(cli.clone(), move || client(src_address, ready, counter));
    is_ready
        .recv_timeout(Duration::from_secs(30))
        .expect("the client got no echo from the source");
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let dst_rootfs = dst.rootfs("echo");
    let tcp_close = format!("{}=true", annotations::RESTORE_TCP_CLOSE);
    let receiver = receive_with(
        dst,
        "echo",
        &dst_rootfs,
        &listen,
        &dst.key(),
        &["--net-host", "--annotation", &tcp_close],
    );
    Setup {
        src_address,
        dst_address,
        cli,
        client,
        echoed,
        receiver,
        listen,
    }
}

/// Sends a line to the echo service at `address` from the client namespace: its echo.
fn echo(cli: &str, address: SocketAddr) -> std::io::Result<[u8; 6]> {
    in_netns(cli.to_string(), move || {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"hello\n")?;
        let mut reply = [0u8; 6];
        stream.read_exact(&mut reply)?;
        Ok(reply)
    })
    .join()
    .unwrap()
}

/// The source host's firewall rules (INPUT).
fn source_rules(hosts: &TwoHosts) -> String {
    let rules = std::process::Command::new("ip")
        .args(["netns", "exec", &format!("{}-src", hosts.name())])
        .args(["iptables", "-w", "-S", "INPUT"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&rules.stdout).into_owned()
}

/// A client on one connection to a host-network echo service, and a destination that holds
/// its commit for four seconds after it runs the container: the client's connection breaks
/// within a second of the destination running it (not at the commit), a new connection to the
/// source is refused at once, and after the commit no rule is left behind.
#[test]
fn clients_of_the_frozen_source_are_released_when_the_destination_runs_it() {
    let (failpoints, _remove) = failpoints_file("destination::before-commit=sleep(4000)\n");
    let hosts = TwoHosts::up_with_env("10gbit", &[("PCLIVE_FAILPOINTS", &failpoints)]);
    let (src, dst) = (&hosts.src, &hosts.dst);
    let setup = set_up(&hosts);
    let report = migrate(src, "echo", &setup.listen, &src.key()).unwrap_or_else(|e| {
        panic!(
            "migration failed: {e}\n--- source log ---\n{}\n--- destination log ---\n{}",
            tail(&src.log(), 30),
            tail(&dst.log(), 30)
        )
    });
    assert_eq!(setup.receiver.wait_code(Duration::from_secs(60)), 0);
    let end = setup.client.join().unwrap();
    eprintln!("client: {end:?}\nreport: {report:#}");

    let released = &report["clients_released"];
    assert_eq!(released["ports"], serde_json::json!([PORT]), "{report:#}");
    assert!(
        released["connections_reset"].as_u64().unwrap() >= 1,
        "{report:#}"
    );
    let restored = report["restored_unix"].as_f64().unwrap();
    let committed = report["committed_unix"].as_f64().unwrap();
    assert!(
        committed - restored > 3.5,
        "the destination did not hold its commit: {report:#}"
    );
    assert!(end.replies >= 10);
    assert!(
        end.failed_unix - restored < 1.0 && end.failed_unix < committed - 2.5,
        "the client's connection broke {:.3}s after the destination ran the container and {:.3}s \
         before the commit ({}): it waited on the frozen source",
        end.failed_unix - restored,
        committed - end.failed_unix,
        end.error
    );
    assert_eq!(
        end.reconnect,
        std::io::ErrorKind::ConnectionRefused,
        "a new connection to the frozen source was not refused"
    );
    let rules = source_rules(&hosts);
    assert!(!rules.contains("pclive-release"), "{rules}");
    assert_eq!(
        &echo(&setup.cli, setup.dst_address).expect("no echo from the destination"),
        b"hello\n"
    );
    assert!(echo(&setup.cli, setup.src_address).is_err());
    // The destination restores connections closed (its tcp-close annotation) and said so in
    // the handshake: the final dump recorded them closed, neither reading nor locking each one
    // (shim/src/network_lock.rs); the restore, which needs tcp-close for such images, ran.
    assert_eq!(report["tcp_connections"], "closed", "{report:#}");
    assert!(
        src.log()
            .contains("the final dump records them closed, without locking them"),
        "{}",
        tail(&src.log(), 30)
    );
}

/// The destination fails after running the container and before its commit: the source stays
/// frozen in doubt and goes on refusing its clients (two copies must never serve); once an
/// operator resumes it with `pclive resolve --resume-source`, the rule is gone and it serves.
#[test]
fn an_in_doubt_source_refuses_clients_until_an_operator_resumes_it() {
    let (failpoints, _remove) = failpoints_file("destination::before-commit=return(error)\n");
    let hosts = TwoHosts::up_with_env("10gbit", &[("PCLIVE_FAILPOINTS", &failpoints)]);
    let src = &hosts.src;
    let setup = set_up(&hosts);
    let err = migrate(src, "echo", &setup.listen, &src.key()).unwrap_err();
    assert!(err.contains("in doubt"), "{err}");
    let _ = setup.receiver.wait_code(Duration::from_secs(60));
    let end = setup.client.join().unwrap();
    assert_eq!(
        end.reconnect,
        std::io::ErrorKind::ConnectionRefused,
        "{end:?}"
    );
    assert!(source_rules(&hosts).contains("pclive-release:echo"));
    assert!(echo(&setup.cli, setup.src_address).is_err());

    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}-src", hosts.name()))
        .arg(env!("CARGO_BIN_EXE_pclive"))
        .args(["resolve", "echo", "--resume-source"])
        .env("CONTAINERD_ADDRESS", &src.address)
        .env("CONTAINERD_NAMESPACE", &src.namespace)
        .env("PCLIVE_STATE_DIR", src.state_base())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pclive resolve: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = source_rules(&hosts);
    assert!(!rules.contains("pclive-release"), "{rules}");
    assert_eq!(
        &echo(&setup.cli, setup.src_address).expect("the resumed source does not answer"),
        b"hello\n"
    );
}

/// The destination restores connections closed, so the source's final dump recorded them closed
/// and locked nothing; then the destination fails before it restores. The source resumes, and the
/// client's connection, which no repair mode or lock ever touched, goes on being answered.
#[test]
fn a_migration_that_fails_before_the_restore_leaves_the_clients_connection_working() {
    let (failpoints, _remove) = failpoints_file("destination::after-images=return(error)\n");
    let hosts = TwoHosts::up_with_env("10gbit", &[("PCLIVE_FAILPOINTS", &failpoints)]);
    let (src, dst) = (&hosts.src, &hosts.dst);
    let setup = set_up(&hosts);
    let err = migrate(src, "echo", &setup.listen, &src.key()).unwrap_err();
    assert!(
        src.log()
            .contains("the final dump records them closed, without locking them"),
        "the final dump did not record the connections closed: {err}\n{}",
        tail(&src.log(), 30)
    );
    assert_ne!(setup.receiver.wait_code(Duration::from_secs(60)), 0);
    assert_eq!(src.task("echo").unwrap().1, "RUNNING", "{err}");
    let resumed = setup.echoed.load(Ordering::SeqCst);
    wait_for(
        "the client's connection to the resumed source to carry echoes",
        Duration::from_secs(10),
        || setup.echoed.load(Ordering::SeqCst) > resumed + 100,
    );
    assert!(
        !setup.client.is_finished(),
        "the client's connection ended: {:?}\n{}",
        setup.client.join(),
        tail(&dst.log(), 20)
    );
    assert_eq!(
        &echo(&setup.cli, setup.src_address).expect("the resumed source does not answer"),
        b"hello\n"
    );
}
