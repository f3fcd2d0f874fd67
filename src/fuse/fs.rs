//! The `Filesystem` implementation: each FUSE method calls a `do_x` returning
//! `Result<_, Errno>` and replies exactly once. Ids are translated at the edge: attributes
//! going out through `attr`, callers and chown targets coming in through `inner_*`.

use std::borrow::Cow;
use std::ffi::{CString, OsStr};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle,
    FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::Timespec;
use rustix::fs::{AtFlags, Mode, OFlags, RawDir, ResolveFlags, SeekFrom, Stat, Timestamps};
use rustix::io::Errno as SysErrno;
use rustix::thread::CapabilitySet;

use super::caller::Caller;
use super::handle::{DirHandle, FileHandle as OpenFile, HandleTable, OpenLimit, Slot};
use super::inode::{Inode, InodeTable, Key};
use super::pool::Pool;
use crate::idmap::{IdMapping, InnerGid, InnerUid, OuterGid, OuterUid};
use crate::mount::MountFlags;
use crate::sys::creds::{FsCreds, set_thread_umask};
use crate::sys::fileattr::{self, FsXattr, IFlags};
use crate::sys::procfd::{self, ProcFd};
use crate::xattr;

type Result<T> = std::result::Result<T, Errno>;

const GEN: Generation = Generation(0);

fn sys(e: SysErrno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

/// An `io::Error` from a syscall keeps its errno; only an error without one becomes EIO.
fn io(e: std::io::Error) -> Errno {
    Errno::from(e)
}

/// Open flags we pass on to the backing file. O_CREAT/O_EXCL are the daemon's business,
/// O_DIRECT would impose alignment on our own buffers, O_TRUNC comes as a separate SETATTR
/// (no FUSE_ATOMIC_O_TRUNC), O_NOCTTY and unknown bits (FMODE_EXEC) mean nothing to us.
fn backing_open_flags(flags: i32) -> OFlags {
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_NONBLOCK
        | libc::O_DSYNC
        | libc::O_SYNC
        | libc::O_NOATIME
        | libc::O_LARGEFILE;
    OFlags::from_bits_retain((flags & keep) as u32) | OFlags::CLOEXEC
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// Never panics: a timestamp SystemTime cannot hold shows as the epoch.
fn time(sec: i64, nsec: u64) -> SystemTime {
    let nsec = Duration::from_nanos(nsec.min(999_999_999));
    let secs = Duration::from_secs(sec.unsigned_abs());
    let t = if sec >= 0 {
        UNIX_EPOCH.checked_add(secs)
    } else {
        UNIX_EPOCH.checked_sub(secs)
    };
    t.and_then(|t| t.checked_add(nsec)).unwrap_or(UNIX_EPOCH)
}

fn timespec(t: Option<TimeOrNow>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: d.subsec_nanos().into(),
            },
            Err(e) => {
                let d = e.duration();
                let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                let (mut s, mut n) = (secs.saturating_neg(), -i64::from(d.subsec_nanos()));
                if n < 0 {
                    s = s.saturating_sub(1);
                    n += 1_000_000_000;
                }
                Timespec {
                    tv_sec: s,
                    tv_nsec: n as _,
                }
            }
        },
    }
}

/// FUSE carries device numbers in the kernel's `new_encode_dev` form.
fn encode_dev(dev: u64) -> u32 {
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn decode_dev(dev: u32) -> u64 {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    rustix::fs::makedev(major, minor)
}

/// A regular file whose write by an unprivileged caller must clear bits: setuid, or setgid
/// with group execute (without it setgid marks mandatory locking and stays).
fn is_sxid(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFREG
        && (mode & libc::S_ISUID != 0
            || mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP)
}

/// `mode` with the bits `is_sxid` looks at cleared.
fn killed_sxid(mode: u32) -> u32 {
    let mut m = mode & !libc::S_ISUID;
    if m & libc::S_IXGRP != 0 {
        m &= !libc::S_ISGID;
    }
    m
}

/// Files read through the FUSE page cache are smaller than this (most of a root file system);
/// larger ones are read through passthrough.
const PAGE_CACHE_MAX: i64 = 1 << 20;

fn is_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

/// How the kernel serves an open file's data.
enum OpenMode {
    /// Straight to the backing file (FUSE passthrough).
    Passthrough(Arc<BackingId>),
    /// Through the page cache and the daemon; `keep_cache` keeps pages from earlier opens.
    Cached { keep_cache: bool },
}

/// `__FMODE_EXEC`: set in the flags of the open the kernel makes for execve.
const FMODE_EXEC: i32 = 0x20;

/// The file capability xattr, which the kernel reads (through us) at exec.
const XATTR_CAPS: &[u8] = b"security.capability";

/// The handle of a directory the kernel did not open (handles start at 1).
const NO_HANDLE: u64 = 0;

fn blank_attr(mode: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: file_type(mode),
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

/// `STATX_MNT_ID_UNIQUE` (Linux 6.8): a mount id never reused while the system runs.
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;

/// The id of the mount `fd` is on: the unique one where the kernel has it, else the old
/// one (unique among mounts alive; ours stay alive while we hold fds on them).
fn mount_id(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let want = rustix::fs::StatxFlags::MNT_ID
        | rustix::fs::StatxFlags::from_bits_retain(STATX_MNT_ID_UNIQUE);
    let stx = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        want,
    )?;
    Ok(stx.stx_mnt_id)
}

/// The identity of the object `fd` (whose `fstat` is `st`) as reached through its mount.
fn key(fd: BorrowedFd<'_>, st: &Stat) -> Result<Key> {
    Ok(Key {
        mnt: mount_id(fd).map_err(io)?,
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// FUSE hands us one path component; refuse anything that could walk elsewhere.
fn check_name(name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

fn cstr(s: &OsStr) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| Errno::EINVAL)
}

/// `openat2` confined beneath `dir`, never following a symlink or magic link.
fn open_beneath(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlags, mode: u32) -> Result<OwnedFd> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_SYMLINKS;
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, name, flags, Mode::from_raw_mode(mode), resolve) {
            // The kernel asks for a retry when a concurrent rename raced the lookup.
            Err(SysErrno::AGAIN) if tries < 8 => tries += 1,
            r => return r.map_err(sys),
        }
    }
}

pub(super) struct Config {
    pub mapping: IdMapping,
    pub flags: MountFlags,
    pub ttl: Duration,
    pub passthrough: bool,
    pub stack_depth: u32,
    /// Directory offsets are cookies any fd can resume from (not overlayfs, whose offsets
    /// index a listing cached per open file).
    pub stable_dir_offsets: bool,
    /// Inodes anchored by fds before file handles are used instead.
    pub fd_budget: usize,
    /// Files and directories held open for callers, at most.
    pub max_open: usize,
    /// Threads for long data requests (fsync, fallocate, copy_file_range).
    pub data_threads: usize,
}

pub(super) struct ShiftFs {
    map: IdMapping,
    flags: MountFlags,
    ttl: Duration,
    inodes: InodeTable,
    files: HandleTable<OpenFile>,
    dirs: HandleTable<DirHandle>,
    open_limit: Arc<OpenLimit>,
    /// Where long data requests run, off the session's workers.
    data: Pool,
    proc: ProcFd,
    want_passthrough: bool,
    stack_depth: u32,
    stable_dir_offsets: bool,
    /// Decided in `init`, cleared for the rest of the mount when the kernel refuses.
    passthrough: AtomicBool,
    /// Decided in `init`: directories are listed without OPENDIR (handle 0).
    no_opendir: bool,
}

impl ShiftFs {
    pub fn new(root: OwnedFd, proc: ProcFd, cfg: Config) -> std::io::Result<Self> {
        let st = rustix::fs::fstat(&root)?;
        let mnt = mount_id(root.as_fd())?;
        Ok(Self {
            map: cfg.mapping,
            flags: cfg.flags,
            ttl: cfg.ttl,
            inodes: InodeTable::new(
                root,
                Key {
                    mnt,
                    dev: st.st_dev,
                    ino: st.st_ino,
                },
                cfg.fd_budget,
            ),
            files: HandleTable::default(),
            dirs: HandleTable::default(),
            open_limit: OpenLimit::new(cfg.max_open),
            data: Pool::new(cfg.data_threads),
            proc,
            want_passthrough: cfg.passthrough,
            stack_depth: cfg.stack_depth,
            stable_dir_offsets: cfg.stable_dir_offsets,
            passthrough: AtomicBool::new(false),
            no_opendir: false,
        })
    }

    fn inode(&self, ino: INodeNo) -> Result<Arc<Inode>> {
        self.inodes.get(ino.0).ok_or(Errno::ESTALE)
    }

    /// A place under the open-file cap for a file or directory `uid` opens: ENFILE past it
    /// (the opener is refused, not the daemon's other work).
    fn open_slot(&self, uid: u32) -> Result<Slot> {
        self.open_limit.acquire(uid).ok_or(Errno::ENFILE)
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<OpenFile>> {
        self.files.get(fh.0).ok_or(Errno::EBADF)
    }

    fn dir(&self, fh: FileHandle) -> Result<Arc<DirHandle>> {
        self.dirs.get(fh.0).ok_or(Errno::EBADF)
    }

    /// Whether setuid/setgid bits and file capabilities of `inode` are hidden: it is on a
    /// `nosuid` submount while this mount is `suid`, and the kernel, which knows only this
    /// mount's flags, would honour them at exec.
    fn hides_suid(&self, inode: &Inode) -> bool {
        self.flags.suid && inode.mount.nosuid() && inode.is_reg()
    }

    fn attr(&self, inode: &Inode, st: &Stat) -> FileAttr {
        let mut perm = st.st_mode & 0o7777;
        if self.hides_suid(inode) {
            perm &= !(libc::S_ISUID | libc::S_ISGID);
        }
        FileAttr {
            ino: INodeNo(inode.nodeid),
            size: st.st_size.max(0) as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: file_type(st.st_mode),
            perm: perm as u16,
            nlink: st.st_nlink as u32,
            // (uid_t)-1 is INVALID_UID to the kernel: it matches no caller in permission checks
            // (65534 would make host `nobody` the owner), and stat shows it as the overflow
            // id, exactly as on an idmapped mount.
            uid: self
                .map
                .uid
                .to_outer(InnerUid(st.st_uid))
                .map_or(u32::MAX, |o| o.0),
            gid: self
                .map
                .gid
                .to_outer(InnerGid(st.st_gid))
                .map_or(u32::MAX, |o| o.0),
            rdev: encode_dev(st.st_rdev),
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    fn stat_attr(&self, inode: &Inode) -> Result<FileAttr> {
        let st = rustix::fs::fstat(inode.fd().map_err(io)?).map_err(sys)?;
        Ok(self.attr(inode, &st))
    }

    /// EROFS when `inode` is on a read-only mount (the source's own or one below it). The
    /// kernel refuses such changes by itself, since every change acts through an fd of the
    /// inode's own mount; this answers before any work is done and does not depend on it.
    /// A mount seen read-only is looked at again before refusing: it may have been
    /// remounted read-write since.
    fn check_writable(&self, inode: &Inode) -> Result<()> {
        if !inode.mount.read_only() {
            return Ok(());
        }
        inode.mount.refresh(inode.fd().map_err(io)?.as_fd());
        if inode.mount.read_only() {
            return Err(Errno::EROFS);
        }
        Ok(())
    }

    /// The on-disk owner for an object created by `req`'s caller; EOVERFLOW when the
    /// caller's fsuid or fsgid has no inner id (nothing may be created then).
    fn inner_caller(&self, req: &Request) -> Result<(u32, u32)> {
        let uid = self.map.uid.to_inner(OuterUid(req.uid()));
        let gid = self.map.gid.to_inner(OuterGid(req.gid()));
        match (uid, gid) {
            (Some(u), Some(g)) => Ok((u.0, g.0)),
            _ => Err(Errno::EOVERFLOW),
        }
    }

    fn owner_mapped(&self, st: &Stat) -> (bool, bool) {
        (
            self.map.uid.to_outer(InnerUid(st.st_uid)).is_some(),
            self.map.gid.to_outer(InnerGid(st.st_gid)).is_some(),
        )
    }

    /// Like the kernel's idmapped mounts (`may_delete`, `may_linkat`, "inode writeback is
    /// not safe when the uid or gid are invalid"): an object whose on-disk owner has no
    /// outer id may not be deleted, renamed, linked or have its xattrs changed, else a host
    /// user whose id happens to equal the overflow id would own every unmapped file.
    fn check_owner_mapped(&self, st: &Stat, err: Errno) -> Result<()> {
        match self.owner_mapped(st) {
            (true, true) => Ok(()),
            _ => Err(err),
        }
    }

    /// Before deleting or replacing `name`: the object there must be the one the kernel
    /// checked permissions on (it looked it up, so it is in the table; one swapped in on
    /// the source side since is not) and its owner must be mapped.
    fn check_victim(&self, parent: &Inode, name: &OsStr, stale: Errno) -> Result<()> {
        let fd = open_beneath(parent.fd().map_err(io)?.as_fd(), name, OFlags::PATH, 0)?;
        let st = rustix::fs::fstat(&fd).map_err(sys)?;
        if !self.inodes.knows(key(fd.as_fd(), &st)?, fd.as_fd()) {
            return Err(stale);
        }
        self.check_owner_mapped(&st, Errno::EOVERFLOW)
    }

    /// Runs `f` (one creating syscall) with the caller's inner ids as this thread's fsuid
    /// and fsgid, so the backing filesystem gives the new object its owner atomically and
    /// applies setgid-directory inheritance itself; space as `limited` allows.
    fn as_caller<T>(
        &self,
        req: &Request,
        umask: Option<u32>,
        f: impl Fn() -> Result<T>,
    ) -> Result<T> {
        let (uid, gid) = self.inner_caller(req)?;
        if let Some(mask) = umask {
            set_thread_umask(mask).map_err(io)?;
        }
        limited(uid, gid, || Caller::of(req), f)
    }

    /// `as_caller` for a syscall that makes `name` in `dir`, undone (ENOSPC) when it took
    /// blocks ext4 keeps for root and the caller may not have them. The kernel grants them
    /// by the caller's host fsuid; the daemon creates with the inner one so the object gets
    /// its owner, and a container root (inner 0) would pass for root (the default `resuid`).
    fn create_as_caller<T>(
        &self,
        req: &Request,
        umask: Option<u32>,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        make: impl Fn() -> Result<T>,
    ) -> Result<T> {
        let near = NearReserve::check(dir);
        let made = self.as_caller(req, umask, make)?;
        let Some(near) = near else {
            return Ok(made);
        };
        let made_st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW);
        if !near.dipped(dir) || near.may_use(dir, req.uid(), req.gid(), &Caller::of(req)) {
            return Ok(made);
        }
        drop(made);
        // Only what this request made: a name swapped in on the source side since stays.
        if let Ok(made_st) = made_st
            && let Ok(now) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            && (now.st_dev, now.st_ino) == (made_st.st_dev, made_st.st_ino)
        {
            let flags = if now.st_mode & libc::S_IFMT == libc::S_IFDIR {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            if let Err(e) = rustix::fs::unlinkat(dir, name, flags) {
                tracing::warn!("cannot remove {name:?}, made in root's reserve: {e}");
            }
        }
        Err(Errno::ENOSPC)
    }

    /// Runs a change that may take space but gives no object an owner (write, link, rename,
    /// xattrs) with the caller's host ids, as the kernel would, limited as `limited` says.
    fn as_writer<T>(&self, req: &Request, f: impl Fn() -> Result<T>) -> Result<T> {
        limited(req.uid(), req.gid(), || Caller::of(req), f)
    }

    /// Records a kernel lookup of the object `fd` refers to.
    fn remember(&self, fd: OwnedFd) -> Result<(Arc<Inode>, FileAttr)> {
        let st = rustix::fs::fstat(&fd).map_err(sys)?;
        let key = key(fd.as_fd(), &st)?;
        let kind = st.st_mode & libc::S_IFMT;
        if (kind == libc::S_IFCHR || kind == libc::S_IFBLK) && st.st_rdev != 0 {
            // The kernel opens device nodes itself, without asking us: a device on a `nodev`
            // submount is not served when this mount allows devices.
            let mount = self.inodes.mount(key.mnt, fd.as_fd(), kind);
            if self.flags.dev && mount.nodev() {
                return Err(Errno::EACCES);
            }
        }
        let inode = self.inodes.insert_lookup(fd, key, kind);
        let attr = self.attr(&inode, &st);
        Ok((inode, attr))
    }

    fn lookup_child(&self, parent: &Inode, name: &OsStr) -> Result<(Arc<Inode>, FileAttr)> {
        check_name(name)?;
        let fd = open_beneath(parent.fd().map_err(io)?.as_fd(), name, OFlags::PATH, 0)?;
        self.remember(fd)
    }

    /// Ids inside ACL entries and a capability's root id, on-disk to host; an ACL entry
    /// without a host id shows as the overflow id.
    fn xattr_out(&self, name: &OsStr, value: Vec<u8>) -> Result<Vec<u8>> {
        let t = xattr::ToOuter(&self.map);
        match xattr::translate(name.as_bytes(), &value, &t, xattr::Unmapped::Omit) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Ok(value),
            // A capability for a root the mount cannot show is no capability here: the kernel's
            // exec path treats only ENODATA as "none" (any other error fails the exec).
            Err(xattr::Error::Unmapped { .. }) => Err(Errno::NO_XATTR),
            Err(e) => Err(Errno::from_i32(e.errno())),
        }
    }

    /// Ids in a value about to be written, host to on-disk; an id without an on-disk id
    /// refuses the whole value (EOVERFLOW) and nothing is written.
    fn xattr_in<'a>(&self, name: &OsStr, value: &'a [u8]) -> Result<Cow<'a, [u8]>> {
        let t = xattr::ToInner(&self.map);
        match xattr::translate(name.as_bytes(), value, &t, xattr::Unmapped::Fail) {
            Ok(Some(v)) => Ok(Cow::Owned(v)),
            Ok(None) => Ok(Cow::Borrowed(value)),
            Err(e) => Err(Errno::from_i32(e.errno())),
        }
    }

    fn passthrough_on(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// How an open of `inode` is served, decided under the inode's lock so that concurrent
    /// opens never mix modes (the kernel fails an open with EIO when its mode, passthrough or
    /// cached, differs from that of the inode's other open files).
    ///
    /// Opens for writing go through passthrough, registering `fd` with the kernel when no
    /// open handle holds the inode's shared `BackingId`; so do reads of files of
    /// `PAGE_CACHE_MAX` or more (the backing file's own page cache, no second copy).
    /// With caching on, read-only opens of smaller files use the FUSE page cache (unless
    /// passthrough is active on the inode or ever wrote it): a warm read is then served
    /// without the daemon, while every passthrough read makes the kernel drop the cached
    /// atime, so the next stat costs a GETATTR and the ACL check after it a GETXATTR. With
    /// caching off, reads go through passthrough too: always fresh, no GETATTR per read.
    /// A cached open reserves its place in `cached_opens`, which the handle releases.
    fn open_mode(
        &self,
        inode: &Inode,
        fd: BorrowedFd<'_>,
        write: bool,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> OpenMode {
        if !inode.is_reg() {
            return OpenMode::Cached { keep_cache: false };
        }
        let mut slot = inode
            .backing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let written = inode.passthrough_written.load(Ordering::Relaxed);
        let small = || rustix::fs::fstat(fd).is_ok_and(|st| st.st_size < PAGE_CACHE_MAX);
        let passthrough = if let Some(b) = slot.upgrade() {
            Some(b)
        } else if (!write && !written && !self.ttl.is_zero() && small())
            || !self.passthrough_on()
            || inode.cached_opens.load(Ordering::Relaxed) > 0
        {
            None
        } else {
            match register(fd) {
                Ok(id) => {
                    let id = Arc::new(id);
                    *slot = Arc::downgrade(&id);
                    Some(id)
                }
                Err(e) => {
                    self.passthrough_refused(inode, &e);
                    None
                }
            }
        };
        match passthrough {
            Some(id) => {
                if write {
                    inode.passthrough_written.store(true, Ordering::Relaxed);
                }
                OpenMode::Passthrough(id)
            }
            None => {
                inode.cached_opens.fetch_add(1, Ordering::Relaxed);
                OpenMode::Cached {
                    keep_cache: !written && !self.ttl.is_zero(),
                }
            }
        }
    }

    fn passthrough_refused(&self, inode: &Inode, e: &std::io::Error) {
        let code = e.raw_os_error().unwrap_or(0);
        if [libc::EPERM, libc::EOPNOTSUPP, libc::ENOTTY, libc::ENOSYS].contains(&code) {
            if self.passthrough.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    "kernel refused FUSE passthrough ({e}); serving file data through the \
                     daemon for the rest of this mount"
                );
            }
        } else {
            tracing::debug!("no passthrough for inode {}: {e}", inode.nodeid);
        }
    }

    /// Makes the handle of an open and the flags of its reply.
    /// NOFLUSH: close() need not wait for a FLUSH round trip, we buffer nothing and hold
    /// no locks. The kernel rejects any flag outside FOPEN_PASSTHROUGH_MASK (so no
    /// KEEP_CACHE) on a passthrough open and fails the open with EIO.
    fn open_handle(
        &self,
        inode: Arc<Inode>,
        fd: OwnedFd,
        mode: OpenMode,
        slot: Slot,
    ) -> (u64, FopenFlags, Option<Arc<BackingId>>) {
        let (backing, flags) = match mode {
            OpenMode::Passthrough(id) => (Some(id), FopenFlags::FOPEN_NOFLUSH),
            OpenMode::Cached { keep_cache: true } => (
                None,
                FopenFlags::FOPEN_NOFLUSH | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            OpenMode::Cached { keep_cache: false } => (None, FopenFlags::FOPEN_NOFLUSH),
        };
        let fh = self
            .files
            .insert(OpenFile::new(inode, fd, backing.clone(), slot));
        (fh, flags, backing)
    }

    // ---- operations -------------------------------------------------------------------

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr> {
        let p = self.inode(parent)?;
        Ok(self.lookup_child(&p, name)?.1)
    }

    fn do_getattr(&self, ino: INodeNo, fh: Option<FileHandle>) -> Result<FileAttr> {
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
    fn do_setattr(
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
        let uid = match uid {
            Some(u) => Some(self.map.uid.to_inner(OuterUid(u)).ok_or(Errno::EOVERFLOW)?),
            None => None,
        };
        let gid = match gid {
            Some(g) => Some(self.map.gid.to_inner(OuterGid(g)).ok_or(Errno::EOVERFLOW)?),
            None => None,
        };
        // As notify_change on an idmapped mount: no change to an object with an unmapped
        // owner unless the change maps it.
        let st = rustix::fs::fstat(ifd).map_err(sys)?;
        let (uid_ok, gid_ok) = self.owner_mapped(&st);
        if (!uid_ok && uid.is_none()) || (!gid_ok && gid.is_none()) {
            return Err(Errno::EOVERFLOW);
        }
        if mode.is_some() && inode.is_symlink() {
            return Err(Errno::EOPNOTSUPP);
        }
        if let Some(size) = size {
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
        }
        if uid.is_some() || gid.is_some() {
            rustix::fs::chownat(
                ifd,
                "",
                uid.map(|u| rustix::fs::Uid::from_raw_unchecked(u.0)),
                gid.map(|g| rustix::fs::Gid::from_raw_unchecked(g.0)),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(sys)?;
        }
        // After chown: the kernel sends the mode it wants (suid/sgid already cleared), and
        // the backing chown may have cleared bits we must set again.
        if let Some(mut mode) = mode {
            if self.hides_suid(&inode) {
                // Bits the caller cannot see are neither set nor cleared by a chmod.
                let hidden = libc::S_ISUID | libc::S_ISGID;
                let now = rustix::fs::fstat(ifd).map_err(sys)?.st_mode;
                mode = (mode & !hidden) | (now & hidden);
            }
            // A chmod rewrites an ACL's mask, which may take a new xattr block (ext4 shares
            // them between inodes).
            self.as_writer(req, || self.proc.chmod(ifd, mode & 0o7777).map_err(io))?;
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
            rustix::fs::chownat(
                ifd,
                "",
                None,
                None,
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(sys)?;
        }
        let kill = mode.is_none()
            && size.is_some()
            && is_sxid(st.st_mode)
            && !Caller::of(req).is_host_fsetid();
        if kill {
            let now = rustix::fs::fstat(ifd).map_err(sys)?.st_mode;
            self.proc
                .chmod(ifd, killed_sxid(now) & 0o7777)
                .map_err(io)?;
        }
        if atime.is_some() || mtime.is_some() {
            let times = Timestamps {
                last_access: timespec(atime),
                last_modification: timespec(mtime),
            };
            self.proc.utimens(ifd, &times).map_err(io)?;
        }
        let st = rustix::fs::fstat(ifd).map_err(sys)?;
        Ok(self.attr(&inode, &st))
    }

    fn do_readlink(&self, ino: INodeNo) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        if !inode.is_symlink() {
            return Err(Errno::EINVAL);
        }
        let target =
            rustix::fs::readlinkat(inode.fd().map_err(io)?, "", Vec::new()).map_err(sys)?;
        Ok(target.into_bytes())
    }

    #[allow(clippy::too_many_arguments)]
    fn do_mknod(
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
        self.create_as_caller(req, Some(umask), pfd, name, || {
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

    fn do_mkdir(
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
        self.create_as_caller(req, Some(umask), pfd, name, || {
            rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(mode & 0o7777)).map_err(sys)
        })?;
        Ok(self.lookup_child(&p, name)?.1)
    }

    fn do_symlink(
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
        self.create_as_caller(req, None, pfd, name, || {
            rustix::fs::symlinkat(target, pfd, name).map_err(sys)
        })?;
        Ok(self.lookup_child(&p, name)?.1)
    }

    fn do_link(
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
        self.inner_caller(req)?;
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

    fn do_unlink(&self, parent: INodeNo, name: &OsStr, flags: AtFlags) -> Result<()> {
        let p = self.inode(parent)?;
        self.check_writable(&p)?;
        let pfd = p.fd().map_err(io)?;
        let pfd = pfd.as_fd();
        check_name(name)?;
        self.check_victim(&p, name, Errno::ENOENT)?;
        rustix::fs::unlinkat(pfd, name, flags).map_err(sys)
    }

    fn do_rename(
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
                self.inner_caller(req)?;
                if flags.is_empty() {
                    flags = rustix::fs::RenameFlags::NOREPLACE;
                }
            }
            r => r?,
        }
        let (pfd, npfd) = (p.fd().map_err(io)?, np.fd().map_err(io)?);
        if flags.contains(rustix::fs::RenameFlags::WHITEOUT) {
            // The whiteout left at the old name is a new object: it must belong to the
            // caller, as on the plain file system, not to the daemon.
            return self.as_caller(req, None, || {
                rustix::fs::renameat_with(&pfd, name, &npfd, newname, flags).map_err(sys)
            });
        }
        self.as_writer(req, || {
            rustix::fs::renameat_with(&pfd, name, &npfd, newname, flags).map_err(sys)
        })
    }

    fn do_open(
        &self,
        uid: u32,
        ino: INodeNo,
        flags: OpenFlags,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> Result<(u64, FopenFlags, Option<Arc<BackingId>>)> {
        let inode = self.inode(ino)?;
        // The kernel sends OPEN for regular files only (it opens FIFOs and devices itself);
        // opening anything else for real would have effects of its own.
        if !inode.is_reg() {
            return Err(Errno::EIO);
        }
        if is_write(flags.0) {
            self.check_writable(&inode)?;
        }
        if flags.0 & FMODE_EXEC != 0 && inode.mount.noexec() {
            // As the kernel's exec on a `noexec` mount (mmap with PROT_EXEC cannot be
            // refused here: the kernel does not ask).
            return Err(Errno::EACCES);
        }
        let slot = self.open_slot(uid)?;
        let ifd = inode.fd().map_err(io)?;
        let fd = self
            .proc
            .reopen(ifd.as_fd(), backing_open_flags(flags.0))
            .map_err(io)?;
        let mode = self.open_mode(&inode, fd.as_fd(), is_write(flags.0), register);
        Ok(self.open_handle(inode, fd, mode, slot))
    }

    #[allow(clippy::too_many_arguments)]
    fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> Result<(FileAttr, u64, FopenFlags, Option<Arc<BackingId>>)> {
        let p = self.inode(parent)?;
        self.check_writable(&p)?;
        let slot = self.open_slot(req.uid())?;
        let pfd = p.fd().map_err(io)?;
        let pfd = pfd.as_fd();
        check_name(name)?;
        // Always O_EXCL: the kernel only asks us to create after a lookup found nothing, so
        // an existing file here was made since (on the source side, through another mount,
        // or behind a cached miss) and must not be opened with root's rights.
        let oflags = backing_open_flags(flags) | OFlags::CREATE | OFlags::EXCL;
        let created = self.create_as_caller(req, Some(umask), pfd, name, || {
            open_beneath(pfd, name, oflags, mode & 0o7777)
        });
        let fd = match created {
            Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => {
                self.open_existing_as_caller(req, pfd, name, flags)?
            }
            r => r?,
        };
        let path_fd = self.proc.reopen(fd.as_fd(), OFlags::PATH).map_err(io)?;
        let (inode, attr) = self.remember(path_fd)?;
        let mode = self.open_mode(&inode, fd.as_fd(), is_write(flags), register);
        let (fh, fl, backing) = self.open_handle(inode, fd, mode, slot);
        Ok((attr, fh, fl, backing))
    }

    /// Opens an existing `name` the way the caller's open(O_CREAT) would have: with the
    /// caller's inner ids and groups and no capability beyond what the kernel leaves after
    /// the fsuid change, so the backing filesystem decides whether they may.
    fn open_existing_as_caller(
        &self,
        req: &Request,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        flags: i32,
    ) -> Result<OwnedFd> {
        let (uid, gid) = self.inner_caller(req)?;
        // The caller's supplementary groups as the filesystem knows them (unmapped ones
        // cannot match any on-disk group).
        let groups: Vec<u32> = Caller::of(req)
            .groups
            .into_iter()
            .filter_map(|g| self.map.gid.to_inner(OuterGid(g)).map(|g| g.0))
            .collect();
        let _creds = FsCreds::switch_checked(uid, gid, &groups).map_err(io)?;
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

    fn do_read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        // Short reads only at EOF: FUSE zero-fills whatever we do not return.
        while done < buf.len() {
            match rustix::io::pread(h.fd(), &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(SysErrno::INTR) => {}
                Err(e) => return Err(sys(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32> {
        let h = self.file(fh)?;
        let mut done = 0;
        while done < data.len() {
            match rustix::io::pwrite(h.fd(), &data[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(SysErrno::INTR) => {}
                Err(e) if done > 0 && e != SysErrno::INTR => break,
                Err(e) => return Err(sys(e)),
            }
        }
        u32::try_from(done).map_err(|_| Errno::EOVERFLOW)
    }

    fn open_dir_fd(&self, inode: &Inode) -> Result<OwnedFd> {
        self.proc
            .reopen(
                inode.fd().map_err(io)?.as_fd(),
                OFlags::RDONLY | OFlags::DIRECTORY,
            )
            .map_err(io)
    }

    fn do_opendir(&self, uid: u32, ino: INodeNo) -> Result<u64> {
        let inode = self.inode(ino)?;
        let slot = self.open_slot(uid)?;
        let fd = self.open_dir_fd(&inode)?;
        Ok(self.dirs.insert(DirHandle::new(fd, slot)))
    }

    /// Runs `f` on the directory's fd: its handle's, or for handle 0 (a directory the kernel
    /// did not open, `NO_OPENDIR`) a fresh one.
    fn with_dir_fd<T>(
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
    fn walk_dir(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        add: impl FnMut(&OsStr, u64, u32, u64) -> bool,
    ) -> Result<()> {
        self.with_dir_fd(ino, fh, |fd| Self::list_from(fd, offset, add))
    }

    fn list_from(
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

    fn do_readdir(
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

    fn do_readdirplus(
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

    fn do_statfs(&self, ino: INodeNo) -> Result<rustix::fs::StatVfs> {
        let inode = self.inode(ino)?;
        rustix::fs::fstatvfs(inode.fd().map_err(io)?).map_err(sys)
    }

    fn do_getxattr(&self, ino: INodeNo, name: &OsStr) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        if self.hides_suid(&inode) && name.as_bytes() == XATTR_CAPS {
            // The kernel reads it at exec through us: a `nosuid` submount grants nothing.
            return Err(Errno::NO_XATTR);
        }
        let ifd = inode.fd().map_err(io)?;
        let path = self.proc.path(ifd.as_fd());
        let value = match procfd::getxattr(&path, &cstr(name)?) {
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

    fn do_listxattr(&self, req: &Request, ino: INodeNo) -> Result<Vec<u8>> {
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
        if !names.windows(8).any(|w| w == b"trusted.") || Caller::of(req).is_host_admin() {
            return Ok(names);
        }
        Ok(names
            .split_inclusive(|&b| b == 0)
            .filter(|n| !n.starts_with(b"trusted."))
            .flatten()
            .copied()
            .collect())
    }

    fn do_setxattr(
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
    fn kill_sgid_after_acl(&self, req: &Request, fd: BorrowedFd<'_>) -> Result<()> {
        let st = rustix::fs::fstat(fd).map_err(sys)?;
        if st.st_mode & libc::S_ISGID == 0 {
            return Ok(());
        }
        let file_uid = self.map.uid.to_outer_or_overflow(InnerUid(st.st_uid)).0;
        let file_gid = self.map.gid.to_outer_or_overflow(InnerGid(st.st_gid)).0;
        let who = Caller::of(req);
        if !who.may_keep_setgid(req.gid(), file_uid, file_gid) {
            self.proc
                .chmod(fd, (st.st_mode & 0o7777) & !libc::S_ISGID)
                .map_err(io)?;
        }
        Ok(())
    }

    fn do_removexattr(&self, ino: INodeNo, name: &OsStr) -> Result<()> {
        let inode = self.inode(ino)?;
        self.check_writable(&inode)?;
        let ifd = inode.fd().map_err(io)?;
        let st = rustix::fs::fstat(ifd.as_fd()).map_err(sys)?;
        self.check_owner_mapped(&st, Errno::EPERM)?;
        rustix::fs::removexattr(self.proc.path(ifd.as_fd()), &*cstr(name)?).map_err(sys)
    }

    /// The inode attribute ioctls (`lsattr`/`chattr`, project ids), on a fresh read-only fd
    /// of the inode; any other command: ENOTTY. The kernel sends these four only for regular
    /// files and directories, after checking on the translated attributes that the caller
    /// owns the inode or has CAP_FOWNER over it, that changing `i` or `a` comes with
    /// CAP_LINUX_IMMUTABLE in the initial namespace and a project id change from the initial
    /// namespace. The daemon holds all of that itself, so it changes flags with the
    /// caller's ids and only the capabilities the caller has on the host, and repeats the
    /// project id rule. Project ids are not user ids: they pass unchanged, as through an
    /// idmapped mount.
    fn do_ioctl(
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
                let who = Caller::of(req);
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
                    let _creds = FsCreds::switch(req.uid(), req.gid(), without).map_err(io)?;
                    fileattr::fssetxattr(&fd, new).map_err(io)?;
                } else {
                    let raw = in_data.get(..4).ok_or(Errno::EINVAL)?;
                    let flags = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                    let _creds = FsCreds::switch(req.uid(), req.gid(), without).map_err(io)?;
                    fileattr::setflags(&fd, IFlags::from_bits_retain(flags)).map_err(io)?;
                }
                // The kernel's own requests want nothing back; a caller's want their bytes.
                let n = in_data.len().min(out_size as usize);
                Ok(in_data[..n].to_vec())
            }
        }
    }
}

/// Runs `f` as fsuid/fsgid `uid`/`gid` without CAP_SYS_RESOURCE (ext4's blocks reserved
/// for root, quota hard limits); when that runs out of space or quota, once more with it if
/// the caller (`who`) holds it on the host, as the kernel would have let them.
fn limited<T>(
    uid: u32,
    gid: u32,
    who: impl FnOnce() -> Caller,
    f: impl Fn() -> Result<T>,
) -> Result<T> {
    let r = {
        let _creds = FsCreds::switch(uid, gid, CapabilitySet::SYS_RESOURCE).map_err(io)?;
        f()
    };
    match r {
        Err(e) if (e == Errno::ENOSPC || e == Errno::EDQUOT) && who().is_host_resource() => {
            let _creds = FsCreds::switch(uid, gid, CapabilitySet::empty()).map_err(io)?;
            f()
        }
        r => r,
    }
}

/// `ShiftFs::as_writer` for a request whose ids were taken before it moved to the pool.
fn as_data_writer<T>(ids: (u32, u32, u32), f: impl Fn() -> Result<T>) -> Result<T> {
    let (pid, uid, gid) = ids;
    limited(
        uid,
        gid,
        || Caller::read(Path::new("/proc"), pid, uid, gid),
        f,
    )
}

/// Free space of an ext2/3/4 file system so close to the blocks it keeps for root (`-m`,
/// `resuid`, `resgid`) that a create may reach into them.
struct NearReserve {
    bfree: u64,
    /// Blocks kept back, known from a statfs that showed some available.
    reserve: Option<u64>,
}

/// Available blocks above which no create (a few blocks, one per worker at a time) can
/// reach the reserve.
const RESERVE_MARGIN: u64 = 256;

impl NearReserve {
    fn check(dir: BorrowedFd<'_>) -> Option<Self> {
        let s = rustix::fs::fstatfs(dir).ok()?;
        if crate::mountinfo::statfs_name(&s) != "ext4" || s.f_bavail >= RESERVE_MARGIN {
            return None;
        }
        Some(Self {
            bfree: s.f_bfree,
            reserve: (s.f_bavail > 0).then(|| s.f_bfree.saturating_sub(s.f_bavail)),
        })
    }

    /// Whether blocks of the reserve were taken since `check`.
    fn dipped(&self, dir: BorrowedFd<'_>) -> bool {
        let Ok(s) = rustix::fs::fstatfs(dir) else {
            return false;
        };
        match self.reserve {
            Some(r) => s.f_bfree < r,
            None => s.f_bfree < self.bfree,
        }
    }

    /// ext4's rule for the reserve, for a caller with host fsuid/fsgid `uid`/`gid`: it is
    /// the `resuid`, in the group `resgid` (unless that is 0), or has CAP_SYS_RESOURCE.
    fn may_use(&self, dir: BorrowedFd<'_>, uid: u32, gid: u32, who: &Caller) -> bool {
        // Unreadable: ext4's defaults.
        let (resuid, resgid) = reserve_owners(dir).unwrap_or((0, 0));
        uid == resuid
            || (resgid != 0 && (gid == resgid || who.groups.contains(&resgid)))
            || who.is_host_resource()
    }
}

/// `resuid` and `resgid` of the ext4 file system holding `dir`: `/proc/fs/ext4/DEV/options`
/// lists them, defaults included. Only `/proc` is read (a sandbox keeps it for fd reopening).
fn reserve_owners(dir: BorrowedFd<'_>) -> Option<(u32, u32)> {
    let st = rustix::fs::fstat(dir).ok()?;
    let dev = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let parts = std::fs::read_to_string("/proc/partitions").ok()?;
    let name = block_device_name(&parts, dev)?;
    let opts = std::fs::read_to_string(format!("/proc/fs/ext4/{name}/options")).ok()?;
    let get = |key: &str| {
        opts.lines()
            .find_map(|l| l.strip_prefix(key)?.parse::<u32>().ok())
    };
    Some((get("resuid=")?, get("resgid=")?))
}

/// The name `/proc/partitions` gives the block device `dev` (major, minor).
fn block_device_name(partitions: &str, dev: (u32, u32)) -> Option<&str> {
    partitions.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (maj, min, name) = (f.first()?, f.get(1)?, f.get(3)?);
        let ok = maj.parse() == Ok(dev.0) && min.parse() == Ok(dev.1);
        (ok && !name.contains('/') && !name.starts_with('.')).then_some(*name)
    })
}

/// Credentials for registering a passthrough backing file: the kernel keeps them for every
/// passthrough write to the inode, by whichever opener, so they never include
/// CAP_SYS_RESOURCE, whoever opened first.
fn register_creds(req: &Request) -> std::io::Result<FsCreds> {
    FsCreds::switch(req.uid(), req.gid(), CapabilitySet::SYS_RESOURCE)
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
        match self.do_setattr(req, ino, mode, uid, gid, size, atime, mtime, fh) {
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
        match self.do_mknod(req, parent, name, mode, umask, rdev) {
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
        match self.do_mkdir(req, parent, name, mode, umask) {
            Ok(attr) => reply.entry(&self.ttl, &attr, GEN),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.do_unlink(parent, name, AtFlags::empty()));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.do_unlink(parent, name, AtFlags::REMOVEDIR));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.do_symlink(req, parent, link_name, target) {
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
        reply_empty(
            reply,
            self.do_rename(req, parent, name, newparent, newname, flags),
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.do_link(req, ino, newparent, newname) {
            Ok(attr) => reply.entry(&self.ttl, &attr, GEN),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // The kernel keeps the credentials of the registration for every passthrough write.
        match self.do_open(req.uid(), ino, flags, |fd| {
            let _writer = register_creds(req)?;
            reply.open_backing(fd)
        }) {
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
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.as_writer(req, || self.do_write(fh, offset, data)) {
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
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(fh.0);
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
        match self.do_opendir(req.uid(), ino) {
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
        reply_empty(reply, self.do_setxattr(req, ino, name, value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.do_getxattr(ino, name));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.do_listxattr(req, ino));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.do_removexattr(ino, name));
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
        match self.do_create(req, parent, name, mode, umask, flags, |fd| {
            let _writer = register_creds(req)?;
            reply.open_backing(fd)
        }) {
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
        let ids = (req.pid(), req.uid(), req.gid());
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
        let ids = (req.pid(), req.uid(), req.gid());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_round_trip_through_fuse_encoding() {
        for (maj, min) in [(0, 0), (1, 3), (8, 17), (259, 65536), (4095, 1_048_575)] {
            let dev = rustix::fs::makedev(maj, min);
            let back = decode_dev(encode_dev(dev));
            assert_eq!(
                (rustix::fs::major(back), rustix::fs::minor(back)),
                (maj, min)
            );
        }
        // The kernel's new_encode_dev(1, 3) is 0x103.
        assert_eq!(encode_dev(rustix::fs::makedev(1, 3)), 0x103);
    }

    #[test]
    fn block_devices_are_named_from_proc_partitions() {
        let parts = "major minor  #blocks  name\n\n 254        0  268435456 vda\n   7        0      32768 loop0\n";
        assert_eq!(block_device_name(parts, (7, 0)), Some("loop0"));
        assert_eq!(block_device_name(parts, (254, 0)), Some("vda"));
        assert_eq!(block_device_name(parts, (254, 1)), None);
        assert_eq!(block_device_name("8 0 1 ../x\n", (8, 0)), None);
    }

    #[test]
    fn names_that_could_walk_are_refused() {
        for bad in ["", ".", "..", "a/b", "/"] {
            assert_eq!(check_name(OsStr::new(bad)), Err(Errno::EINVAL), "{bad:?}");
        }
        assert_eq!(check_name(OsStr::new("...")), Ok(()));
    }

    #[test]
    fn extreme_times_do_not_panic() {
        for (s, n) in [(i64::MIN, 999_999_999), (i64::MAX, u64::MAX), (i64::MIN, 0)] {
            let _ = timespec(Some(TimeOrNow::SpecificTime(time(s, n))));
        }
    }

    #[test]
    fn times_before_1970_survive() {
        let t = time(-2, 500_000_000);
        let ts = timespec(Some(TimeOrNow::SpecificTime(t)));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (-2, 500_000_000));
        let ts = timespec(None);
        assert_eq!(ts.tv_nsec, rustix::fs::UTIME_OMIT);
    }

    #[test]
    fn open_flags_drop_creation_and_direct_io() {
        let f = backing_open_flags(
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_DIRECT | libc::O_APPEND,
        );
        assert!(f.contains(OFlags::RDWR | OFlags::APPEND | OFlags::CLOEXEC));
        assert!(!f.intersects(OFlags::CREATE | OFlags::EXCL | OFlags::DIRECT));
    }
}
