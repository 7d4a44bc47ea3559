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
