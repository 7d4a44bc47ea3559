//! The migration protocol: versioned, encrypted, authenticated frames.
//!
//! Every frame is
//!
//! ```text
//! magic u32 "PCLV" | version u16 | kind u16 | seq u64 | len u32 | payload (len bytes) | tag [16]
//! ```
//!
//! (little-endian). The payload is a protobuf message (prost) named by `kind` (a page frame puts
//! its pages' bytes before the message: [`pages`]), encrypted with
//! AES-256-GCM under its direction's key; the header is authenticated with it and the sequence
//! number is the nonce ([`seal`]). The handshake ([`handshake`]) authenticates both peers with a
//! pre-shared key and an ephemeral X25519 exchange and derives the two keys; every later frame's
//! sequence number must increase by one, so a corrupted, forged, replayed, reordered or
//! truncated stream is refused, and what the container's memory and files hold is not readable
//! on the link. Without a key both sides must explicitly agree to an unauthenticated session
//! (`insecure`): its frames travel in the clear with a checksum that detects corruption only.
//!
//! - [`messages`]: the protobuf messages each frame kind carries,
//! - [`handshake`]: authentication and the per-direction keys ([`connect`], [`accept`]),
//! - [`seal`]: what protects a frame,
//! - [`pages`]: page frames as they travel (runs raw or LZ4) and their checks,
//! - this file: frames and the [`Session`] that sends and receives them, with flow control.

mod handshake;
mod messages;
pub mod pages;
mod seal;

use std::io::{self, Read, Write};

use prost::Message;

pub use handshake::{accept, accept_on, connect, harden_tcp, read_key_file, Auth};
pub use messages::*;
pub use seal::{FrameKey, TAG_LEN};

pub const MAGIC: u32 = 0x564C_4350; // "PCLV"
/// 2: page runs may be LZ4-compressed (`PageRun::lz4`). 3: migration ids, outcome queries,
/// `Lost` and `Ack` (the migration transaction). 4: the container's filesystem travels
/// (`LayerEntry`, `LayerBlock`, `RoundEnd::layer`). 5: frames are encrypted (AES-256-GCM), the
/// handshake adds X25519 and says nothing keyed before the connecting side has proven the key.
/// 6: the source says whether the container's address moves with it (`Proof::moves_address`),
/// which the destination must have been prepared for. 7: a page frame carries its runs' bytes
/// ahead of its descriptor ([`pages`]), so neither side copies them into or out of a message.
/// 8: the destination says whether it restores connections closed (`Accept::closes_connections`,
/// [`Terms`]), so the source's final dump can leave their state out. 9: page frames may travel
/// on connections of their own (`Purpose::Stream`, `Proof::streams`, `RoundEnd::stream_frames`).
pub const VERSION: u16 = 9;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 20;
/// Largest payload accepted: a page batch of 8 MiB plus framing. Anything larger is refused
/// before it is read, so a hostile length cannot exhaust memory.
pub const MAX_PAYLOAD: u32 = 9 << 20;
/// Payload bytes a sender may have in flight before the receiver grants more: bounds what a
/// slow link makes either side buffer.
pub const INITIAL_CREDIT: u64 = 64 << 20;

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
        "frame {seq} failed its integrity check: the stream was corrupted or tampered with on the way"
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
    #[error("page frame is corrupt: {0}")]
    BadPageFrame(String),
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn write_header(header: &mut [u8], kind: Kind, seq: u64, len: usize) {
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    header[8..16].copy_from_slice(&seq.to_le_bytes());
    header[16..20].copy_from_slice(&(len as u32).to_le_bytes());
}

/// Seals the payload that follows the header room in `buf` (the first [`HEADER_LEN`] bytes) in
/// place and appends the tag: the frame is then `buf`, ready to write. One pass over the
/// payload, no copy.
fn seal_frame(buf: &mut Vec<u8>, key: &FrameKey, kind: Kind, seq: u64) {
    let len = buf.len() - HEADER_LEN;
    debug_assert!(
        len <= MAX_PAYLOAD as usize,
        "a {len}-byte frame would be refused"
    );
    let (header, payload) = buf.split_at_mut(HEADER_LEN);
    write_header(header, kind, seq, len);
    let tag = key.seal(seq, header, payload);
    buf.extend_from_slice(&tag);
}

/// Encodes one frame.
pub fn encode_frame(key: &FrameKey, kind: Kind, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
    buf.resize(HEADER_LEN, 0);
    buf.extend_from_slice(payload);
    seal_frame(&mut buf, key, kind, seq);
    buf
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

/// A frame read off the stream whose header is well formed but whose payload is not yet checked
/// (nor decrypted).
pub struct Sealed {
    header: [u8; HEADER_LEN],
    /// Payload and tag.
    body: Vec<u8>,
}

impl Sealed {
    /// The frame's bytes as they travelled (for the handshake's transcript).
    fn append_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&self.body);
    }

    fn raw_kind(&self) -> u16 {
        u16::from_le_bytes(self.header[6..8].try_into().expect("2 bytes"))
    }

    fn seq(&self) -> u64 {
        u64::from_le_bytes(self.header[8..16].try_into().expect("8 bytes"))
    }

    /// What the header says the frame is (unauthenticated until [`Self::open`]).
    pub fn claimed_kind(&self) -> Option<Kind> {
        Kind::from_u16(self.raw_kind())
    }

    /// Checks the tag, decrypts, then checks the sequence number and the kind.
    pub fn open(mut self, key: &FrameKey, expected_seq: u64) -> Result<Frame, WireError> {
        let seq = self.seq();
        let len = key
            .open(seq, &self.header, &mut self.body)
            .ok_or(WireError::BadMac { seq })?;
        if seq != expected_seq {
            return Err(WireError::Sequence {
                expected: expected_seq,
                found: seq,
            });
        }
        let raw_kind = self.raw_kind();
        let kind = Kind::from_u16(raw_kind).ok_or(WireError::UnknownKind(raw_kind))?;
        self.body.truncate(len);
        Ok(Frame {
            kind,
            seq,
            payload: self.body,
        })
    }
}

/// Reads one frame's bytes and checks its header: magic, version, size limit.
pub fn read_sealed(reader: &mut impl Read) -> Result<Sealed, WireError> {
    read_sealed_into(reader, Vec::new())
}

/// [`read_sealed`] into `body`, a buffer a previous frame left (its contents are overwritten,
/// its allocation reused: a page frame is 8 MiB).
fn read_sealed_into(reader: &mut impl Read, mut body: Vec<u8>) -> Result<Sealed, WireError> {
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
    let len = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    // Only bytes beyond what the buffer held before are zeroed; all are read over.
    body.resize(len as usize + TAG_LEN, 0);
    read_full(reader, &mut body, false)?;
    Ok(Sealed { header, body })
}

/// Reads and checks one frame: magic, version, size limit, tag (and decryption), sequence number.
pub fn read_frame(
    reader: &mut impl Read,
    key: &FrameKey,
    expected_seq: u64,
) -> Result<Frame, WireError> {
    read_sealed(reader)?.open(key, expected_seq)
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
    send_key: FrameKey,
    recv_key: FrameKey,
    /// Where frames are encoded and sealed, reused (a page frame is up to 9 MiB).
    send_buf: Vec<u8>,
    /// Where the next frame is read, given back by [`Self::recycle`].
    recv_buf: Vec<u8>,
    send_seq: u64,
    recv_seq: u64,
    /// Flow-control credit the peer granted and we have not used yet.
    credit: u64,
    /// What the connecting side said it wants (on both ends).
    intent: Intent,
    /// What the listening side said it does (on both ends).
    terms: Terms,
}

impl<S: Read + Write> Session<S> {
    fn established(
        stream: S,
        send_key: FrameKey,
        recv_key: FrameKey,
        intent: Intent,
        terms: Terms,
    ) -> Self {
        Session {
            stream,
            send_key,
            recv_key,
            send_buf: Vec::new(),
            recv_buf: Vec::new(),
            send_seq: handshake::FIRST_SESSION_SEQ,
            recv_seq: handshake::FIRST_SESSION_SEQ,
            credit: INITIAL_CREDIT,
            intent,
            terms,
        }
    }

    /// What the listening side said about how it restores.
    pub fn terms(&self) -> Terms {
        self.terms
    }

    /// The migration and purpose the connecting side announced.
    pub fn intent(&self) -> &Intent {
        &self.intent
    }

    /// What protects this session's frames (for reports).
    pub fn protection(&self) -> &'static str {
        self.send_key.name()
    }

    pub fn send<M: Message>(&mut self, kind: Kind, message: &M) -> Result<(), WireError> {
        let mut buf = std::mem::take(&mut self.send_buf);
        buf.clear();
        buf.reserve(HEADER_LEN + message.encoded_len() + TAG_LEN);
        buf.resize(HEADER_LEN, 0);
        message
            .encode(&mut buf)
            .expect("a Vec grows to hold any message");
        seal_frame(&mut buf, &self.send_key, kind, self.send_seq);
        let written = self.stream.write_all(&buf);
        self.send_buf = buf;
        written?;
        self.send_seq += 1;
        Ok(())
    }

    /// Sends a page frame, sealed in the buffer it was built in, and empties it.
    pub fn send_pages(&mut self, frame: &mut pages::PageFrame) -> Result<(), WireError> {
        let buf = frame.finish();
        seal_frame(buf, &self.send_key, Kind::Pages, self.send_seq);
        let written = self.stream.write_all(buf);
        frame.clear();
        written?;
        self.send_seq += 1;
        Ok(())
    }

    /// Gives a received frame's buffer back, to read the next frame into.
    pub fn recycle(&mut self, payload: Vec<u8>) {
        if payload.capacity() > self.recv_buf.capacity() {
            self.recv_buf = payload;
        }
    }

    fn receive_any(&mut self) -> Result<Frame, WireError> {
        let buf = std::mem::take(&mut self.recv_buf);
        let frame = read_sealed_into(&mut self.stream, buf)?.open(&self.recv_key, self.recv_seq)?;
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

    fn key(byte: u8) -> FrameKey {
        FrameKey::aes_256_gcm(&[byte; 32])
    }

    #[test]
    fn corrupted_replayed_reordered_and_truncated_frames_are_refused() {
        for key in [key(3), FrameKey::Plain] {
            let frame = encode_frame(&key, Kind::Credit, 5, &Credit { bytes: 1 }.encode_to_vec());
            assert!(read_frame(&mut frame.as_slice(), &key, 5).is_ok());
            for at in [HEADER_LEN, 6, 10, frame.len() - 1] {
                let mut flipped = frame.clone();
                flipped[at] ^= 1;
                assert!(
                    matches!(
                        read_frame(&mut flipped.as_slice(), &key, 5),
                        Err(WireError::BadMac { .. })
                    ),
                    "{key:?}: byte {at} flipped"
                );
            }
            // Replayed (an old frame again) or reordered (a later one first).
            assert!(matches!(
                read_frame(&mut frame.as_slice(), &key, 6),
                Err(WireError::Sequence {
                    expected: 6,
                    found: 5
                })
            ));
            assert!(matches!(
                read_frame(&mut frame.as_slice(), &key, 4),
                Err(WireError::Sequence {
                    expected: 4,
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
            other[4] = (VERSION + 1) as u8;
            assert!(read_frame(&mut other.as_slice(), &key, 5)
                .unwrap_err()
                .to_string()
                .contains("same pclive version"));
        }
    }

    #[test]
    fn a_frame_sealed_with_another_key_or_the_other_direction_is_refused() {
        let frame = encode_frame(
            &key(1),
            Kind::Credit,
            0,
            &Credit { bytes: 1 }.encode_to_vec(),
        );
        assert!(matches!(
            read_frame(&mut frame.as_slice(), &key(2), 0),
            Err(WireError::BadMac { seq: 0 })
        ));
        assert!(matches!(
            read_frame(&mut frame.as_slice(), &FrameKey::Plain, 0),
            Err(WireError::BadMac { seq: 0 })
        ));
        let plain = encode_frame(&FrameKey::Plain, Kind::Credit, 0, &[1, 2]);
        assert!(read_frame(&mut plain.as_slice(), &key(1), 0).is_err());
    }

    #[test]
    fn encrypted_frames_do_not_show_their_payload() {
        let marker = b"a secret the container holds in memory";
        let payload = marker.repeat(100);
        let sealed = encode_frame(&key(9), Kind::Pages, 0, &payload);
        assert!(!sealed.windows(marker.len()).any(|w| w == marker));
        let plain = encode_frame(&FrameKey::Plain, Kind::Pages, 0, &payload);
        assert!(plain.windows(marker.len()).any(|w| w == marker));
        let frame = read_frame(&mut sealed.as_slice(), &key(9), 0).unwrap();
        assert_eq!(frame.payload, payload);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn the_frame_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = read_frame(&mut bytes.as_slice(), &key(1), 0);
            let _ = read_frame(&mut bytes.as_slice(), &FrameKey::Plain, 0);
        }

        #[test]
        fn mutated_frames_never_pass_the_tag(
            flip in any::<usize>(),
            value in 1u8..,
            plain in any::<bool>(),
        ) {
            let key = if plain { FrameKey::Plain } else { key(4) };
            let mut frame = encode_frame(&key, Kind::Pages, 0, &Pages { pid: 1, round: 1, runs: vec![], zero_pages: vec![1, 2, 3] }.encode_to_vec());
            let at = flip % frame.len();
            frame[at] ^= value;
            prop_assert!(read_frame(&mut frame.as_slice(), &key, 0).is_err());
        }

        #[test]
        fn truncated_frames_are_refused(cut in 1usize..60) {
            let frame = encode_frame(&key(4), Kind::Credit, 0, &Credit { bytes: 77 }.encode_to_vec());
            let cut = cut.min(frame.len());
            prop_assert!(read_frame(&mut &frame[..frame.len() - cut], &key(4), 0).is_err());
        }
    }
}
