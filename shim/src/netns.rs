//! Network namespace fix-ups, and the interfaces of an address that moves.
//!
//! `runc create` brings the loopback interface of a new network namespace up (runc init does it);
//! `runc restore` creates the namespace but runs no init, so a restored container finds `lo`
//! down and its 127.0.0.1 listeners unreachable. The shim brings it up after the restore.
//!
//! A container whose address moves with it (`--move-address`) joins a network namespace
//! prepared by its network plugin on each host; the source's interfaces go down before the final
//! dump, the destination's come up (announcing the address: gratuitous ARP, unsolicited
//! neighbour advertisements) before the restored tasks resume.
//!
//! Interface flags go through SIOCGIFFLAGS/SIOCSIFFLAGS on a socket opened inside the namespace:
//! a few lines, where a netlink crate would bring an async runtime and `ip` a process per call.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::thread;

use nix::sched::{setns, CloneFlags};

/// Runs `f` on a thread of its own that joined the network namespace `ns` (setns(CLONE_NEWNET)
/// changes only the calling thread).
fn in_netns<T: Send + 'static>(
    ns: File,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    thread::spawn(move || -> io::Result<T> {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| io::Error::other("network namespace thread panicked"))?
}

/// A socket of the current thread's network namespace for interface ioctls.
struct IfSocket(OwnedFd);

impl IfSocket {
    fn new() -> io::Result<Self> {
        // SAFETY: socket() takes no pointers; we own the returned descriptor.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor owned by nobody else.
        Ok(IfSocket(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    fn request(name: &str) -> io::Result<libc::ifreq> {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= req.ifr_name.len() || name.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not an interface name"),
            ));
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        Ok(req)
    }

    fn flags(&self, name: &str) -> io::Result<libc::c_short> {
        let mut req = Self::request(name)?;
        // SAFETY: SIOCGIFFLAGS fills the flags of the named interface in `req`, which outlives
        // the call.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: reading the union member SIOCGIFFLAGS just wrote.
        Ok(unsafe { req.ifr_ifru.ifru_flags })
    }

    /// Sets or clears IFF_UP; nothing if it is so already.
    fn set_up(&self, name: &str, up: bool) -> io::Result<()> {
        let flags = self.flags(name)?;
        let is_up = flags & libc::IFF_UP as libc::c_short != 0;
        if is_up == up {
            return Ok(());
        }
        let mut req = Self::request(name)?;
        req.ifr_ifru.ifru_flags = if up {
            flags | libc::IFF_UP as libc::c_short
        } else {
            flags & !(libc::IFF_UP as libc::c_short)
        };
        // SAFETY: SIOCSIFFLAGS reads `req`, valid for the call.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

pub use crate::paths::netns_of_pid as of_pid;

/// Brings `lo` up in the network namespace of `pid`.
pub fn bring_up_loopback(pid: u32) -> io::Result<()> {
    let ns = File::open(of_pid(pid))?;
    in_netns(ns, || IfSocket::new()?.set_up("lo", true))
}

/// An interface of a network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub up: bool,
}

/// The interfaces of the network namespace `ns` (a path such as `/proc/PID/ns/net` or
/// `/run/netns/NAME`) besides loopback.
pub fn links(ns: &Path) -> io::Result<Vec<Link>> {
    let ns = File::open(ns)?;
    in_netns(ns, || {
        let socket = IfSocket::new()?;
        let mut out = Vec::new();
        for interface in nix::net::if_::if_nameindex()
            .map_err(io::Error::from)?
            .iter()
        {
            let name = interface.name().to_string_lossy().into_owned();
            let flags = socket.flags(&name)?;
            if flags & libc::IFF_LOOPBACK as libc::c_short != 0 {
                continue;
            }
            out.push(Link {
                name,
                up: flags & libc::IFF_UP as libc::c_short != 0,
            });
        }
        Ok(out)
    })
}

/// Takes the interfaces `names` of the network namespace `ns` down, or brings them up. Up, the
/// kernel is first told to announce them (`arp_notify`, `ndisc_notify`): a gratuitous ARP and
/// unsolicited neighbour advertisements as they come up, so that switches and neighbours learn
/// at once that the address lives here now.
pub fn set_links(ns: &Path, names: &[String], up: bool) -> io::Result<()> {
    let ns = File::open(ns)?;
    let names = names.to_vec();
    in_netns(ns, move || {
        let socket = IfSocket::new()?;
        for name in &names {
            if up {
                // The thread's namespace decides which /proc/sys/net it sees.
                announce_on_up(name)?;
            }
            socket.set_up(name, up).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "setting interface {name} {}: {e}",
                        if up { "up" } else { "down" }
                    ),
                )
            })?;
        }
        Ok(())
    })
}

fn announce_on_up(name: &str) -> io::Result<()> {
    if name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    fs::write(format!("/proc/sys/net/ipv4/conf/{name}/arp_notify"), "1").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("enabling gratuitous ARP on {name} (net.ipv4.conf.{name}.arp_notify): {e}"),
        )
    })?;
    match fs::write(format!("/proc/sys/net/ipv6/conf/{name}/ndisc_notify"), "1") {
        // No IPv6 on this interface (or host): nothing to announce there.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Whether the bundle's spec gives the container a new network namespace of its own.
pub fn has_private_netns(spec: &oci_spec::runtime::Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|namespaces| {
            namespaces.iter().any(|ns| {
                ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network && ns.path().is_none()
            })
        })
}

/// The network namespace the spec joins by path, if any (a network plugin's, as CNI makes for
/// a pod).
pub fn joined_netns(spec: &oci_spec::runtime::Spec) -> Option<std::path::PathBuf> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|namespaces| {
            namespaces
                .iter()
                .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
                .and_then(|ns| ns.path().clone())
        })
}

/// The names of the interfaces of network namespace `ns` besides loopback.
pub fn link_names(ns: &Path) -> io::Result<Vec<String>> {
    Ok(links(ns)?.into_iter().map(|l| l.name).collect())
}

/// The interfaces of `pid`'s network namespace (besides loopback) that are down.
pub fn down_links(pid: u32) -> io::Result<Vec<String>> {
    Ok(links(&of_pid(pid))?
        .into_iter()
        .filter(|l| !l.up)
        .map(|l| l.name)
        .collect())
}

/// The tag of the rules that keep a moving address's interfaces silent during the restore.
const LOCK_TAG: &str = "pclive-move-lock";

/// Brings the interfaces `names` of `pid`'s network namespace up *locked*, so that the address
/// is up for the restore (CRIU reconnects the TCP sockets through it: "Network is unreachable"
/// otherwise) while the network sees nothing of it: every frame sent is dropped (a `pfifo`
/// queue of length 0: no ARP or neighbour answers, no resets) and every IP packet that arrives
/// is dropped before TCP sees it (an iptables rule tagged `pclive-move-lock`). CRIU's own
/// network lock covers only namespaces it creates. (tc filters would do both in one, but this
/// kernel, as many, has no drop action built in.)
pub fn raise_locked(pid: u32, names: &[String]) -> Result<(), String> {
    for name in names {
        let args = strings(&[
            "qdisc", "replace", "dev", name, "root", "pfifo", "limit", "0",
        ]);
        crate::tools::run_tool_unreaped("tc", &args, Some(pid)).map_err(|e| {
            format!(
                "locking interface {name} (tc {}): {e}; install iproute2 (scripts/setup.sh does)",
                args.join(" ")
            )
        })?;
        for tool in ["iptables", "ip6tables"] {
            let rule = lock_rule("-I", name);
            match crate::tools::run_tool_unreaped(tool, &rule, Some(pid)) {
                Ok(_) => {}
                // No IPv6 here: nothing arrives over it either.
                Err(_) if tool == "ip6tables" => {}
                Err(e) => {
                    return Err(format!(
                        "locking interface {name} ({tool} {}): {e}; install iptables (scripts/setup.sh does)",
                        rule.join(" ")
                    ))
                }
            }
        }
    }
    set_links(&of_pid(pid), names, true).map_err(|e| e.to_string())
}

/// Unlocks the interfaces [`raise_locked`] brought up and announces their address (down and up
/// again with `arp_notify`/`ndisc_notify` on: a gratuitous ARP, unsolicited neighbour
/// advertisements), so that the network sends the address's traffic here from now on.
/// Interfaces that were not locked are announced too.
pub fn unlock_and_announce(pid: u32, names: &[String]) -> Result<(), String> {
    for name in names {
        // Whatever of the lock is there goes (a rule or queue that is not there is no error).
        let _ = crate::tools::run_tool_unreaped(
            "tc",
            &strings(&["qdisc", "del", "dev", name, "root"]),
            Some(pid),
        );
        for tool in ["iptables", "ip6tables"] {
            while crate::tools::run_tool_unreaped(tool, &lock_rule("-D", name), Some(pid)).is_ok() {
            }
        }
    }
    let ns = of_pid(pid);
    set_links(&ns, names, false).map_err(|e| e.to_string())?;
    set_links(&ns, names, true).map_err(|e| e.to_string())
}

fn lock_rule(action: &str, name: &str) -> Vec<String> {
    strings(&[
        "-w",
        action,
        "INPUT",
        "-i",
        name,
        "-m",
        "comment",
        "--comment",
        LOCK_TAG,
        "-j",
        "DROP",
    ])
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}
