//! The migration protocol: versioned, authenticated, integrity-checked frames.
//!
//! Every frame is
//!
//! ```text
//! magic u32 "PCLV" | version u16 | kind u16 | seq u64 | len u32 | payload (len bytes) | mac [32]
//! ```
//!
//! (little-endian). The payload is a protobuf message (prost) named by `kind`. `mac` is
//! HMAC-SHA256 over header and payload. The handshake authenticates both peers with a pre-shared
//! key (challenge–response on fresh nonces) and derives one key per direction; every later frame
//! is MAC'd with its direction's key and carries a sequence number that must increase by one, so
//! a corrupted, forged, replayed, reordered or truncated stream is refused. Without a key both
//! sides must explicitly agree to an unauthenticated session (`insecure`); its frames still
//! carry a MAC under a well-known key, which detects corruption but not tampering.

use std::io::{self, Read, Write};

use hmac::{Hmac, KeyInit, Mac};
use prost::Message;
use sha2::Sha256;

pub const MAGIC: u32 = 0x564C_4350; // "PCLV"
/// 2: page runs may be LZ4-compressed (`PageRun::lz4`).
pub const VERSION: u16 = 2;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 20;
pub const MAC_LEN: usize = 32;
/// Largest payload accepted: a page batch of 8 MiB plus framing. Anything larger is refused
/// before it is read, so a hostile length cannot exhaust memory.
pub const MAX_PAYLOAD: u32 = 9 << 20;
const NONCE_LEN: usize = 32;
/// Payload bytes a sender may have in flight before the receiver grants more: bounds what a
/// slow link makes either side buffer.
pub const INITIAL_CREDIT: u64 = 64 << 20;
const INSECURE_KEY: &[u8] = b"pclive unauthenticated session: integrity only";

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("truncated frame: the stream ended inside a frame")]
    Truncated,
    #[error("not a pclive migration stream (magic {0:#010x}): is the address right?")]
    BadMagic(u32),
    #[error("protocol version {found} is not supported (this pclive speaks {ours}): use the same pclive version on both hosts")]
    Version { found: u16, ours: u16 },
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit: corrupt or hostile stream")]
    TooLarge(u32),
    #[error(
        "frame integrity check failed (frame {seq}): the stream was corrupted or tampered with"
    )]
    BadMac { seq: u64 },
    #[error("frame {found} arrived where {expected} was expected: replayed, dropped or reordered frames")]
    Sequence { expected: u64, found: u64 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("undecodable {kind:?} frame: {source}")]
    Decode {
        kind: Kind,
        #[source]
        source: prost::DecodeError,
    },
    #[error("expected a {expected:?} frame, got {found:?}")]
    Unexpected { expected: Kind, found: Kind },
    #[error("authentication failed: the peers do not share the same key (check --key-file on both hosts; an unauthenticated session needs --insecure on both)")]
    AuthFailed,
    #[error("the peer refused the session: {0}")]
    Refused(String),
    #[error("the peer asked for an unauthenticated session; pass --insecure on both hosts to allow it, or give both the same --key-file")]
    InsecureRefused,
}

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    Challenge = 2,
    Proof = 3,
    Accept = 4,
    Reject = 5,
    Pages = 16,
    RoundEnd = 17,
    ImageFile = 18,
    Control = 19,
    Credit = 20,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Challenge,
            3 => Kind::Proof,
            4 => Kind::Accept,
            5 => Kind::Reject,
            16 => Kind::Pages,
            17 => Kind::RoundEnd,
            18 => Kind::ImageFile,
            19 => Kind::Control,
            20 => Kind::Credit,
            _ => return None,
        })
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct Hello {
    #[prost(uint32, repeated, tag = "1")]
    pub versions: Vec<u32>,
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    #[prost(bool, tag = "3")]
    pub insecure: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Challenge {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Proof {
    #[prost(bytes = "vec", tag = "1")]
    pub mac: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Reject {
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// A run of consecutive pages of one task: either `data`, or `lz4` (an LZ4 block) that
/// decompresses to `lz4_len` bytes.
#[derive(Clone, PartialEq, Message)]
pub struct PageRun {
    #[prost(uint64, tag = "1")]
    pub vaddr: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub lz4: Vec<u8>,
    #[prost(uint32, tag = "4")]
    pub lz4_len: u32,
}

impl PageRun {
    /// Bytes this run takes on the wire (what flow control counts).
    pub fn wire_len(&self) -> usize {
        self.data.len() + self.lz4.len()
    }
}

/// Pages of one task (pid in the container's namespace) from one pre-copy round.
#[derive(Clone, PartialEq, Message)]
pub struct Pages {
    #[prost(uint32, tag = "1")]
    pub pid: u32,
    #[prost(uint32, tag = "2")]
    pub round: u32,
    #[prost(message, repeated, tag = "3")]
    pub runs: Vec<PageRun>,
    #[prost(uint64, repeated, tag = "4")]
    pub zero_pages: Vec<u64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RoundEnd {
    #[prost(uint32, tag = "1")]
    pub round: u32,
    #[prost(uint64, tag = "2")]
    pub pages: u64,
    #[prost(uint64, tag = "3")]
    pub bytes: u64,
    /// The last round: the source is frozen and the images follow.
    #[prost(bool, tag = "4")]
    pub last: bool,
}

/// A chunk of a CRIU image file of the final dump.
#[derive(Clone, PartialEq, Message)]
pub struct ImageFile {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
    #[prost(bool, tag = "4")]
    pub last_chunk: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum ControlCode {
    Unspecified = 0,
    /// Source → destination: every image is sent; restore now.
    ImagesDone = 1,
    /// Destination → source: every page is installed; the source may go.
    Committed = 2,
    /// Either way: give up; the source resumes.
    Abort = 3,
    Progress = 4,
}

#[derive(Clone, PartialEq, Message)]
pub struct Control {
    #[prost(enumeration = "ControlCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// Flow control: the receiver allows this many more payload bytes.
#[derive(Clone, PartialEq, Message)]
pub struct Credit {
    #[prost(uint64, tag = "1")]
    pub bytes: u64,
}

/// A received frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub kind: Kind,
    pub seq: u64,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn decode<M: Message + Default>(&self) -> Result<M, WireError> {
        M::decode(self.payload.as_slice()).map_err(|source| WireError::Decode {
            kind: self.kind,
            source,
        })
    }
}

fn mac_of(key: &[u8], header: &[u8], payload: &[u8]) -> [u8; MAC_LEN] {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(header);
    mac.update(payload);
    mac.finalize().into_bytes().into()
}

fn derive(key: &[u8], label: &[u8], a: &[u8], b: &[u8]) -> [u8; MAC_LEN] {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(a);
    mac.update(b);
    mac.finalize().into_bytes().into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Encodes one frame.
pub fn encode_frame(key: &[u8], kind: Kind, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + MAC_LEN);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mac = mac_of(key, &out[..HEADER_LEN], payload);
    out.extend_from_slice(payload);
    out.extend_from_slice(&mac);
    out
}

fn read_full(reader: &mut impl Read, buf: &mut [u8], at_start: bool) -> Result<(), WireError> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) if done == 0 && at_start => return Err(WireError::Closed),
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads and checks one frame: magic, version, size limit, MAC, sequence number.
pub fn read_frame(
    reader: &mut impl Read,
    key: &[u8],
    expected_seq: u64,
) -> Result<Frame, WireError> {
    let mut header = [0u8; HEADER_LEN];
    read_full(reader, &mut header, true)?;
    let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = u16::from_le_bytes(header[4..6].try_into().expect("2 bytes"));
    if version != VERSION {
        return Err(WireError::Version {
            found: version,
            ours: VERSION,
        });
    }
    let raw_kind = u16::from_le_bytes(header[6..8].try_into().expect("2 bytes"));
    let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    read_full(reader, &mut payload, false)?;
    let mut mac = [0u8; MAC_LEN];
    read_full(reader, &mut mac, false)?;
    if !constant_time_eq(&mac, &mac_of(key, &header, &payload)) {
        return Err(WireError::BadMac { seq });
    }
    if seq != expected_seq {
        return Err(WireError::Sequence {
            expected: expected_seq,
            found: seq,
        });
    }
    let kind = Kind::from_u16(raw_kind).ok_or(WireError::UnknownKind(raw_kind))?;
    Ok(Frame { kind, seq, payload })
}

/// Authentication settings of one end.
#[derive(Clone)]
pub enum Auth {
    /// A pre-shared key (at least 16 bytes).
    Key(Vec<u8>),
    /// No authentication: only when the user explicitly asked for it on both ends.
    Insecure,
}

/// One end of an established session: frames in both directions, keys and sequence numbers.
pub struct Session<S: Read + Write> {
    stream: S,
    send_key: Vec<u8>,
    recv_key: Vec<u8>,
    send_seq: u64,
    recv_seq: u64,
    /// Flow-control credit the peer granted and we have not used yet.
    credit: u64,
}

impl<S: Read + Write> Session<S> {
    pub fn send<M: Message>(&mut self, kind: Kind, message: &M) -> Result<(), WireError> {
        let frame = encode_frame(
            &self.send_key,
            kind,
            self.send_seq,
            &message.encode_to_vec(),
        );
        self.stream.write_all(&frame)?;
        self.send_seq += 1;
        Ok(())
    }

    fn receive_any(&mut self) -> Result<Frame, WireError> {
        let frame = read_frame(&mut self.stream, &self.recv_key, self.recv_seq)?;
        self.recv_seq += 1;
        Ok(frame)
    }

    /// The next frame that is not flow-control credit (credit is banked for [`Self::spend`]).
    pub fn receive(&mut self) -> Result<Frame, WireError> {
        loop {
            let frame = self.receive_any()?;
            if frame.kind == Kind::Credit {
                self.credit += frame.decode::<Credit>()?.bytes;
                continue;
            }
            return Ok(frame);
        }
    }

    /// Takes `bytes` of credit, waiting for the peer to grant more when the window is used up.
    pub fn spend(&mut self, bytes: u64) -> Result<(), WireError> {
        while self.credit < bytes {
            let frame = self.receive_any()?;
            match frame.kind {
                Kind::Credit => self.credit += frame.decode::<Credit>()?.bytes,
                Kind::Reject => return Err(WireError::Refused(frame.decode::<Reject>()?.reason)),
                Kind::Control => {
                    let control: Control = frame.decode()?;
                    return Err(WireError::Refused(format!(
                        "the peer stopped the transfer: {}",
                        if control.message.is_empty() {
                            "abort"
                        } else {
                            control.message.as_str()
                        }
                    )));
                }
                other => {
                    return Err(WireError::Unexpected {
                        expected: Kind::Credit,
                        found: other,
                    })
                }
            }
        }
        self.credit -= bytes;
        Ok(())
    }

    /// Receives a frame that must be of `kind`.
    pub fn expect<M: Message + Default>(&mut self, kind: Kind) -> Result<M, WireError> {
        let frame = self.receive()?;
        if frame.kind == Kind::Reject {
            return Err(WireError::Refused(frame.decode::<Reject>()?.reason));
        }
        if frame.kind != kind {
            return Err(WireError::Unexpected {
                expected: kind,
                found: frame.kind,
            });
        }
        frame.decode()
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }
}

fn nonce() -> Result<Vec<u8>, WireError> {
    let mut n = vec![0u8; NONCE_LEN];
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    urandom.read_exact(&mut n)?;
    Ok(n)
}

fn handshake_key(auth: &Auth) -> &[u8] {
    match auth {
        Auth::Key(k) => k,
        Auth::Insecure => INSECURE_KEY,
    }
}

/// The connecting side (the migration source).
pub fn connect<S: Read + Write>(mut stream: S, auth: &Auth) -> Result<Session<S>, WireError> {
    let key = handshake_key(auth).to_vec();
    let client_nonce = nonce()?;
    let hello = Hello {
        versions: vec![VERSION as u32],
        nonce: client_nonce.clone(),
        insecure: matches!(auth, Auth::Insecure),
    };
    stream.write_all(&encode_frame(&key, Kind::Hello, 0, &hello.encode_to_vec()))?;
    let frame = match read_frame(&mut stream, &key, 0) {
        Ok(f) => f,
        // A server with another key cannot produce a valid MAC: that is an authentication failure.
        Err(WireError::BadMac { .. }) => return Err(WireError::AuthFailed),
        Err(e) => return Err(e),
    };
    if frame.kind == Kind::Reject {
        return Err(WireError::Refused(frame.decode::<Reject>()?.reason));
    }
    if frame.kind != Kind::Challenge {
        return Err(WireError::Unexpected {
            expected: Kind::Challenge,
            found: frame.kind,
        });
    }
    let challenge: Challenge = frame.decode()?;
    let proof = Proof {
        mac: derive(
            &key,
            b"pclive client proof",
            &challenge.nonce,
            &client_nonce,
        )
        .to_vec(),
    };
    stream.write_all(&encode_frame(&key, Kind::Proof, 1, &proof.encode_to_vec()))?;
    let frame = read_frame(&mut stream, &key, 1)?;
    if frame.kind == Kind::Reject {
        return Err(WireError::Refused(frame.decode::<Reject>()?.reason));
    }
    let accept: Proof = frame.decode()?;
    let expected = derive(
        &key,
        b"pclive server proof",
        &client_nonce,
        &challenge.nonce,
    );
    if !constant_time_eq(&accept.mac, &expected) {
        return Err(WireError::AuthFailed);
    }
    Ok(Session {
        stream,
        send_key: derive(&key, b"pclive c2s", &client_nonce, &challenge.nonce).to_vec(),
        recv_key: derive(&key, b"pclive s2c", &client_nonce, &challenge.nonce).to_vec(),
        send_seq: 0,
        recv_seq: 0,
        credit: INITIAL_CREDIT,
    })
}

/// The listening side (the migration destination).
pub fn accept<S: Read + Write>(mut stream: S, auth: &Auth) -> Result<Session<S>, WireError> {
    let key = handshake_key(auth).to_vec();
    let reject = |stream: &mut S, seq: u64, reason: &str| {
        // Best effort: the peer may not be able to check our MAC.
        let _ = stream.write_all(&encode_frame(
            &key,
            Kind::Reject,
            seq,
            &Reject {
                reason: reason.into(),
            }
            .encode_to_vec(),
        ));
    };
    let frame = match read_frame(&mut stream, &key, 0) {
        Ok(f) => f,
        Err(WireError::BadMac { .. }) => {
            // Another key, or an unauthenticated client meeting a keyed server (or vice versa).
            reject(&mut stream, 0, "authentication failed: different keys");
            return Err(WireError::AuthFailed);
        }
        Err(e) => return Err(e),
    };
    if frame.kind != Kind::Hello {
        return Err(WireError::Unexpected {
            expected: Kind::Hello,
            found: frame.kind,
        });
    }
    let hello: Hello = frame.decode()?;
    if hello.insecure != matches!(auth, Auth::Insecure) {
        reject(
            &mut stream,
            0,
            "one side is unauthenticated (--insecure) and the other is not",
        );
        return Err(WireError::InsecureRefused);
    }
    if !hello.versions.contains(&(VERSION as u32)) {
        reject(&mut stream, 0, "no common protocol version");
        return Err(WireError::Version {
            found: hello.versions.first().copied().unwrap_or(0) as u16,
            ours: VERSION,
        });
    }
    let server_nonce = nonce()?;
    let challenge = Challenge {
        version: VERSION as u32,
        nonce: server_nonce.clone(),
    };
    stream.write_all(&encode_frame(
        &key,
        Kind::Challenge,
        0,
        &challenge.encode_to_vec(),
    ))?;
    let proof: Proof = read_frame(&mut stream, &key, 1).and_then(|f| {
        if f.kind != Kind::Proof {
            return Err(WireError::Unexpected {
                expected: Kind::Proof,
                found: f.kind,
            });
        }
        f.decode()
    })?;
    let expected = derive(&key, b"pclive client proof", &server_nonce, &hello.nonce);
    if !constant_time_eq(&proof.mac, &expected) {
        reject(&mut stream, 1, "authentication failed");
        return Err(WireError::AuthFailed);
    }
    let accept = Proof {
        mac: derive(&key, b"pclive server proof", &hello.nonce, &server_nonce).to_vec(),
    };
    stream.write_all(&encode_frame(
        &key,
        Kind::Accept,
        1,
        &accept.encode_to_vec(),
    ))?;
    Ok(Session {
        stream,
        send_key: derive(&key, b"pclive s2c", &hello.nonce, &server_nonce).to_vec(),
        recv_key: derive(&key, b"pclive c2s", &hello.nonce, &server_nonce).to_vec(),
        send_seq: 0,
        recv_seq: 0,
        credit: INITIAL_CREDIT,
    })
}

/// Makes a migration connection notice a dead peer or a cut link within ~15 s, idle or not:
/// keepalive probes while waiting (e.g. for the commit during a long fill) and a bound on how
/// long sent data may stay unacknowledged. Without this a silent link would keep the source
/// frozen for many minutes.
pub fn harden_tcp(stream: &std::net::TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: setsockopt reads one c_int that lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 2)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 10_000)?;
    stream.set_nodelay(true)
}

/// Reads a pre-shared key file: at least 16 bytes (e.g. `head -c 32 /dev/urandom > key`).
pub fn read_key_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let key =
        std::fs::read(path).map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    if key.len() < 16 {
        return Err(format!(
            "key file {} holds {} bytes; use at least 16 random bytes (head -c 32 /dev/urandom > {})",
            path.display(),
            key.len(),
            path.display()
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn pair(
        client_auth: Auth,
        server_auth: Auth,
    ) -> (
        Result<Session<UnixStream>, WireError>,
        Result<Session<UnixStream>, WireError>,
    ) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || accept(b, &server_auth));
        let client = connect(a, &client_auth);
        (client, server.join().unwrap())
    }

    fn key(byte: u8) -> Auth {
        Auth::Key(vec![byte; 32])
    }

    #[test]
    fn authenticated_session_carries_messages_both_ways() {
        let (client, server) = pair(key(7), key(7));
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let pages = Pages {
            pid: 1,
            round: 2,
            runs: vec![PageRun {
                vaddr: 0x1000,
                data: vec![9; 4096],
                ..Default::default()
            }],
            zero_pages: vec![0x5000],
        };
        client.send(Kind::Pages, &pages).unwrap();
        assert_eq!(server.expect::<Pages>(Kind::Pages).unwrap(), pages);
        server
            .send(
                Kind::Control,
                &Control {
                    code: ControlCode::Committed as i32,
                    message: String::new(),
                },
            )
            .unwrap();
        let control: Control = client.expect(Kind::Control).unwrap();
        assert_eq!(control.code, ControlCode::Committed as i32);
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides() {
        let (client, server) = pair(key(1), key(2));
        assert!(
            matches!(server, Err(WireError::AuthFailed)),
            "{:?}",
            server.err()
        );
        let err = client.err().unwrap();
        assert!(
            matches!(err, WireError::AuthFailed | WireError::Refused(_)),
            "{err}"
        );
    }

    #[test]
    fn an_unauthenticated_peer_needs_explicit_consent() {
        let (client, server) = pair(Auth::Insecure, key(1));
        assert!(client.is_err() && server.is_err());
        let (client, server) = pair(Auth::Insecure, Auth::Insecure);
        assert!(client.is_ok() && server.is_ok());
    }

    #[test]
    fn corrupted_replayed_and_truncated_frames_are_refused() {
        let key = [3u8; 32];
        let frame = encode_frame(&key, Kind::Credit, 5, &Credit { bytes: 1 }.encode_to_vec());
        assert!(read_frame(&mut frame.as_slice(), &key, 5).is_ok());
        let mut flipped = frame.clone();
        flipped[HEADER_LEN] ^= 1;
        assert!(matches!(
            read_frame(&mut flipped.as_slice(), &key, 5),
            Err(WireError::BadMac { .. })
        ));
        assert!(matches!(
            read_frame(&mut frame.as_slice(), &key, 6),
            Err(WireError::Sequence {
                expected: 6,
                found: 5
            })
        ));
        assert!(matches!(
            read_frame(&mut &frame[..frame.len() - 1], &key, 5),
            Err(WireError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &[][..], &key, 5),
            Err(WireError::Closed)
        ));
        let mut big = frame.clone();
        big[16..20].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            read_frame(&mut big.as_slice(), &key, 5),
            Err(WireError::TooLarge(_))
        ));
        let mut other = frame;
        other[4] = 9;
        assert!(read_frame(&mut other.as_slice(), &key, 5)
            .unwrap_err()
            .to_string()
            .contains("same pclive version"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn the_frame_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = read_frame(&mut bytes.as_slice(), &[1u8; 32], 0);
        }

        #[test]
        fn mutated_frames_never_pass_the_mac(
            flip in any::<usize>(),
            value in 1u8..,
        ) {
            let key = [4u8; 32];
            let mut frame = encode_frame(&key, Kind::Pages, 0, &Pages { pid: 1, round: 1, runs: vec![], zero_pages: vec![1, 2, 3] }.encode_to_vec());
            let at = flip % frame.len();
            frame[at] ^= value;
            prop_assert!(read_frame(&mut frame.as_slice(), &key, 0).is_err());
        }
    }
}
