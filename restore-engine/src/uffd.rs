//! userfaultfd: the ioctls and messages the lazy-pages server needs (linux/userfaultfd.h).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const UFFD_API: u64 = 0xAA;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// `struct uffdio_writeprotect`.
#[repr(C)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_writeprotect, 0xAA, 0x06, UffdioWriteprotect);
nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
nix::ioctl_readwrite!(uffdio_copy, 0xAA, 0x03, UffdioCopy);
nix::ioctl_readwrite!(uffdio_zeropage, 0xAA, 0x04, UffdioZeropage);
nix::ioctl_read!(uffdio_wake, 0xAA, 0x02, UffdioRange);
nix::ioctl_read!(uffdio_unregister, 0xAA, 0x01, UffdioRange);

/// One message read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    PageFault { address: u64, flags: u64 },
    Fork { child_uffd: RawFd },
    Remap { from: u64, to: u64, len: u64 },
    Remove { start: u64, end: u64 },
    Unmap { start: u64, end: u64 },
    Unknown(u8),
}

/// Size of `struct uffd_msg`.
pub const UFFD_MSG_SIZE: usize = 32;

/// Decodes a `struct uffd_msg`.
pub fn decode_msg(raw: &[u8; UFFD_MSG_SIZE]) -> UffdEvent {
    let u64_at = |off: usize| u64::from_ne_bytes(raw[off..off + 8].try_into().expect("8 bytes"));
    let u32_at = |off: usize| u32::from_ne_bytes(raw[off..off + 4].try_into().expect("4 bytes"));
    // event (u8) + reserved (u8, u16, u32), then the 24-byte argument union at offset 8.
    match raw[0] {
        UFFD_EVENT_PAGEFAULT => UffdEvent::PageFault {
            flags: u64_at(8),
            address: u64_at(16),
        },
        UFFD_EVENT_FORK => UffdEvent::Fork {
            child_uffd: u32_at(8) as RawFd,
        },
        UFFD_EVENT_REMAP => UffdEvent::Remap {
            from: u64_at(8),
            to: u64_at(16),
            len: u64_at(24),
        },
        UFFD_EVENT_REMOVE => UffdEvent::Remove {
            start: u64_at(8),
            end: u64_at(16),
        },
        UFFD_EVENT_UNMAP => UffdEvent::Unmap {
            start: u64_at(8),
            end: u64_at(16),
        },
        other => UffdEvent::Unknown(other),
    }
}

/// Why an install stopped before the end of its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The address space is changing (a fork, remap or unmap event is pending): read the
    /// events, then retry. Retrying without reading them would spin forever, since the task
    /// waits for its event to be read.
    Busy,
    /// ENOENT: the rest of the range is not inside one registered mapping: unmapped (an unmap
    /// event follows) or crossing a mapping boundary (mprotect splits mappings).
    Unmapped,
    /// The task's address space is gone (it exited).
    Exited,
}

/// Outcome of installing pages: how many bytes from the start are done (installed, or present
/// already), and why it stopped early, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    pub bytes: u64,
    pub stop: Option<Stop>,
}

/// A userfaultfd received from a restored task.
#[derive(Debug)]
pub struct Uffd(OwnedFd);

impl Uffd {
    pub fn from_owned(fd: OwnedFd) -> Self {
        Uffd(fd)
    }

    pub fn as_raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Takes ownership of a descriptor the kernel handed us in a fork event.
    ///
    /// # Safety
    /// `fd` must be an open descriptor owned by nobody else.
    pub unsafe fn from_raw(fd: RawFd) -> Self {
        // SAFETY: guaranteed by the caller.
        Uffd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// A second descriptor for the same userfaultfd (for a thread that copies while this one
    /// reads events).
    pub fn try_clone(&self) -> io::Result<Uffd> {
        Ok(Uffd(self.0.try_clone()?))
    }

    /// Installs `data` at `dst` (page aligned, whole pages) with UFFDIO_COPY, waking threads
    /// that wait on those pages. Pages present already are skipped.
    pub fn copy(&self, dst: u64, data: &[u8]) -> io::Result<Installed> {
        // SAFETY: `data` is borrowed, so it stays readable for the whole call.
        unsafe { self.copy_from(dst, data.as_ptr() as u64, data.len() as u64) }
    }

    /// [`Self::copy`] from `len` bytes at address `src` of this process.
    ///
    /// # Safety
    /// `[src, src + len)` must stay allocated and unchanged for the whole call: the kernel
    /// reads it (a freed range would fail with EFAULT, a reused one would install wrong data).
    pub unsafe fn copy_from(&self, dst: u64, src: u64, len: u64) -> io::Result<Installed> {
        install_loop(len, |done| {
            let mut arg = UffdioCopy {
                dst: dst + done,
                src: src + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: the fd is a userfaultfd; `arg` is a valid uffdio_copy whose src range is
            // readable for the call (the caller's contract).
            let result = unsafe { uffdio_copy(self.as_raw(), &mut arg) };
            (result.map(|_| arg.len), arg.copy)
        })
    }

    /// Installs zero pages over `[start, start + len)`, waking waiting threads.
    pub fn zero(&self, start: u64, len: u64) -> io::Result<Installed> {
        install_loop(len, |done| {
            let mut arg = UffdioZeropage {
                range: UffdioRange {
                    start: start + done,
                    len: len - done,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: the fd is a userfaultfd; `arg` is a valid uffdio_zeropage for the call.
            let result = unsafe { uffdio_zeropage(self.as_raw(), &mut arg) };
            (result.map(|_| arg.range.len), arg.zeropage)
        })
    }

    /// Wakes threads blocked on faults in `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: the fd is a userfaultfd; `range` is a valid uffdio_range for the call.
        unsafe { uffdio_wake(self.as_raw(), &mut range) }
            .map(drop)
            .map_err(io::Error::from)
    }

    /// Reads pending messages (the fd must be non-blocking). Returns an empty vector when none.
    pub fn read_events(&self) -> io::Result<Vec<UffdEvent>> {
        let mut buf = [0u8; UFFD_MSG_SIZE * 64];
        // SAFETY: reads at most buf.len() bytes into our buffer.
        let n = unsafe { libc::read(self.as_raw(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                return Ok(Vec::new());
            }
            return Err(err);
        }
        Ok(buf[..n as usize]
            .chunks_exact(UFFD_MSG_SIZE)
            .map(|chunk| decode_msg(chunk.try_into().expect("32-byte chunk")))
            .collect())
    }
}

/// The retry logic UFFDIO_COPY and UFFDIO_ZEROPAGE share. `attempt(done)` tries to install the
/// rest from offset `done` and returns the ioctl's result (bytes on success) and the partial
/// count the kernel reported on failure.
fn install_loop(
    len: u64,
    mut attempt: impl FnMut(u64) -> (nix::Result<u64>, i64),
) -> io::Result<Installed> {
    let page = crate::page::SIZE_U64;
    let mut done = 0u64;
    while done < len {
        match attempt(done) {
            (Ok(bytes), _) => done += bytes,
            // Part of it went in before the error: continue after it.
            (Err(_), partial) if partial > 0 => done += partial as u64,
            (Err(errno), _) => match classify(errno) {
                Some(stop) => {
                    return Ok(Installed {
                        bytes: done,
                        stop: Some(stop),
                    })
                }
                // EEXIST: the first page is present already.
                None if errno == nix::errno::Errno::EEXIST => done += page,
                None => return Err(io::Error::from(errno)),
            },
        }
    }
    Ok(Installed {
        bytes: done,
        stop: None,
    })
}

/// Errors after which the caller decides what to do (the others are failures or EEXIST).
fn classify(errno: nix::errno::Errno) -> Option<Stop> {
    match errno {
        nix::errno::Errno::EAGAIN => Some(Stop::Busy),
        nix::errno::Errno::ENOENT => Some(Stop::Unmapped),
        nix::errno::Errno::ESRCH | nix::errno::Errno::ENOSPC => Some(Stop::Exited),
        _ => None,
    }
}

/// What this kernel's userfaultfd supports, probed on a userfaultfd of our own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdFeatures {
    pub available: bool,
    pub features: u64,
}

impl UffdFeatures {
    pub fn has(&self, feature: u64) -> bool {
        self.available && self.features & feature == feature
    }
}

/// Opens a userfaultfd (user-mode faults only, which needs no privilege) and asks the kernel
/// which API features it offers.
pub fn probe() -> io::Result<UffdFeatures> {
    const UFFD_USER_MODE_ONLY: libc::c_long = 1;
    // SAFETY: the userfaultfd syscall takes flags only and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC as libc::c_long
                | libc::O_NONBLOCK as libc::c_long
                | UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: fd is a userfaultfd and `api` a valid uffdio_api for the call.
    unsafe { uffdio_api(fd.as_raw_fd(), &mut api) }.map_err(io::Error::from)?;
    Ok(UffdFeatures {
        available: true,
        features: api.features,
    })
}

/// A userfaultfd of this process with the events CRIU's restorer asks for (fork, remap,
/// remove, unmap), the way a restored task hands one to the lazy-pages server. For tests and
/// tools that play the restorer.
pub fn open_like_criu() -> io::Result<Uffd> {
    // SAFETY: the userfaultfd syscall takes flags only and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC as libc::c_long | libc::O_NONBLOCK as libc::c_long,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let uffd = Uffd(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_EVENT_FORK
            | UFFD_FEATURE_EVENT_REMAP
            | UFFD_FEATURE_EVENT_REMOVE
            | UFFD_FEATURE_EVENT_UNMAP,
        ioctls: 0,
    };
    // SAFETY: a userfaultfd and a valid uffdio_api for the call.
    unsafe { uffdio_api(uffd.as_raw(), &mut api) }.map_err(io::Error::from)?;
    Ok(uffd)
}

impl Uffd {
    /// Stops watching `[start, start + len)`: later faults there are the kernel's to handle.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: the fd is a userfaultfd; `range` is a valid uffdio_range for the call.
        unsafe { uffdio_unregister(self.as_raw(), &mut range) }
            .map(drop)
            .map_err(io::Error::from)
    }

    /// Registers `[start, start + len)` for missing-page faults.
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<()> {
        self.register(start, len, UFFDIO_REGISTER_MODE_MISSING)
    }

    /// Registers `[start, start + len)` for write-protect. With [`Self::enable_wp_async`] its
    /// pages start unprotected (written), and the kernel resolves write faults itself.
    pub fn register_wp(&self, start: u64, len: u64) -> io::Result<()> {
        self.register(start, len, UFFDIO_REGISTER_MODE_WP)
    }

    fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut arg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: a userfaultfd and a valid uffdio_register for the call.
        unsafe { uffdio_register(self.as_raw(), &mut arg) }
            .map(drop)
            .map_err(io::Error::from)
    }

    /// Removes write-protection from `[start, start + len)`, markers of pages not there
    /// included (`UFFDIO_WRITEPROTECT` without `MODE_WP`).
    pub fn unprotect(&self, start: u64, len: u64) -> io::Result<()> {
        let mut arg = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: 0,
        };
        // SAFETY: a userfaultfd and a valid uffdio_writeprotect for the call.
        unsafe { uffdio_writeprotect(self.as_raw(), &mut arg) }
            .map(drop)
            .map_err(io::Error::from)
    }

    /// Turns on asynchronous write-protect (and its markers for pages not yet there) on a
    /// fresh userfaultfd: the write-protect tracker's, which nobody reads.
    pub fn enable_wp_async(&self) -> io::Result<()> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        // SAFETY: a userfaultfd and a valid uffdio_api for the call.
        unsafe { uffdio_api(self.as_raw(), &mut api) }
            .map(drop)
            .map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_fault_and_remap_messages() {
        let mut raw = [0u8; UFFD_MSG_SIZE];
        raw[0] = UFFD_EVENT_PAGEFAULT;
        raw[8..16].copy_from_slice(&1u64.to_ne_bytes());
        raw[16..24].copy_from_slice(&0x7f00_0000_1000u64.to_ne_bytes());
        assert_eq!(
            decode_msg(&raw),
            UffdEvent::PageFault {
                address: 0x7f00_0000_1000,
                flags: 1
            }
        );
        raw[0] = UFFD_EVENT_REMAP;
        raw[24..32].copy_from_slice(&0x2000u64.to_ne_bytes());
        assert_eq!(
            decode_msg(&raw),
            UffdEvent::Remap {
                from: 1,
                to: 0x7f00_0000_1000,
                len: 0x2000
            }
        );
        raw[0] = 0x99;
        assert_eq!(decode_msg(&raw), UffdEvent::Unknown(0x99));
    }

    #[test]
    fn this_kernel_offers_userfaultfd() {
        let features = probe().expect(
            "userfaultfd is required by pclive's lazy restore (CONFIG_USERFAULTFD, and \
             vm.unprivileged_userfaultfd or root)",
        );
        assert!(features.available);
        assert!(features.has(UFFD_FEATURE_EVENT_FORK));
    }
}
