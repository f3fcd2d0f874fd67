//! Opening `/dev/fuse` and mounting a FUSE filesystem on it with `mount(2)`.
//!
//! We mount ourselves instead of letting fuser do it: fuser's direct mount cannot set the
//! `fuse.<subtype>` type and canonicalises the target path; `fuser::Session::from_fd` then
//! serves the connection.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::mount::MountFlags;

pub const DEV_FUSE: &str = "/dev/fuse";

pub fn open_dev_fuse() -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        DEV_FUSE,
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// What the kernel needs to attach `dev` at `target`.
pub struct FuseMount<'a> {
    pub dev: BorrowedFd<'a>,
    /// Shown as the mount source (findmnt SOURCE).
    pub fsname: &'a str,
    /// Mount type becomes `fuse.<subtype>`.
    pub subtype: &'a str,
    pub flags: MountFlags,
    pub allow_other: bool,
    pub default_permissions: bool,
}

pub fn mount_fuse(target: &Path, m: &FuseMount<'_>) -> io::Result<()> {
    let mut data = format!(
        "fd={},rootmode=40000,user_id={},group_id={}",
        m.dev.as_raw_fd(),
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    if m.default_permissions {
        data.push_str(",default_permissions");
    }
    if m.allow_other {
        data.push_str(",allow_other");
    }
    let data = CString::new(data).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fstype = format!("fuse.{}", m.subtype);
    rustix::mount::mount(m.fsname, target, fstype.as_str(), m.flags, data.as_c_str())?;
    Ok(())
}

/// Lazy unmount: detaches now, the filesystem goes away when its last user leaves.
pub fn detach(target: &Path) -> io::Result<()> {
    Ok(rustix::mount::unmount(
        target,
        rustix::mount::UnmountFlags::DETACH,
    )?)
}
