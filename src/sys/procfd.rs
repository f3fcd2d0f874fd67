//! Reaching the object behind one of our own `O_PATH` fds through `/proc/self/fd/N`.
//!
//! Opening, chmod, utimens and xattr calls do not work on `O_PATH` fds directly; going
//! through the fd's magic link in our own `/proc/self/fd` lands exactly on the inode the fd
//! holds (for a symlink: on the link itself, never its target, as measured on 6.18), with
//! no path resolution inside the source tree.
//!
//! Where the kernel takes an `O_PATH` fd itself (`AT_EMPTY_PATH` in `utimensat`, and in
//! `fchmodat2` on recent kernels: 6.18 has it) that is used first: the walk of
//! `/proc/self/fd/N` costs 4 to 6 µs here, the direct call under 3
//! (bench-results/ops/results.md).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

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
        let through_proc = || {
            Ok(rustix::fs::chmodat(
                &self.dir,
                Self::name(fd).as_c_str(),
                Mode::from_raw_mode(mode),
                AtFlags::empty(),
            )?)
        };
        direct_or_proc(
            &CHMOD_EMPTY_PATH,
            || fchmodat2_empty_path(fd, mode),
            through_proc,
        )
    }

    pub fn utimens(&self, fd: BorrowedFd<'_>, times: &Timestamps) -> io::Result<()> {
        let direct = || Ok(rustix::fs::utimensat(fd, c"", times, AtFlags::EMPTY_PATH)?);
        let through_proc = || {
            Ok(rustix::fs::utimensat(
                &self.dir,
                Self::name(fd).as_c_str(),
                times,
                AtFlags::empty(),
            )?)
        };
        direct_or_proc(&UTIMENS_EMPTY_PATH, direct, through_proc)
    }

    /// The `/proc/self/fd/N` path, for the path-only xattr syscalls.
    pub fn path(&self, fd: BorrowedFd<'_>) -> CString {
        // A decimal number and a fixed prefix have no NUL byte.
        CString::new(link(fd, b"")).unwrap_or_default()
    }
}

/// Whether the kernel takes `AT_EMPTY_PATH` on an `O_PATH` fd in `fchmodat2`, and in
/// `utimensat`: assumed until it refuses.
static CHMOD_EMPTY_PATH: AtomicBool = AtomicBool::new(true);
static UTIMENS_EMPTY_PATH: AtomicBool = AtomicBool::new(true);

/// `direct` while `works` holds, else `through_proc`. A kernel without the direct form
/// answers EINVAL (unknown flag) or ENOSYS (no `fchmodat2`): the call is made through
/// `/proc` instead, and only when that succeeds is the direct form given up for good (an
/// EINVAL of the change itself, such as a bad timestamp, fails both ways).
fn direct_or_proc(
    works: &AtomicBool,
    direct: impl FnOnce() -> io::Result<()>,
    through_proc: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    if !works.load(Ordering::Relaxed) {
        return through_proc();
    }
    match direct() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
            through_proc()?;
            works.store(false, Ordering::Relaxed);
            Ok(())
        }
        r => r,
    }
}

/// `fchmodat2(fd, "", mode, AT_EMPTY_PATH)`: the mode of the object `fd` (also `O_PATH`)
/// refers to, never following a symlink. Neither rustix nor libc has a wrapper yet.
fn fchmodat2_empty_path(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: the path is a NUL-terminated static string, the fd is borrowed for the call,
    // the mode and flags are plain integers; the kernel writes no memory of ours.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            fd.as_raw_fd(),
            c"".as_ptr(),
            mode as libc::c_uint,
            libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn o_path(p: &std::path::Path) -> OwnedFd {
        rustix::fs::open(p, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty()).unwrap()
    }

    /// chmod and utimens reach the object an `O_PATH` fd holds: the file itself, and for a
    /// symlink the link, never its target (as the `/proc/self/fd` walk does).
    #[test]
    fn chmod_and_utimens_act_on_the_held_object() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
        let proc = ProcFd::open().unwrap();

        let fd = o_path(&f);
        proc.chmod(fd.as_fd(), 0o2710).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o7777, 0o2710);
        let at = |sec| rustix::fs::Timespec {
            tv_sec: sec,
            tv_nsec: 0,
        };
        let times = Timestamps {
            last_access: at(1_000_000),
            last_modification: at(2_000_000),
        };
        proc.utimens(fd.as_fd(), &times).unwrap();
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!((md.atime(), md.mtime()), (1_000_000, 2_000_000));

        let link = o_path(&dir.path().join("l"));
        let times = Timestamps {
            last_access: at(3_000_000),
            last_modification: at(4_000_000),
        };
        proc.utimens(link.as_fd(), &times).unwrap();
        let lmd = std::fs::symlink_metadata(dir.path().join("l")).unwrap();
        assert_eq!(lmd.mtime(), 4_000_000);
        assert_eq!(std::fs::metadata(&f).unwrap().mtime(), 2_000_000);
        // A bad timestamp fails, and does not make the next calls take the long way.
        let bad = Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: 2_000_000_000,
            },
            last_modification: at(0),
        };
        let direct = UTIMENS_EMPTY_PATH.load(Ordering::Relaxed);
        assert!(proc.utimens(fd.as_fd(), &bad).is_err());
        assert_eq!(UTIMENS_EMPTY_PATH.load(Ordering::Relaxed), direct);
    }
}
