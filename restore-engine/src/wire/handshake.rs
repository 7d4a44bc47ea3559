//! The handshake: both peers prove they hold the pre-shared key (challenge–response on fresh
//! nonces) and derive one key per direction; or, with explicit consent on both ends, an
//! unauthenticated session.

use std::io::{self, Read, Write};

use prost::Message;

use super::{
    constant_time_eq, derive, encode_frame, read_frame, Challenge, Hello, Intent, Kind, Proof,
    Purpose, Reject, Session, WireError, INITIAL_CREDIT, VERSION,
};

const NONCE_LEN: usize = 32;
const INSECURE_KEY: &[u8] = b"pclive unauthenticated session: integrity only";

/// Authentication settings of one end.
#[derive(Clone)]
pub enum Auth {
    /// A pre-shared key (at least 16 bytes).
    Key(Vec<u8>),
    /// No authentication: only when the user explicitly asked for it on both ends.
    Insecure,
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

/// The connecting side (the migration source), announcing what it wants.
pub fn connect<S: Read + Write>(
    mut stream: S,
    auth: &Auth,
    intent: &Intent,
) -> Result<Session<S>, WireError> {
    let key = handshake_key(auth).to_vec();
    let client_nonce = nonce()?;
    let hello = Hello {
        versions: vec![VERSION as u32],
        nonce: client_nonce.clone(),
        insecure: matches!(auth, Auth::Insecure),
        migration_id: intent.migration_id.clone(),
        purpose: intent.purpose.unwrap_or(Purpose::Migrate) as i32,
        container: intent.container.clone(),
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
        intent: intent.clone(),
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
        intent: Intent {
            migration_id: hello.migration_id.clone(),
            purpose: Purpose::try_from(hello.purpose).ok(),
            container: hello.container.clone(),
        },
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
