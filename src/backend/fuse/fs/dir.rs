//! Directories: opendir (or none, where offsets are stable), readdir, readdirplus.

use super::*;

impl ShiftFs {
    pub(super) fn open_dir_fd(&self, inode: &Inode) -> Result<OwnedFd> {
        self.proc
            .reopen(
                inode.fd().map_err(io)?.as_fd(),
                OFlags::RDONLY | OFlags::DIRECTORY,
            )
            .map_err(io)
    }

    pub(super) fn do_opendir(&self, uid: u32, ino: INodeNo) -> Result<u64> {
        let inode = self.inode(ino)?;
        let slot = self.open_slot(uid)?;
        let fd = self.open_dir_fd(&inode)?;
        Ok(self.dirs.insert(DirHandle::new(fd, slot)))
    }

    /// Runs `f` on the directory's fd: its handle's, or for handle 0 (a directory the kernel
    /// did not open, `NO_OPENDIR`) a fresh one.
    pub(super) fn with_dir_fd<T>(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        f: impl FnOnce(&OwnedFd) -> Result<T>,
    ) -> Result<T> {
        if fh.0 == NO_HANDLE {
            f(&self.open_dir_fd(&*self.inode(ino)?)?)
        } else {
            f(&self.dir(fh)?.lock())
        }
    }

    /// Walks the directory from `offset`, handing each entry to `add` until it reports the
    /// reply buffer full. Offsets are the backing filesystem's own cookies, so any fd of the
    /// directory can resume a listing.
    pub(super) fn walk_dir(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        add: impl FnMut(&OsStr, u64, u32, u64) -> bool,
    ) -> Result<()> {
        self.with_dir_fd(ino, fh, |fd| Self::list_from(fd, offset, add))
    }

    pub(super) fn list_from(
        fd: &OwnedFd,
        offset: u64,
        mut add: impl FnMut(&OsStr, u64, u32, u64) -> bool,
    ) -> Result<()> {
        rustix::fs::seek(fd, SeekFrom::Start(offset)).map_err(sys)?;
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 16 * 1024];
        let mut iter = RawDir::new(fd, &mut buf);
        while let Some(ent) = iter.next() {
            let ent = ent.map_err(sys)?;
            let name = OsStr::from_bytes(ent.file_name().to_bytes());
            let dtype = if ent.file_type() == rustix::fs::FileType::Unknown {
                // DT_UNKNOWN (filesystems without a type in the dirent): FUSE needs a type.
                rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_or(libc::S_IFREG, |st| st.st_mode & libc::S_IFMT)
            } else {
                ent.file_type().as_raw_mode() & libc::S_IFMT
            };
            if add(name, ent.ino(), dtype, ent.next_entry_cookie()) {
                break;
            }
        }
        Ok(())
    }

    pub(super) fn do_readdir(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectory,
    ) -> Result<()> {
        self.walk_dir(ino, fh, offset, |name, ino, mode, next| {
            reply.add(INodeNo(ino), next, file_type(mode), name)
        })
    }

    pub(super) fn do_readdirplus(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectoryPlus,
    ) -> Result<()> {
        let parent = self.inode(ino)?;
        self.walk_dir(ino, fh, offset, |name, ino, mode, next| {
            let b = name.as_bytes();
            if b == b"." || b == b".." {
                // fuser sends attr.ino as both node id and d_ino. The kernel never links
                // "." or "..", and glibc hides d_ino 0, so give the real inode number.
                let attr = FileAttr {
                    ino: INodeNo(ino),
                    ..blank_attr(mode)
                };
                return reply.add(INodeNo(ino), next, name, &Duration::ZERO, &attr, GEN);
            }
            match self.lookup_child(&parent, name) {
                Ok((inode, attr)) => {
                    let full = reply.add(INodeNo(inode.nodeid), next, name, &self.ttl, &attr, GEN);
                    if full {
                        // Not sent: the kernel never counted this lookup.
                        self.inodes.forget(inode.nodeid, 1);
                    }
                    full
                }
                // Vanished between getdents and open: leave it out.
                Err(e) if e == Errno::ENOENT => false,
                // Listed without attributes (node id 0: the kernel links nothing).
                Err(_) => {
                    let attr = blank_attr(mode);
                    reply.add(INodeNo(0), next, name, &Duration::ZERO, &attr, GEN)
                }
            }
        })
    }
}
