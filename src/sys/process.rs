//! Process-wide housekeeping for the backgrounded daemon.

/// Restores SIGPIPE's default action (Rust's runtime ignores it, which turns a closed pipe
/// into a panic in `println!`).
pub fn default_sigpipe() {
    // SAFETY: setting a standard signal to SIG_DFL installs no handler and touches no memory;
    // called at start-up before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
