//! How a frame is protected: AES-256-GCM under its direction's key, with the frame's sequence
//! number as the nonce and its header as associated data; or, in a session both ends agreed to
//! run unauthenticated (`--insecure`), in the clear with an xxh3 checksum that catches
//! corruption and nothing else.
//!
//! ring (BoringSSL's AES-NI/PCLMUL code) does the cipher: several GB/s per core, well above what
//! a migration link carries, where the HMAC-SHA256 of protocol version 4 cost more CPU than the
//! copy itself.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use xxhash_rust::xxh3::Xxh3;

/// Bytes after a frame's payload: the GCM tag (or the checksum of a plaintext frame).
pub const TAG_LEN: usize = 16;

/// The protection of one direction of a session.
pub enum FrameKey {
    /// Authenticated encryption under a key only this direction of this session uses.
    Aead(Box<LessSafeKey>),
    /// No secrecy, no authenticity: the handshake's clear frames and `--insecure` sessions.
    Plain,
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn nonce(seq: u64) -> Nonce {
    // Each direction has its own key and its sequence numbers never repeat within a session,
    // so (key, nonce) pairs are never reused.
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(bytes)
}

fn checksum(header: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
    let mut hasher = Xxh3::new();
    hasher.update(header);
    hasher.update(payload);
    hasher.digest128().to_le_bytes()
}

impl FrameKey {
    /// An AES-256-GCM key from 32 bytes of key material.
    pub fn aes_256_gcm(key: &[u8; 32]) -> Self {
        FrameKey::Aead(Box::new(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, key).expect("32 bytes is an AES-256 key"),
        )))
    }

    /// A key for one direction of a session, expanded from the handshake's secret.
    pub(super) fn derive(prk: &ring::hkdf::Prk, label: &[u8]) -> Self {
        let info = [label];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .expect("an AES-256 key is far below HKDF's output limit");
        FrameKey::Aead(Box::new(LessSafeKey::new(UnboundKey::from(okm))))
    }

    /// What protects the frames, for reports and logs.
    pub fn name(&self) -> &'static str {
        match self {
            FrameKey::Aead(_) => "AES-256-GCM",
            FrameKey::Plain => "none (unauthenticated, --insecure)",
        }
    }

    pub fn encrypts(&self) -> bool {
        matches!(self, FrameKey::Aead(_))
    }

    /// Encrypts `payload` in place, authenticating `header` with it; returns the tag.
    pub fn seal(&self, seq: u64, header: &[u8], payload: &mut [u8]) -> [u8; TAG_LEN] {
        match self {
            FrameKey::Aead(key) => {
                let tag = key
                    .seal_in_place_separate_tag(nonce(seq), Aad::from(header), payload)
                    .expect("a frame is far below GCM's length limit");
                tag.as_ref().try_into().expect("GCM tags are 16 bytes")
            }
            FrameKey::Plain => checksum(header, payload),
        }
    }

    /// Checks and decrypts `body` (payload then tag) in place; returns the payload's length, or
    /// `None` when the frame was not sealed with this key, this sequence number and this header.
    pub fn open(&self, seq: u64, header: &[u8], body: &mut [u8]) -> Option<usize> {
        let len = body.len().checked_sub(TAG_LEN)?;
        match self {
            FrameKey::Aead(key) => key
                .open_in_place(nonce(seq), Aad::from(header), body)
                .ok()
                .map(|plain| plain.len()),
            FrameKey::Plain => {
                let (payload, tag) = body.split_at(len);
                super::constant_time_eq(tag, &checksum(header, payload)).then_some(len)
            }
        }
    }
}
