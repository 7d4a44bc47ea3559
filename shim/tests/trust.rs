//! The receiving host does not restore images that exceed what the receiving container was
//! granted: CRIU would take credentials, capabilities, namespaces and mounts from the images.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::migration::*;
use common::*;

/// The source holds CAP_NET_RAW (containerd's default capabilities); the receiving container
/// is created without it. The migration is refused with a message naming the capability, the
/// source keeps running with its memory intact, and nothing is left running on the destination.
#[test]
fn images_with_a_capability_the_receiving_container_lacks_are_refused() {
    let hosts = TwoHosts::up("10gbit");
    let (src, dst) = (&hosts.src, &hosts.dst);
    let rootfs = counter(src);
    // Each host has its own root filesystem and its own copy of the key.
    let dst_rootfs = dst.rootfs("app");
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let receiver = receive_with(
        dst,
        "app",
        &dst_rootfs,
        &listen,
        &dst.key(),
        &["--cap-drop", "CAP_NET_RAW"],
    );
    let err = migrate(src, "app", &listen, &src.key()).unwrap_err();
    assert!(
        err.contains("holds CAP_NET_RAW")
            && err.contains("which the receiving container's spec does not grant"),
        "the error does not name the capability: {err}\n--- destination log ---\n{}",
        tail(&dst.log(), 30)
    );
    assert!(
        err.contains("keeps running here"),
        "the error does not say the source resumed: {err}"
    );
    assert_keeps_running(src, &rootfs);
    assert_ne!(receiver.wait_code(Duration::from_secs(30)), 0);

    // Nothing runs on the destination: no receiving server, no task, nothing mounted.
    assert_eq!(
        processes_with_args(&["--receive", &listen]),
        Vec::<i32>::new()
    );
    assert!(
        dst.task("app")
            .is_none_or(|(_, status)| status != "RUNNING"),
        "the refused container runs on the destination"
    );
    let bundle = dst.bundle("app");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let left: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(&bundle))
        .collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}");
}

/// The listeners of a host's network namespace that belong to CRIU (`ss -ltnp`).
fn criu_listeners(hosts: &TwoHosts, side: &str) -> Vec<String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}-{side}", hosts.name()))
        .args(["ss", "-Hltnp"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"criu\""))
        .map(str::to_string)
        .collect()
}

/// During the final dump CRIU serves the container's memory on a TCP port (its page server).
/// For a container with a network namespace of its own, the dump runs in a private namespace:
/// nothing on the source host can connect and read pages or hold the dump. A fault point
/// stalls the shim before it connects, so the page server listens for two seconds; the host's
/// namespace is sampled all along. The migration then completes.
#[test]
fn crius_page_server_is_not_reachable_from_the_source_host() {
    let dir = tempfile::tempdir().unwrap();
    let failpoints = dir.path().join("failpoints");
    fs::write(
        &failpoints,
        "source::before-page-server-connect=sleep(2000)\n",
    )
    .unwrap();
    let hosts = TwoHosts::up_with_env("10gbit", &[("PCLIVE_FAILPOINTS", &failpoints)]);
    let (src, dst) = (&hosts.src, &hosts.dst);
    counter(src);
    let dst_rootfs = dst.rootfs("app");
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let receiver = receive_with(dst, "app", &dst_rootfs, &listen, &dst.key(), &[]);
    let key = src.key();
    let done = std::sync::atomic::AtomicBool::new(false);
    let migration = {
        let (hosts, listen, key, done) = (&hosts, &listen, &key, &done);
        std::thread::scope(|scope| {
            let sampler = scope.spawn(|| {
                let mut seen = Vec::new();
                let mut samples = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    seen.extend(criu_listeners(hosts, "src"));
                    samples += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                (seen, samples)
            });
            let result = migrate(&hosts.src, "app", listen, key);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (result, sampler.join().unwrap())
        })
    };
    let (result, (seen, samples)) = migration;
    let report = result.unwrap_or_else(|e| panic!("migration failed: {e}"));
    assert!(samples > 50, "sampled only {samples} times");
    assert!(
        seen.is_empty(),
        "CRIU listened in the source host's network namespace: {seen:?}"
    );
    assert!(
        report["final_dump_seconds"].as_f64().unwrap() >= 2.0,
        "{report:#}"
    );
    assert_eq!(receiver.wait_code(Duration::from_secs(60)), 0);
    let status = dst_rootfs.join("status");
    let before = memcheck_status(&status).map_or(0, |s| s.pass);
    wait_for(
        "memcheck to verify every page on the destination",
        Duration::from_secs(60),
        || memcheck_status(&status).is_some_and(|s| s.pass > before),
    );
}

/// A host-network container is dumped from the host's namespace, where CRIU's page server
/// listens on every address (it ignores the address runc passes): a firewall keeps it to root
/// on the source host. While it listens (stalled two seconds), neither the destination host
/// nor an unprivileged user of the source host can connect; the migration then completes. (The
/// fence is raised before the freeze, so that its iptables runs are not part of the downtime.)
#[test]
fn crius_page_server_of_a_host_network_container_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let failpoints = dir.path().join("failpoints");
    fs::write(
        &failpoints,
        "source::before-page-server-connect=sleep(2000)\n",
    )
    .unwrap();
    let hosts = TwoHosts::up_with_env("10gbit", &[("PCLIVE_FAILPOINTS", &failpoints)]);
    let (src, dst) = (&hosts.src, &hosts.dst);
    let memcheck = workload_binary("memcheck");
    let src_rootfs = src.rootfs_with("app", &[&memcheck]);
    let dst_rootfs = dst.rootfs_with("app", &[&memcheck]);
    src.run_detached(
        "app",
        &src_rootfs,
        &["--net-host"],
        &["/usr/local/bin/memcheck", "16", "--status", "/status"],
    );
    wait_for("memcheck to verify", Duration::from_secs(60), || {
        memcheck_status(&src_rootfs.join("status")).is_some_and(|s| s.pass >= 1)
    });
    let src_ip = hosts
        .dst_ip
        .rsplit_once('.')
        .map(|(net, _)| format!("{net}.1"))
        .unwrap();
    let listen = format!("{}:{}", hosts.dst_ip, free_port());
    let receiver = receive_with(
        dst,
        "app",
        &dst_rootfs,
        &listen,
        &dst.key(),
        &["--net-host"],
    );
    let key = src.key();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (result, probes) = {
        let (hosts, listen, key, done, src_ip) = (&hosts, &listen, &key, &done, &src_ip);
        std::thread::scope(|scope| {
            let prober = scope.spawn(move || {
                let mut probes = Vec::new();
                while !done.load(std::sync::atomic::Ordering::SeqCst) && probes.is_empty() {
                    let port = criu_listeners(hosts, "src").iter().find_map(|l| {
                        l.split_whitespace()
                            .nth(3)
                            .and_then(|a| a.rsplit_once(':'))
                            .map(|(_, p)| p.to_string())
                    });
                    if let Some(port) = port {
                        let from_dst = std::process::Command::new("nsenter")
                            .arg(format!("--net=/run/netns/{}-dst", hosts.name()))
                            .args(["nc", "-z", "-w", "1", src_ip, &port])
                            .status()
                            .unwrap()
                            .success();
                        let as_nobody = std::process::Command::new("nsenter")
                            .arg(format!("--net=/run/netns/{}-src", hosts.name()))
                            .args(["setpriv", "--reuid", "65534", "--regid", "65534"])
                            .args(["--clear-groups", "nc", "-z", "-w", "1", "127.0.0.1", &port])
                            .status()
                            .unwrap()
                            .success();
                        probes.push((port, from_dst, as_nobody));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                probes
            });
            let result = migrate(&hosts.src, "app", listen, key);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (result, prober.join().unwrap())
        })
    };
    let report = result.unwrap_or_else(|e| panic!("migration failed: {e}"));
    let [(port, from_dst, as_nobody)] = probes.as_slice() else {
        panic!("CRIU's page server was never seen listening: {probes:?}\n{report:#}");
    };
    assert!(
        !from_dst,
        "the destination host reached CRIU's page server on port {port}"
    );
    assert!(
        !as_nobody,
        "an unprivileged user reached CRIU's page server on port {port}"
    );
    assert_eq!(receiver.wait_code(Duration::from_secs(60)), 0);
    let status = dst_rootfs.join("status");
    let before = memcheck_status(&status).map_or(0, |s| s.pass);
    wait_for(
        "memcheck to verify every page on the destination",
        Duration::from_secs(60),
        || memcheck_status(&status).is_some_and(|s| s.pass > before),
    );
    // The rules go when the migration ends.
    wait_for("the firewall rules to go", Duration::from_secs(10), || {
        let rules = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}-src", hosts.name()))
            .args(["iptables", "-S"])
            .output()
            .unwrap();
        !String::from_utf8_lossy(&rules.stdout).contains(&format!("--dport {port}"))
    });
}

/// Records the migration link: listens on the destination host, forwards every connection to
/// the receiver and keeps every byte that crosses, both ways. (A packet capture with tcpdump
/// was tried first: under the suite's load the kernel dropped packets from its ring, and a
/// capture with holes cannot show that something is absent. A relay cannot lose a byte.)
struct Recorder {
    address: String,
    bytes: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    listener: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    fn start(hosts: &TwoHosts, receiver: &str) -> Self {
        use std::net::{TcpListener, TcpStream};
        let bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let address = format!("{}:{}", hosts.dst_ip, free_port());
        let (listen, target) = (address.clone(), receiver.to_string());
        let (ready, is_ready) = std::sync::mpsc::channel();
        let recorded = std::sync::Arc::clone(&bytes);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        // On the destination host: the relay threads it starts are there too.
        let listener = in_netns(format!("{}-dst", hosts.name()), move || {
            let listener = TcpListener::bind(&listen).unwrap();
            listener.set_nonblocking(true).unwrap();
            ready.send(()).unwrap();
            while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let server = TcpStream::connect(&target).unwrap();
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let recorded = std::sync::Arc::clone(&recorded);
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 1 << 16];
                        loop {
                            match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                                    if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        is_ready.recv_timeout(Duration::from_secs(10)).unwrap();
        Recorder {
            address,
            bytes,
            stop,
            listener: Some(listener),
        }
    }

    /// What crossed so far.
    fn recorded(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    /// Stops listening (the relayed connections end with the migration's).
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(listener) = self.listener.take() {
            let _ = listener.join();
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A container whose memory holds `marker` (in its environment, a shell variable and every
/// `sleep` child's), migrated with a key and then without one: what crossed the link shows the
/// marker only when the user said --insecure.
#[test]
fn container_memory_crosses_the_link_encrypted_unless_insecure() {
    let hosts = TwoHosts::up("10gbit");
    let (src, dst) = (&hosts.src, &hosts.dst);
    let mut random = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .unwrap();
    let marker = format!(
        "pclive-marker-{}",
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    for (id, insecure) in [("sealed", false), ("clear", true)] {
        let rootfs = src.rootfs(id);
        let env = format!("PCLIVE_MARKER={marker}");
        src.run_detached(
            id,
            &rootfs,
            &["--env", &env],
            &[
                "/bin/sh",
                "-c",
                "held=\"$PCLIVE_MARKER\"; while true; do sleep 0.05; done",
            ],
        );
        src.wait_status(id, "RUNNING");
        let listen = format!("{}:{}", hosts.dst_ip, free_port());
        let dst_rootfs = dst.rootfs(id);
        let receiver = if insecure {
            receive_insecure(dst, id, &dst_rootfs, &listen)
        } else {
            receive_with(dst, id, &dst_rootfs, &listen, &dst.key(), &[])
        };
        let link = Recorder::start(&hosts, &listen);
        let report = if insecure {
            migrate_insecure(src, id, &link.address)
        } else {
            migrate(src, id, &link.address, &src.key())
        }
        .unwrap_or_else(|e| {
            panic!(
                "migration of {id} failed: {e}\n--- destination log ---\n{}",
                tail(&dst.log(), 30)
            )
        });
        drop(receiver);
        dst.wait_status(id, "RUNNING");
        let captured = link.recorded();
        drop(link);
        assert!(
            captured.len() > 100_000,
            "{} bytes crossed: the migration did not go through the recorder",
            captured.len()
        );
        if insecure {
            assert!(report["encryption"].as_str().unwrap().contains("insecure"));
            assert!(
                contains(&captured, marker.as_bytes()),
                "what the unencrypted migration sent ({} bytes) lacks the marker: the test \
                 cannot tell encrypted from clear",
                captured.len()
            );
        } else {
            assert_eq!(report["encryption"], "AES-256-GCM", "{report:#}");
            assert!(
                !contains(&captured, marker.as_bytes()),
                "the container's memory crossed the link in the clear"
            );
            assert!(!contains(&captured, b"PCLIVE_MARKER"));
        }
    }
}
