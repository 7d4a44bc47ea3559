//! Special descriptors and timers: timerfd, interval and POSIX timers, epoll, inotify, signalfd.

use std::ffi::CString;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::procs::{read_word, write_word};
use crate::{ensure, mix, os_err, wait_until, Check, Checked, DEADLINE};

static ALARMS: AtomicU64 = AtomicU64::new(0);
static POSIX_TICKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_alarm(_: libc::c_int) {
    ALARMS.fetch_add(1, Ordering::Relaxed);
}

extern "C" fn on_posix_timer(_: libc::c_int) {
    POSIX_TICKS.fetch_add(1, Ordering::Relaxed);
}

fn handle(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) -> Checked {
    // SAFETY: sigaction is plain old data; all-zero is a valid value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: a valid action; the handler only touches an atomic.
    let r = unsafe { libc::sigaction(signal, &action, ptr::null_mut()) };
    ensure(r == 0, || os_err("sigaction"))
}

/// A periodic timerfd, an interval timer (SIGALRM) and a POSIX timer (SIGUSR2): all three must
/// keep firing.
struct Timers {
    timerfd: libc::c_int,
    seen: (u64, u64),
}

fn every_10ms() -> libc::itimerspec {
    let tick = libc::timespec {
        tv_sec: 0,
        tv_nsec: 10_000_000,
    };
    libc::itimerspec {
        it_interval: tick,
        it_value: tick,
    }
}

pub fn timers(_: &[String]) -> Result<Box<dyn Check>, String> {
    // SAFETY: timerfd_create takes plain integers.
    let timerfd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
    ensure(timerfd >= 0, || os_err("timerfd_create"))?;
    // SAFETY: a valid itimerspec.
    let r = unsafe { libc::timerfd_settime(timerfd, 0, &every_10ms(), ptr::null_mut()) };
    ensure(r == 0, || os_err("timerfd_settime"))?;
    handle(libc::SIGALRM, on_alarm)?;
    handle(libc::SIGUSR2, on_posix_timer)?;
    let interval = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        },
        it_value: libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        },
    };
    // SAFETY: a valid itimerval.
    let r = unsafe { libc::setitimer(libc::ITIMER_REAL, &interval, ptr::null_mut()) };
    ensure(r == 0, || os_err("setitimer"))?;
    // SAFETY: sigevent is plain old data; all-zero is a valid start.
    let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
    event.sigev_notify = libc::SIGEV_SIGNAL;
    event.sigev_signo = libc::SIGUSR2;
    let mut timer: libc::timer_t = ptr::null_mut();
    // SAFETY: valid event and out-pointer.
    let r = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) };
    ensure(r == 0, || os_err("timer_create"))?;
    // SAFETY: a valid timer and itimerspec.
    let r = unsafe { libc::timer_settime(timer, 0, &every_10ms(), ptr::null_mut()) };
    ensure(r == 0, || os_err("timer_settime"))?;
    Ok(Box::new(Timers {
        timerfd,
        seen: (0, 0),
    }))
}

impl Check for Timers {
    fn round(&mut self, _: u64) -> Checked {
        let expirations = read_word(self.timerfd).map_err(|e| format!("timerfd: {e}"))?;
        ensure(expirations >= 1, || "timerfd read 0 expirations".into())?;
        let seen = self.seen;
        wait_until("SIGALRM and the POSIX timer to fire", || {
            Ok(ALARMS.load(Ordering::Relaxed) > seen.0
                && POSIX_TICKS.load(Ordering::Relaxed) > seen.1)
        })?;
        self.seen = (
            ALARMS.load(Ordering::Relaxed),
            POSIX_TICKS.load(Ordering::Relaxed),
        );
        Ok(())
    }
}

/// An epoll set watching an eventfd (level-triggered) and a pipe (edge-triggered).
struct Epoll {
    epoll: libc::c_int,
    eventfd: libc::c_int,
    pipe: (libc::c_int, libc::c_int),
}

pub fn epoll(_: &[String]) -> Result<Box<dyn Check>, String> {
    // SAFETY: plain integers.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    ensure(epoll >= 0, || os_err("epoll_create1"))?;
    // SAFETY: plain integers.
    let eventfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    ensure(eventfd >= 0, || os_err("eventfd"))?;
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    ensure(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, || {
        os_err("pipe")
    })?;
    for (fd, events, tag) in [
        (eventfd, libc::EPOLLIN as u32, 1u64),
        (fds[0], (libc::EPOLLIN | libc::EPOLLET) as u32, 2),
    ] {
        let mut event = libc::epoll_event { events, u64: tag };
        // SAFETY: a valid event.
        let r = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) };
        ensure(r == 0, || os_err("epoll_ctl"))?;
    }
    Ok(Box::new(Epoll {
        epoll,
        eventfd,
        pipe: (fds[0], fds[1]),
    }))
}

impl Check for Epoll {
    fn round(&mut self, n: u64) -> Checked {
        write_word(self.eventfd, n)?;
        write_word(self.pipe.1, mix(n))?;
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 4];
        let mut tags = Vec::new();
        while tags.len() < 2 {
            // SAFETY: ready has room for 4 events.
            let r = unsafe {
                libc::epoll_wait(
                    self.epoll,
                    ready.as_mut_ptr(),
                    4,
                    DEADLINE.as_millis() as i32,
                )
            };
            if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            ensure(r > 0, || os_err(&format!("epoll_wait returned {r}")))?;
            for e in &ready[..r as usize] {
                let tag = e.u64;
                if !tags.contains(&tag) {
                    tags.push(tag);
                }
            }
        }
        let value = read_word(self.eventfd)?;
        ensure(value == n, || format!("the eventfd held {value}"))?;
        let piped = read_word(self.pipe.0)?;
        ensure(piped == mix(n), || format!("the pipe held {piped:#x}"))
    }
}

/// An inotify watch on a directory in /tmp: creating and removing a file there must be reported.
///
/// CRIU dumps the watches, not the events waiting in the queue (checkpoint-restore/criu#48): a
/// task frozen between a change and its read loses that event. The kernel queues an event before
/// the change's system call returns, so one that is not there within [`EVENT_WAIT`] is lost; that
/// is excused only when the program's network namespace changed since its last round (it was
/// restored elsewhere: the documented loss, docs/design-notes.md); any other loss fails.
struct Inotify {
    fd: libc::c_int,
    dir: String,
    /// The network namespace of the last round.
    net: String,
}

const EVENT_WAIT: i32 = 2000;

pub fn inotify(_: &[String]) -> Result<Box<dyn Check>, String> {
    let dir = format!("/tmp/statecheck-inotify-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
    // SAFETY: plain integers.
    // Non-blocking: a task frozen between poll and read can find the queue empty after the
    // restore (CRIU drops queued events), and a blocking read would then wait forever.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    ensure(fd >= 0, || os_err("inotify_init1"))?;
    let path = CString::new(dir.clone()).unwrap();
    // SAFETY: a valid path.
    let wd =
        unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_CREATE | libc::IN_DELETE) };
    ensure(wd >= 0, || os_err("inotify_add_watch"))?;
    Ok(Box::new(Inotify {
        fd,
        dir,
        net: crate::network_namespace(),
    }))
}

impl Inotify {
    /// The next event (its mask and name), or None if none came within [`EVENT_WAIT`].
    fn next(&self) -> Result<Option<(u32, String)>, String> {
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_millis(EVENT_WAIT as u64);
        let mut buf = [0u8; 4096];
        let r = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
            ensure(ready >= 0, || os_err("poll inotify"))?;
            if ready == 0 {
                return Ok(None);
            }
            // SAFETY: buf has room for 4096 bytes.
            let r = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
                // Ready before a freeze, empty after the restore: the event was dropped.
                continue;
            }
            break r;
        };
        let header = std::mem::size_of::<libc::inotify_event>();
        ensure(r >= header as isize, || {
            os_err(&format!("read inotify (got {r})"))
        })?;
        // SAFETY: buf holds at least one whole event header.
        let event: libc::inotify_event = unsafe { ptr::read_unaligned(buf.as_ptr().cast()) };
        let name = &buf[header..header + event.len as usize];
        let name = String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_string();
        ensure(r == (header + event.len as usize) as isize, || {
            format!("more than one inotify event at once ({r} bytes)")
        })?;
        Ok(Some((event.mask, name)))
    }

    /// Expects the event `what` (IN_CREATE or IN_DELETE) for `name`.
    fn expect(&self, what: u32, label: &str, name: &str) -> Checked {
        match self.next()? {
            Some((mask, got)) => ensure(mask & what != 0 && got == name, || {
                format!("expected {label} {name}, got {mask:#x} {got}")
            }),
            None => {
                let moved = crate::network_namespace() != self.net;
                if moved {
                    eprintln!("statecheck inotify: {label} {name} was queued when the task was dumped and is lost (CRIU does not carry inotify queues)");
                }
                ensure(moved, || {
                    format!("no {label} event for {name} in {EVENT_WAIT} ms")
                })
            }
        }
    }
}

impl Check for Inotify {
    fn round(&mut self, n: u64) -> Checked {
        let file = format!("{}/f{n}", self.dir);
        std::fs::write(&file, b"x").map_err(|e| format!("create {file}: {e}"))?;
        self.expect(libc::IN_CREATE, "IN_CREATE", &format!("f{n}"))?;
        std::fs::remove_file(&file).map_err(|e| format!("remove {file}: {e}"))?;
        self.expect(libc::IN_DELETE, "IN_DELETE", &format!("f{n}"))?;
        self.net = crate::network_namespace();
        Ok(())
    }
}

/// A signalfd for SIGUSR1 (blocked); each round queues the signal with a value and reads it back.
struct Signalfd {
    fd: libc::c_int,
}

pub fn signalfd(_: &[String]) -> Result<Box<dyn Check>, String> {
    // SAFETY: sigset_t is plain old data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid set pointers.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
    }
    // SAFETY: a valid set; this program has one thread.
    let r = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, ptr::null_mut()) };
    ensure(r == 0, || os_err("sigprocmask"))?;
    // SAFETY: a valid set.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    ensure(fd >= 0, || os_err("signalfd"))?;
    Ok(Box::new(Signalfd { fd }))
}

impl Check for Signalfd {
    fn round(&mut self, n: u64) -> Checked {
        let value = libc::sigval {
            sival_ptr: (mix(n) & 0x7fff_ffff) as usize as *mut libc::c_void,
        };
        // SAFETY: queue a signal to ourselves with a plain value.
        let r = unsafe { libc::sigqueue(libc::getpid(), libc::SIGUSR1, value) };
        ensure(r == 0, || os_err("sigqueue"))?;
        // SAFETY: signalfd_siginfo is plain old data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: info has room for one siginfo.
        let r = unsafe { libc::read(self.fd, ptr::from_mut(&mut info).cast(), size) };
        ensure(r == size as isize, || os_err("read signalfd"))?;
        ensure(
            info.ssi_signo == libc::SIGUSR1 as u32
                && u64::from(info.ssi_int as u32) == mix(n) & 0x7fff_ffff,
            || {
                format!(
                    "signalfd read signal {} value {:#x}",
                    info.ssi_signo, info.ssi_int
                )
            },
        )
    }
}
