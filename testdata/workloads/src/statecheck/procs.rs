//! Processes and address spaces that change: fork/exit churn, mmap/munmap churn across threads,
//! a stopped child, and vfork.

use std::process::Command;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::{ensure, fork_child, mix, os_err, task_state, wait_until, Check, Checked};

fn wait_exit(pid: libc::pid_t) -> Result<i32, String> {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer for the call.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r != pid {
        return Err(os_err(&format!("waitpid {pid}")));
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(format!("child {pid} ended with wait status {status:#x}"))
    }
}

/// Each round forks short-lived children that each compute a value and exit with it, and every
/// tenth round runs a program (fork + exec); the exit codes must match.
struct ForkChurn;

pub fn fork_churn(_: &[String]) -> Result<Box<dyn Check>, String> {
    Ok(Box::new(ForkChurn))
}

impl Check for ForkChurn {
    fn round(&mut self, n: u64) -> Checked {
        let mut children = Vec::new();
        for i in 0..4 {
            let v = n * 4 + i;
            let pid = fork_child(move || (mix(v) & 0x7f) as i32)?;
            children.push((pid, v));
        }
        for (pid, v) in children {
            let code = wait_exit(pid)?;
            ensure(code == (mix(v) & 0x7f) as i32, || {
                format!("child {pid} exited {code}, expected {}", mix(v) & 0x7f)
            })?;
        }
        if n.is_multiple_of(10) {
            let status = Command::new("/bin/sh")
                .args(["-c", "exit 7"])
                .status()
                .map_err(|e| format!("run /bin/sh: {e}"))?;
            ensure(status.code() == Some(7), || {
                format!("sh -c 'exit 7' ended {status}")
            })?;
        }
        Ok(())
    }
}

/// Threads that keep mapping regions of varying size, filling, moving (mremap), verifying and
/// unmapping them; the round checks that no thread saw wrong data and that each made progress.
struct MmapChurn {
    progress: Vec<Arc<AtomicU64>>,
    seen: Vec<u64>,
    error: Arc<Mutex<Option<String>>>,
}

const PAGE: usize = 4096;

fn churn_thread(id: u64, progress: &AtomicU64, error: &Mutex<Option<String>>) {
    for iteration in 1u64.. {
        let seed = mix(id << 40 | iteration);
        let pages = 1 + (seed % 64) as usize;
        let len = pages * PAGE;
        // SAFETY: an anonymous private mapping; no existing memory is touched.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            *error.lock().unwrap() = Some(os_err("mmap"));
            return;
        }
        let mut region = (addr.cast::<u64>(), len);
        let fill = |(p, len): (*mut u64, usize)| {
            for w in 0..len / 8 {
                // SAFETY: w < len/8 words of a mapping of len bytes that this thread owns.
                unsafe { p.add(w).write(mix(seed ^ w as u64)) };
            }
        };
        let verify = |(p, len): (*mut u64, usize), what: &str| -> Result<(), String> {
            for w in 0..len / 8 {
                // SAFETY: as in fill: within the mapping this thread owns.
                let got = unsafe { p.add(w).read() };
                if got != mix(seed ^ w as u64) {
                    return Err(format!(
                        "thread {id}: word {w} of a {len}-byte region {what} is {got:#x}"
                    ));
                }
            }
            Ok(())
        };
        fill(region);
        let mut result = verify(region, "after fill");
        if result.is_ok() && seed & 1 == 1 {
            // Move it (and grow it): the old address range vanishes.
            // SAFETY: the region is this thread's own mapping of `len` bytes.
            let moved =
                unsafe { libc::mremap(region.0.cast(), len, len + PAGE, libc::MREMAP_MAYMOVE) };
            if moved == libc::MAP_FAILED {
                result = Err(os_err("mremap"));
            } else {
                region = (moved.cast(), len + PAGE);
                result = verify((region.0, len), "after mremap");
            }
        }
        // SAFETY: unmapping the region this thread mapped; nothing refers to it afterwards.
        unsafe { libc::munmap(region.0.cast(), region.1) };
        if let Err(e) = result {
            *error.lock().unwrap() = Some(e);
            return;
        }
        progress.store(iteration, Ordering::Release);
    }
}

pub fn mmap_churn(_: &[String]) -> Result<Box<dyn Check>, String> {
    let error = Arc::new(Mutex::new(None));
    let mut progress = Vec::new();
    for id in 0..3 {
        let p = Arc::new(AtomicU64::new(0));
        let (p2, e2) = (Arc::clone(&p), Arc::clone(&error));
        thread::spawn(move || churn_thread(id, &p2, &e2));
        progress.push(p);
    }
    Ok(Box::new(MmapChurn {
        seen: vec![0; progress.len()],
        progress,
        error,
    }))
}

impl Check for MmapChurn {
    fn round(&mut self, _: u64) -> Checked {
        for (i, p) in self.progress.iter().enumerate() {
            let before = self.seen[i];
            let error = Arc::clone(&self.error);
            wait_until(&format!("thread {i} to map another region"), || {
                if let Some(e) = error.lock().unwrap().clone() {
                    return Err(e);
                }
                Ok(p.load(Ordering::Acquire) > before)
            })?;
            self.seen[i] = p.load(Ordering::Acquire);
        }
        Ok(())
    }
}

/// A child stopped with SIGSTOP: it must stay stopped; every 25th round it is continued, asked
/// for a value over a pipe, and stopped again.
struct StoppedChild {
    pid: libc::pid_t,
    to_child: libc::c_int,
    from_child: libc::c_int,
}

fn pipe() -> Result<(libc::c_int, libc::c_int), String> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two descriptors for pipe() to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(os_err("pipe"));
    }
    Ok((fds[0], fds[1]))
}

pub fn read_word(fd: libc::c_int) -> Result<u64, String> {
    let mut word = [0u8; 8];
    // SAFETY: word is a valid 8-byte buffer.
    let r = unsafe { libc::read(fd, word.as_mut_ptr().cast(), 8) };
    ensure(r == 8, || os_err(&format!("read (got {r})")))?;
    Ok(u64::from_le_bytes(word))
}

pub fn write_word(fd: libc::c_int, v: u64) -> Checked {
    let word = v.to_le_bytes();
    // SAFETY: word is a valid 8-byte buffer.
    let r = unsafe { libc::write(fd, word.as_ptr().cast(), 8) };
    ensure(r == 8, || os_err(&format!("write (wrote {r})")))
}

pub fn stopped_child(_: &[String]) -> Result<Box<dyn Check>, String> {
    let (req_r, req_w) = pipe()?;
    let (resp_r, resp_w) = pipe()?;
    let pid = fork_child(move || loop {
        match read_word(req_r) {
            Ok(v) if write_word(resp_w, mix(v)).is_ok() => {}
            _ => return 1,
        }
    })?;
    // SAFETY: kill() takes plain integers; pid is our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let check = StoppedChild {
        pid,
        to_child: req_w,
        from_child: resp_r,
    };
    check.wait_state('T')?;
    Ok(Box::new(check))
}

impl StoppedChild {
    fn wait_state(&self, want: char) -> Checked {
        wait_until(&format!("child {} to be in state {want}", self.pid), || {
            Ok(task_state(self.pid)? == want)
        })
    }
}

impl Check for StoppedChild {
    fn round(&mut self, n: u64) -> Checked {
        let state = task_state(self.pid)?;
        ensure(state == 'T', || {
            format!("the stopped child {} is in state {state}", self.pid)
        })?;
        if n.is_multiple_of(25) {
            write_word(self.to_child, n)?;
            // SAFETY: plain integers; our own child.
            unsafe { libc::kill(self.pid, libc::SIGCONT) };
            let got = read_word(self.from_child)?;
            ensure(got == mix(n), || format!("the child answered {got:#x}"))?;
            // SAFETY: as above.
            unsafe { libc::kill(self.pid, libc::SIGSTOP) };
            self.wait_state('T')?;
        }
        Ok(())
    }
}

/// vfork as posix_spawn and shells use it: each round vforks a child that execs a program at
/// once; the parent is blocked only for that moment.
struct VforkSpawn;

pub fn vfork_spawn(_: &[String]) -> Result<Box<dyn Check>, String> {
    Ok(Box::new(VforkSpawn))
}

/// A stack for a CLONE_VFORK child (it runs on its own stack while the parent waits).
const CHILD_STACK: usize = 64 * 1024;

/// clone(CLONE_VM | CLONE_VFORK), as vfork() and posix_spawn do: the parent is blocked until
/// `child` execs or exits. (libc::vfork itself is deprecated in Rust: a function that returns
/// twice on one stack is undefined behaviour; a separate stack is not.)
fn vfork_run(
    child: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> Result<libc::pid_t, String> {
    let mut stack = vec![0u8; CHILD_STACK];
    // SAFETY: the stack is valid and outlives the child's use of it (the parent is suspended
    // until the child execs or exits); `child` only makes async-signal-safe calls.
    let pid = unsafe {
        libc::clone(
            child,
            stack.as_mut_ptr().add(CHILD_STACK).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            arg,
        )
    };
    ensure(pid > 0, || os_err("clone(CLONE_VM | CLONE_VFORK)"))?;
    Ok(pid)
}

extern "C" fn exec_true(_: *mut libc::c_void) -> libc::c_int {
    let path = c"/bin/true";
    let argv = [path.as_ptr(), ptr::null()];
    // SAFETY: argv is a null-terminated array of C strings.
    unsafe {
        libc::execv(path.as_ptr(), argv.as_ptr());
        libc::_exit(127)
    }
}

impl Check for VforkSpawn {
    fn round(&mut self, _: u64) -> Checked {
        let pid = vfork_run(exec_true, ptr::null_mut())?;
        let code = wait_exit(pid)?;
        ensure(code == 0, || format!("/bin/true (vforked) exited {code}"))
    }
}

/// A parent that stays blocked in vfork: its child sleeps before it execs. `vfork-hold SECS`.
/// Stock CRIU cannot checkpoint a task waiting for its vfork child (it cannot be seized), so a
/// migration must refuse it with a clear message and leave it running.
struct VforkHold {
    seconds: u32,
}

pub fn vfork_hold(args: &[String]) -> Result<Box<dyn Check>, String> {
    let seconds = args.first().and_then(|s| s.parse().ok()).unwrap_or(3600);
    Ok(Box::new(VforkHold { seconds }))
}

extern "C" fn sleep_then_exit(arg: *mut libc::c_void) -> libc::c_int {
    let pause = libc::timespec {
        tv_sec: arg as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: nanosleep with a valid timespec, then _exit: no shared state is touched.
    unsafe {
        libc::nanosleep(&pause, ptr::null_mut());
        libc::_exit(0)
    }
}

impl Check for VforkHold {
    fn round(&mut self, _: u64) -> Checked {
        let pid = vfork_run(sleep_then_exit, self.seconds as usize as *mut libc::c_void)?;
        let code = wait_exit(pid)?;
        ensure(code == 0, || format!("the vfork child exited {code}"))
    }
}
