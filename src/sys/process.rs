//! Process-wide housekeeping for the backgrounded daemon.

use std::io;

/// Closes every file descriptor from `first` up, so a daemon does not keep open what its
/// starter happened to pass on (a shell's `exec 5>file`, a CI runner's pipe, make's
/// jobserver), which would hang whoever waits for those to close.
///
/// # Safety
///
/// Nothing in the process may own or use a descriptor numbered `first` or above (an
/// `OwnedFd`, a `File`, a descriptor a library or another thread holds): it would be closed
/// under it, and its number could then be reused for an unrelated file it goes on to read,
/// write or close. Call it at start-up, single-threaded, before opening anything.
pub unsafe fn close_fds_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range takes integers and touches no memory; by this function's contract
    // no live owner refers to the closed range, so nothing is closed twice or used after.
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
