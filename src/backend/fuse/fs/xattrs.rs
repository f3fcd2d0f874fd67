//! Extended attributes: ids inside ACLs and capabilities cross the map here (`xattr_in`,
//! `xattr_out`); `trusted.*` only for the host-capable.

use super::*;

/// An ENOSYS in the reply to an xattr request makes the kernel stop sending that request for
/// the rest of the mount (`no_getxattr` and the like); without GETXATTR it takes every file
/// for one without an ACL, so a deny entry would stop denying. A syscall refused with ENOSYS
/// (by the sandbox's filter, or a kernel without it) fails the one request instead.
fn not_enosys<T>(r: Result<T>) -> Result<T> {
    match r {
        Err(e) if e == Errno::ENOSYS => Err(Errno::EIO),
        r => r,
    }
}

impl ShiftFs {
    pub(super) fn do_getxattr(&self, ino: INodeNo, name: &OsStr) -> Result<Vec<u8>> {
        not_enosys(self.read_xattr(ino, name))
    }

    pub(super) fn do_listxattr(&self, req: &Request, ino: INodeNo) -> Result<Vec<u8>> {
        not_enosys(self.list_xattrs(req, ino))
    }

    pub(super) fn do_setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        not_enosys(self.write_xattr(req, ino, name, value, flags))
    }

    pub(super) fn do_removexattr(&self, ino: INodeNo, name: &OsStr) -> Result<()> {
        not_enosys(self.remove_xattr(ino, name))
    }

    fn read_xattr(&self, ino: INodeNo, name: &OsStr) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        if self.hides_suid(&inode) && name.as_bytes() == XATTR_CAPS {
            // The kernel reads it at exec through us: a `nosuid` submount grants nothing.
            return Err(Errno::NO_XATTR);
        }
        let name_c = cstr(name)?;
        // The same inode through an open file, without the walk of /proc/self/fd/N. Never
        // ENOSYS to the kernel (it would stop asking for any xattr): a sandbox that refuses
        // fgetxattr makes the walk after all.
        let read = match inode
            .open_fd()
            .map(|fd| crate::sys::xattr::read_whole(|b| rustix::fs::fgetxattr(&*fd, &*name_c, b)))
        {
            Some(Err(SysErrno::NOSYS)) | None => {
                let ifd = inode.fd().map_err(io)?;
                procfd::getxattr(&self.proc.path(ifd.as_fd()), &name_c)
            }
            Some(r) => r.map_err(std::io::Error::from),
        };
        let value = match read {
            // A source without xattrs (ramfs, vfat) has no ACL and no capability: the FUSE
            // kernel treats ENODATA as "none" but fails permission checks and exec on EOPNOTSUPP.
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    && xattr::is_id_bearing(name.as_bytes()) =>
            {
                return Err(Errno::NO_XATTR);
            }
            r => r.map_err(io)?,
        };
        self.xattr_out(name, value)
    }

    fn list_xattrs(&self, req: &Request, ino: INodeNo) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        let ifd = inode.fd().map_err(io)?;
        let mut names = procfd::listxattr(&self.proc.path(ifd.as_fd())).map_err(io)?;
        if self.hides_suid(&inode) {
            names = names
                .split_inclusive(|&b| b == 0)
                .filter(|n| n.strip_suffix(b"\0").unwrap_or(n) != XATTR_CAPS)
                .flatten()
                .copied()
                .collect();
        }
        // The kernel lists `trusted.*` only to CAP_SYS_ADMIN in the initial namespace; the
        // daemon has it, so filter for the caller.
        if !names.windows(8).any(|w| w == b"trusted.") || self.caller(req).is_host_admin() {
            return Ok(names);
        }
        Ok(names
            .split_inclusive(|&b| b == 0)
            .filter(|n| !n.starts_with(b"trusted."))
            .flatten()
            .copied()
            .collect())
    }

    fn write_xattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        let inode = self.inode(ino)?;
        self.check_writable(&inode)?;
        let ifd = inode.fd().map_err(io)?;
        let st = rustix::fs::fstat(ifd.as_fd()).map_err(sys)?;
        self.check_owner_mapped(&st, Errno::EPERM)?;
        let value = self.xattr_in(name, value)?;
        let flags = rustix::fs::XattrFlags::from_bits(flags as u32).ok_or(Errno::EINVAL)?;
        let (path, cname) = (self.proc.path(ifd.as_fd()), cstr(name)?);
        self.as_writer(req, || {
            rustix::fs::setxattr(&path, &*cname, &value, flags).map_err(sys)
        })?;
        if name.as_bytes() == xattr::ACL_ACCESS {
            self.kill_sgid_after_acl(req, ifd.as_fd())?;
        }
        Ok(())
    }

    /// The backing filesystem keeps the mode's group class in step with the new ACL, but
    /// judges setgid by the daemon's credentials (root, CAP_FSETID: always kept). The kernel
    /// would clear it unless the caller is in the file's group or holds CAP_FSETID over it;
    /// fuser 0.18 cannot negotiate SETXATTR_EXT, which would tell us so, so decide here.
    pub(super) fn kill_sgid_after_acl(&self, req: &Request, fd: BorrowedFd<'_>) -> Result<()> {
        let st = rustix::fs::fstat(fd).map_err(sys)?;
        if st.st_mode & libc::S_ISGID == 0 {
            return Ok(());
        }
        let keep = if self.idmappable {
            self.caller(req)
                .may_keep_setgid_in_own_ns(st.st_uid, st.st_gid)
        } else {
            let (file_uid, file_gid) = self.owner_out(&st);
            Caller::of(req).may_keep_setgid(req.gid(), file_uid, file_gid)
        };
        if !keep {
            self.proc
                .chmod(fd, (st.st_mode & 0o7777) & !libc::S_ISGID)
                .map_err(io)?;
        }
        Ok(())
    }

    fn remove_xattr(&self, ino: INodeNo, name: &OsStr) -> Result<()> {
        let inode = self.inode(ino)?;
        self.check_writable(&inode)?;
        let ifd = inode.fd().map_err(io)?;
        let st = rustix::fs::fstat(ifd.as_fd()).map_err(sys)?;
        self.check_owner_mapped(&st, Errno::EPERM)?;
        rustix::fs::removexattr(self.proc.path(ifd.as_fd()), &*cstr(name)?).map_err(sys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enosys_never_answers_an_xattr_request() {
        assert_eq!(not_enosys::<()>(Err(Errno::ENOSYS)), Err(Errno::EIO));
        assert_eq!(not_enosys::<()>(Err(Errno::NO_XATTR)), Err(Errno::NO_XATTR));
        assert_eq!(not_enosys(Ok(3)), Ok(3));
    }
}
