//! Attributes: getattr (ids shifted out through `attr`), setattr (chown targets shifted in,
//! setuid/setgid clearing as the kernel does), statfs.

use super::*;

impl ShiftFs {
    pub(super) fn do_getattr(&self, ino: INodeNo, fh: Option<FileHandle>) -> Result<FileAttr> {
        let inode = self.inode(ino)?;
        // fstat on an open file works even when the inode is unlinked and only anchored
        // by a file handle.
        if let Some(h) = fh.and_then(|fh| self.files.get(fh.0)) {
            let st = rustix::fs::fstat(h.fd()).map_err(sys)?;
            return Ok(self.attr(&inode, &st));
        }
        self.stat_attr(&inode)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr> {
        let inode = self.inode(ino)?;
        self.check_writable(&inode)?;
        let ifd = inode.fd().map_err(io)?;
        let ifd = ifd.as_fd();
        // Translate everything first: an unmapped target changes nothing on disk.
        let (uid, gid) = self.owner_to_inner(uid, gid)?;
        let st = rustix::fs::fstat(ifd).map_err(sys)?;
        self.check_setattr(&inode, &st, mode, uid, gid)?;
        if let Some(size) = size {
            self.set_size(&inode, ifd, fh, size)?;
        }
        if uid.is_some() || gid.is_some() {
            set_owner(ifd, uid, gid)?;
        }
        // After chown: the kernel sends the mode it wants (suid/sgid already cleared), and
        // the backing chown may have cleared bits we must set again.
        if let Some(mode) = mode {
            self.set_mode(req, &inode, ifd, mode)?;
        }
        // FUSE_HANDLE_KILLPRIV_V2 leaves clearing setuid/setgid to us, flagged with
        // FATTR_KILL_SUIDGID, which fuser 0.18 does not pass on. The kernel sends it on a
        // truncate by a caller without CAP_FSETID, and as a SETATTR with nothing else before
        // the first write, fallocate or copy into a setuid/setgid file by such a caller
        // (chown: the backing chown clears them itself). The empty SETATTR also comes when
        // a write only drops a file capability, whoever writes, and for chown(path, -1, -1),
        // which changes ctime (FATTR_CTIME comes only with the writeback cache). A backing
        // chown(-1, -1) does all of it: ctime, setuid and setgid (with group execute) and
        // the capability, as on the plain file system; a setuid bit on a file that also has
        // a capability is then cleared where the kernel would keep it (the safe side).
        let empty = mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && atime.is_none()
            && mtime.is_none();
        if empty {
            set_owner(ifd, None, None)?;
        }
        let kill = mode.is_none()
            && size.is_some()
            && is_sxid(st.st_mode)
            && !self.caller(req).is_host_fsetid();
        if kill {
            self.kill_sxid(ifd)?;
        }
        if atime.is_some() || mtime.is_some() {
            self.set_times(ifd, atime, mtime)?;
        }
        let st = rustix::fs::fstat(ifd).map_err(sys)?;
        Ok(self.attr(&inode, &st))
    }

    fn owner_to_inner(
        &self,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(Option<InnerUid>, Option<InnerGid>)> {
        let uid = match uid {
            Some(u) => Some(
                self.map
                    .uid
                    .to_inner(OuterUid::new(u))
                    .ok_or(Errno::EOVERFLOW)?,
            ),
            None => None,
        };
        let gid = match gid {
            Some(g) => Some(
                self.map
                    .gid
                    .to_inner(OuterGid::new(g))
                    .ok_or(Errno::EOVERFLOW)?,
            ),
            None => None,
        };
        Ok((uid, gid))
    }

    /// Refusals that must come before anything is written.
    fn check_setattr(
        &self,
        inode: &Inode,
        st: &Stat,
        mode: Option<u32>,
        uid: Option<InnerUid>,
        gid: Option<InnerGid>,
    ) -> Result<()> {
        // As notify_change on an idmapped mount: no change to an object with an unmapped
        // owner unless the change maps it.
        let (uid_ok, gid_ok) = self.owner_mapped(st);
        if (!uid_ok && uid.is_none()) || (!gid_ok && gid.is_none()) {
            return Err(Errno::EOVERFLOW);
        }
        if mode.is_some() && inode.is_symlink() {
            return Err(Errno::EOPNOTSUPP);
        }
        Ok(())
    }

    fn set_size(
        &self,
        inode: &Inode,
        ifd: BorrowedFd<'_>,
        fh: Option<FileHandle>,
        size: u64,
    ) -> Result<()> {
        if !inode.is_reg() {
            return Err(if inode.is_dir() {
                Errno::EISDIR
            } else {
                Errno::EINVAL
            });
        }
        let handle = fh.and_then(|fh| self.files.get(fh.0));
        match handle {
            Some(h) => rustix::fs::ftruncate(h.fd(), size).map_err(sys)?,
            None => {
                let fd = self.proc.reopen(ifd, OFlags::WRONLY).map_err(io)?;
                rustix::fs::ftruncate(&fd, size).map_err(sys)?;
            }
        }
        Ok(())
    }

    fn set_mode(
        &self,
        req: &Request,
        inode: &Inode,
        ifd: BorrowedFd<'_>,
        mut mode: u32,
    ) -> Result<()> {
        if self.hides_suid(inode) {
            // Bits the caller cannot see are neither set nor cleared by a chmod.
            let hidden = libc::S_ISUID | libc::S_ISGID;
            let now = rustix::fs::fstat(ifd).map_err(sys)?.st_mode;
            mode = (mode & !hidden) | (now & hidden);
        }
        // A chmod rewrites an ACL's mask, which may take a new xattr block (ext4 shares
        // them between inodes).
        let chmod = || self.proc.chmod(ifd, mode & 0o7777).map_err(io);
        if inode.mount.space_by_writer_ids() {
            self.as_writer(req, chmod)
        } else {
            chmod()
        }
    }

    fn kill_sxid(&self, ifd: BorrowedFd<'_>) -> Result<()> {
        let now = rustix::fs::fstat(ifd).map_err(sys)?.st_mode;
        self.proc.chmod(ifd, killed_sxid(now) & 0o7777).map_err(io)
    }

    fn set_times(
        &self,
        ifd: BorrowedFd<'_>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<()> {
        let times = Timestamps {
            last_access: timespec(atime),
            last_modification: timespec(mtime),
        };
        self.proc.utimens(ifd, &times).map_err(io)
    }
    pub(super) fn do_statfs(&self, ino: INodeNo) -> Result<rustix::fs::StatVfs> {
        let inode = self.inode(ino)?;
        rustix::fs::fstatvfs(inode.fd().map_err(io)?).map_err(sys)
    }
}

/// `None` leaves that id as it is; with both `None` the backing file system still does
/// what a chown does to ctime, setuid/setgid and the capability.
fn set_owner(ifd: BorrowedFd<'_>, uid: Option<InnerUid>, gid: Option<InnerGid>) -> Result<()> {
    rustix::fs::chownat(
        ifd,
        "",
        uid.map(|u| rustix::fs::Uid::from_raw_unchecked(u.get())),
        gid.map(|g| rustix::fs::Gid::from_raw_unchecked(g.get())),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(sys)
}
