//! `name_to_handle_at` / `open_by_handle_at`: a small, fd-less way to remember an inode.
//!
//! The FUSE daemon anchors inodes with `O_PATH` fds; past an fd budget it keeps a file
//! handle instead and reopens the inode on demand (needs CAP_DAC_READ_SEARCH).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::fs::OFlags;

/// Header (`handle_bytes`, `handle_type`) plus up to MAX_HANDLE_SZ bytes, in u64 words so
/// the buffer is aligned for `struct file_handle`.
const WORDS: usize = (8 + libc::MAX_HANDLE_SZ as usize).div_ceil(8);

/// An opaque file handle of the filesystem it was taken on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handle {
    buf: Box<[u64]>,
}

/// The handle of the object `fd` refers to (an `O_PATH` fd works) and its mount id.
pub fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<(Handle, i32)> {
    let mut buf = [0u64; WORDS];
    let fh = buf.as_mut_ptr().cast::<libc::file_handle>();
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is 8-byte aligned and large enough for the header plus MAX_HANDLE_SZ
    // bytes, which is what we announce in handle_bytes; the path is an empty C string.
    let r = unsafe {
        (*fh).handle_bytes = libc::MAX_HANDLE_SZ as libc::c_uint;
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            fh,
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled in the header of the buffer we own.
    let bytes = unsafe { (*fh).handle_bytes } as usize;
    let words = (8 + bytes.min(libc::MAX_HANDLE_SZ as usize)).div_ceil(8);
    Ok((
        Handle {
            buf: buf[..words].into(),
        },
        mount_id,
    ))
}

/// Opens the object behind `handle`; `mount` is any fd on the same mount, not `O_PATH`.
pub fn open_by_handle(
    mount: BorrowedFd<'_>,
    handle: &Handle,
    flags: OFlags,
) -> io::Result<OwnedFd> {
    // SAFETY: the buffer holds a complete handle as returned by name_to_handle_at; the
    // kernel only reads it (copy_from_user), so the const-to-mut cast is never written
    // through.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            handle.buf.as_ptr().cast::<libc::file_handle>().cast_mut(),
            (flags | OFlags::CLOEXEC).bits() as libc::c_int,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_by_handle_at returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::Mode;
    use std::os::fd::AsFd;

    #[test]
    fn handle_reopens_the_same_inode() {
        if !rustix::process::geteuid().is_root() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let fd = rustix::fs::open(dir.path().join("f"), OFlags::PATH, Mode::empty()).unwrap();
        let root = rustix::fs::open(dir.path(), OFlags::RDONLY, Mode::empty()).unwrap();
        let (h, _mnt) = name_to_handle(fd.as_fd()).unwrap();
        let again = open_by_handle(root.as_fd(), &h, OFlags::PATH).unwrap();
        let (a, b) = (
            rustix::fs::fstat(&fd).unwrap(),
            rustix::fs::fstat(&again).unwrap(),
        );
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
    }
}
