//! Reading xattrs: the one loop that reads a whole value or name list, and
//! `listxattrat(2)` (Linux 6.13), which lists the xattrs of `dirfd/name` without following
//! the last component and without going through `/proc/self/fd` paths (which cost several
//! extra lookups per file in a tree walk); rustix and libc do not have it yet.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The kernel's limit on one xattr value and on a name list (`XATTR_SIZE_MAX`, `XATTR_LIST_MAX`).
const XATTR_MAX: usize = 65536;

/// Calls `read` (a getxattr or listxattr of some kind) with a buffer that grows until the
/// whole value fits: ERANGE means it was too small, or the value grew in between.
pub fn read_whole(
    mut read: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) if buf.len() < XATTR_MAX => {
                buf.resize((buf.len() * 4).min(XATTR_MAX), 0);
            }
            Err(e) => return Err(e),
        }
    }
}

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
    fn whole_values_past_the_first_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let big = vec![b'v'; 3000];
        rustix::fs::setxattr(&f, "user.big", &big, rustix::fs::XattrFlags::empty()).unwrap();
        let got = read_whole(|b| rustix::fs::getxattr(&f, "user.big", b)).unwrap();
        assert_eq!(got, big);
        let names = read_whole(|b| rustix::fs::listxattr(&f, b)).unwrap();
        assert!(names.split(|&c| c == 0).any(|n| n == b"user.big"));
    }

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
