//! The shifting filesystem: its state and the helpers every operation shares (inodes,
//! handles, credential switching, the checks the kernel cannot make for us). The operations
//! are grouped in the child modules (`entry`, `attr`, `data`, `dir`, `xattrs`, `ioctl`), each
//! a `do_x` returning `Result<_, Errno>`; `adapter` is the fuser `Filesystem` impl that calls
//! them and replies exactly once. Ids cross the map only here: attributes going out through
//! `attr`, callers and chown targets coming in through `inner_caller`/`idmap`, ACL and
//! capability values through `xattr_in`/`xattr_out`.
//!
//! An idmappable mount (`Config::idmappable`) is an identity one whose INIT reply carries
//! `FUSE_ALLOW_IDMAP`, so the kernel may idmap it (Linux 6.12+, with `default_permissions`,
//! which every mount here has). The kernel then checks permissions itself on the ids the
//! idmapped mount shows, and requests change: only the creating ones (MKNOD, MKDIR,
//! SYMLINK, CREATE, TMPFILE) carry the caller's fsuid/fsgid, already mapped through the
//! idmapped mount into the filesystem's ids (the daemon stores them as they come); every
//! other request carries -1 (`NO_ID`); a chown's SETATTR carries its new owner mapped the
//! same way, ACL entries and a capability's root id come mapped too. What the daemon needs
//! to know about the caller beyond that (its host ids for ext4's reserve and the open-file
//! share, its groups and capabilities) it reads from `/proc/TID` (`caller`, `host_ids`), and
//! nothing is ever created with -1 as owner. A shifting mount does not negotiate it: its
//! rules (EOVERFLOW for unmapped callers, the reserve, the per-user share) need the caller's
//! ids in every request, and stacking a second map on a shifted mount is better done as one
//! map on the kernel backend.

use std::borrow::Cow;
use std::ffi::{CString, OsStr};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
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

use super::caller::{Caller, NO_ID};
use super::handle::{DirHandle, FileHandle as OpenFile, HandleTable, OpenLimit, Slot};
use super::inode::{FdPool, Inode, InodeTable, Key};
use super::pool::Pool;
use super::share::{Member, Stale};
use crate::idmap::{IdMapping, InnerGid, InnerUid, OuterGid, OuterUid};
use crate::options::MountFlags;
use crate::sys::creds::{FsCreds, FsIds, set_thread_umask};
use crate::sys::fileattr::{self, FsXattr, IFlags};
use crate::sys::procfd::{self, ProcFd};
use crate::xattr;

type Result<T> = std::result::Result<T, Errno>;

mod adapter;
mod attr;
mod data;
mod dir;
mod entry;
mod ioctl;
mod reserve;
mod xattrs;

use reserve::NearReserve;

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

/// The id of the mount `fd` is on: the unique one where the kernel has it (Linux 6.8), else
/// the old one (unique among mounts alive; ours stay alive while we hold fds on them).
fn mount_id(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let want = rustix::fs::StatxFlags::MNT_ID
        | rustix::fs::StatxFlags::from_bits_retain(crate::sys::statmount::STATX_MNT_ID_UNIQUE);
    let stx = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        want,
    )?;
    Ok(stx.stx_mnt_id)
}

/// The identity of the object `fd` (whose `fstat` is `st`) as reached through its mount,
/// `mnt` when already known.
fn key(fd: BorrowedFd<'_>, st: &Stat, mnt: Option<u64>) -> Result<Key> {
    Ok(Key {
        mnt: match mnt {
            Some(m) => m,
            None => mount_id(fd).map_err(io)?,
        },
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
    open_resolving(dir, name, flags, mode, ResolveFlags::empty())
}

/// An `O_PATH` fd of `name` in `dir`, and whether it is on `dir`'s own mount (then the
/// child's mount id is the parent's, and the lookup needs no `statx` to learn it). Only a
/// mount point is not: `RESOLVE_NO_XDEV` refuses it, and it is opened again across.
fn open_child(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(OwnedFd, bool)> {
    match open_resolving(dir, name, OFlags::PATH, 0, ResolveFlags::NO_XDEV) {
        Err(Errno::EXDEV) => Ok((open_beneath(dir, name, OFlags::PATH, 0)?, false)),
        r => r.map(|fd| (fd, true)),
    }
}

fn open_resolving(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: OFlags,
    mode: u32,
    extra: ResolveFlags,
) -> Result<OwnedFd> {
    let resolve =
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_SYMLINKS | extra;
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
    /// Fds for inode anchors (before file handles), shared by the daemon's sessions.
    pub fd_pool: Arc<FdPool>,
    /// The cap on files and directories held open for callers, shared likewise.
    pub open_limit: Arc<OpenLimit>,
    /// Threads for long data requests (fsync, fallocate, copy_file_range).
    pub data_threads: usize,
    /// The other sessions serving this source, told of every change made through this one.
    pub share: Member,
    /// Negotiate `FUSE_ALLOW_IDMAP` (the mapping must be the identity).
    pub idmappable: bool,
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
    share: Member,
    /// Asked for: see the module's documentation.
    idmappable: bool,
    /// Whether the source gives new objects the creating fsuid/fsgid (sshfs, for one, does
    /// not: the server creates as its own user). Known for local filesystems; elsewhere
    /// unknown until a create got another owner, or creates by two different uids each got
    /// their own (one uid's alone proves nothing: sshfs logged in as root gives a container
    /// root's files the right owner by chance).
    owner_honoured: OnceLock<bool>,
    /// While `owner_honoured` is unknown: the last uid whose create got it as owner
    /// (`NO_WITNESS`: none yet).
    honoured_uid: AtomicU32,
}

/// No create has been seen to give its caller's uid.
const NO_WITNESS: u32 = u32::MAX;

impl ShiftFs {
    pub fn new(root: OwnedFd, proc: ProcFd, cfg: Config) -> std::io::Result<Self> {
        // Creating requests then carry ids mapped by the kernel, stored as they come.
        if cfg.idmappable && cfg.mapping != IdMapping::identity() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an idmappable mount serves SOURCE unshifted: its map must be the identity",
            ));
        }
        let st = rustix::fs::fstat(&root)?;
        let mnt = mount_id(root.as_fd())?;
        let owner_honoured = OnceLock::new();
        if rustix::fs::fstatfs(&root).is_ok_and(|s| super::well_known_local(s.f_type)) {
            let _ = owner_honoured.set(true);
        }
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
                cfg.fd_pool,
            ),
            files: HandleTable::default(),
            dirs: HandleTable::default(),
            open_limit: cfg.open_limit,
            data: Pool::new(cfg.data_threads),
            proc,
            want_passthrough: cfg.passthrough,
            stack_depth: cfg.stack_depth,
            stable_dir_offsets: cfg.stable_dir_offsets,
            passthrough: AtomicBool::new(false),
            no_opendir: false,
            share: cfg.share,
            idmappable: cfg.idmappable,
            owner_honoured,
            honoured_uid: AtomicU32::new(NO_WITNESS),
        })
    }

    /// What `/proc` shows of the caller of `req`. On an idmappable mount a creating request
    /// carries filesystem ids, not the host's, so the ids found there are not compared.
    fn caller(&self, req: &Request) -> Caller {
        if self.idmappable || !carries_ids(req) {
            return Caller::read(Path::new("/proc"), req.pid(), NO_ID, NO_ID);
        }
        Caller::of(req)
    }

    /// The caller's fsuid and fsgid as the host sees them: what a shifting mount's requests
    /// carry; on an idmappable one (requests carry -1 or filesystem ids) read from `/proc`,
    /// and where unreadable the overflow ids, which own nothing and reach no reserve.
    fn host_ids(&self, req: &Request) -> (OuterUid, OuterGid) {
        let (uid, gid) = if !self.idmappable && carries_ids(req) {
            (req.uid(), req.gid())
        } else {
            Caller::read_fs_ids(Path::new("/proc"), req.pid()).unwrap_or((OVERFLOW, OVERFLOW))
        };
        (OuterUid::new(uid), OuterGid::new(gid))
    }

    fn inode(&self, ino: INodeNo) -> Result<Arc<Inode>> {
        self.inodes.get(ino.0).ok_or(Errno::ESTALE)
    }

    /// A place under the open-file cap for a file or directory `uid` (the caller's host uid,
    /// whatever the request carries) opens: ENFILE past it (the opener is refused, not the
    /// daemon's other work).
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
            uid: self.owner_out(st).0,
            gid: self.owner_out(st).1,
            rdev: encode_dev(st.st_rdev),
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// The owner of `st` as the host sees it. An unmapped id is (uid_t)-1, INVALID_UID to
    /// the kernel: it matches no caller in permission checks (65534 would make host `nobody`
    /// the owner), and stat shows it as the overflow id, exactly as on an idmapped mount.
    fn owner_out(&self, st: &Stat) -> (u32, u32) {
        let uid = self.map.uid.to_outer(InnerUid::new(st.st_uid));
        let gid = self.map.gid.to_outer(InnerGid::new(st.st_gid));
        (
            uid.map_or(u32::MAX, OuterUid::get),
            gid.map_or(u32::MAX, OuterGid::get),
        )
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
    fn inner_caller(&self, req: &Request) -> Result<FsIds> {
        if self.idmappable {
            // Mapped by the kernel already (identity when no idmapped mount is in between).
            // -1 comes with requests that create nothing; the VFS refuses a caller the
            // idmapped mount cannot map before asking.
            if !carries_ids(req) {
                return Err(Errno::EOVERFLOW);
            }
            return Ok(FsIds::Disk(
                InnerUid::new(req.uid()),
                InnerGid::new(req.gid()),
            ));
        }
        let uid = self.map.uid.to_inner(OuterUid::new(req.uid()));
        let gid = self.map.gid.to_inner(OuterGid::new(req.gid()));
        match (uid, gid) {
            (Some(u), Some(g)) => Ok(FsIds::Disk(u, g)),
            _ => Err(Errno::EOVERFLOW),
        }
    }

    /// A name is about to be made by a request that does not make an object of its own
    /// (link, rename): the caller must be mapped. On an idmappable mount the VFS has checked
    /// that against the idmapped mount (`may_create`), and the request carries no ids.
    fn check_caller_mapped(&self, req: &Request) -> Result<()> {
        if self.idmappable {
            return Ok(());
        }
        self.inner_caller(req).map(drop)
    }

    fn owner_mapped(&self, st: &Stat) -> (bool, bool) {
        (
            self.map.uid.to_outer(InnerUid::new(st.st_uid)).is_some(),
            self.map.gid.to_outer(InnerGid::new(st.st_gid)).is_some(),
        )
    }

    /// `check_owner_mapped` for the on-disk owner `uid`, `gid`.
    fn check_ids_mapped(&self, uid: u32, gid: u32, err: Errno) -> Result<()> {
        let mapped = self.map.uid.to_outer(InnerUid::new(uid)).is_some()
            && self.map.gid.to_outer(InnerGid::new(gid)).is_some();
        if mapped { Ok(()) } else { Err(err) }
    }

    /// Like the kernel's idmapped mounts (`may_delete`, `may_linkat`, "inode writeback is
    /// not safe when the uid or gid are invalid"): an object whose on-disk owner has no
    /// outer id may not be deleted, renamed, linked or have its xattrs changed, else a host
    /// user whose id happens to equal the overflow id would own every unmapped file.
    fn check_owner_mapped(&self, st: &Stat, err: Errno) -> Result<()> {
        self.check_ids_mapped(st.st_uid, st.st_gid, err)
    }

    /// Before deleting or replacing `name`: the object there must be the one the kernel
    /// checked permissions on (it looked it up, so it is in the table; one swapped in on
    /// the source side since is not) and its owner must be mapped.
    ///
    /// One `statx` by name (a single component, not followed if a symlink, as the unlink or
    /// rename after it treats it) gives the identity and the owner: no open, and on a FUSE
    /// source no request beyond the lookup the unlink or rename makes anyway. An fd is only
    /// opened for an object the table remembers by file handle, to compare handles.
    fn check_victim(&self, parent: &Inode, name: &OsStr, stale: Errno) -> Result<()> {
        let pfd = parent.fd().map_err(io)?;
        let want = rustix::fs::StatxFlags::TYPE
            | rustix::fs::StatxFlags::INO
            | rustix::fs::StatxFlags::UID
            | rustix::fs::StatxFlags::GID
            | rustix::fs::StatxFlags::MNT_ID
            | rustix::fs::StatxFlags::from_bits_retain(crate::sys::statmount::STATX_MNT_ID_UNIQUE);
        let stx = rustix::fs::statx(
            pfd.as_fd(),
            name,
            AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
            want,
        )
        .map_err(sys)?;
        let key = Key {
            mnt: stx.stx_mnt_id,
            dev: rustix::fs::makedev(stx.stx_dev_major, stx.stx_dev_minor),
            ino: stx.stx_ino,
        };
        let known = self
            .inodes
            .knows(key, || open_child(pfd.as_fd(), name).ok().map(|(fd, _)| fd));
        if !known {
            return Err(stale);
        }
        self.check_ids_mapped(stx.stx_uid, stx.stx_gid, Errno::EOVERFLOW)
    }

    /// Runs `f` (one creating syscall) with `ids` (the caller's inner ids) as this thread's
    /// fsuid and fsgid, so the backing filesystem gives the new object its owner atomically
    /// and applies setgid-directory inheritance itself; space as `limited` allows.
    fn as_ids<T>(
        &self,
        req: &Request,
        ids: FsIds,
        umask: Option<u32>,
        f: impl Fn() -> Result<T>,
    ) -> Result<T> {
        if let Some(mask) = umask {
            set_thread_umask(mask).map_err(io)?;
        }
        limited(ids, || self.caller(req), f)
    }

    /// `as_ids` with the caller's inner ids for a syscall that makes `name` in `dir` (its
    /// owner set afterwards on a source that ignores them), undone (ENOSPC) when it took
    /// blocks ext4 keeps for root and the caller may not have them. The kernel grants them
    /// by the caller's host fsuid; the daemon creates with the inner one so the object gets
    /// its owner, and a container root (inner 0) would pass for root (the default `resuid`).
    fn create_as_caller<T>(
        &self,
        req: &Request,
        umask: Option<u32>,
        parent: &Inode,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        make: impl Fn() -> Result<T>,
    ) -> Result<T> {
        let ids = self.inner_caller(req)?;
        let near = NearReserve::check(dir, parent.key.dev);
        let made = self.as_ids(req, ids, umask, make)?;
        self.check_owner_of_new(dir, name, ids)?;
        let Some(near) = near else {
            return Ok(made);
        };
        let made_st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW);
        let (uid, gid) = self.host_ids(req);
        if !near.dipped(dir) || near.may_use(dir, uid.get(), gid.get(), &self.caller(req)) {
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

    /// A source that ignores the creating fsuid/fsgid (sshfs creates as the server's user)
    /// would leave `name` with another owner: give it the one it should have, the caller's
    /// (the group of a setgid directory). Not checked once the source is known to honour
    /// the creator (see `owner_honoured`); a new object that already has its caller's uid
    /// is left as it is.
    fn check_owner_of_new(&self, dir: BorrowedFd<'_>, name: &OsStr, ids: FsIds) -> Result<()> {
        if self.owner_honoured.get() == Some(&true) {
            return Ok(());
        }
        let FsIds::Disk(uid, gid) = ids else {
            return Ok(());
        };
        // The owner tells: the group may differ for good reasons (setgid directory, ext4's
        // `grpid`), and is only set here when the owner was not honoured either. On a FUSE
        // source the create's reply left these attributes cached: no request.
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(sys)?;
        if st.st_uid == uid.get() {
            if self.owner_honoured.get().is_none() {
                let before = self.honoured_uid.swap(uid.get(), Ordering::Relaxed);
                if before != NO_WITNESS && before != uid.get() {
                    let _ = self.owner_honoured.set(true);
                }
            }
            return Ok(());
        }
        if self.owner_honoured.set(false).is_ok() {
            tracing::info!(
                "the source gives new objects its own owner, not the creator's; setting \
                 each new object's owner afterwards"
            );
        }
        // Making an entry changes neither the directory's mode nor its group: the cached
        // ones are as fresh as before the create, and on a FUSE source (whose attributes
        // of the directory the create invalidated) refreshing them would cost the server a
        // round trip (an SFTP LSTAT for sshfs).
        let parent = rustix::fs::statx(
            dir,
            "",
            AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
            rustix::fs::StatxFlags::MODE | rustix::fs::StatxFlags::GID,
        )
        .map_err(sys)?;
        let gid = if u32::from(parent.stx_mode) & libc::S_ISGID != 0 {
            parent.stx_gid
        } else {
            gid.get()
        };
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw_unchecked(uid.get())),
            Some(rustix::fs::Gid::from_raw_unchecked(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(sys)
    }

    /// Runs a change that may take space but gives no object an owner (write, link, rename,
    /// xattrs) with the caller's host ids, as the kernel would, limited as `limited` says.
    fn as_writer<T>(&self, req: &Request, f: impl Fn() -> Result<T>) -> Result<T> {
        let (uid, gid) = self.host_ids(req);
        limited(FsIds::Host(uid, gid), || self.caller(req), f)
    }

    /// Records a kernel lookup of the object `fd` refers to.
    /// Takes `fd` into the inode table; `mnt` is its mount id when the caller knows it.
    fn remember(&self, fd: OwnedFd, mnt: Option<u64>) -> Result<(Arc<Inode>, FileAttr)> {
        let st = rustix::fs::fstat(&fd).map_err(sys)?;
        let key = key(fd.as_fd(), &st, mnt)?;
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
        let (fd, same_mount) = open_child(parent.fd().map_err(io)?.as_fd(), name)?;
        self.remember(fd, same_mount.then_some(parent.key.mnt))
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
        host: (OuterUid, OuterGid),
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
            match register_backing(inode, host, || register(fd)) {
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
}

/// The kernel's overflow id: what stands for a caller whose ids cannot be learnt.
const OVERFLOW: u32 = 65534;

/// Whether `req` carries caller ids (all do on a shifting mount; on an idmappable one only
/// the creating requests).
fn carries_ids(req: &Request) -> bool {
    req.uid() != NO_ID && req.gid() != NO_ID
}

/// Registers a passthrough backing file of `inode` (`register`). The kernel keeps the
/// credentials of the registration for every passthrough write to the inode, by whichever
/// opener, so they never include CAP_SYS_RESOURCE, whoever opened first, and they carry the
/// caller's host ids (`host`) where the file system hands out space by the writer's ids.
fn register_backing(
    inode: &Inode,
    (uid, gid): (OuterUid, OuterGid),
    register: impl FnOnce() -> std::io::Result<BackingId>,
) -> std::io::Result<BackingId> {
    let _writer = if inode.mount.space_by_writer_ids() {
        FsCreds::switch(FsIds::Host(uid, gid), CapabilitySet::SYS_RESOURCE)?
    } else {
        FsCreds::keep_ids(CapabilitySet::SYS_RESOURCE)?
    };
    register()
}

/// Runs `f` as fsuid/fsgid `ids` without CAP_SYS_RESOURCE (ext4's blocks reserved
/// for root, quota hard limits); when that runs out of space or quota, once more with it if
/// the caller (`who`) holds it on the host, as the kernel would have let them.
fn limited<T>(ids: FsIds, who: impl FnOnce() -> Caller, f: impl Fn() -> Result<T>) -> Result<T> {
    let r = {
        let _creds = FsCreds::switch(ids, CapabilitySet::SYS_RESOURCE).map_err(io)?;
        f()
    };
    match r {
        Err(e) if (e == Errno::ENOSPC || e == Errno::EDQUOT) && who().is_host_resource() => {
            let _creds = FsCreds::switch(ids, CapabilitySet::empty()).map_err(io)?;
            f()
        }
        r => r,
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
