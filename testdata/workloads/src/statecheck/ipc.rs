//! Inter-process state: a FIFO, pipes (with data left in them), SysV message queues and
//! semaphores, and memory shared with a child (SysV segment and MAP_SHARED).

use std::ffi::CString;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::procs::{read_word, write_word};
use crate::{ensure, fork_child, mix, os_err, wait_until, Check, Checked};

/// A FIFO in /tmp that a child writes to and this process reads from, fed through a request
/// pipe; the FIFO holds one answer across rounds (a checkpoint must carry FIFO data once).
struct Fifo {
    to_child: libc::c_int,
    from_child: libc::c_int,
}

fn open(path: &CString, flags: libc::c_int) -> Result<libc::c_int, String> {
    // SAFETY: path is a valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    ensure(fd >= 0, || os_err(&format!("open {path:?}")))?;
    Ok(fd)
}

fn pipe() -> Result<(libc::c_int, libc::c_int), String> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two descriptors for pipe() to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(os_err("pipe"));
    }
    Ok((fds[0], fds[1]))
}

pub fn fifo(_: &[String]) -> Result<Box<dyn Check>, String> {
    let path = CString::new(format!("/tmp/statecheck-fifo-{}", std::process::id())).unwrap();
    // SAFETY: unlink/mkfifo take a valid C string.
    unsafe { libc::unlink(path.as_ptr()) };
    // SAFETY: as above.
    if unsafe { libc::mkfifo(path.as_ptr(), 0o600) } != 0 {
        return Err(os_err("mkfifo"));
    }
    let (req_r, req_w) = pipe()?;
    let child_path = path.clone();
    fork_child(move || {
        // The child writes into the FIFO what it reads from the request pipe, transformed.
        let Ok(fifo) = open(&child_path, libc::O_WRONLY) else {
            return 1;
        };
        loop {
            match read_word(req_r) {
                Ok(v) if write_word(fifo, mix(v)).is_ok() => {}
                _ => return 1,
            }
        }
    })?;
    let from_child = open(&path, libc::O_RDONLY)?;
    write_word(req_w, 0)?;
    Ok(Box::new(Fifo {
        to_child: req_w,
        from_child,
    }))
}

impl Check for Fifo {
    fn round(&mut self, n: u64) -> Checked {
        write_word(self.to_child, n)?;
        let got = read_word(self.from_child).map_err(|e| format!("the FIFO: {e}"))?;
        ensure(got == mix(n - 1), || {
            let earlier = (0..n + 1).find(|&i| mix(i) == got);
            format!(
                "the FIFO carried {got:#x}, expected the answer to request {} (this is the answer to {earlier:?})",
                n - 1
            )
        })
    }
}

/// A pipe to an echoing child and back, and a pipe holding 3000 bytes that are read back and
/// refilled each round (a checkpoint must carry pipe buffers).
struct Pipes {
    to_child: libc::c_int,
    from_child: libc::c_int,
    parked: (libc::c_int, libc::c_int),
}

const PARKED: usize = 3000;

fn parked_bytes(n: u64) -> Vec<u8> {
    (0..PARKED)
        .map(|i| mix(n ^ (i as u64) << 20) as u8)
        .collect()
}

pub fn pipes(_: &[String]) -> Result<Box<dyn Check>, String> {
    let (req_r, req_w) = pipe()?;
    let (resp_r, resp_w) = pipe()?;
    fork_child(move || loop {
        match read_word(req_r) {
            Ok(v) if write_word(resp_w, mix(v)).is_ok() => {}
            _ => return 1,
        }
    })?;
    let parked = pipe()?;
    let data = parked_bytes(0);
    // SAFETY: data is a valid buffer of PARKED bytes; a pipe holds 64 KiB.
    let r = unsafe { libc::write(parked.1, data.as_ptr().cast(), PARKED) };
    ensure(r == PARKED as isize, || os_err("fill the parked pipe"))?;
    Ok(Box::new(Pipes {
        to_child: req_w,
        from_child: resp_r,
        parked,
    }))
}

impl Check for Pipes {
    fn round(&mut self, n: u64) -> Checked {
        write_word(self.to_child, n)?;
        let got = read_word(self.from_child)?;
        ensure(got == mix(n), || format!("the pipe carried {got:#x}"))?;
        let mut buf = vec![0u8; PARKED];
        // SAFETY: buf holds PARKED bytes.
        let r = unsafe { libc::read(self.parked.0, buf.as_mut_ptr().cast(), PARKED) };
        ensure(r == PARKED as isize, || {
            os_err(&format!("read the parked pipe (got {r})"))
        })?;
        ensure(buf == parked_bytes(n - 1), || {
            "the data parked in a pipe changed".into()
        })?;
        let next = parked_bytes(n);
        // SAFETY: next holds PARKED bytes.
        let w = unsafe { libc::write(self.parked.1, next.as_ptr().cast(), PARKED) };
        ensure(w == PARKED as isize, || os_err("refill the parked pipe"))
    }
}

/// A SysV message queue holding a message across rounds and a semaphore counting rounds (in the
/// container's IPC namespace).
struct SysvIpc {
    queue: libc::c_int,
    sem: libc::c_int,
}

#[repr(C)]
struct Message {
    mtype: libc::c_long,
    value: u64,
}

fn send(queue: libc::c_int, mtype: libc::c_long, value: u64) -> Checked {
    let msg = Message { mtype, value };
    // SAFETY: msg is a valid message whose text is 8 bytes.
    let r = unsafe { libc::msgsnd(queue, ptr::from_ref(&msg).cast(), 8, libc::IPC_NOWAIT) };
    ensure(r == 0, || os_err("msgsnd"))
}

fn receive(queue: libc::c_int, mtype: libc::c_long) -> Result<u64, String> {
    let mut msg = Message { mtype: 0, value: 0 };
    // SAFETY: msg has room for 8 bytes of text.
    let r = unsafe {
        libc::msgrcv(
            queue,
            ptr::from_mut(&mut msg).cast(),
            8,
            mtype,
            libc::IPC_NOWAIT,
        )
    };
    ensure(r == 8, || os_err(&format!("msgrcv of type {mtype}")))?;
    Ok(msg.value)
}

pub fn sysv_ipc(_: &[String]) -> Result<Box<dyn Check>, String> {
    // SAFETY: msgget/semget take plain integers.
    let queue = unsafe { libc::msgget(libc::IPC_PRIVATE, 0o600) };
    ensure(queue >= 0, || os_err("msgget"))?;
    // SAFETY: as above.
    let sem = unsafe { libc::semget(libc::IPC_PRIVATE, 1, 0o600) };
    ensure(sem >= 0, || os_err("semget"))?;
    send(queue, 2, 0)?;
    Ok(Box::new(SysvIpc { queue, sem }))
}

impl Check for SysvIpc {
    fn round(&mut self, n: u64) -> Checked {
        let parked = receive(self.queue, 2)?;
        ensure(parked == n - 1, || {
            format!("the parked message holds {parked}, expected {}", n - 1)
        })?;
        send(self.queue, 2, n)?;
        send(self.queue, 1, mix(n))?;
        let got = receive(self.queue, 1)?;
        ensure(got == mix(n), || {
            format!("message of type 1 holds {got:#x}")
        })?;
        let mut op = libc::sembuf {
            sem_num: 0,
            sem_op: 1,
            sem_flg: 0,
        };
        // SAFETY: one valid sembuf.
        let r = unsafe { libc::semop(self.sem, &mut op, 1) };
        ensure(r == 0, || os_err("semop"))?;
        // SAFETY: GETVAL takes no fourth argument.
        let value = unsafe { libc::semctl(self.sem, 0, libc::GETVAL) };
        // The semaphore counts rounds modulo 1000 (it may not exceed 32767).
        let expected = (n - 1) % 1000 + 1;
        ensure(i64::from(value) == expected as i64, || {
            format!("the semaphore is {value}, expected {expected}")
        })?;
        if expected == 1000 {
            // SAFETY: SETVAL's fourth argument is the int value.
            let r = unsafe { libc::semctl(self.sem, 0, libc::SETVAL, 0) };
            ensure(r == 0, || os_err("semctl SETVAL"))?;
        }
        Ok(())
    }
}

/// A SysV shared memory segment and a MAP_SHARED anonymous mapping, both shared with a child:
/// the parent writes a request into one and the child answers in the other, so they must still
/// be the same memory in both processes after a restore.
struct SharedMemory {
    segment: *mut AtomicU64,
    anon: *mut AtomicU64,
}

const SHARED_BYTES: usize = 1 << 20;

pub fn shared_memory(_: &[String]) -> Result<Box<dyn Check>, String> {
    // SAFETY: shmget takes plain integers.
    let id = unsafe { libc::shmget(libc::IPC_PRIVATE, SHARED_BYTES, 0o600) };
    ensure(id >= 0, || os_err("shmget"))?;
    // SAFETY: attach the new segment anywhere.
    let segment = unsafe { libc::shmat(id, ptr::null(), 0) };
    ensure(segment as isize != -1, || os_err("shmat"))?;
    // SAFETY: an anonymous shared mapping; no existing memory is touched.
    let anon = unsafe {
        libc::mmap(
            ptr::null_mut(),
            SHARED_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    ensure(anon != libc::MAP_FAILED, || os_err("mmap MAP_SHARED"))?;
    let (segment, anon) = (segment.cast::<AtomicU64>(), anon.cast::<AtomicU64>());
    let (seg_addr, anon_addr) = (segment as usize, anon as usize);
    fork_child(move || {
        let (segment, anon) = (seg_addr as *mut AtomicU64, anon_addr as *mut AtomicU64);
        let mut last = 0;
        loop {
            // SAFETY: word 0 of the shared segment, mapped in this child as in its parent.
            let request = unsafe { &*segment }.load(Ordering::Acquire);
            if request != last {
                last = request;
                // Word `request % 1024` of the anonymous mapping (and word 0) carry the answer.
                let slot = 1 + (request % 1024) as usize;
                // SAFETY: slot < 1025 words, within the 1 MiB mapping.
                unsafe { &*anon.add(slot) }.store(mix(request), Ordering::Release);
                // SAFETY: word 0 of the mapping.
                unsafe { &*anon }.store(request, Ordering::Release);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    })?;
    Ok(Box::new(SharedMemory { segment, anon }))
}

impl Check for SharedMemory {
    fn round(&mut self, n: u64) -> Checked {
        // SAFETY: word 0 of the segment mapped at setup.
        unsafe { &*self.segment }.store(n, Ordering::Release);
        // SAFETY: word 0 of the anonymous shared mapping.
        let answered = || unsafe { &*self.anon }.load(Ordering::Acquire);
        wait_until("the child to answer through shared memory", || {
            Ok(answered() == n)
        })?;
        let slot = 1 + (n % 1024) as usize;
        // SAFETY: slot < 1025 words, within the mapping.
        let got = unsafe { &*self.anon.add(slot) }.load(Ordering::Acquire);
        ensure(got == mix(n), || {
            format!("shared word {slot} holds {got:#x}")
        })
    }
}
