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

//!
//! - [`messages`]: the protobuf messages each frame kind carries,
//! - [`handshake`]: authentication and the per-direction keys ([`connect`], [`accept`]),
//! - [`pages`]: page runs as they travel (raw or LZ4) and their checks,
//! - this file: frames and the [`Session`] that sends and receives them, with flow control.

mod handshake;
mod messages;
pub mod pages;

use std::io::{self, Read, Write};

use hmac::{Hmac, KeyInit, Mac};
use prost::Message;
use sha2::Sha256;

pub use handshake::{accept, connect, harden_tcp, read_key_file, Auth};
pub use messages::*;

pub const MAGIC: u32 = 0x564C_4350; // "PCLV"
/// 2: page runs may be LZ4-compressed (`PageRun::lz4`). 3: migration ids, outcome queries,
/// `Lost` and `Ack` (the migration transaction). 4: the container's filesystem travels
/// (`LayerEntry`, `LayerBlock`, `RoundEnd::layer`).
pub const VERSION: u16 = 4;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 20;
pub const MAC_LEN: usize = 32;
/// Largest payload accepted: a page batch of 8 MiB plus framing. Anything larger is refused
/// before it is read, so a hostile length cannot exhaust memory.
pub const MAX_PAYLOAD: u32 = 9 << 20;
/// Payload bytes a sender may have in flight before the receiver grants more: bounds what a
/// slow link makes either side buffer.
pub const INITIAL_CREDIT: u64 = 64 << 20;

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
    #[error("page run at {vaddr:#x} of task {pid} is corrupt: {problem}")]
    BadRun {
        pid: u32,
        vaddr: u64,
        problem: String,
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
    Outcome = 21,
    LayerEntry = 22,
    LayerBlock = 23,
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
            21 => Kind::Outcome,
            22 => Kind::LayerEntry,
            23 => Kind::LayerBlock,
            _ => return None,
        })
    }
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

/// Streams whose reads can time out (what the migration's connections run on).
pub trait Timeouts {
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()>;
}

impl Timeouts for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
}

impl Timeouts for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
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
    /// What the connecting side said it wants (on both ends).
    intent: Intent,
}

impl<S: Read + Write> Session<S> {
    /// The migration and purpose the connecting side announced.
    pub fn intent(&self) -> &Intent {
        &self.intent
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
