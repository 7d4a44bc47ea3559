//! Sockets: loopback UDP and TCP, unix sockets, and a long-lived Redis client connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::time::Duration;

use crate::{ensure, fork_child, mix, Check, Checked, DEADLINE};

/// A UDP socket connected to 127.0.0.1 and its server; the client retransmits (datagrams in
/// flight at a checkpoint may be lost, as on any network), so what is checked is that both
/// sockets keep their addresses and the connected one still reaches its peer.
struct UdpLoopback {
    server: UdpSocket,
    client: UdpSocket,
    server_addr: SocketAddr,
    client_addr: SocketAddr,
}

pub fn udp_loopback(_: &[String]) -> Result<Box<dyn Check>, String> {
    let server = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("bind: {e}"))?;
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("bind: {e}"))?;
    let server_addr = server.local_addr().map_err(|e| e.to_string())?;
    client
        .connect(server_addr)
        .map_err(|e| format!("connect: {e}"))?;
    for s in [&server, &client] {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
    }
    let client_addr = client.local_addr().map_err(|e| e.to_string())?;
    Ok(Box::new(UdpLoopback {
        server,
        client,
        server_addr,
        client_addr,
    }))
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl Check for UdpLoopback {
    fn round(&mut self, n: u64) -> Checked {
        let addrs = (
            self.client.local_addr().map_err(|e| e.to_string())?,
            self.client.peer_addr().map_err(|e| e.to_string())?,
            self.server.local_addr().map_err(|e| e.to_string())?,
        );
        ensure(
            addrs == (self.client_addr, self.server_addr, self.server_addr),
            || format!("addresses changed: {addrs:?}"),
        )?;
        let attempts = DEADLINE.as_millis() / 200;
        for _ in 0..attempts {
            self.client
                .send(&n.to_le_bytes())
                .map_err(|e| format!("send to {}: {e}", self.server_addr))?;
            let mut buf = [0u8; 16];
            match self.server.recv_from(&mut buf) {
                Ok((8, from)) if from == self.client_addr => {
                    let got = u64::from_le_bytes(buf[..8].try_into().unwrap());
                    if got != n {
                        continue; // an older retransmission
                    }
                    self.server
                        .send_to(&mix(n).to_le_bytes(), from)
                        .map_err(|e| format!("reply: {e}"))?;
                }
                Ok((len, from)) => {
                    return Err(format!("unexpected datagram ({len} bytes from {from})"))
                }
                Err(e) if timed_out(&e) => continue,
                Err(e) => return Err(format!("server recv: {e}")),
            }
            loop {
                match self.client.recv(&mut buf) {
                    Ok(8) if u64::from_le_bytes(buf[..8].try_into().unwrap()) == mix(n) => {
                        return Ok(())
                    }
                    Ok(_) => continue, // a reply to an older retransmission
                    Err(e) if timed_out(&e) => break,
                    Err(e) => return Err(format!("client recv: {e}")),
                }
            }
        }
        Err(format!("no reply over 127.0.0.1 in {DEADLINE:?}"))
    }
}

/// A TCP connection over 127.0.0.1 between this process and a child that echoes each message
/// transformed; the child also keeps its listening socket open.
struct TcpLoopback {
    stream: TcpStream,
    local: SocketAddr,
}

fn echo_transformed(mut stream: impl Read + Write) -> i32 {
    let mut buf = [0u8; 64];
    loop {
        if stream.read_exact(&mut buf).is_err() {
            return 0;
        }
        for w in buf.chunks_exact_mut(8) {
            let v = u64::from_le_bytes(w.try_into().unwrap());
            w.copy_from_slice(&mix(v).to_le_bytes());
        }
        if stream.write_all(&buf).is_err() {
            return 1;
        }
    }
}

/// Sends 64 bytes derived from `n` and checks the echo.
fn exchange(stream: &mut (impl Read + Write), n: u64, peer: &str) -> Checked {
    let mut msg = [0u8; 64];
    for (i, w) in msg.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(n * 8 + i as u64).to_le_bytes());
    }
    stream
        .write_all(&msg)
        .map_err(|e| format!("write to {peer}: {e}"))?;
    let mut back = [0u8; 64];
    stream
        .read_exact(&mut back)
        .map_err(|e| format!("read from {peer}: {e}"))?;
    for (i, w) in back.chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes(w.try_into().unwrap());
        ensure(got == mix(n * 8 + i as u64), || {
            format!("wrong echo from {peer} (word {i}: {got:#x})")
        })?;
    }
    Ok(())
}

pub fn tcp_loopback(_: &[String]) -> Result<Box<dyn Check>, String> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    fork_child(move || match listener.accept() {
        Ok((stream, _)) => echo_transformed(stream),
        Err(_) => 1,
    })?;
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    Ok(Box::new(TcpLoopback { stream, local }))
}

impl Check for TcpLoopback {
    fn round(&mut self, n: u64) -> Checked {
        let local = self.stream.local_addr().map_err(|e| e.to_string())?;
        ensure(local == self.local, || {
            format!(
                "the connection's address changed: {local} (was {})",
                self.local
            )
        })?;
        exchange(&mut self.stream, n, "the child over 127.0.0.1")
    }
}

/// A stream socket pair to an echoing child, a datagram pair holding a queued message across
/// rounds, and a named listener with a connected client.
struct UnixSockets {
    stream: UnixStream,
    dgram: (UnixDatagram, UnixDatagram),
    named: (UnixStream, UnixStream),
}

pub fn unix_sockets(_: &[String]) -> Result<Box<dyn Check>, String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    let theirs = OwnedFd::from(theirs);
    let child_end = theirs.as_raw_fd();
    fork_child(move || {
        // SAFETY: the child's copy of the descriptor; nothing else in the child owns it.
        echo_transformed(unsafe { UnixStream::from_raw_fd(child_end) })
    })?;
    drop(theirs);
    ours.set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    let dgram = UnixDatagram::pair().map_err(|e| e.to_string())?;
    dgram
        .0
        .send(&0u64.to_le_bytes())
        .map_err(|e| e.to_string())?;
    let path = format!("/tmp/statecheck-unix-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| format!("bind {path}: {e}"))?;
    let client = UnixStream::connect(&path).map_err(|e| format!("connect {path}: {e}"))?;
    let (server, _) = listener.accept().map_err(|e| e.to_string())?;
    client
        .set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    // The listener stays bound (and open, leaked on purpose) for the program's life.
    std::mem::forget(listener);
    Ok(Box::new(UnixSockets {
        stream: ours,
        dgram,
        named: (client, server),
    }))
}

impl Check for UnixSockets {
    fn round(&mut self, n: u64) -> Checked {
        exchange(&mut self.stream, n, "the child over a socket pair")?;
        // The datagram queued by the previous round is still there, then queue the next one.
        let mut buf = [0u8; 16];
        self.dgram
            .1
            .set_read_timeout(Some(DEADLINE))
            .map_err(|e| e.to_string())?;
        let len = self
            .dgram
            .1
            .recv(&mut buf)
            .map_err(|e| format!("datagram: {e}"))?;
        let got = u64::from_le_bytes(buf[..8].try_into().unwrap());
        ensure(len == 8 && got == n - 1, || {
            format!("queued datagram: {len} bytes, {got} (expected {})", n - 1)
        })?;
        self.dgram
            .0
            .send(&n.to_le_bytes())
            .map_err(|e| e.to_string())?;
        // Through the named socket, both ways.
        let (client, server) = &mut self.named;
        client
            .write_all(&n.to_le_bytes())
            .map_err(|e| format!("named socket: {e}"))?;
        let mut word = [0u8; 8];
        server
            .read_exact(&mut word)
            .map_err(|e| format!("named socket: {e}"))?;
        server.write_all(&word).map_err(|e| e.to_string())?;
        client
            .read_exact(&mut word)
            .map_err(|e| format!("named socket: {e}"))?;
        ensure(u64::from_le_bytes(word) == n, || {
            "the named socket returned other data".into()
        })
    }
}

/// One TCP connection to Redis on 127.0.0.1:PORT, kept for the program's life: `INCR` of a key
/// only this client writes must count up by one each round, and `CLIENT ID` must stay the one
/// the server gave this connection at start (a reconnect would get a new id).
struct RedisConnection {
    stream: TcpStream,
    key: String,
    id: i64,
    count: i64,
}

fn redis_command(stream: &mut TcpStream, args: &[&str]) -> Result<String, String> {
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream
        .write_all(cmd.as_bytes())
        .map_err(|e| format!("send {args:?} to redis: {e}"))?;
    // Integer (":N") and status ("+OK") replies: one line.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            Ok(_) => return Err(format!("redis closed the connection during {args:?}")),
            Err(e) => return Err(format!("read reply to {args:?}: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line).trim_end().to_string();
    if text.starts_with('-') {
        return Err(format!("redis answered {args:?} with {text}"));
    }
    Ok(text)
}

fn integer(reply: &str) -> Result<i64, String> {
    reply
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("not an integer reply: {reply}"))
}

pub fn redis_connection(args: &[String]) -> Result<Box<dyn Check>, String> {
    let port: u16 = args
        .first()
        .and_then(|p| p.parse().ok())
        .ok_or("usage: statecheck redis-conn PORT --status DIR")?;
    let mut stream = None;
    crate::wait_until("redis to accept a connection", || {
        stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok();
        Ok(stream.is_some())
    })?;
    let mut stream = stream.unwrap();
    stream
        .set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    let id = integer(&redis_command(&mut stream, &["CLIENT", "ID"])?)?;
    let key = format!("statecheck:{}", std::process::id());
    redis_command(&mut stream, &["SET", &key, "0"])?;
    Ok(Box::new(RedisConnection {
        stream,
        key,
        id,
        count: 0,
    }))
}

impl Check for RedisConnection {
    fn round(&mut self, _: u64) -> Checked {
        let got = integer(&redis_command(&mut self.stream, &["INCR", &self.key])?)?;
        self.count += 1;
        ensure(got == self.count, || {
            format!("INCR {} returned {got}, expected {}", self.key, self.count)
        })?;
        let id = integer(&redis_command(&mut self.stream, &["CLIENT", "ID"])?)?;
        ensure(id == self.id, || {
            format!(
                "CLIENT ID is {id}, was {}: this is another connection",
                self.id
            )
        })
    }
}
