//! `listxattrat(2)` (Linux 6.13): lists the xattrs of `dirfd/name` without following the
//! last component and without going through `/proc/self/fd` paths, which cost several
//! extra lookups per file in a tree walk. rustix and libc do not have it yet.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The syscall number is the same on every architecture (the unified table after 424).
const SYS_LISTXATTRAT: libc::c_long = 465;

/// Fills `buf` with the NUL-separated names, returning their total length. ENOSYS on
/// kernels before 6.13; ERANGE when `buf` is too small.
pub fn listxattrat_nofollow(
    dirfd: BorrowedFd<'_>,
    name: &CStr,
    buf: &mut [u8],
) -> io::Result<usize> {
    // SAFETY: `name` is NUL-terminated and outlives the call; `buf` is valid for writes of
    // `buf.len()` bytes; the fd is borrowed for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dirfd.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn lists_without_following() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
        let d = std::fs::File::open(dir.path()).unwrap();
        let mut buf = [0u8; 1024];
        match listxattrat_nofollow(d.as_fd(), c"f", &mut buf) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return,
            r => {
                r.unwrap();
            }
        }
        assert!(listxattrat_nofollow(d.as_fd(), c"l", &mut buf).is_ok());
        let e = listxattrat_nofollow(d.as_fd(), c"missing", &mut buf).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
