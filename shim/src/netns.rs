//! Network namespace fix-ups.
//!
//! `runc create` brings the loopback interface of a new network namespace up (runc init does it);
//! `runc restore` creates the namespace but runs no init, so a restored container finds `lo`
//! down and its 127.0.0.1 listeners unreachable. The shim brings it up after the restore.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::thread;

use nix::sched::{setns, CloneFlags};

/// Brings `lo` up in the network namespace of `pid`.
pub fn bring_up_loopback(pid: u32) -> io::Result<()> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    // setns(CLONE_NEWNET) changes only the calling thread: do it on a thread of its own.
    thread::spawn(move || -> io::Result<()> {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        // SAFETY: socket() takes no pointers; we own the returned descriptor.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS fills the flags of the named interface in `req`, which outlives
        // the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: reading the union member SIOCGIFFLAGS just wrote.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads `req`, valid for the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("loopback thread panicked"))?
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
