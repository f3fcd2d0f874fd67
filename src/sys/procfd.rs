//! Reaching the object behind one of our own `O_PATH` fds through `/proc/self/fd/N`.
//!
//! Opening, chmod, utimens and xattr calls do not work on `O_PATH` fds directly; going
//! through the fd's magic link in our own `/proc/self/fd` lands exactly on the inode the fd
//! holds (for a symlink: on the link itself, never its target, as measured on 6.18), with
//! no path resolution inside the source tree.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, Mode, OFlags, Timestamps};

pub struct ProcFd {
    dir: OwnedFd,
}

impl ProcFd {
    /// Opens `/proc/self/fd` once, so later calls do not depend on the path staying valid.
    pub fn open() -> io::Result<Self> {
        let dir = rustix::fs::open(
            "/proc/self/fd",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { dir })
    }

    fn name(fd: BorrowedFd<'_>) -> CString {
        // A decimal number has no NUL byte.
        CString::new(fd.as_raw_fd().to_string()).unwrap_or_default()
    }

    /// A new open file description of the object behind `fd`, with `flags`.
    pub fn reopen(&self, fd: BorrowedFd<'_>, flags: OFlags) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat(
            &self.dir,
            Self::name(fd).as_c_str(),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }

    pub fn chmod(&self, fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
        Ok(rustix::fs::chmodat(
            &self.dir,
            Self::name(fd).as_c_str(),
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )?)
    }

    pub fn utimens(&self, fd: BorrowedFd<'_>, times: &Timestamps) -> io::Result<()> {
        Ok(rustix::fs::utimensat(
            &self.dir,
            Self::name(fd).as_c_str(),
            times,
            AtFlags::empty(),
        )?)
    }

    /// The `/proc/self/fd/N` path, for the path-only xattr syscalls.
    pub fn path(&self, fd: BorrowedFd<'_>) -> CString {
        // A decimal number and a fixed prefix have no NUL byte.
        CString::new(link(fd, b"")).unwrap_or_default()
    }
}

impl AsFd for ProcFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

/// Reads a whole xattr value of `path` (a `/proc/self/fd/N` path).
pub fn getxattr(path: &CStr, name: &CStr) -> io::Result<Vec<u8>> {
    Ok(super::xattr::read_whole(|b| {
        rustix::fs::getxattr(path, name, b)
    })?)
}

/// Reads the whole xattr name list of `path`.
pub fn listxattr(path: &CStr) -> io::Result<Vec<u8>> {
    Ok(super::xattr::read_whole(|b| {
        rustix::fs::listxattr(path, b)
    })?)
}

/// The kernel's name for the object behind `fd` (`readlink /proc/self/fd/N`), for messages
/// and records; `None` when it has none a path could reach (deleted, or outside our root).
pub fn fd_path(fd: BorrowedFd<'_>) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let link = std::fs::read_link(std::ffi::OsStr::from_bytes(&link(fd, b""))).ok()?;
    let text = link.as_os_str().as_encoded_bytes();
    (text.starts_with(b"/") && !text.ends_with(b" (deleted)")).then_some(link)
}

/// `/proc/self/fd/FD/NAME` (or `/proc/self/fd/FD` for an empty name): short whatever the
/// depth, and resolved from the held fd.
pub fn link(fd: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}", fd.as_raw_fd()).into_bytes();
    if !name.is_empty() {
        p.push(b'/');
        p.extend_from_slice(name);
    }
    p
}
