//! SIGTERM and SIGINT end a run cleanly (the summary and state file are still written).

use std::sync::atomic::{AtomicBool, Ordering};

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the handlers and returns the flag they set.
pub fn install_stop_handlers() -> &'static AtomicBool {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `sigaction` gets a zeroed (valid: empty mask, no flags) struct whose handler is
        // an `extern "C"` function that only performs an atomic store, which is
        // async-signal-safe; no Rust state is touched from the handler.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = request_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // SA_RESTART: blocking reads and sleeps in the worker threads continue; they poll the
            // stop flag on their own.
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    &STOP_REQUESTED
}
