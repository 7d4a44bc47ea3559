//! Stopping every thread of a task (so that its mappings hold still while the tracker reads
//! and registers them), and making it create a userfaultfd of its own address space: a
//! `userfaultfd()` system call injected with ptrace, the descriptor taken with `pidfd_getfd`,
//! and the task's copy closed again (CRIU refuses to dump a task that holds a userfaultfd).
//! Only the creation needs the task to run code: the shim registers mappings and scans them
//! through its own copy, which acts on the task's address space.
//!
//! Hand-written: no maintained crate injects a system call into another process (CRIU's compel
//! is C and injects a whole parasite). The steps follow ptrace(2):
//! - `PTRACE_SEIZE` every thread with `PTRACE_O_SUSPEND_SECCOMP` (a container's seccomp
//!   profile may deny `userfaultfd`) and `PTRACE_INTERRUPT` it; list the threads again until a
//!   pass finds none new (a thread may start another before it stops). A thread in a group
//!   stop (state T) means the task is left alone. One thread runs the calls, which act on the
//!   shared address space and descriptor table.
//! - Block every signal while the thread runs the calls (`PTRACE_SETSIGMASK`), so that no
//!   handler runs on borrowed registers.
//! - For each call: point the instruction pointer at a `syscall` instruction of the vDSO (code
//!   that nothing ever writes, so no code of the task is patched under its other threads), set
//!   the arguments, and step over it with `PTRACE_SYSCALL` (its entry stop, then its exit stop,
//!   checked with `PTRACE_GET_SYSCALL_INFO`). `orig_rax` is set to -1 first, so that the
//!   kernel does not "restart" a system call the thread was interrupted in with our registers.
//! - Restore the registers and the signal mask and detach: a system call the thread was in is
//!   restarted as if it had received a signal with `SA_RESTART`.
//!
//! Stops are found by polling `PTRACE_GETSIGINFO` (it fails while the thread runs) rather than
//! with `waitpid`: the shim's reaper calls `waitpid(-1)` on every SIGCHLD and would take the
//! stop notifications of a tracee of any of its threads.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

/// How long a thread may take to stop (it is interrupted, so only uninterruptible sleep delays
/// it).
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("task {pid}: {what} failed: {source}")]
    Sys {
        pid: u32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("task {pid} did not stop within {STOP_TIMEOUT:?} (uninterruptible sleep?)")]
    Timeout { pid: u32 },
    #[error("task {pid} is stopped (state T): pclive does not run code in a stopped task")]
    Stopped { pid: u32 },
    #[error("task {pid}: thread {tid} exited while being stopped")]
    ThreadExited { pid: u32, tid: u32 },
    #[error("task {pid} has no vDSO with a `syscall` instruction to run a call through")]
    NoSyscallInstruction { pid: u32 },
    #[error("task {pid} stopped unexpectedly while running {call} ({detail})")]
    Unexpected {
        pid: u32,
        call: &'static str,
        detail: String,
    },
    #[error("task {pid}: {call} returned {source}")]
    Call {
        pid: u32,
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    #[error("injecting system calls is implemented for x86-64 only")]
    Unsupported,
}

const UFFD_USER_MODE_ONLY: u64 = 1;

/// Task `pid` with every thread in a ptrace stop: its mappings cannot change until this is
/// dropped, which resumes every thread as it was.
pub struct StoppedTask {
    #[cfg(target_arch = "x86_64")]
    inner: x86_64::Stopped,
}

/// Stops every thread of task `pid` (threads it starts meanwhile too). A task in a group stop
/// (state T) is left alone: [`InjectError::Stopped`].
pub fn stop_task(pid: u32) -> Result<StoppedTask, InjectError> {
    #[cfg(target_arch = "x86_64")]
    {
        Ok(StoppedTask {
            inner: x86_64::stop_task(pid)?,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = pid;
        Err(InjectError::Unsupported)
    }
}

impl StoppedTask {
    /// Makes the task create a userfaultfd (user-mode faults only, which needs no privilege in
    /// the task), takes it, and closes the task's copy. The descriptor has not had `UFFDIO_API`.
    pub fn userfaultfd(&mut self) -> Result<OwnedFd, InjectError> {
        #[cfg(target_arch = "x86_64")]
        {
            self.inner.userfaultfd()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Err(InjectError::Unsupported)
        }
    }
}

/// The first `syscall` instruction (0f 05) in task `pid`'s vDSO.
fn vdso_syscall_address(pid: u32) -> Result<u64, InjectError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| {
        InjectError::Sys {
            pid,
            what: "reading /proc/PID/maps",
            source,
        }
    })?;
    let (start, end) = maps
        .lines()
        .find(|l| l.ends_with("[vdso]"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(super::super::parse_range)
        .ok_or(InjectError::NoSyscallInstruction { pid })?;
    let mut code = vec![0u8; (end - start) as usize];
    super::super::read_remote(pid, start, &mut code).map_err(|e| InjectError::Sys {
        pid,
        what: "reading the vDSO",
        source: io::Error::other(e.to_string()),
    })?;
    code.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|at| start + at as u64)
        .ok_or(InjectError::NoSyscallInstruction { pid })
}

/// A thread's state letter in /proc (R, S, D, T, t, Z, ...).
fn state_of(pid: u32, tid: u32) -> Option<char> {
    crate::procfs::stat_state(
        &std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?,
    )
}

/// The threads of task `pid`.
fn threads_of(pid: u32) -> Result<Vec<u32>, InjectError> {
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|source| InjectError::Sys {
            pid,
            what: "listing /proc/PID/task",
            source,
        })?;
    Ok(tasks
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect())
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use super::*;
    use std::os::fd::{FromRawFd, RawFd};
    use std::time::Instant;

    const PTRACE_O_SUSPEND_SECCOMP: libc::c_long = 1 << 21;
    /// Syscall stops say so (PTRACE_GET_SYSCALL_INFO needs it).
    const PTRACE_O_TRACESYSGOOD: libc::c_long = 1;
    const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
    const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
    const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;
    const PTRACE_SYSCALL_INFO_ENTRY: u8 = 1;
    const PTRACE_SYSCALL_INFO_EXIT: u8 = 2;
    const PTRACE_EVENT_STOP: i32 = 128;

    /// `struct ptrace_syscall_info` (linux/ptrace.h), large enough for every variant.
    #[repr(C)]
    #[derive(Default)]
    struct SyscallInfo {
        op: u8,
        _pad: [u8; 3],
        arch: u32,
        instruction_pointer: u64,
        stack_pointer: u64,
        /// entry: nr, args[6]; exit: rval, is_error.
        data: [u64; 8],
    }

    /// A seized thread: detached on drop, its registers and signal mask restored first.
    struct Seized {
        pid: u32,
        tid: libc::pid_t,
        saved: Option<(libc::user_regs_struct, u64)>,
        /// A signal whose delivery stop we found the thread in: delivered on detach.
        pending_signal: libc::c_int,
        /// It exited while seized: nothing to restore or detach.
        exited: bool,
    }

    /// # Safety
    /// For a request that reads or writes memory, `data` points to memory valid for what the
    /// request reads or writes (and `addr` gives its size where the request takes one).
    unsafe fn ptrace(
        request: libc::c_uint,
        tid: libc::pid_t,
        addr: libc::c_long,
        data: libc::c_long,
    ) -> io::Result<libc::c_long> {
        // SAFETY: the caller's contract.
        let r = unsafe { libc::ptrace(request, tid, addr, data) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    impl Seized {
        fn sys(&self, what: &'static str) -> impl FnOnce(io::Error) -> InjectError {
            let pid = self.pid;
            move |source| InjectError::Sys { pid, what, source }
        }

        fn seize(pid: u32, tid: u32) -> Result<Seized, InjectError> {
            let tid = tid as libc::pid_t;
            // SAFETY: PTRACE_SEIZE takes integers only.
            unsafe {
                ptrace(
                    libc::PTRACE_SEIZE,
                    tid,
                    0,
                    PTRACE_O_SUSPEND_SECCOMP | PTRACE_O_TRACESYSGOOD,
                )
            }
            .map_err(|source| InjectError::Sys {
                pid,
                what: "PTRACE_SEIZE",
                source,
            })?;
            Ok(Seized {
                pid,
                tid,
                saved: None,
                pending_signal: 0,
                exited: false,
            })
        }

        /// Waits until the thread is in a ptrace stop; returns its siginfo.
        fn wait_stop(&self) -> Result<libc::siginfo_t, InjectError> {
            let deadline = Instant::now() + STOP_TIMEOUT;
            let mut spins = 0u32;
            loop {
                // SAFETY: zeroed siginfo_t is a valid value; the kernel writes one into it.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: `info` is a siginfo_t, what PTRACE_GETSIGINFO writes.
                match unsafe {
                    ptrace(
                        libc::PTRACE_GETSIGINFO,
                        self.tid,
                        0,
                        &mut info as *mut _ as libc::c_long,
                    )
                } {
                    Ok(_) => return Ok(info),
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => return Err(self.sys("PTRACE_GETSIGINFO")(e)),
                }
                if spins % 64 == 63
                    && !matches!(state_of(self.pid, self.tid as u32), Some(c) if !matches!(c, 'Z' | 'X'))
                {
                    return Err(InjectError::ThreadExited {
                        pid: self.pid,
                        tid: self.tid as u32,
                    });
                }
                if Instant::now() > deadline {
                    return Err(InjectError::Timeout { pid: self.pid });
                }
                spins += 1;
                if spins < 200 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }

        fn regs(&self) -> Result<libc::user_regs_struct, InjectError> {
            // SAFETY: zeroed user_regs_struct is valid; PTRACE_GETREGS writes one.
            let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
            // SAFETY: `regs` is a user_regs_struct, what PTRACE_GETREGS writes.
            unsafe {
                ptrace(
                    libc::PTRACE_GETREGS,
                    self.tid,
                    0,
                    &mut regs as *mut _ as libc::c_long,
                )
            }
            .map_err(self.sys("PTRACE_GETREGS"))?;
            Ok(regs)
        }

        fn set_regs(&self, regs: &libc::user_regs_struct) -> Result<(), InjectError> {
            // SAFETY: `regs` is a user_regs_struct, what PTRACE_SETREGS reads.
            unsafe {
                ptrace(
                    libc::PTRACE_SETREGS,
                    self.tid,
                    0,
                    regs as *const _ as libc::c_long,
                )
            }
            .map(drop)
            .map_err(self.sys("PTRACE_SETREGS"))
        }

        fn set_sigmask(&self, mask: u64) -> Result<(), InjectError> {
            // SAFETY: an 8-byte mask, the size passed.
            unsafe {
                ptrace(
                    PTRACE_SETSIGMASK,
                    self.tid,
                    8,
                    &mask as *const u64 as libc::c_long,
                )
            }
            .map(drop)
            .map_err(self.sys("PTRACE_SETSIGMASK"))
        }

        /// Asks the thread to stop ([`Seized::await_stop`] waits for it).
        fn interrupt(&self) -> Result<(), InjectError> {
            // SAFETY: PTRACE_INTERRUPT takes integers only.
            unsafe { ptrace(libc::PTRACE_INTERRUPT, self.tid, 0, 0) }
                .map(drop)
                .map_err(self.sys("PTRACE_INTERRUPT"))
        }

        /// Waits for the stop [`Seized::interrupt`] asked for.
        fn await_stop(&mut self) -> Result<(), InjectError> {
            let info = self.wait_stop()?;
            let event = info.si_code >> 8;
            if event != PTRACE_EVENT_STOP {
                // A signal arrived between the seize and the interrupt: it is delivered when
                // we detach.
                self.pending_signal = info.si_signo;
            } else if info.si_signo != libc::SIGTRAP {
                // A group stop (SIGSTOP, SIGTSTP...): leave a stopped task alone.
                return Err(InjectError::Stopped { pid: self.pid });
            }
            Ok(())
        }

        /// Saves the stopped thread's registers and signal mask (restored on drop) and blocks
        /// its signals, so that no handler runs on borrowed registers.
        fn prepare_calls(&mut self) -> Result<(), InjectError> {
            let regs = self.regs()?;
            let mut mask = 0u64;
            // SAFETY: an 8-byte mask, the size passed.
            unsafe {
                ptrace(
                    PTRACE_GETSIGMASK,
                    self.tid,
                    8,
                    &mut mask as *mut u64 as libc::c_long,
                )
            }
            .map_err(self.sys("PTRACE_GETSIGMASK"))?;
            self.saved = Some((regs, mask));
            self.set_sigmask(!0)
        }

        /// Resumes to the next syscall stop of `expected` kind; returns its info. `at`: where
        /// the thread must still be if it stops before the call's entry.
        fn syscall_stop(
            &self,
            call: &'static str,
            expected: u8,
            at: u64,
        ) -> Result<SyscallInfo, InjectError> {
            // A stop of another kind (a trap of the interrupt still pending) comes before the
            // call: resume again, a few times at most.
            for _ in 0..4 {
                // SAFETY: PTRACE_SYSCALL takes integers only (no signal to deliver).
                unsafe { ptrace(libc::PTRACE_SYSCALL, self.tid, 0, 0) }
                    .map_err(self.sys("PTRACE_SYSCALL"))?;
                self.wait_stop()?;
                let mut info = SyscallInfo::default();
                // SAFETY: `info` is as large as the size passed; the kernel writes at most that.
                unsafe {
                    ptrace(
                        PTRACE_GET_SYSCALL_INFO,
                        self.tid,
                        std::mem::size_of::<SyscallInfo>() as libc::c_long,
                        &mut info as *mut _ as libc::c_long,
                    )
                }
                .map_err(self.sys("PTRACE_GET_SYSCALL_INFO"))?;
                if info.op == expected {
                    return Ok(info);
                }
                if info.op == PTRACE_SYSCALL_INFO_ENTRY || info.op == PTRACE_SYSCALL_INFO_EXIT {
                    return Err(InjectError::Unexpected {
                        pid: self.pid,
                        call,
                        detail: format!("syscall stop {} instead of {expected}", info.op),
                    });
                }
                // Another stop (the interrupt's trap): only before the call, never past it.
                let rip = self.regs()?.rip;
                if expected != PTRACE_SYSCALL_INFO_ENTRY || rip != at {
                    return Err(InjectError::Unexpected {
                        pid: self.pid,
                        call,
                        detail: format!("a stop at {rip:#x} (op {})", info.op),
                    });
                }
            }
            Err(InjectError::Unexpected {
                pid: self.pid,
                call,
                detail: "it kept stopping before the call".into(),
            })
        }

        /// Runs system call `nr` with `args` in the thread; returns its result.
        fn call(
            &self,
            call: &'static str,
            entry: u64,
            nr: libc::c_long,
            args: [u64; 3],
        ) -> Result<i64, InjectError> {
            let (saved, _) = self.saved.expect("stopped first");
            let mut regs = saved;
            regs.rip = entry;
            regs.rax = nr as u64;
            // No restart of the call the thread was stopped in, with these registers.
            regs.orig_rax = u64::MAX;
            regs.rdi = args[0];
            regs.rsi = args[1];
            regs.rdx = args[2];
            self.set_regs(&regs)?;
            let entered = self.syscall_stop(call, PTRACE_SYSCALL_INFO_ENTRY, entry)?;
            if entered.data[0] != nr as u64 {
                return Err(InjectError::Unexpected {
                    pid: self.pid,
                    call,
                    detail: format!("entered system call {}", entered.data[0]),
                });
            }
            let exited = self.syscall_stop(call, PTRACE_SYSCALL_INFO_EXIT, entry)?;
            let result = exited.data[0] as i64;
            if (-4095..0).contains(&result) {
                return Err(InjectError::Call {
                    pid: self.pid,
                    call,
                    source: io::Error::from_raw_os_error(-result as i32),
                });
            }
            Ok(result)
        }

        fn restore(&mut self) -> io::Result<()> {
            if let Some((regs, mask)) = self.saved.take() {
                // SAFETY: `regs` is a user_regs_struct, what PTRACE_SETREGS reads.
                unsafe {
                    ptrace(
                        libc::PTRACE_SETREGS,
                        self.tid,
                        0,
                        &regs as *const _ as libc::c_long,
                    )
                }?;
                // SAFETY: an 8-byte mask, the size passed.
                unsafe {
                    ptrace(
                        PTRACE_SETSIGMASK,
                        self.tid,
                        8,
                        &mask as *const u64 as libc::c_long,
                    )
                }?;
            }
            Ok(())
        }
    }

    impl Drop for Seized {
        fn drop(&mut self) {
            if self.exited {
                return;
            }
            if let Err(e) = self.restore() {
                log::error!(
                    "task {}: restoring its registers after an injected call failed: {e}",
                    self.pid
                );
            }
            // SAFETY: PTRACE_DETACH takes integers only (the signal to deliver).
            if let Err(e) = unsafe {
                ptrace(
                    libc::PTRACE_DETACH,
                    self.tid,
                    0,
                    self.pending_signal as libc::c_long,
                )
            } {
                log::error!("task {}: PTRACE_DETACH failed: {e}", self.pid);
            }
        }
    }

    /// A task with all its threads seized and stopped (see [`super::StoppedTask`]).
    pub(super) struct Stopped {
        pid: u32,
        threads: Vec<Seized>,
    }

    pub(super) fn stop_task(pid: u32) -> Result<Stopped, InjectError> {
        let mut stopped = Stopped {
            pid,
            threads: Vec::new(),
        };
        let mut seen = std::collections::HashSet::new();
        // The first reason to give up. Threads already interrupted are waited for first in any
        // case: only a thread in a ptrace stop can be detached, and one left undetached would
        // stay traced.
        let mut failed = None;
        // A thread may start others until it stops: list again until a pass finds none new
        // (as CRIU's seize does).
        while failed.is_none() {
            let mut batch = Vec::new();
            for tid in threads_of(pid)? {
                if !seen.insert(tid) {
                    continue;
                }
                match state_of(pid, tid) {
                    Some('T') => {
                        failed = Some(InjectError::Stopped { pid });
                        break;
                    }
                    Some('Z') | Some('X') | None => continue,
                    Some(_) => {}
                }
                let mut seized = match Seized::seize(pid, tid) {
                    Ok(seized) => seized,
                    // Exited since it was listed.
                    Err(InjectError::Sys { source, .. })
                        if source.raw_os_error() == Some(libc::ESRCH) =>
                    {
                        continue
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                if let Err(e) = seized.interrupt() {
                    // Seized but not stopping (it exited): nothing to detach.
                    seized.exited = true;
                    failed = Some(e);
                    break;
                }
                batch.push(seized);
            }
            if batch.is_empty() {
                break;
            }
            for mut seized in batch {
                match seized.await_stop() {
                    Ok(()) => stopped.threads.push(seized),
                    Err(InjectError::ThreadExited { .. }) => seized.exited = true,
                    Err(e) => {
                        stopped.threads.push(seized);
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if stopped.threads.is_empty() {
            return Err(InjectError::Sys {
                pid,
                what: "stopping its threads",
                source: io::Error::from_raw_os_error(libc::ESRCH),
            });
        }
        Ok(stopped)
    }

    impl Stopped {
        pub(super) fn userfaultfd(&mut self) -> Result<OwnedFd, InjectError> {
            let pid = self.pid;
            let entry = vdso_syscall_address(pid)?;
            // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
            let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0) };
            if pidfd < 0 {
                return Err(InjectError::Sys {
                    pid,
                    what: "pidfd_open",
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: a fresh descriptor we own.
            let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
            // Any stopped thread runs the calls: they act on the shared address space and
            // descriptor table.
            let seized = &mut self.threads[0];
            seized.prepare_calls()?;
            let flags = libc::O_CLOEXEC as u64 | libc::O_NONBLOCK as u64 | UFFD_USER_MODE_ONLY;
            let remote = seized.call("userfaultfd", entry, libc::SYS_userfaultfd, [flags, 0, 0])?;
            let taken = {
                use std::os::fd::AsRawFd;
                // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags, and returns
                // a new descriptor or -1.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_getfd,
                        pidfd.as_raw_fd() as libc::c_long,
                        remote as libc::c_long,
                        0,
                    )
                }
            };
            let taken_error = io::Error::last_os_error();
            // The task's copy goes in any case (CRIU refuses a task that holds one).
            let closed = seized.call("close", entry, libc::SYS_close, [remote as u64, 0, 0]);
            if let Err(e) = seized.restore() {
                log::error!(
                    "task {pid}: restoring its registers after an injected call failed: {e}"
                );
            }
            if taken < 0 {
                return Err(InjectError::Sys {
                    pid,
                    what: "pidfd_getfd",
                    source: taken_error,
                });
            }
            // SAFETY: a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(taken as RawFd) };
            closed?;
            Ok(fd)
        }
    }
}
