//! Handing held fds to a re-executed copy of ourselves (the FUSE daemon), so it mounts
//! onto exactly the directories the parent checked instead of looking names up again.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::io::FdFlags;

/// Lets `fd` survive the next `exec` of a child (clears `FD_CLOEXEC`) until the returned
/// guard is dropped. Only one thread of the CLI spawns children, so no other child can
/// inherit it meanwhile.
pub fn pass_on(fd: BorrowedFd<'_>) -> io::Result<PassOn<'_>> {
    rustix::io::fcntl_setfd(fd, FdFlags::empty())?;
    Ok(PassOn { fd })
}

pub struct PassOn<'a> {
    fd: BorrowedFd<'a>,
}

impl Drop for PassOn<'_> {
    fn drop(&mut self) {
        let _ = rustix::io::fcntl_setfd(self.fd, FdFlags::CLOEXEC);
    }
}

/// Takes ownership of fd number `raw`, which our parent passed on and named on our command
/// line; marks it close-on-exec again.
///
/// # Safety
/// Nothing else in this process may own `raw`: call it once per number, at start-up, before
/// anything opens files.
pub unsafe fn take(raw: RawFd) -> io::Result<OwnedFd> {
    if raw < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: fcntl(F_GETFD) only reads the fd table; it tells whether `raw` is open at all.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is open (checked above) and, by this function's contract, owned by
    // nothing else in this process, so the OwnedFd is its only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    rustix::io::fcntl_setfd(&fd, FdFlags::CLOEXEC)?;
    Ok(fd)
}

/// Closes every fd from 3 up except `keep`, so a daemon does not hold open what its
/// starter happened to pass on (a shell's `exec 5>file`, a CI runner's pipe, make's
/// jobserver), which would hang whoever waits for those to close.
///
/// # Safety
/// No live `OwnedFd` (or other owner) in this process may refer to a closed number: call
/// it at start-up, when only `keep` is owned.
pub unsafe fn close_all_but(keep: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep.iter().map(|f| f.as_raw_fd() as u32).collect();
    keep.sort_unstable();
    let mut first = 3u32;
    for k in keep.into_iter().chain([u32::MAX]) {
        if k > first {
            // SAFETY: close_range takes integers and touches no memory; by this function's
            // contract nothing owns the numbers closed, so nothing is closed twice.
            let r = unsafe { libc::syscall(libc::SYS_close_range, first, k - 1, 0u32) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        first = first.max(k.saturating_add(1));
    }
    Ok(())
}
