//! CRIU's lazy-pages socket, as `criu restore --lazy-pages` speaks it (criu/uffd.c, CRIU 4.2).
//!
//! The server listens on `<work dir>/lazy-pages.socket`; CRIU's restore connects once and sends,
//! per restored process, its pid (the pid in the container's namespace, 4 bytes) and then one
//! byte carrying the process's userfaultfd (SCM_RIGHTS); a zombie sends its negated pid and no
//! descriptor. After all tasks it sends the marker [`RESTORE_FINISHED`] and expects no reply. The
//! restorer has already done UFFDIO_API (fork, remap, remove and unmap events) and registers
//! every lazy-eligible VMA in MISSING mode.
//!
//! The same descriptor passing hands the shim (the supervisor) a copy of every userfaultfd.

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::LazyError;

/// The socket's name in the restore's CRIU work directory.
pub const SOCKET_NAME: &str = "lazy-pages.socket";
/// "ReSTore Finished": sent by CRIU once every task is restored.
pub const RESTORE_FINISHED: u32 = 0x5253_5446;

/// Binds `<dir>/lazy-pages.socket`. Through /proc/self/fd when the path is longer than a unix
/// socket address allows.
pub fn listen(dir: &Path) -> Result<UnixListener, LazyError> {
    let path = dir.join(SOCKET_NAME);
    let _ = fs::remove_file(&path);
    let listen_err = |source| LazyError::Listen {
        path: path.clone(),
        source,
    };
    if path.as_os_str().len() < 100 {
        return UnixListener::bind(&path).map_err(listen_err);
    }
    let dir_fd = fs::File::open(dir).map_err(listen_err)?;
    let short = format!("/proc/self/fd/{}/{SOCKET_NAME}", dir_fd.as_raw_fd());
    UnixListener::bind(short).map_err(listen_err)
}

pub(super) fn read_exact_or_eof(stream: &mut UnixStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated message",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Receives one message of `data.len()` bytes and the first descriptor it carries (any further
/// descriptors are closed). Returns the bytes received and the descriptor.
fn receive_with_fd(stream: &UnixStream, data: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = [io::IoSliceMut::new(data)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fd = None;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel installed this descriptor for us; nobody else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    Ok((msg.bytes, fd))
}

pub(super) fn receive_fd(stream: &UnixStream) -> Result<OwnedFd, LazyError> {
    let mut byte = [0u8; 1];
    let (_, fd) = receive_with_fd(stream, &mut byte)
        .map_err(|e| LazyError::Protocol(format!("receiving a userfaultfd: {e}")))?;
    fd.ok_or_else(|| LazyError::Protocol("a task record carried no userfaultfd".into()))
}

/// Sends `pid` and a descriptor to the supervisor, which keeps a copy so that the memory of the
/// restored tasks is never zero-filled even if this server dies.
pub fn send_to_supervisor(supervisor: &UnixStream, pid: u32, fd: RawFd) -> Result<(), LazyError> {
    let data = pid.to_le_bytes();
    let iov = [io::IoSlice::new(&data)];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(supervisor.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map(drop)
        .map_err(|e| LazyError::Supervisor(e.to_string()))
}

/// Receives what [`send_to_supervisor`] sent: `None` at end of stream.
pub fn receive_from_server(stream: &UnixStream) -> io::Result<Option<(u32, OwnedFd)>> {
    let mut data = [0u8; 4];
    let (bytes, fd) = receive_with_fd(stream, &mut data)?;
    if bytes == 0 {
        return Ok(None);
    }
    let pid = u32::from_le_bytes(data);
    fd.map(|f| Some((pid, f)))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "message without descriptor"))
}
