//! The inode attribute ioctls (`lsattr`/`chattr`, project ids) on a real fd of an inode.
//! rustix has `FS_IOC_GETFLAGS`/`SETFLAGS`; the `fsxattr` pair is wrapped here.

use std::io;
use std::os::fd::AsFd;

use rustix::ioctl::{Getter, Opcode, Setter, opcode};

pub use rustix::fs::IFlags;

/// `struct fsxattr` of `<linux/fs.h>`, as `FS_IOC_FSGETXATTR`/`FSSETXATTR` carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsXattr {
    pub xflags: u32,
    pub extsize: u32,
    pub nextents: u32,
    pub projid: u32,
    pub cowextsize: u32,
    pub pad: [u8; 8],
}

/// Its size on the wire (FUSE passes the bytes of the struct unchanged).
pub const FSXATTR_SIZE: usize = std::mem::size_of::<FsXattr>();

impl FsXattr {
    /// The struct from the bytes of a FUSE ioctl request; `None` when too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b = b.get(..FSXATTR_SIZE)?;
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut pad = [0u8; 8];
        pad.copy_from_slice(&b[20..28]);
        Some(Self {
            xflags: word(0),
            extsize: word(4),
            nextents: word(8),
            projid: word(12),
            cowextsize: word(16),
            pad,
        })
    }

    pub fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(FSXATTR_SIZE);
        for w in [
            self.xflags,
            self.extsize,
            self.nextents,
            self.projid,
            self.cowextsize,
        ] {
            v.extend_from_slice(&w.to_ne_bytes());
        }
        v.extend_from_slice(&self.pad);
        v
    }
}

/// `FS_XFLAG_PROJINHERIT`: new children take the directory's project id.
pub const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;

pub const FS_IOC_FSGETXATTR: Opcode = opcode::read::<FsXattr>(b'X', 31);
pub const FS_IOC_FSSETXATTR: Opcode = opcode::write::<FsXattr>(b'X', 32);
/// `_IOR('f', 1, long)` and `_IOW('f', 2, long)`: FUSE passes the caller's number, which
/// encodes the size of a `long` (the kernel reads an `int` whatever it says).
pub const FS_IOC_GETFLAGS: Opcode = opcode::read::<libc::c_long>(b'f', 1);
pub const FS_IOC_SETFLAGS: Opcode = opcode::write::<libc::c_long>(b'f', 2);
/// The same from a 32-bit caller on a 64-bit kernel.
pub const FS_IOC32_GETFLAGS: Opcode = opcode::read::<i32>(b'f', 1);
pub const FS_IOC32_SETFLAGS: Opcode = opcode::write::<i32>(b'f', 2);

pub fn getflags(fd: impl AsFd) -> io::Result<IFlags> {
    Ok(rustix::fs::ioctl_getflags(fd)?)
}

pub fn setflags(fd: impl AsFd, flags: IFlags) -> io::Result<()> {
    Ok(rustix::fs::ioctl_setflags(fd, flags)?)
}

pub fn fsgetxattr(fd: impl AsFd) -> io::Result<FsXattr> {
    // SAFETY: FS_IOC_FSGETXATTR writes one `struct fsxattr`, which `FsXattr` lays out
    // field for field (repr(C), 28 bytes).
    Ok(unsafe { rustix::ioctl::ioctl(fd, Getter::<FS_IOC_FSGETXATTR, FsXattr>::new()) }?)
}

pub fn fssetxattr(fd: impl AsFd, attr: FsXattr) -> io::Result<()> {
    // SAFETY: FS_IOC_FSSETXATTR reads one `struct fsxattr` through the pointer the setter
    // passes; `FsXattr` has its layout.
    Ok(unsafe { rustix::ioctl::ioctl(fd, Setter::<FS_IOC_FSSETXATTR, FsXattr>::new(attr)) }?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_layout_match_linux_fs_h() {
        assert_eq!(FSXATTR_SIZE, 28);
        #[cfg(target_pointer_width = "64")]
        {
            assert_eq!(FS_IOC_GETFLAGS, 0x8008_6601);
            assert_eq!(FS_IOC_SETFLAGS, 0x4008_6602);
        }
        assert_eq!(FS_IOC32_GETFLAGS, 0x8004_6601);
        assert_eq!(FS_IOC_FSGETXATTR, 0x801c_581f);
        assert_eq!(FS_IOC_FSSETXATTR, 0x401c_5820);
        let x = FsXattr {
            xflags: 1,
            extsize: 2,
            nextents: 3,
            projid: 4,
            cowextsize: 5,
            pad: [6; 8],
        };
        assert_eq!(FsXattr::from_bytes(&x.to_bytes()), Some(x));
        assert_eq!(FsXattr::from_bytes(&[0; 27]), None);
    }
}
