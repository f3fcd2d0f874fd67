//! `mount_setattr(2)`, which rustix 1.1 does not wrap yet.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::fs::AtFlags;
use rustix::mount::MountAttrFlags;

/// `AT_RECURSIVE`: apply to the whole mount tree under the path (rustix's `AtFlags` lacks it).
pub const AT_RECURSIVE: AtFlags = AtFlags::from_bits_retain(libc::AT_RECURSIVE as u32);

/// The attribute change of one `mount_setattr` call.
#[derive(Clone, Copy, Debug)]
pub struct MountAttr<'a> {
    /// Attributes to set (`MOUNT_ATTR_IDMAP` requires `userns`).
    pub set: MountAttrFlags,
    /// Attributes to clear.
    pub clr: MountAttrFlags,
    /// The user namespace whose maps become the mount's idmapping.
    pub userns: Option<BorrowedFd<'a>>,
}

/// `mount_setattr(dfd, path, flags, &attr, sizeof attr)`.
pub fn mount_setattr(
    dfd: BorrowedFd<'_>,
    path: &CStr,
    flags: AtFlags,
    attr: &MountAttr<'_>,
) -> io::Result<()> {
    let raw = libc::mount_attr {
        attr_set: u64::from(attr.set.bits()),
        attr_clr: u64::from(attr.clr.bits()),
        propagation: 0,
        userns_fd: attr
            .userns
            .map_or(0, |fd| u64::try_from(fd.as_raw_fd()).unwrap_or(u64::MAX)),
    };
    // SAFETY: `path` is a valid NUL-terminated string and `raw` a fully initialised
    // `struct mount_attr` that both outlive the call; the size passed is its size; the
    // kernel only reads them. The fds are borrowed, so they stay open during the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dfd.as_raw_fd(),
            path.as_ptr(),
            flags.bits(),
            &raw const raw,
            size_of::<libc::mount_attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
