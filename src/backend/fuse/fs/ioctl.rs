//! The inode-flag ioctls (FS_IOC_GETFLAGS/SETFLAGS, FS_IOC_FSGETXATTR/FSSETXATTR) with the
//! kernel's privilege rules; every other ioctl answers ENOTTY.

use super::*;

impl ShiftFs {
    /// The inode attribute ioctls (`lsattr`/`chattr`, project ids), on a fresh read-only fd
    /// of the inode; any other command: ENOTTY. The kernel sends these four only for regular
    /// files and directories, after checking on the translated attributes that the caller
    /// owns the inode or has CAP_FOWNER over it, that changing `i` or `a` comes with
    /// CAP_LINUX_IMMUTABLE in the initial namespace and a project id change from the initial
    /// namespace. The daemon holds all of that itself, so it changes flags with the
    /// caller's ids and only the capabilities the caller has on the host, and repeats the
    /// project id rule. Project ids are not user ids: they pass unchanged, as through an
    /// idmapped mount.
    pub(super) fn do_ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
    ) -> Result<Vec<u8>> {
        use fileattr::{
            FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR, FS_IOC_GETFLAGS, FS_IOC_SETFLAGS,
            FS_IOC32_GETFLAGS, FS_IOC32_SETFLAGS,
        };
        let set = match cmd {
            FS_IOC_GETFLAGS | FS_IOC32_GETFLAGS | FS_IOC_FSGETXATTR => false,
            FS_IOC_SETFLAGS | FS_IOC32_SETFLAGS | FS_IOC_FSSETXATTR => true,
            _ => return Err(Errno::ENOTTY),
        };
        let inode = self.inode(ino)?;
        // Opening anything else for real would have effects of its own.
        if !inode.is_reg() && !inode.is_dir() {
            return Err(Errno::ENOTTY);
        }
        if set {
            self.check_writable(&inode)?;
        }
        // Our own /proc/self/fd link lands on this very inode (O_NOFOLLOW would refuse the
        // link itself).
        let fd = self
            .proc
            .reopen(
                inode.fd().map_err(io)?.as_fd(),
                OFlags::RDONLY | OFlags::NONBLOCK,
            )
            .map_err(io)?;
        match cmd {
            FS_IOC_GETFLAGS | FS_IOC32_GETFLAGS => {
                let flags = fileattr::getflags(&fd).map_err(io)?;
                Ok(flags.bits().to_ne_bytes().to_vec())
            }
            FS_IOC_FSGETXATTR => Ok(fileattr::fsgetxattr(&fd).map_err(io)?.to_bytes()),
            _ => {
                let st = rustix::fs::fstat(&fd).map_err(sys)?;
                self.check_owner_mapped(&st, Errno::EPERM)?;
                let who = self.caller(req);
                let (uid, gid) = self.host_ids(req);
                let mut without = CapabilitySet::SYS_RESOURCE;
                if !who.is_host_immutable() {
                    without |= CapabilitySet::LINUX_IMMUTABLE;
                }
                if cmd == FS_IOC_FSSETXATTR {
                    let new = FsXattr::from_bytes(in_data).ok_or(Errno::EINVAL)?;
                    if !who.in_host_userns() {
                        let old = fileattr::fsgetxattr(&fd).map_err(io)?;
                        let inherit = (old.xflags ^ new.xflags) & fileattr::FS_XFLAG_PROJINHERIT;
                        if old.projid != new.projid || inherit != 0 {
                            return Err(Errno::EINVAL);
                        }
                    }
                    let _creds = FsCreds::switch(FsIds::Host(uid, gid), without).map_err(io)?;
                    fileattr::fssetxattr(&fd, new).map_err(io)?;
                } else {
                    let raw = in_data.get(..4).ok_or(Errno::EINVAL)?;
                    let flags = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                    let _creds = FsCreds::switch(FsIds::Host(uid, gid), without).map_err(io)?;
                    fileattr::setflags(&fd, IFlags::from_bits_retain(flags)).map_err(io)?;
                }
                // The kernel's own requests want nothing back; a caller's want their bytes.
                let n = in_data.len().min(out_size as usize);
                Ok(in_data[..n].to_vec())
            }
        }
    }
}
