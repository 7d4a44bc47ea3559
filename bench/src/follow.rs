//! A connection that follows the service from one endpoint to another.
//!
//! During a live migration the server answers at endpoint A, then at endpoint B. The old one
//! either refuses connections or, frozen, accepts TCP connects (the kernel completes the
//! handshake) but never replies. So "connected" is not "answering": a candidate endpoint counts
//! only once it answered a PING. Any error or timeout drops the connection, and the next request
//! tries the endpoints in rotation, starting with the one after the current, until one answers
//! or the run is stopped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::conn::{Conn, ConnError};
use crate::resp::Value;

/// How long a request waits before looking at the stop flag again.
const STOP_SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum FollowError {
    /// The run was stopped while looking for an endpoint; nothing was sent.
    #[error("stopped")]
    Stopped,
    /// The request was (maybe partly) sent but no reply came back: its effect is unknown.
    #[error("request lost on endpoint {endpoint}: {source}")]
    Lost { endpoint: usize, source: ConnError },
}

/// A reply, who gave it and how long it took from sending the request.
#[derive(Debug)]
pub struct Reply {
    pub value: Value,
    pub endpoint: usize,
    pub latency: Duration,
}

pub struct Follower {
    endpoints: Vec<SocketAddr>,
    current: usize,
    conn: Option<Conn>,
    /// Whether `current` ever answered; the first search starts at endpoint 0 itself.
    ever_connected: bool,
    request_timeout: Duration,
    connect_timeout: Duration,
    stop: Arc<AtomicBool>,
    /// Connections established after the first one (failovers and reconnects).
    pub reconnects: u64,
}

impl Follower {
    pub fn new(
        endpoints: Vec<SocketAddr>,
        request_timeout: Duration,
        connect_timeout: Duration,
        stop: Arc<AtomicBool>,
    ) -> Self {
        assert!(!endpoints.is_empty(), "at least one endpoint");
        Follower {
            endpoints,
            current: 0,
            conn: None,
            ever_connected: false,
            request_timeout,
            connect_timeout,
            stop,
            reconnects: 0,
        }
    }

    /// The endpoint currently (or last) answering.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Sends `command` and waits for its reply, connecting (or failing over) first if needed.
    pub fn request(&mut self, command: &[u8]) -> Result<Reply, FollowError> {
        self.ensure_connected()?;
        let conn = self.conn.as_mut().expect("connected above");
        // Latency starts once a connection answers: the failover time is the probe's to show.
        let sent = Instant::now();
        // Waits in slices, so that a stop is noticed while a patient request waits long.
        let slice = self.request_timeout.min(STOP_SLICE);
        let mut result = conn.request(command, slice);
        while matches!(result, Err(ConnError::Timeout(_)))
            && sent.elapsed() < self.request_timeout
            && !self.stop.load(Ordering::Relaxed)
        {
            result = conn.read_reply(slice);
        }
        match result {
            Ok(value) => Ok(Reply {
                value,
                endpoint: self.current,
                latency: sent.elapsed(),
            }),
            Err(source) => {
                // Whatever went wrong (timeout, reset, garbage), this connection is unusable:
                // replies could arrive late and be taken for the next request's.
                self.conn = None;
                Err(FollowError::Lost {
                    endpoint: self.current,
                    source,
                })
            }
        }
    }

    /// Drops the connection, so that the next request looks for an answering endpoint.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    fn ensure_connected(&mut self) -> Result<(), FollowError> {
        if self.conn.is_some() {
            return Ok(());
        }
        loop {
            for candidate in rotation(self.current, self.endpoints.len(), self.ever_connected) {
                if self.stop.load(Ordering::Relaxed) {
                    return Err(FollowError::Stopped);
                }
                if let Ok(conn) = self.try_endpoint(candidate) {
                    if self.ever_connected {
                        self.reconnects += 1;
                    }
                    self.ever_connected = true;
                    self.current = candidate;
                    self.conn = Some(conn);
                    return Ok(());
                }
            }
            // Every endpoint refused at once: do not spin a core the migration needs.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn try_endpoint(&self, index: usize) -> Result<Conn, ConnError> {
        let mut conn = Conn::connect(self.endpoints[index], self.connect_timeout)?;
        conn.ping(self.connect_timeout)?;
        Ok(conn)
    }
}

/// The order in which to try endpoints: all of them, starting after `current` once it has been
/// connected (it just failed), at `current` itself before that.
fn rotation(current: usize, count: usize, after_current: bool) -> impl Iterator<Item = usize> {
    let first = if after_current { current + 1 } else { current };
    (0..count).map(move |k| (first + k) % count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_starting_after_the_failed_endpoint() {
        assert_eq!(rotation(0, 3, false).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rotation(0, 3, true).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(rotation(2, 3, true).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rotation(0, 1, true).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn fails_over_from_a_silent_endpoint_to_an_answering_one() {
        use std::io::{Read, Write};
        use std::net::TcpListener;
        // Endpoint 0 accepts connections but never answers (a frozen server).
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        // Endpoint 1 answers every command with +PONG.
        let answering = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoints = vec![
            silent.local_addr().unwrap(),
            answering.local_addr().unwrap(),
        ];
        std::thread::spawn(move || {
            for stream in answering.incoming() {
                let mut stream = stream.unwrap();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(b"+PONG\r\n").is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut follower = Follower::new(
            endpoints,
            Duration::from_millis(20),
            Duration::from_millis(20),
            stop.clone(),
        );
        let reply = follower.request(crate::conn::PING).unwrap();
        assert_eq!(reply.value, Value::Simple(b"PONG".to_vec()));
        assert_eq!(reply.endpoint, 1);
        assert_eq!(follower.reconnects, 0);

        stop.store(true, Ordering::Relaxed);
        follower.disconnect();
        assert!(matches!(
            follower.request(crate::conn::PING),
            Err(FollowError::Stopped)
        ));
        drop(silent);
    }
}
