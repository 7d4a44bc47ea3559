//! One blocking RESP2 connection over a `TcpStream`, with a deadline on every reply.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::resp::{self, Limits, ProtocolError, Value};

#[derive(Debug, Error)]
pub enum ConnError {
    #[error("cannot resolve '{0}': give the endpoint as HOST:PORT, e.g. 10.0.0.2:6379")]
    Resolve(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("the server closed the connection")]
    Closed,
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("server replied with an error: {0}")]
    Server(String),
    #[error("unexpected reply {0:?}")]
    Unexpected(Value),
}

/// Resolves `HOST:PORT` to its first address.
pub fn resolve(endpoint: &str) -> Result<SocketAddr, ConnError> {
    endpoint
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| ConnError::Resolve(endpoint.to_string()))
}

pub struct Conn {
    stream: TcpStream,
    /// Bytes read but not yet parsed; `consumed` bytes at its front are already parsed.
    buf: Vec<u8>,
    consumed: usize,
    /// What each `read` fills before its bytes are appended to `buf` (avoids zeroing `buf`).
    scratch: Box<[u8]>,
    limits: Limits,
}

impl Conn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, ConnError> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|source| ConnError::Connect { addr, source })?;
        // Requests are small and latency is what we measure: no Nagle delay.
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(64 << 10),
            consumed: 0,
            scratch: vec![0; 64 << 10].into_boxed_slice(),
            limits: Limits::default(),
        })
    }

    /// Sends already-encoded commands. A frozen peer stops reading, so writes are bounded too.
    pub fn send(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), ConnError> {
        self.stream.set_write_timeout(Some(timeout))?;
        self.stream.write_all(bytes).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ConnError::Timeout(timeout),
            _ => ConnError::Io(e),
        })
    }

    /// Reads the next reply, failing with [`ConnError::Timeout`] if none is complete within
    /// `timeout`. Server error replies are returned as values, not errors.
    pub fn read_reply(&mut self, timeout: Duration) -> Result<Value, ConnError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((value, used)) = resp::parse(&self.buf[self.consumed..], &self.limits)? {
                self.consumed += used;
                if self.consumed == self.buf.len() {
                    self.buf.clear();
                    self.consumed = 0;
                }
                return Ok(value);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ConnError::Timeout(timeout));
            }
            self.fill(remaining, timeout)?;
        }
    }

    fn fill(&mut self, wait: Duration, timeout: Duration) -> Result<(), ConnError> {
        // Drop parsed bytes before growing, so the buffer stays the size of one reply batch.
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.stream.set_read_timeout(Some(wait))?;
        match self.stream.read(&mut self.scratch) {
            Ok(0) => Err(ConnError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&self.scratch[..n]);
                Ok(())
            }
            Err(e) => match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => Err(ConnError::Timeout(timeout)),
                ErrorKind::Interrupted => Ok(()),
                _ => Err(ConnError::Io(e)),
            },
        }
    }

    /// Sends one command and waits for its reply.
    pub fn request(&mut self, command: &[u8], timeout: Duration) -> Result<Value, ConnError> {
        let deadline = Instant::now() + timeout;
        self.send(command, timeout)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.read_reply(remaining.max(Duration::from_micros(1)))
            .map_err(|e| match e {
                ConnError::Timeout(_) => ConnError::Timeout(timeout),
                other => other,
            })
    }

    /// PING, expecting PONG.
    pub fn ping(&mut self, timeout: Duration) -> Result<(), ConnError> {
        match self.request(PING, timeout)? {
            Value::Simple(s) if s == b"PONG" => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// `PING`, encoded once.
pub const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// Turns a reply the caller did not expect into the most telling error.
pub fn unexpected(value: Value) -> ConnError {
    match value.error_text() {
        Some(text) => ConnError::Server(text),
        None => ConnError::Unexpected(value),
    }
}
