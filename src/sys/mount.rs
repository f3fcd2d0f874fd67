//! `mount_setattr(2)` and `open_tree_attr(2)`, which rustix 1.1 does not wrap yet.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::fs::AtFlags;
use rustix::mount::{MountAttrFlags, OpenTreeFlags};

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

fn raw_attr(attr: &MountAttr<'_>) -> libc::mount_attr {
    libc::mount_attr {
        attr_set: u64::from(attr.set.bits()),
        attr_clr: u64::from(attr.clr.bits()),
        propagation: 0,
        userns_fd: attr
            .userns
            .map_or(0, |fd| u64::try_from(fd.as_raw_fd()).unwrap_or(u64::MAX)),
    }
}

/// `mount_setattr(dfd, path, flags, &attr, sizeof attr)`.
pub fn mount_setattr(
    dfd: BorrowedFd<'_>,
    path: &CStr,
    flags: AtFlags,
    attr: &MountAttr<'_>,
) -> io::Result<()> {
    let raw = raw_attr(attr);
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

/// `open_tree_attr`'s number (Linux 6.15): the same on every architecture with the unified
/// syscall table; mips numbers its calls apart and is left to ENOSYS.
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6"
)))]
const SYS_OPEN_TREE_ATTR: Option<libc::c_long> = Some(467);
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6"
))]
const SYS_OPEN_TREE_ATTR: Option<libc::c_long> = None;

/// `open_tree_attr(dfd, path, flags, &attr, sizeof attr)` (Linux 6.15): `open_tree` that
/// applies `attr` to the new tree as `mount_setattr` would; with `OPEN_TREE_CLONE` it may
/// also replace the idmapping of an idmapped mount, which `mount_setattr` refuses. ENOSYS on
/// older kernels.
pub fn open_tree_attr(
    dfd: BorrowedFd<'_>,
    path: &CStr,
    flags: OpenTreeFlags,
    attr: &MountAttr<'_>,
) -> io::Result<OwnedFd> {
    let nr = SYS_OPEN_TREE_ATTR.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSYS))?;
    let raw = raw_attr(attr);
    // SAFETY: `path` is a valid NUL-terminated string and `raw` a fully initialised
    // `struct mount_attr`, both outliving the call, whose size is the one passed; the kernel
    // only reads them. The borrowed fds stay open during the call.
    let ret = unsafe {
        libc::syscall(
            nr,
            dfd.as_raw_fd(),
            path.as_ptr(),
            flags.bits(),
            &raw const raw,
            size_of::<libc::mount_attr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned `fd` as a new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
