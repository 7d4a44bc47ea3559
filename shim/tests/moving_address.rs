//! A container whose address moves with it (`pclive migrate --move-address`, `pclive receive
//! --netns PATH --move-address`): it joins a pod network namespace prepared on each test-bed host
//! with the same address (as a CNI with fixed IPs does); its interfaces go down on the source
//! before the final dump and come up, announced, on the destination before the tasks resume; a
//! client's TCP connection from outside both hosts continues on the destination. Failures before
//! the destination runs it give the address back to the source.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::migration::*;
use common::*;
use containerd_shim_pclive::annotations;

const PORT: u16 = 7777;

/// What the client saw on its one connection.
#[derive(Debug)]
struct Conversation {
    replies: u64,
    /// Replies received after this time (the restore), to show the connection carried data
    /// on the destination.
    replies_after: u64,
    longest_gap: f64,
    longest_gap_ended_unix: f64,
    error: Option<String>,
}

/// A client that sends a numbered line every millisecond on one connection and checks each
/// echo (so a lost, repeated or foreign reply fails it), until `stop`; no timeout of its own but
/// a long one, as most clients have.
fn client(
    address: SocketAddr,
    ready: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
    after_unix: Arc<std::sync::Mutex<f64>>,
) -> Conversation {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut conversation = Conversation {
        replies: 0,
        replies_after: 0,
        longest_gap: 0.0,
        longest_gap_ended_unix: 0.0,
        error: None,
    };
    let mut last = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let line = format!("line {:09}\n", conversation.replies);
        let mut reply = vec![0u8; line.len()];
        let step = stream
            .write_all(line.as_bytes())
            .and_then(|()| stream.read_exact(&mut reply));
        if let Err(e) = step {
            conversation.error = Some(format!("after {} replies: {e}", conversation.replies));
            break;
        }
        if reply != line.as_bytes() {
            conversation.error = Some(format!(
                "reply {:?} to {line:?}",
                String::from_utf8_lossy(&reply)
            ));
            break;
        }
        let gap = last.elapsed().as_secs_f64();
        last = Instant::now();
        if gap > conversation.longest_gap {
            conversation.longest_gap = gap;
            conversation.longest_gap_ended_unix = unix_now();
        }
        conversation.replies += 1;
        if unix_now() > *after_unix.lock().unwrap() {
            conversation.replies_after += 1;
        }
        if conversation.replies == 10 {
            ready.send(()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    conversation
}

/// The echo service in a pod network namespace on the source, a pod namespace with the same
/// address (down) on the destination, and a client on one connection from the client namespace.
struct Setup {
    src_pod: PathBuf,
    dst_pod: PathBuf,
    dst_rootfs: PathBuf,
    listen: String,
    client: std::thread::JoinHandle<Conversation>,
    stop: Arc<AtomicBool>,
    after_unix: Arc<std::sync::Mutex<f64>>,
}

fn set_up(hosts: &TwoHosts) -> Setup {
    let address = hosts.pod_address(10);
    let src_pod = hosts.pod("src", "echo", &address, true);
    let dst_pod = hosts.pod("dst", "echo", &address, false);
    let src = &hosts.src;
    let rootfs = src.rootfs("echo");
    let netns = format!("network:{}", src_pod.display());
    src.run_detached(
        "echo",
        &rootfs,
        &["--with-ns", &netns],
        &["/bin/nc", "-ll", "-p", "7777", "-e", "/bin/cat"],
    );
    src.wait_status("echo", "RUNNING");
    let service: SocketAddr = format!("{address}:{PORT}").parse().unwrap();
    let cli = format!("{}-cli", hosts.name());
    wait_reachable("the echo service to listen", &cli, service);
    let (ready, is_ready) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let after_unix = Arc::new(std::sync::Mutex::new(f64::MAX));
    let client = {
        let (stop, after_unix) = (stop.clone(), after_unix.clone());
        in_netns(cli, move || client(service, ready, stop, after_unix))
    };
    is_ready
        .recv_timeout(Duration::from_secs(30))
        .expect("the client got no echo from the source");
    Setup {
        src_pod,
        dst_pod,
        dst_rootfs: hosts.dst.rootfs("echo"),
        listen: format!("{}:{}", hosts.dst_ip, free_port()),
        client,
        stop,
        after_unix,
    }
}

impl Setup {
    /// The receiving container in the destination's pod namespace; `move_address` as the
    /// receiver says it.
    fn receive(&self, dst: &Containerd, move_address: bool) -> Guarded {
        let netns = format!("network:{}", self.dst_pod.display());
        let moving = format!("{}=true", annotations::RECEIVE_MOVE_ADDRESS);
        let mut extra = vec!["--with-ns", netns.as_str()];
        if move_address {
            extra.extend(["--annotation", moving.as_str()]);
        }
        receive_with(
            dst,
            "echo",
            &self.dst_rootfs,
            &self.listen,
            &dst.key(),
            &extra,
        )
    }

    /// `pclive migrate --move-address` of the echo service to the receiver.
    fn migrate(&self, hosts: &TwoHosts) -> Result<serde_json::Value, String> {
        migrate_with(
            &hosts.src,
            "echo",
            &self.listen,
            &hosts.src.key(),
            &["--move-address"],
        )
    }

    /// Lets the client go on for a second, then stops it.
    fn finish(self) -> Conversation {
        std::thread::sleep(Duration::from_secs(1));
        self.stop.store(true, Ordering::SeqCst);
        self.client.join().unwrap()
    }
}

fn eth0_up(netns: &Path) -> bool {
    link_is_up(netns, "eth0")
}

/// The client's connection survives the migration: same socket, every reply right, replies
/// after the restore; its longest wait is about the reported downtime (it is frozen that long).
/// The address lives on the destination only afterwards.
#[test]
fn a_clients_connection_survives_when_the_address_moves() {
    let hosts = TwoHosts::up("10gbit");
    let setup = set_up(&hosts);
    let receiver = setup.receive(&hosts.dst, true);
    assert!(
        !eth0_up(&setup.dst_pod),
        "the receiving container did not hold its interface down until the switchover"
    );
    let report = setup.migrate(&hosts).unwrap_or_else(|e| {
        panic!(
            "migration failed: {e}\n--- source log ---\n{}\n--- destination log ---\n{}",
            tail(&hosts.src.log(), 30),
            tail(&hosts.dst.log(), 30)
        )
    });
    assert_eq!(receiver.wait_code(Duration::from_secs(60)), 0);
    *setup.after_unix.lock().unwrap() = report["restored_unix"].as_f64().unwrap();
    let (src_pod, dst_pod) = (setup.src_pod.clone(), setup.dst_pod.clone());
    let conversation = setup.finish();
    eprintln!("client: {conversation:?}\nreport: {report:#}");
    assert_eq!(conversation.error, None, "{report:#}");
    assert!(
        conversation.replies_after > 100,
        "the connection carried no data on the destination: {conversation:?}"
    );
    assert_eq!(report["address_moved"], serde_json::json!(["eth0"]));
    assert!(report["clients_released"].is_null(), "{report:#}");
    let downtime = report["downtime_seconds"].as_f64().unwrap();
    // The acceptance figure (the reported downtime plus 100 ms) is measured by the benchmark;
    // here a loaded CI machine gets some slack, but not a TCP retransmission backoff's worth.
    assert!(
        conversation.longest_gap < downtime + 0.5,
        "the client waited {:.3}s on its connection, the downtime was {downtime:.3}s",
        conversation.longest_gap
    );
    assert!(!eth0_up(&src_pod), "the source's address is still up");
    assert!(eth0_up(&dst_pod), "the destination's address is not up");
    // The connection's state travelled: the final dump read it, locked with CRIU's nftables set
    // (shim/src/network_lock.rs), not with an iptables run per connection and direction.
    assert_eq!(report["tcp_connections"], "state", "{report:#}");
    let nftables = std::process::Command::new("criu")
        .args(["check", "--feature", "network_lock_nftables"])
        .output()
        .is_ok_and(|o| o.status.success());
    if nftables {
        assert!(
            hosts.src.log().contains("locks the network with nftables"),
            "{}",
            tail(&hosts.src.log(), 30)
        );
    } else {
        eprintln!("SKIPPED (LOUDLY): this CRIU has no nftables network lock");
    }
}

/// A receiver that was not prepared for the address (no --move-address) refuses the source
/// before anything happens: the source keeps its address and the client its connection.
#[test]
fn a_receiver_not_prepared_for_the_address_refuses_it() {
    let hosts = TwoHosts::up("10gbit");
    let setup = set_up(&hosts);
    let receiver = setup.receive(&hosts.dst, false);
    let err = setup.migrate(&hosts).unwrap_err();
    assert!(err.contains("was not prepared for that"), "{err}");
    assert_ne!(receiver.wait_code(Duration::from_secs(60)), 0);
    assert!(eth0_up(&setup.src_pod));
    assert_eq!(hosts.src.task("echo").unwrap().1, "RUNNING");
    let conversation = setup.finish();
    assert_eq!(conversation.error, None);
}

/// The migration fails after the source's address went down, before the destination ran the
/// container: the source brings its interface up again and resumes, and the client's
/// connection goes on there; the destination never raised its copy of the address.
#[test]
fn a_migration_that_fails_after_the_address_went_down_gives_it_back() {
    let (failpoints, _remove) = failpoints_file("source::after-dump=return(error)\n");
    let hosts = TwoHosts::up_with_env("10gbit", &[("PCLIVE_FAILPOINTS", &failpoints)]);
    let setup = set_up(&hosts);
    let receiver = setup.receive(&hosts.dst, true);
    let err = setup.migrate(&hosts).unwrap_err();
    assert!(
        err.contains("fault injected at source::after-dump"),
        "{err}"
    );
    let _ = receiver.wait_code(Duration::from_secs(60));
    assert!(
        eth0_up(&setup.src_pod),
        "the source did not get its address back"
    );
    assert!(
        !eth0_up(&setup.dst_pod),
        "the destination raised the address"
    );
    assert_eq!(hosts.src.task("echo").unwrap().1, "RUNNING");
    let conversation = setup.finish();
    assert_eq!(conversation.error, None, "{conversation:?}");
}

/// The destination fails after it ran the container with the address (its lazy-pages server
/// dies right after the restore): the destination takes its interfaces down again, the source
/// stays frozen in doubt without taking the address back on its own, and once the operator
/// resumes it (`pclive resolve --resume-source`) the address is the source's alone.
#[test]
fn a_destination_that_fails_after_taking_the_address_gives_it_up() {
    let (failpoints, _remove) = failpoints_file("destination::after-restored=return(kill)\n");
    let hosts = TwoHosts::up_with_env("10gbit", &[("PCLIVE_FAILPOINTS", &failpoints)]);
    let setup = set_up(&hosts);
    let receiver = setup.receive(&hosts.dst, true);
    let err = migrate_with(
        &hosts.src,
        "echo",
        &setup.listen,
        &hosts.src.key(),
        &["--move-address", "--resolve-timeout", "5"],
    )
    .unwrap_err();
    assert!(err.contains("in doubt"), "{err}");
    let _ = receiver.wait_code(Duration::from_secs(60));
    wait_for(
        "the failed destination to take its interfaces down",
        Duration::from_secs(30),
        || !eth0_up(&setup.dst_pod),
    );
    assert!(
        !eth0_up(&setup.src_pod),
        "an in-doubt source took the address back on its own"
    );
    assert_ne!(
        hosts.src.task("echo").unwrap().1,
        "RUNNING",
        "in doubt, frozen"
    );

    let out = hosts
        .pclive(true)
        .args(["resolve", "echo", "--resume-source"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pclive resolve --resume-source: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(eth0_up(&setup.src_pod), "the resumed source has no address");
    assert!(!eth0_up(&setup.dst_pod), "two hosts hold the address");
    assert_eq!(hosts.src.task("echo").unwrap().1, "RUNNING");
    // The connection may not survive: the destination answered on it for a moment.
    setup.stop.store(true, Ordering::SeqCst);
    let _ = setup.client.join();
}
