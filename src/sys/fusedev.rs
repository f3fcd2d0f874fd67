//! Opening `/dev/fuse` and mounting a FUSE filesystem on it with `mount(2)`.
//!
//! We mount ourselves instead of letting fuser do it: fuser's direct mount cannot set the
//! `fuse.<subtype>` type and mounts by path; we use the new mount API (`fsopen`,
//! `fsconfig`, `fsmount`, `move_mount`) onto a held target fd, and
//! `fuser::Session::from_fd` then serves the connection.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::mount::MountAttrFlags;

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
    /// ro, nosuid, nodev, noexec of the mount (`MOUNT_ATTR_RDONLY` also makes the
    /// filesystem itself read-only).
    pub attrs: MountAttrFlags,
    pub allow_other: bool,
    pub default_permissions: bool,
}

/// Makes a FUSE mount served through `m.dev` and attaches it onto the directory `target`
/// (an fd checked by the caller), never by name. Returns an `O_PATH` fd of the new mount's
/// root, which names this very mount for [`detach_fd`]; holding it keeps the mount busy, so
/// close it once the mount is known to work.
pub fn mount_fuse(target: BorrowedFd<'_>, m: &FuseMount<'_>) -> io::Result<OwnedFd> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MoveMountFlags, fsconfig_create, fsconfig_set_flag,
        fsconfig_set_string, fsmount, fsopen, move_mount,
    };
    let fs = fsopen("fuse", FsOpenFlags::FSOPEN_CLOEXEC)?;
    let opts = [
        ("source", m.fsname.to_string()),
        ("subtype", m.subtype.to_string()),
        ("fd", m.dev.as_raw_fd().to_string()),
        ("rootmode", "40000".to_string()),
        ("user_id", rustix::process::getuid().as_raw().to_string()),
        ("group_id", rustix::process::getgid().as_raw().to_string()),
    ];
    for (key, value) in opts {
        fsconfig_set_string(&fs, key, value.as_str())?;
    }
    if m.default_permissions {
        fsconfig_set_flag(&fs, "default_permissions")?;
    }
    if m.allow_other {
        fsconfig_set_flag(&fs, "allow_other")?;
    }
    if m.attrs.contains(MountAttrFlags::MOUNT_ATTR_RDONLY) {
        fsconfig_set_flag(&fs, "ro")?;
    }
    fsconfig_create(&fs)?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, m.attrs)?;
    move_mount(
        &mnt,
        c"",
        target,
        c"",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?;
    Ok(mnt)
}

/// Lazy unmount of the mount whose root `mnt` holds: it leaves the namespace now and goes
/// away when its last user leaves. Through the fd's `/proc/self/fd` link, so the mount
/// unmounted is this one, not whatever a path names by now.
pub fn detach_fd(mnt: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    detach(Path::new(std::ffi::OsStr::from_bytes(
        &super::procfd::link(mnt, b""),
    )))
}

/// Lazy unmount of the mount at `target`; a symlink there is not followed.
pub fn detach(target: &Path) -> io::Result<()> {
    Ok(rustix::mount::unmount(
        target,
        rustix::mount::UnmountFlags::DETACH,
    )?)
}
