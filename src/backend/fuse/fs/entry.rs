//! Operations that make, name and remove objects: lookup, mknod, mkdir, symlink, link,
//! unlink, rename, create. New objects get the caller's inner ids (see `create_as_caller`).

use super::*;

impl ShiftFs {
    pub(super) fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr> {
        let p = self.inode(parent)?;
        Ok(self.lookup_child(&p, name)?.1)
    }

    pub(super) fn do_readlink(&self, ino: INodeNo) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        if !inode.is_symlink() {
            return Err(Errno::EINVAL);
        }
        let target =
            rustix::fs::readlinkat(inode.fd().map_err(io)?, "", Vec::new()).map_err(sys)?;
        Ok(target.into_bytes())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<FileAttr> {
        let p = self.inode(parent)?;
        self.check_writable(&p)?;
        let pfd = p.fd().map_err(io)?;
        let pfd = pfd.as_fd();
        check_name(name)?;
        let kind = mode & libc::S_IFMT;
        let ftype = match kind {
            libc::S_IFIFO => rustix::fs::FileType::Fifo,
            libc::S_IFSOCK => rustix::fs::FileType::Socket,
            libc::S_IFREG | 0 => rustix::fs::FileType::RegularFile,
            // A whiteout (char 0:0) is no device: the kernel lets any user namespace root
            // make one (overlayfs in containers needs it), so `nodev` does not refuse it.
            libc::S_IFCHR if rdev == 0 => rustix::fs::FileType::CharacterDevice,
            libc::S_IFCHR | libc::S_IFBLK if !self.flags.dev || p.mount.nodev() => {
                return Err(Errno::EPERM);
            }
            libc::S_IFCHR => rustix::fs::FileType::CharacterDevice,
            libc::S_IFBLK => rustix::fs::FileType::BlockDevice,
            _ => return Err(Errno::EINVAL),
        };
        self.create_as_caller(req, Some(umask), &p, pfd, name, || {
            rustix::fs::mknodat(
                pfd,
                name,
                ftype,
                Mode::from_raw_mode(mode & 0o7777),
                decode_dev(rdev),
            )
            .map_err(sys)
        })?;
        Ok(self.lookup_child(&p, name)?.1)
    }

    pub(super) fn do_mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr> {
        let p = self.inode(parent)?;
        self.check_writable(&p)?;
        let pfd = p.fd().map_err(io)?;
        let pfd = pfd.as_fd();
        check_name(name)?;
        self.create_as_caller(req, Some(umask), &p, pfd, name, || {
            rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(mode & 0o7777)).map_err(sys)
        })?;
        Ok(self.lookup_child(&p, name)?.1)
    }

    pub(super) fn do_symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
    ) -> Result<FileAttr> {
        let p = self.inode(parent)?;
        self.check_writable(&p)?;
        let pfd = p.fd().map_err(io)?;
        let pfd = pfd.as_fd();
        check_name(name)?;
        self.create_as_caller(req, None, &p, pfd, name, || {
            rustix::fs::symlinkat(target, pfd, name).map_err(sys)
        })?;
        Ok(self.lookup_child(&p, name)?.1)
    }

    pub(super) fn do_link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
    ) -> Result<FileAttr> {
        let inode = self.inode(ino)?;
        let p = self.inode(newparent)?;
        self.check_writable(&p)?;
        let (ifd, pfd) = (inode.fd().map_err(io)?, p.fd().map_err(io)?);
        check_name(newname)?;
        self.check_caller_mapped(req)?;
        let st = rustix::fs::fstat(ifd.as_fd()).map_err(sys)?;
        self.check_owner_mapped(&st, Errno::EOVERFLOW)?;
        // The new name keeps the inode's owner; the directory may grow.
        self.as_writer(req, || {
            rustix::fs::linkat(ifd.as_fd(), "", pfd.as_fd(), newname, AtFlags::EMPTY_PATH)
                .map_err(sys)
        })?;
        let st = rustix::fs::fstat(ifd.as_fd()).map_err(sys)?;
        if !self.inodes.add_lookup(inode.nodeid) {
            return Ok(self.lookup_child(&p, newname)?.1);
        }
        // The reply must carry the lookup just counted: nothing may fail after it.
        Ok(self.attr(&inode, &st))
    }

    pub(super) fn do_unlink(&self, parent: INodeNo, name: &OsStr, flags: AtFlags) -> Result<()> {
        let p = self.inode(parent)?;
        self.check_writable(&p)?;
        let pfd = p.fd().map_err(io)?;
        let pfd = pfd.as_fd();
        check_name(name)?;
        self.check_victim(&p, name, Errno::ENOENT)?;
        rustix::fs::unlinkat(pfd, name, flags).map_err(sys)
    }

    pub(super) fn do_rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<()> {
        let p = self.inode(parent)?;
        let np = self.inode(newparent)?;
        self.check_writable(&p)?;
        self.check_writable(&np)?;
        check_name(name)?;
        check_name(newname)?;
        let mut flags = rustix::fs::RenameFlags::from_bits(flags.bits()).ok_or(Errno::EINVAL)?;
        self.check_victim(&p, name, Errno::ENOENT)?;
        match self.check_victim(&np, newname, Errno::EEXIST) {
            // A new name is a creation: the caller must be mapped. The kernel checked
            // permissions for a free name; never replace a file that appeared since.
            Err(e) if e == Errno::ENOENT => {
                self.check_caller_mapped(req)?;
                if flags.is_empty() {
                    flags = rustix::fs::RenameFlags::NOREPLACE;
                }
            }
            r => r?,
        }
        let (pfd, npfd) = (p.fd().map_err(io)?, np.fd().map_err(io)?);
        if flags.contains(rustix::fs::RenameFlags::WHITEOUT) {
            // The whiteout left at the old name is a new object: it must belong to the
            // caller, as on the plain file system, not to the daemon. A RENAME on an
            // idmappable mount carries no caller ids: the caller's ids in its own user
            // namespace stand for them (see `Caller::may_keep_setgid_in_own_ns`), else the
            // filesystem root's.
            let ids = if self.idmappable {
                let (uid, gid) = self.caller(req).fs_ids_in_own_ns().unwrap_or((0, 0));
                FsIds::Disk(InnerUid::new(uid), InnerGid::new(gid))
            } else {
                self.inner_caller(req)?
            };
            return self.as_ids(req, ids, None, || {
                rustix::fs::renameat_with(&pfd, name, &npfd, newname, flags).map_err(sys)
            });
        }
        self.as_writer(req, || {
            rustix::fs::renameat_with(&pfd, name, &npfd, newname, flags).map_err(sys)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        host: (OuterUid, OuterGid),
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> Result<(FileAttr, u64, FopenFlags, Option<Arc<BackingId>>)> {
        let p = self.inode(parent)?;
        self.check_writable(&p)?;
        let slot = self.open_slot(host.0.get())?;
        let pfd = p.fd().map_err(io)?;
        let pfd = pfd.as_fd();
        check_name(name)?;
        // Always O_EXCL: the kernel only asks us to create after a lookup found nothing, so
        // an existing file here was made since (on the source side, through another mount,
        // or behind a cached miss) and must not be opened with root's rights.
        let oflags = backing_open_flags(flags) | OFlags::CREATE | OFlags::EXCL;
        let created = self.create_as_caller(req, Some(umask), &p, pfd, name, || {
            open_beneath(pfd, name, oflags, mode & 0o7777)
        });
        // A file this request made is on the parent's mount; one that existed may be a
        // file bind-mounted there.
        let (fd, mnt) = match created {
            Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => {
                (self.open_existing_as_caller(req, pfd, name, flags)?, None)
            }
            r => (r?, Some(p.key.mnt)),
        };
        let path_fd = self.proc.reopen(fd.as_fd(), OFlags::PATH).map_err(io)?;
        let (inode, attr) = self.remember(path_fd, mnt)?;
        let mode = self.open_mode(&inode, fd.as_fd(), is_write(flags), host, register);
        let (fh, fl, backing) = self.open_handle(inode, fd, mode, slot);
        Ok((attr, fh, fl, backing))
    }

    /// Opens an existing `name` the way the caller's open(O_CREAT) would have: with the
    /// caller's inner ids and groups and no capability beyond what the kernel leaves after
    /// the fsuid change, so the backing filesystem decides whether they may.
    pub(super) fn open_existing_as_caller(
        &self,
        req: &Request,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        flags: i32,
    ) -> Result<OwnedFd> {
        let ids = self.inner_caller(req)?;
        // The caller's supplementary groups as the filesystem knows them (unmapped ones
        // cannot match any on-disk group). On an idmappable mount the idmapping the caller
        // went through is unknown: none, fewer rights rather than more.
        let groups: Vec<u32> = if self.idmappable {
            Vec::new()
        } else {
            Caller::of(req)
                .groups
                .into_iter()
                .filter_map(|g| self.map.gid.to_inner(OuterGid::new(g)).map(InnerGid::get))
                .collect()
        };
        let _creds = FsCreds::switch_checked(ids, &groups).map_err(io)?;
        // Look before opening: opening a FIFO or a device has effects of its own (a blocked
        // writer goes on, a tape rewinds), so only a regular file is opened for real.
        let path_fd = open_beneath(dir, name, OFlags::PATH, 0)?;
        let st = rustix::fs::fstat(&path_fd).map_err(sys)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Errno::EEXIST);
        }
        self.proc
            .reopen(path_fd.as_fd(), backing_open_flags(flags))
            .map_err(io)
    }
}
