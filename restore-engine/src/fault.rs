//! Fault injection at exact phases of a migration, for the fault-matrix tests.
//!
//! Built with the `failpoints` feature, [`point`] evaluates the `fail` crate's point of that
//! name, configured from the file named by `PCLIVE_FAILPOINTS` (lines `name=actions`, e.g.
//! `source::after-dump=return(error)`; see [`load`]). Actions that return carry what to do:
//! `error` (the default) makes the point fail like an I/O error, `kill` kills this process with
//! SIGKILL right there, `exit` ends it without any cleanup, `wait:FILE` creates `FILE.reached`
//! and holds the migration there until FILE exists (at most two minutes), so that a test can
//! change the container at an exact phase. Without the feature every point is
//! a no-op and this module costs nothing.

use std::io;

/// Fails, kills or stalls here if the point `name` is configured so.
pub fn point(name: &str) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    {
        fail::fail_point!(name, |arg: Option<String>| act(name, arg.as_deref()));
    }
    let _ = name;
    Ok(())
}

#[cfg(feature = "failpoints")]
fn act(name: &str, arg: Option<&str>) -> io::Result<()> {
    log::warn!("fault injected at {name}: {}", arg.unwrap_or("error"));
    match arg {
        Some("kill") => {
            // SAFETY: raising a signal on ourselves has no memory-safety preconditions.
            unsafe { libc::raise(libc::SIGKILL) };
            unreachable!("SIGKILL cannot be caught");
        }
        // SAFETY: _exit ends the process at once, as a crash would.
        Some("exit") => unsafe { libc::_exit(137) },
        Some(wait) if wait.starts_with("wait:") => {
            let file = std::path::Path::new(&wait["wait:".len()..]);
            let reached = format!("{}.reached", file.display());
            std::fs::write(&reached, name)?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !file.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(())
        }
        _ => Err(io::Error::other(format!("fault injected at {name}"))),
    }
}

/// (Re)reads the fault configuration (`PCLIVE_FAILPOINTS`); a no-op without the feature.
pub fn load() {
    #[cfg(feature = "failpoints")]
    {
        let Ok(path) = std::env::var("PCLIVE_FAILPOINTS") else {
            return;
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for (name, _) in fail::list() {
            fail::remove(name);
        }
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some((name, actions)) = line.split_once('=') {
                if let Err(e) = fail::cfg(name.trim(), actions.trim()) {
                    log::warn!("{path}: {line}: {e}");
                }
            }
        }
    }
}
