//! Process-wide housekeeping for the backgrounded daemon.

use std::io;

/// Closes every file descriptor from `first` up, so a daemon does not keep open what its
/// starter happened to pass on (a shell's `exec 5>file`, a CI runner's pipe, make's
/// jobserver), which would hang whoever waits for those to close.
///
/// Call it only before anything in this process owns a descriptor at or above `first`.
pub fn close_fds_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range takes integers and touches no memory; the caller guarantees no
    // live OwnedFd refers to the closed range, so nothing is closed twice.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Restores SIGPIPE's default action (Rust's runtime ignores it, which turns a closed pipe
/// into a panic in `println!`).
pub fn default_sigpipe() {
    // SAFETY: setting a standard signal to SIG_DFL installs no handler and touches no memory;
    // called at start-up before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
