//! The fuser adapter: each `Filesystem` method calls a `do_x` returning `Result<_, Errno>`
//! and replies exactly once; long data requests (fsync, fallocate, copy_file_range) run on
//! the data pool.

use super::*;

/// `ShiftFs::as_writer` for a request whose caller (pid, host uid, host gid) was taken before
/// it moved to the pool.
fn as_data_writer<T>(ids: (u32, OuterUid, OuterGid), f: impl Fn() -> Result<T>) -> Result<T> {
    let (pid, uid, gid) = ids;
    limited(
        FsIds::Host(uid, gid),
        || Caller::read(Path::new("/proc"), pid, uid.get(), gid.get()),
        f,
    )
}

/// Bytes one COPY_FILE_RANGE request copies at most: the copy then holds a data thread for
/// milliseconds, not seconds, and the caller's loop (copy_file_range may copy less than
/// asked) sends the next part.
const COPY_CHUNK: u64 = 4 << 20;

/// A directory's fd for a request that outlives the borrow of the filesystem.
enum DirFd {
    Handle(Arc<DirHandle>),
    Fresh(OwnedFd),
}

fn sync_fd(fd: BorrowedFd<'_>, datasync: bool) -> Result<()> {
    if datasync {
        rustix::fs::fdatasync(fd).map_err(sys)
    } else {
        rustix::fs::fsync(fd).map_err(sys)
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, data: Result<Vec<u8>>) {
    match data {
        Err(e) => reply.error(e),
        Ok(v) if size == 0 => match u32::try_from(v.len()) {
            Ok(n) => reply.size(n),
            Err(_) => reply.error(Errno::E2BIG),
        },
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
    }
}

/// A name made, removed or renamed in `parent`: the other sessions drop their entry (a
/// cached miss too) and their listing of `parent`.
fn name_changed(parent: INodeNo, name: &OsStr) -> [Stale; 2] {
    [
        Stale::Entry(parent.0, name.to_owned()),
        Stale::Data(parent.0),
    ]
}

impl ShiftFs {
    /// After a change that succeeded, the other sessions of this source drop what it made
    /// stale (`share.rs`) before the caller is answered.
    fn changed<T>(&self, r: &Result<T>, stale: impl FnOnce() -> Vec<Stale>) {
        if r.is_ok() {
            self.share.changed(stale);
        }
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for ShiftFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        // Not FUSE_ATOMIC_O_TRUNC: with it the daemon truncates during OPEN, before the VFS
        // checks ETXTBSY, so open(O_TRUNC) of a running program through the mount failed
        // with ETXTBSY yet had already emptied the program on disk (seen with pjdfstest).
        let wanted = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_DONT_MASK
            | InitFlags::FUSE_AUTO_INVAL_DATA
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let missing = wanted & !caps;
        if !missing.is_empty() {
            tracing::info!("kernel lacks FUSE features {missing:?}; continuing without them");
        }
        if config.add_capabilities(wanted & caps).is_err() {
            tracing::warn!("kernel rejected FUSE capabilities {:?}", wanted & caps);
        }
        // Listings without OPENDIR need a kernel that knows ENOSYS there (5.1+), caching
        // (a listing cached across opens), and offsets that need no per-open state.
        if !self.ttl.is_zero()
            && self.stable_dir_offsets
            && caps.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
        {
            self.no_opendir = true;
        }
        if self.idmappable {
            if caps.contains(InitFlags::FUSE_ALLOW_IDMAP)
                && config.add_capabilities(InitFlags::FUSE_ALLOW_IDMAP).is_ok()
            {
                tracing::info!("idmappable: the kernel may idmap this mount");
            } else {
                tracing::warn!(
                    "the kernel cannot idmap FUSE mounts (FUSE_ALLOW_IDMAP needs Linux 6.12+): \
                     this mount serves SOURCE unshifted, but no idmapped mount can be stacked on it"
                );
            }
        }
        if self.want_passthrough {
            if !caps.contains(InitFlags::FUSE_PASSTHROUGH) {
                tracing::warn!(
                    "kernel has no FUSE passthrough (needs Linux 6.9+); serving file data \
                     through the daemon"
                );
            } else if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(self.stack_depth).is_ok()
            {
                self.passthrough.store(true, Ordering::Relaxed);
            } else {
                tracing::warn!(
                    "could not enable FUSE passthrough; serving file data through the daemon"
                );
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent, name) {
            Ok(attr) => reply.entry(&self.ttl, &attr, GEN),
            // Node id 0 with a timeout: the kernel caches the miss (library and module
            // searches probe many absent names). Creations through the mount drop it.
            Err(e) if e == Errno::ENOENT && !self.ttl.is_zero() => {
                reply.entry(&self.ttl, &blank_attr(libc::S_IFREG), GEN)
            }
            Err(e) => reply.error(e),
        }
    }

    // batch_forget: fuser's default calls this per node (its ForgetOne type is private).
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.do_getattr(ino, fh) {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.do_setattr(req, ino, mode, uid, gid, size, atime, mtime, fh);
        self.changed(&r, || match size {
            Some(_) => vec![Stale::Data(ino.0)],
            None => vec![Stale::Attr(ino.0)],
        });
        match r {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.do_readlink(ino) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.do_mknod(req, parent, name, mode, umask, rdev);
        self.changed(&r, || name_changed(parent, name).into());
        match r {
            Ok(attr) => reply.entry(&self.ttl, &attr, GEN),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.do_mkdir(req, parent, name, mode, umask);
        self.changed(&r, || name_changed(parent, name).into());
        match r {
            Ok(attr) => reply.entry(&self.ttl, &attr, GEN),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.do_unlink(parent, name, AtFlags::empty());
        self.changed(&r, || name_changed(parent, name).into());
        reply_empty(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.do_unlink(parent, name, AtFlags::REMOVEDIR);
        self.changed(&r, || name_changed(parent, name).into());
        reply_empty(reply, r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.do_symlink(req, parent, link_name, target);
        self.changed(&r, || name_changed(parent, link_name).into());
        match r {
            Ok(attr) => reply.entry(&self.ttl, &attr, GEN),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.do_rename(req, parent, name, newparent, newname, flags);
        self.changed(&r, || {
            let mut stale = Vec::from(name_changed(parent, name));
            stale.extend(name_changed(newparent, newname));
            stale
        });
        reply_empty(reply, r);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.do_link(req, ino, newparent, newname);
        self.changed(&r, || {
            let mut stale = Vec::from(name_changed(newparent, newname));
            stale.push(Stale::Attr(ino.0));
            stale
        });
        match r {
            Ok(attr) => reply.entry(&self.ttl, &attr, GEN),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // The kernel keeps the credentials of the registration for every passthrough write.
        // One look at the caller's ids (on an idmappable mount a read of /proc) for both.
        let host = self.host_ids(req);
        match self.do_open(host, ino, flags, |fd| reply.open_backing(fd)) {
            Ok((fh, fl, Some(b))) => reply.opened_passthrough(FileHandle(fh), fl, &b),
            Ok((fh, fl, None)) => reply.opened(FileHandle(fh), fl),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(fh, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.as_writer(req, || self.do_write(fh, offset, data));
        self.changed(&r, || vec![Stale::Data(ino.0)]);
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Locks are the kernel's (no POSIX_LOCKS/FLOCK_LOCKS), nothing is buffered here.
        reply_empty(reply, self.file(fh).map(drop));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(fh.0);
        // Passthrough writes bypass the daemon: the other sessions learn of them when the
        // writer's file is released.
        if is_write(flags.0) {
            self.changed(&Ok(()), || vec![Stale::Data(ino.0)]);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.file(fh) {
            Ok(h) => self
                .data
                .run(move || reply_empty(reply, sync_fd(h.fd(), datasync))),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // ENOSYS (see `init`): the kernel stops sending OPENDIR and RELEASEDIR (two round
        // trips per directory walked) and keeps listings across opens (FOPEN_CACHE_DIR and
        // KEEP_CACHE are its default then), dropping one when the directory changes through
        // the mount or its mtime moves. Listings then come with handle 0.
        if self.no_opendir {
            return reply.error(Errno::ENOSYS);
        }
        // With caching off, every open lists afresh.
        let flags = if self.ttl.is_zero() {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        };
        match self.do_opendir(self.host_ids(req).0.get(), ino) {
            Ok(fh) => reply.opened(FileHandle(fh), flags),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.do_readdir(ino, fh, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.do_readdirplus(ino, fh, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.remove(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let dir = if fh.0 == NO_HANDLE {
            self.inode(ino)
                .and_then(|i| self.open_dir_fd(&i))
                .map(DirFd::Fresh)
        } else {
            self.dir(fh).map(DirFd::Handle)
        };
        match dir {
            Ok(dir) => self.data.run(move || {
                let r = match &dir {
                    DirFd::Handle(h) => sync_fd(h.lock().as_fd(), datasync),
                    DirFd::Fresh(fd) => sync_fd(fd.as_fd(), datasync),
                };
                reply_empty(reply, r);
            }),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.do_statfs(ino) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.do_setxattr(req, ino, name, value, flags);
        self.changed(&r, || vec![Stale::Attr(ino.0)]);
        reply_empty(reply, r);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.do_getxattr(ino, name));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.do_listxattr(req, ino));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.do_removexattr(ino, name);
        self.changed(&r, || vec![Stale::Attr(ino.0)]);
        reply_empty(reply, r);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions: the kernel checks access on the translated
        // attributes and does not ask us; answer for completeness.
        reply_empty(reply, self.inode(ino).map(drop));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let host = self.host_ids(req);
        let r = self.do_create(req, parent, name, mode, umask, flags, host, |fd| {
            reply.open_backing(fd)
        });
        self.changed(&r, || name_changed(parent, name).into());
        match r {
            Ok((attr, fh, fl, Some(b))) => {
                reply.created_passthrough(&self.ttl, &attr, GEN, FileHandle(fh), fl, &b)
            }
            Ok((attr, fh, fl, None)) => reply.created(&self.ttl, &attr, GEN, FileHandle(fh), fl),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let prepared = self.file(fh).and_then(|h| {
            let mode =
                rustix::fs::FallocateFlags::from_bits(mode as u32).ok_or(Errno::EOPNOTSUPP)?;
            Ok((h, mode))
        });
        let (uid, gid) = self.host_ids(req);
        let ids = (req.pid(), uid, gid);
        match prepared {
            Ok((h, mode)) => self.data.run(move || {
                let r = as_data_writer(ids, || {
                    rustix::fs::fallocate(h.fd(), mode, offset, length).map_err(sys)
                });
                reply_empty(reply, r);
            }),
            Err(e) => reply.error(e),
        }
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        match self.do_ioctl(req, ino, cmd, in_data, out_size) {
            Ok(out) if out.len() <= out_size as usize => reply.ioctl(0, &out),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = self.file(fh).and_then(|h| {
            let off = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
            let pos = match whence {
                libc::SEEK_DATA => SeekFrom::Data(off),
                libc::SEEK_HOLE => SeekFrom::Hole(off),
                libc::SEEK_SET => SeekFrom::Start(off),
                _ => return Err(Errno::EINVAL),
            };
            let r = rustix::fs::seek(h.fd(), pos).map_err(sys)?;
            i64::try_from(r).map_err(|_| Errno::EOVERFLOW)
        });
        match r {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let files = (|| {
            if !flags.is_empty() {
                return Err(Errno::EINVAL);
            }
            Ok((self.file(fh_in)?, self.file(fh_out)?))
        })();
        let (i, o) = match files {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let (uid, gid) = self.host_ids(req);
        let ids = (req.pid(), uid, gid);
        self.data.run(move || {
            let len = len.min(COPY_CHUNK) as usize;
            let r = as_data_writer(ids, || {
                let (mut oi, mut oo) = (offset_in, offset_out);
                rustix::fs::copy_file_range(i.fd(), Some(&mut oi), o.fd(), Some(&mut oo), len)
                    .map_err(sys)
            })
            .and_then(|n| u32::try_from(n).map_err(|_| Errno::EOVERFLOW));
            match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            }
        });
    }
}
