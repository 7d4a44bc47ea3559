//! The handshake: both peers prove they hold the pre-shared key and derive one key per
//! direction; or, with explicit consent on both ends, an unauthenticated session.
//!
//! ```text
//! connecting side (source)                listening side (destination)
//!   Hello {versions, nonce, X25519 pub}  ->                              in the clear
//!                                        <-  Challenge {version, nonce, X25519 pub}  in the clear
//!   keys = HKDF-SHA256(salt = SHA-256(Hello frame | Challenge frame),
//!                      ikm = pre-shared key | X25519 shared secret)
//!   Proof {migration, purpose, container} ->                         sealed (seq 1, c2s key)
//!                                        <-  Accept {version, terms}  sealed (seq 1, s2c key)
//! ```
//!
//! A Proof that opens proves the connecting side holds the key; an Accept that opens proves the
//! listening side does. The listening side says nothing sealed or MAC'd with the key before the
//! Proof has opened (a refusal before that point is a clear `Reject` that reveals nothing about
//! the key), so a client without the key learns nothing to guess it from offline. The ephemeral
//! X25519 exchange gives forward secrecy (a key file stolen later does not decrypt a recorded
//! migration) and keeps a passive observer from testing guesses against the Proof. The session's
//! frames continue at sequence number 2 under the same keys.

use std::io::{self, Read, Write};

use prost::Message;
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hkdf};

use super::{
    encode_frame, read_sealed, Accept, Challenge, FrameKey, Hello, Intent, Kind, Proof, Purpose,
    Reject, Session, Terms, WireError, VERSION,
};

const NONCE_LEN: usize = 32;
/// The session's first sequence number in each direction: 0 and 1 belong to the handshake (and
/// 1 was already sealed under the session's keys, so it must not be reused as a nonce).
pub(super) const FIRST_SESSION_SEQ: u64 = 2;

/// Authentication settings of one end.
#[derive(Clone)]
pub enum Auth {
    /// A pre-shared key (at least 32 bytes).
    Key(Vec<u8>),
    /// No authentication, no encryption: only when the user explicitly asked for it on both ends.
    Insecure,
}

fn random(rng: &SystemRandom) -> Result<Vec<u8>, WireError> {
    let mut bytes = vec![0u8; NONCE_LEN];
    rng.fill(&mut bytes)
        .map_err(|_| io::Error::other("the system's random number generator failed"))?;
    Ok(bytes)
}

/// An ephemeral X25519 key pair, for a keyed session only.
fn ephemeral(
    rng: &SystemRandom,
    auth: &Auth,
) -> Result<Option<(EphemeralPrivateKey, Vec<u8>)>, WireError> {
    if matches!(auth, Auth::Insecure) {
        return Ok(None);
    }
    let failed = |_| io::Error::other("cannot generate an X25519 key");
    let private = EphemeralPrivateKey::generate(&X25519, rng).map_err(failed)?;
    let public = private.compute_public_key().map_err(failed)?;
    Ok(Some((private, public.as_ref().to_vec())))
}

/// The connecting-to-listening and listening-to-connecting keys.
struct Keys {
    c2s: FrameKey,
    s2c: FrameKey,
}

fn session_keys(
    auth: &Auth,
    private: Option<(EphemeralPrivateKey, Vec<u8>)>,
    peer_public: &[u8],
    transcript: &[u8],
) -> Result<Keys, WireError> {
    let (Auth::Key(psk), Some((private, _))) = (auth, private) else {
        return Ok(Keys {
            c2s: FrameKey::Plain,
            s2c: FrameKey::Plain,
        });
    };
    let salt = hkdf::Salt::new(
        hkdf::HKDF_SHA256,
        digest::digest(&digest::SHA256, transcript).as_ref(),
    );
    agreement::agree_ephemeral(
        private,
        &UnparsedPublicKey::new(&X25519, peer_public),
        |shared| {
            let mut ikm = Vec::with_capacity(psk.len() + shared.len());
            ikm.extend_from_slice(psk);
            ikm.extend_from_slice(shared);
            let prk = salt.extract(&ikm);
            ikm.fill(0);
            Keys {
                c2s: FrameKey::derive(&prk, b"pclive v5 connecting to listening"),
                s2c: FrameKey::derive(&prk, b"pclive v5 listening to connecting"),
            }
        },
    )
    // Not a valid X25519 public key: not a pclive peer holding the key.
    .map_err(|_| WireError::AuthFailed)
}

fn refuse_in_clear(stream: &mut impl Write, seq: u64, reason: &str) {
    // Best effort: the peer may be gone. Nothing in it depends on the key.
    let _ = stream.write_all(&encode_frame(
        &FrameKey::Plain,
        Kind::Reject,
        seq,
        &Reject {
            reason: reason.into(),
        }
        .encode_to_vec(),
    ));
}

/// The connecting side (the migration source), announcing what it wants.
pub fn connect<S: Read + Write>(
    mut stream: S,
    auth: &Auth,
    intent: &Intent,
) -> Result<Session<S>, WireError> {
    let rng = SystemRandom::new();
    let ephemeral = ephemeral(&rng, auth)?;
    let hello = Hello {
        versions: vec![VERSION as u32],
        nonce: random(&rng)?,
        insecure: matches!(auth, Auth::Insecure),
        public_key: ephemeral
            .as_ref()
            .map(|(_, public)| public.clone())
            .unwrap_or_default(),
    };
    let mut transcript = encode_frame(&FrameKey::Plain, Kind::Hello, 0, &hello.encode_to_vec());
    stream.write_all(&transcript)?;
    let sealed = read_sealed(&mut stream)?;
    sealed.append_to(&mut transcript);
    let frame = sealed.open(&FrameKey::Plain, 0)?;
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
    if challenge.version != VERSION as u32 {
        return Err(WireError::Version {
            found: challenge.version as u16,
            ours: VERSION,
        });
    }
    let keys = session_keys(auth, ephemeral, &challenge.public_key, &transcript)?;
    let proof = Proof {
        migration_id: intent.migration_id.clone(),
        purpose: intent.purpose.unwrap_or(Purpose::Migrate) as i32,
        container: intent.container.clone(),
        moves_address: intent.moves_address,
        streams: intent.streams,
    };
    stream.write_all(&encode_frame(
        &keys.c2s,
        Kind::Proof,
        1,
        &proof.encode_to_vec(),
    ))?;
    let sealed = read_sealed(&mut stream)?;
    if sealed.claimed_kind() == Some(Kind::Reject) {
        // The listening side refuses in the clear: it could not open the Proof.
        let frame = sealed.open(&FrameKey::Plain, 1)?;
        return Err(WireError::Refused(frame.decode::<Reject>()?.reason));
    }
    let frame = match sealed.open(&keys.s2c, 1) {
        Ok(frame) => frame,
        // The listening side cannot seal with our key: it does not hold it.
        Err(WireError::BadMac { .. }) => return Err(WireError::AuthFailed),
        Err(e) => return Err(e),
    };
    if frame.kind != Kind::Accept {
        return Err(WireError::Unexpected {
            expected: Kind::Accept,
            found: frame.kind,
        });
    }
    let accept: Accept = frame.decode()?;
    let terms = Terms {
        closes_connections: accept.closes_connections,
    };
    Ok(Session::established(
        stream,
        keys.c2s,
        keys.s2c,
        intent.clone(),
        terms,
    ))
}

/// The listening side (the migration destination), on default [`Terms`].
pub fn accept<S: Read + Write>(stream: S, auth: &Auth) -> Result<Session<S>, WireError> {
    accept_on(stream, auth, Terms::default())
}

/// The listening side, telling the connecting side `terms` once it has proven the key.
pub fn accept_on<S: Read + Write>(
    mut stream: S,
    auth: &Auth,
    terms: Terms,
) -> Result<Session<S>, WireError> {
    let sealed = read_sealed(&mut stream)?;
    let mut transcript = Vec::new();
    sealed.append_to(&mut transcript);
    let frame = sealed.open(&FrameKey::Plain, 0)?;
    if frame.kind != Kind::Hello {
        return Err(WireError::Unexpected {
            expected: Kind::Hello,
            found: frame.kind,
        });
    }
    let hello: Hello = frame.decode()?;
    if hello.insecure != matches!(auth, Auth::Insecure) {
        refuse_in_clear(
            &mut stream,
            0,
            "one side is unauthenticated (--insecure) and the other is not",
        );
        return Err(WireError::InsecureRefused);
    }
    if !hello.versions.contains(&(VERSION as u32)) {
        refuse_in_clear(&mut stream, 0, "no common protocol version");
        return Err(WireError::Version {
            found: hello.versions.first().copied().unwrap_or(0) as u16,
            ours: VERSION,
        });
    }
    let rng = SystemRandom::new();
    let ephemeral = ephemeral(&rng, auth)?;
    let challenge = Challenge {
        version: VERSION as u32,
        nonce: random(&rng)?,
        public_key: ephemeral
            .as_ref()
            .map(|(_, public)| public.clone())
            .unwrap_or_default(),
    };
    let challenge = encode_frame(
        &FrameKey::Plain,
        Kind::Challenge,
        0,
        &challenge.encode_to_vec(),
    );
    stream.write_all(&challenge)?;
    transcript.extend_from_slice(&challenge);
    const DIFFERENT_KEYS: &str = "authentication failed: the peers do not share the same key \
                                  (check --key-file on both hosts)";
    let keys = match session_keys(auth, ephemeral, &hello.public_key, &transcript) {
        Ok(keys) => keys,
        Err(e) => {
            refuse_in_clear(&mut stream, 1, DIFFERENT_KEYS);
            return Err(e);
        }
    };
    let frame = match read_sealed(&mut stream).and_then(|sealed| sealed.open(&keys.c2s, 1)) {
        Ok(frame) => frame,
        Err(WireError::BadMac { .. }) => {
            refuse_in_clear(&mut stream, 1, DIFFERENT_KEYS);
            return Err(WireError::AuthFailed);
        }
        Err(e) => return Err(e),
    };
    if frame.kind != Kind::Proof {
        return Err(WireError::Unexpected {
            expected: Kind::Proof,
            found: frame.kind,
        });
    }
    let proof: Proof = frame.decode()?;
    stream.write_all(&encode_frame(
        &keys.s2c,
        Kind::Accept,
        1,
        &Accept {
            version: VERSION as u32,
            closes_connections: terms.closes_connections,
        }
        .encode_to_vec(),
    ))?;
    let intent = Intent {
        migration_id: proof.migration_id,
        purpose: Purpose::try_from(proof.purpose).ok(),
        container: proof.container,
        moves_address: proof.moves_address,
        streams: proof.streams,
    };
    Ok(Session::established(
        stream, keys.s2c, keys.c2s, intent, terms,
    ))
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

/// The shortest pre-shared key accepted: 256 bits.
pub const MIN_KEY_BYTES: usize = 32;

/// The longest: a key file is read whole, and `/dev/zero` must not grow memory without bound.
pub const MAX_KEY_BYTES: usize = 4096;

/// Reads a pre-shared key file. The key is a root credential on every receiving host, so the
/// file must be a regular file owned by root, readable by nobody else (0600 or 0400), and hold
/// at least 32 bytes; anything else is refused with the command that makes a proper one.
pub fn read_key_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let how = format!(
        "make one with: (umask 077; head -c 32 /dev/urandom > {p}) && chown root: {p}",
        p = path.display()
    );
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot read key file {}: {e} ({how})", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    let problem = if !meta.file_type().is_file() {
        Some("is not a regular file".to_string())
    } else if meta.uid() != 0 {
        Some(format!("is owned by uid {}, not root", meta.uid()))
    } else if meta.mode() & 0o077 != 0 {
        Some(format!(
            "has mode {:04o}: others may read it (chmod 600)",
            meta.mode() & 0o7777
        ))
    } else if (meta.len() as usize) < MIN_KEY_BYTES {
        Some(format!(
            "holds {} bytes; a key needs at least {MIN_KEY_BYTES} random bytes",
            meta.len()
        ))
    } else if meta.len() as usize > MAX_KEY_BYTES {
        Some(format!(
            "holds {} bytes; a key file holds at most {MAX_KEY_BYTES}",
            meta.len()
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(format!("key file {} {problem}; {how}", path.display()));
    }
    let mut key = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_KEY_BYTES as u64 + 1)
        .read_to_end(&mut key)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    if key.len() < MIN_KEY_BYTES || key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "key file {} changed while it was read; {how}",
            path.display()
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::super::*;
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
        let client = connect(a, &client_auth, &Intent::default());
        (client, server.join().unwrap())
    }

    fn key(byte: u8) -> Auth {
        Auth::Key(vec![byte; 32])
    }

    #[test]
    fn the_destinations_terms_reach_the_source() {
        let (client, server) = pair(key(7), key(7));
        assert_eq!(client.unwrap().terms(), Terms::default());
        assert_eq!(server.unwrap().terms(), Terms::default());
        let closing = Terms {
            closes_connections: true,
        };
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || accept_on(b, &key(7), closing));
        let client = connect(a, &key(7), &Intent::default()).unwrap();
        assert_eq!(client.terms(), closing);
        assert_eq!(server.join().unwrap().unwrap().terms(), closing);
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
                lz4_len: 0,
                len: 4096,
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
    fn the_listener_says_nothing_keyed_before_the_proof_opens() {
        use prost::Message;
        let (mut a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || accept(b, &key(1)));
        // A client that does not hold the key but follows the protocol.
        let rng = ring::rand::SystemRandom::new();
        let (_, public) = super::ephemeral(&rng, &key(9)).unwrap().unwrap();
        let hello = Hello {
            versions: vec![VERSION as u32],
            nonce: vec![1; 32],
            insecure: false,
            public_key: public,
        };
        std::io::Write::write_all(
            &mut a,
            &encode_frame(&FrameKey::Plain, Kind::Hello, 0, &hello.encode_to_vec()),
        )
        .unwrap();
        let challenge = read_frame(&mut a, &FrameKey::Plain, 0).unwrap();
        assert_eq!(challenge.kind, Kind::Challenge);
        let guess = FrameKey::aes_256_gcm(&[9; 32]);
        std::io::Write::write_all(
            &mut a,
            &encode_frame(&guess, Kind::Proof, 1, &Proof::default().encode_to_vec()),
        )
        .unwrap();
        // The answer opens with no key at all: it carries nothing to test a guess against.
        let refusal = read_frame(&mut a, &FrameKey::Plain, 1).unwrap();
        assert_eq!(refusal.kind, Kind::Reject);
        let reason = refusal.decode::<Reject>().unwrap().reason;
        assert!(reason.contains("same key"), "{reason}");
        assert!(matches!(server.join().unwrap(), Err(WireError::AuthFailed)));
    }

    #[test]
    fn sessions_are_encrypted_unless_both_ends_said_insecure() {
        let (client, server) = pair(key(7), key(7));
        assert_eq!(client.unwrap().protection(), "AES-256-GCM");
        assert_eq!(server.unwrap().protection(), "AES-256-GCM");
        let (client, _) = pair(Auth::Insecure, Auth::Insecure);
        assert!(client.unwrap().protection().contains("insecure"));
    }

    #[test]
    fn an_unauthenticated_peer_needs_explicit_consent() {
        let (client, server) = pair(Auth::Insecure, key(1));
        assert!(client.is_err() && server.is_err());
        let (client, server) = pair(Auth::Insecure, Auth::Insecure);
        assert!(client.is_ok() && server.is_ok());
    }

    #[test]
    fn key_files_must_be_private_regular_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: usize, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![7u8; bytes]).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        assert_eq!(read_key_file(&write("good", 32, 0o600)).unwrap().len(), 32);
        assert!(read_key_file(&write("ro", 64, 0o400)).is_ok());
        let short = read_key_file(&write("short", 16, 0o600)).unwrap_err();
        assert!(
            short.contains("at least 32") && short.contains("head -c 32"),
            "{short}"
        );
        let open = read_key_file(&write("open", 32, 0o644)).unwrap_err();
        assert!(open.contains("mode 0644"), "{open}");
        let huge = read_key_file(&write("huge", 8192, 0o600)).unwrap_err();
        assert!(huge.contains("at most"), "{huge}");
        let device = read_key_file(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(device.contains("not a regular file"), "{device}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("good"), &link).unwrap();
        assert!(read_key_file(&link).is_err(), "a symlink is not followed");
    }
}
