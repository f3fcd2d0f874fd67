//! The FUSE backend: a passthrough of a SOURCE directory with id translation, served by
//! fuser on several threads.
//!
//! `mount_at` attaches the filesystem itself onto a held target fd (type `fuse.shiftfs`,
//! the source path as fsname) and hands the connection to `fuser::Session::from_fd`; the
//! session runs on background threads until the filesystem is unmounted by anyone.
//!
//! Design choices worth knowing (each measured on Linux 6.18):
//! - Inodes are `O_PATH` fds (`inode.rs`), past a budget file handles; node id = backing
//!   `st_ino` (fuser sends the attribute ino as node id), so numbers are stable and shared
//!   by hard links.
//! - New objects are made under the caller's inner fsuid/fsgid with capabilities re-raised
//!   (`sys::creds`) and the caller's umask (`FUSE_DONT_MASK`, per-thread umask): owner,
//!   setgid inheritance and default ACLs are the backing filesystem's own doing.
//! - Everything the kernel checked against one object acts on that object: creates are
//!   `O_EXCL` on disk, renames to a free name are `RENAME_NOREPLACE`, unlink/rename victims
//!   must be objects the kernel looked up; objects with unmapped owners cannot be changed
//!   (as on a kernel idmapped mount).
//! - Not negotiated: `FUSE_ATOMIC_O_TRUNC` (the daemon would truncate before the kernel's
//!   ETXTBSY check), `FUSE_POSIX_LOCKS`/`FUSE_FLOCK_LOCKS` (fuser 0.18 drops the flag telling
//!   flock from POSIX requests, and blocking SETLKW would tie up worker threads: locks are
//!   the kernel's, shared by all users of this mount but not with processes using SOURCE
//!   directly), `FUSE_WRITEBACK_CACHE` (excludes passthrough), `FUSE_SETXATTR_EXT` (fuser
//!   0.18 panics on it), `FUSE_EXPORT_SUPPORT` (no NFS re-export).
//! - File data goes through kernel passthrough when allowed; an open never mixes modes for
//!   one inode, since the kernel fails such an open with EIO.
//!
//! Sub-mounts inside SOURCE, as on the kernel backend: the daemon serves a private clone
//! of SOURCE's mount (`open_tree(OPEN_TREE_CLONE)`), so by default a mount point shows the
//! directory underneath it and nothing mounted inside SOURCE is reachable; with
//! `Options::recursive` (`--recursive`) the clone takes the sub-mounts too, as they were at
//! mount time. Either way each object acts through an fd of its own mount, and inodes are
//! keyed by (mount id, dev, ino), so one file reached through a read-write path and a
//! read-only bind mount is two FUSE inodes. Each mount's flags count (the source's own
//! included; they are read with `statvfs` when the mount is first seen):
//! - `ro`: every change gets EROFS (the kernel refuses it, and the daemon checks first).
//! - `noexec`: the open the kernel makes for execve gets EACCES; an mmap with PROT_EXEC of
//!   a file opened otherwise cannot be refused (the kernel does not ask the daemon).
//! - `nosuid`, when this mount is `suid`: the kernel would honour setuid bits and file
//!   capabilities it reads through us, so regular files there show without setuid/setgid
//!   bits and without `security.capability`, and a chmod through the mount neither sets
//!   nor clears those bits.
//! - `nodev`, when this mount is `dev`: the kernel opens device nodes without asking the
//!   daemon, so device nodes there are not served (lookup EACCES, mknod EPERM).
//!
//! File descriptors: the daemon runs with RLIMIT_NOFILE at its hard limit
//! (raised by the daemon at start, `sys::process::raise_nofile_limit`). A reserve is kept for the fds requests use briefly (lookups,
//! reopens) and the session's own; files and directories callers hold open are capped
//! (`Options::max_open`: past it the opener gets ENFILE, and one caller uid gets at most
//! three quarters of it); what is left anchors inodes by fd, past which they are anchored by
//! file handles. So no caller can make lookups, or other users' requests, fail with EMFILE.
//! The sessions of one daemon draw on its one fd limit, so the plan is the daemon's
//! (`share::Budget`, made at the first session): one cap on open files and one pool of inode
//! fds for all of them, from which each session joining later sets its own fds aside.
//!
//! Long data requests (fsync, fallocate, copy_file_range) run on a pool of their own
//! threads so that metadata requests keep flowing, and a copy_file_range copies at most
//! `COPY_CHUNK` per request (the caller's loop asks for the rest).

mod caller;
mod fs;
mod handle;
mod inode;
mod pool;
mod share;

use share::Member;
pub use share::{DELIVERY_WAIT, Hub};

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::OFlags;

use crate::idmap::IdMapping;
use crate::options::MountFlags;
use crate::resolve::Dir;
use crate::sys::fusedev::{self, FuseMount};
use crate::sys::procfd::ProcFd;

/// How a FUSE shifted mount is set up.
#[derive(Clone, Debug)]
pub struct Options {
    pub mapping: IdMapping,
    /// ro, suid, dev, exec.
    pub flags: MountFlags,
    /// Worker threads; 0 picks twice the number of CPUs (at least 4).
    pub threads: usize,
    /// Try kernel passthrough of file data (Linux 6.9+); falls back when refused.
    pub passthrough: bool,
    /// How long the kernel may trust what it learned: entries (also misses), attributes,
    /// directory listings and (without passthrough) file pages. Changes made on the source
    /// side directly show after at most this long; zero for sources changed underneath.
    pub attr_timeout: Duration,
    /// Shown as the mount source (findmnt SOURCE).
    pub fsname: String,
    /// Inodes remembered by an open fd before file handles are used; 0 = the fds left
    /// under RLIMIT_NOFILE (raised to its maximum at mount) after the reserve and `max_open`.
    pub max_inode_fds: usize,
    /// Files and directories callers may hold open through this mount, at most (one caller
    /// uid: three quarters of it); past it an open fails with ENFILE. 0 = a quarter of the
    /// fds under RLIMIT_NOFILE after the reserve.
    pub max_open: usize,
    /// Serve the sub-mounts inside the source too (each with its own flags), as they were
    /// at mount time; without it mount points show the directory underneath.
    pub recursive: bool,
    /// The other sessions of this process serving the same source, to keep coherent with
    /// (`share.rs`); none: a hub of its own.
    pub share: Option<Arc<Hub>>,
    /// Serve unshifted (identity map) and let the kernel idmap the mount: negotiate
    /// `FUSE_ALLOW_IDMAP` (see `fs` for what requests then carry).
    pub idmappable: bool,
    /// Serve over io_uring (one ring per possible CPU) when the kernel offers it.
    pub uring: crate::options::UringMode,
}

impl Options {
    pub fn new(mapping: IdMapping) -> Self {
        Self {
            mapping,
            flags: MountFlags::default(),
            threads: 0,
            passthrough: true,
            attr_timeout: crate::options::DEFAULT_ATTR_TIMEOUT,
            fsname: "shiftfs".to_owned(),
            max_inode_fds: 0,
            max_open: 0,
            recursive: false,
            share: None,
            idmappable: false,
            uring: crate::options::UringMode::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot open /dev/fuse: {source}; load the fuse module (modprobe fuse), and in a \
         container pass the device in (e.g. --device /dev/fuse)"
    )]
    DevFuse {
        #[source]
        source: io::Error,
    },
    #[error("cannot use the source directory: {source}")]
    Source {
        #[source]
        source: io::Error,
    },
    #[error("the source is not a directory; pass a directory to shift")]
    SourceNotDir,
    #[error("cannot open /proc/self/fd: {source}; the FUSE backend needs /proc mounted")]
    Proc {
        #[source]
        source: io::Error,
    },
    #[error("cannot mount FUSE on {target}: {source}{hint}")]
    Mount {
        target: PathBuf,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("the kernel did not complete the FUSE handshake on {target}: {source}")]
    Handshake {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot serve {target} over io_uring (-o uring=on): {reason}; or mount with \
         -o uring=auto to fall back to /dev/fuse"
    )]
    Uring { target: PathBuf, reason: String },
    #[error("the FUSE session on {target} ended with an error: {source}")]
    Session {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount {target}: {source}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("target {0}")]
    Target(#[from] crate::resolve::Error),
    /// A session joining a daemon whose fd budget has no room for its own fds: the mount
    /// gets a daemon of its own instead.
    #[error(
        "the daemon serving this source has {left} file descriptors to spare, and one more \
         mount needs {need}; mount with -o share=off for a daemon of its own"
    )]
    NoFdsToShare { left: usize, need: usize },
}

fn mount_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => "; mounting needs root (CAP_SYS_ADMIN)",
        Some(libc::ENOENT) => "; create the target directory first",
        Some(libc::ENOTDIR) => "; the target must be a directory",
        Some(libc::ENODEV) => "; the kernel has no fuse filesystem: modprobe fuse",
        _ => "",
    }
}

/// A mounted filesystem being served on background threads.
#[derive(Debug)]
pub struct Session {
    bg: fuser::BackgroundSession,
    stats: Arc<fuser::TransportStats>,
    target: PathBuf,
    /// The id of our mount (mountinfo's), to tell it from one stacked at the path later.
    mount_id: Option<u64>,
    member: Member,
}

impl Session {
    /// Blocks until the filesystem is unmounted (by anyone, e.g. `umount2(target,
    /// MNT_DETACH)`) and the last user of a lazily detached mount has left.
    pub fn wait(self) -> Result<(), Error> {
        let target = self.target;
        let r = self
            .bg
            .join()
            .map_err(|source| Error::Session { target, source });
        self.member.hub().leave(&self.member);
        tracing::info!(
            "requests served: {} over io_uring, {} over /dev/fuse",
            self.stats.ring_requests(),
            self.stats.dev_requests()
        );
        r
    }

    /// Requests served so far over io_uring and over `/dev/fuse`.
    pub fn stats(&self) -> &fuser::TransportStats {
        &self.stats
    }

    /// Detaches the mount (lazily) and waits for the session to end.
    pub fn unmount(self) -> Result<(), Error> {
        fusedev::detach(&self.target).map_err(|source| Error::Unmount {
            target: self.target.clone(),
            source,
        })?;
        self.wait()
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The mount id (as in mountinfo) of the mount this session serves.
    pub fn mount_id(&self) -> Option<u64> {
        self.mount_id
    }
}

/// Default worker count: FUSE requests block in syscalls (fsync, reads of cold data), so
/// more threads than CPUs.
fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus.max(2) * 2).max(4)
}

/// The soft RLIMIT_NOFILE in force; the daemon raises it at start
/// (`sys::process::raise_nofile_limit`), library users may. Read at the first mount: the
/// sandboxed daemon, serving later mounts of its source, may not ask again.
fn nofile_limit() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX)
    })
}

/// How the daemon's fds are shared out.
#[derive(Debug, PartialEq, Eq)]
struct FdPlan {
    /// Inodes anchored by fds (then by file handles).
    inode_fds: usize,
    /// Files and directories held open for callers.
    max_open: usize,
}

/// Splits `limit` fds: a reserve for the fds each of `threads` workers (and the pool of as
/// many) uses during one request plus the session's own, then `max_open` (a quarter of the
/// rest unless asked), then inode anchors. An asked-for `max_open` or `max_inode_fds` is
/// kept, but never so large that the total passes the limit.
fn fd_plan(limit: u64, threads: usize, max_open: usize, max_inode_fds: usize) -> FdPlan {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let reserve = (64 + 16 * threads).max((limit / 8).min(1024));
    let avail = limit.saturating_sub(reserve).max(64);
    let max_open = match max_open {
        0 => avail / 4,
        n if n > avail - 32 => {
            tracing::warn!(
                "max_open={n} does not fit RLIMIT_NOFILE {limit}; using {}",
                avail - 32
            );
            avail - 32
        }
        n => n,
    }
    .max(1);
    let left = (avail - max_open).max(32);
    let inode_fds = match max_inode_fds {
        0 => left,
        n => n.min(left),
    };
    FdPlan {
        inode_fds,
        max_open,
    }
}

/// The fds a session joining a daemon uses besides inode anchors and open files (its
/// `/dev/fuse` clones, its root, each worker's and data thread's fds during one request, an
/// io_uring per possible CPU when it may use them):
/// taken from the daemon's inode fds, which then fall back to file handles sooner. The
/// first session's are in the daemon's plan ([`fd_plan`]'s reserve).
fn joined_reserve(threads: usize, rings: usize) -> usize {
    32 + 8 * threads + rings
}

/// The directory the daemon serves: a private clone of the source's mount (with its
/// sub-mounts when `recursive`), so a mount point inside the source shows what the kernel
/// backend shows, and mounts made inside the source later do not appear. Where cloning is
/// refused, the source itself, sub-mounts included (each still with its own flags).
fn clone_source(source: &OwnedFd, recursive: bool) -> Result<OwnedFd, Error> {
    use rustix::mount::OpenTreeFlags;
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    match rustix::mount::open_tree(source, "", flags) {
        Ok(fd) => return Ok(fd),
        Err(e) => tracing::warn!(
            "cannot clone the source's mount ({e}); serving it with whatever is mounted \
             inside it"
        ),
    }
    // Our own O_PATH fd of the directory, whatever flags the caller's fd was opened with.
    rustix::fs::openat(
        source,
        ".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| Error::Source { source: e.into() })
}

/// overlayfs' magic: a source on overlayfs needs FUSE stacking depth 2 for passthrough.
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

/// Mounts `source` (an `O_PATH | O_DIRECTORY` fd) at `target`, opened without following
/// any symlink, and starts serving it.
pub fn mount(source: OwnedFd, target: &Path, opts: Options) -> Result<Session, Error> {
    mount_at(source, &Dir::open(target)?, opts)
}

/// Mounts `source` (an `O_PATH | O_DIRECTORY` fd) onto the held directory `target` and
/// starts serving it.
pub fn mount_at(source: OwnedFd, target: &Dir, opts: Options) -> Result<Session, Error> {
    let mounted = attach(source, target, opts)?;
    let root = mounted
        .root
        .try_clone()
        .map_err(|source| Error::Source { source })?;
    mounted.serve().inspect_err(|_| {
        // Never leave a mount nobody serves.
        if let Err(e) = fusedev::detach_fd(root.as_fd()) {
            tracing::error!("cannot unmount a FUSE mount after a failed start: {e}");
        }
    })
}

/// A FUSE mount in place whose connection nobody serves yet: requests wait until
/// [`Mounted::serve`] starts the workers. The split lets the daemon confine itself
/// (`crate::sandbox`) after mounting, which needs the host's namespace, and before the
/// first thread starts, which the confinement must precede.
pub struct Mounted {
    fs: fs::ShiftFs,
    dev: OwnedFd,
    /// The mount itself: holding it keeps the mount busy, so it goes with `serve`.
    root: OwnedFd,
    /// The mount id, when the host side told it.
    mount_id: Option<u64>,
    path: PathBuf,
    threads: usize,
    member: Member,
    uring: crate::options::UringMode,
}

/// Mounts `source` (an `O_PATH | O_DIRECTORY` fd) onto the held directory `target`;
/// nothing serves it yet.
pub fn attach(source: OwnedFd, target: &Dir, opts: Options) -> Result<Mounted, Error> {
    let tree = source_tree(source, opts.recursive)?;
    let uring = opts.uring;
    let (fs, threads, member) = build(tree, opts.clone())?;
    let (dev, root) = mount_dev(target, &opts)?;
    Ok(Mounted {
        fs,
        dev,
        root,
        mount_id: None,
        path: target.path().to_path_buf(),
        threads,
        member,
        uring,
    })
}

/// The host's half of a mount that joins a running daemon (done where the host's mount
/// namespace is at hand): the tree to serve, the FUSE connection, and the mount of it on
/// `target`, unserved. The daemon completes it with [`Mounted::join`].
pub struct HostSide {
    pub tree: OwnedFd,
    pub dev: OwnedFd,
    pub mount: OwnedFd,
}

/// The host's half of [`attach`]: see [`HostSide`].
pub fn attach_host(source: OwnedFd, target: &Dir, opts: &Options) -> Result<HostSide, Error> {
    let tree = source_tree(source, opts.recursive)?;
    let (dev, mount) = mount_dev(target, opts)?;
    Ok(HostSide { tree, dev, mount })
}

/// The private clone of the source directory `source` that the daemon serves.
fn source_tree(source: OwnedFd, recursive: bool) -> Result<OwnedFd, Error> {
    let st = rustix::fs::fstat(&source).map_err(|e| Error::Source { source: e.into() })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(Error::SourceNotDir);
    }
    clone_source(&source, recursive)
}

/// The local filesystems whose behaviour the FUSE backend relies on where others differ: a
/// listing resumes from its offset on any fd of the directory (listing without OPENDIR needs
/// it: overlayfs indexes a listing cached per open file, and FUSE servers such as sshfs 3.7,
/// which aborts on an assertion, and network filesystems may keep a listing per handle), and a
/// new object gets the creating fsuid/fsgid, the kernel's own rule (sshfs gives the server's
/// user).
pub(crate) fn well_known_local(f_type: i64) -> bool {
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    const TMPFS: i64 = 0x0102_1994;
    matches!(f_type, EXT4 | XFS | BTRFS | TMPFS)
}

/// The filesystem serving `root` (a tree from `source_tree`), its worker count and its
/// place among the sessions of its source.
fn build(root: OwnedFd, opts: Options) -> Result<(fs::ShiftFs, usize, Member), Error> {
    let f_type = rustix::fs::fstatfs(&root).map_or(0, |s| s.f_type);
    let overlay = f_type == OVERLAYFS_SUPER_MAGIC;
    let threads = if opts.threads == 0 {
        default_threads()
    } else {
        opts.threads
    };
    let hub = opts.share.unwrap_or_default();
    let (budget, first) = hub.budget(|| {
        let plan = fd_plan(nofile_limit(), threads, opts.max_open, opts.max_inode_fds);
        tracing::debug!("fd plan: {plan:?}");
        share::Budget {
            inode_fds: inode::FdPool::new(plan.inode_fds),
            open: handle::OpenLimit::new(plan.max_open),
        }
    });
    let mut member = hub.member();
    if !first {
        if opts.max_open != 0 || opts.max_inode_fds != 0 {
            tracing::warn!(
                "max_open/max_inode_fds of this mount not used: the daemon serving the source \
                 shares one fd budget, set by its first mount (-o share=off for a budget of its own)"
            );
        }
        let rings = match opts.uring {
            crate::options::UringMode::Off => 0,
            _ => fuser::possible_cpus().map_or(0, |c| c.len()),
        };
        let n = joined_reserve(threads, rings);
        let left = budget.inode_fds.cap();
        if left < n {
            return Err(Error::NoFdsToShare { left, need: n });
        }
        member.reserve(&budget.inode_fds, n);
        tracing::debug!(
            "{n} fds set aside for this session; {} left for inode fds",
            budget.inode_fds.cap()
        );
    }
    let proc = ProcFd::open().map_err(|source| Error::Proc { source })?;
    // Read now, for FUSE over io_uring: a sandboxed daemon cannot see /sys when the rings
    // are set up.
    let _ = fuser::possible_cpus();
    let fs = fs::ShiftFs::new(
        root,
        proc,
        fs::Config {
            mapping: opts.mapping,
            flags: opts.flags,
            ttl: opts.attr_timeout,
            passthrough: opts.passthrough,
            stack_depth: if overlay { 2 } else { 1 },
            stable_dir_offsets: well_known_local(f_type),
            fd_pool: budget.inode_fds,
            open_limit: budget.open,
            data_threads: threads,
            share: member.clone(),
            idmappable: opts.idmappable,
        },
    )
    .map_err(|source| Error::Source { source })?;
    Ok((fs, threads, member))
}

/// A FUSE connection and its mount on `target`, with the mount's flags and name.
fn mount_dev(target: &Dir, opts: &Options) -> Result<(OwnedFd, OwnedFd), Error> {
    let dev = fusedev::open_dev_fuse().map_err(|source| Error::DevFuse { source })?;
    let path = target.path().to_path_buf();
    let root = fusedev::mount_fuse(
        target.as_fd(),
        &FuseMount {
            dev: dev.as_fd(),
            fsname: &opts.fsname,
            subtype: "shiftfs",
            attrs: opts.flags.mount_attrs(),
            allow_other: true,
            default_permissions: true,
        },
    )
    .map_err(|source| Error::Mount {
        hint: mount_hint(&source),
        target: path,
        source,
    })?;
    Ok((dev, root))
}

impl Mounted {
    pub fn target(&self) -> &Path {
        &self.path
    }

    /// The mount made by the host side (a [`HostSide`] handed over), to be served in this
    /// process among the other sessions of `opts.share`.
    pub fn join(
        host: HostSide,
        target: PathBuf,
        mount_id: Option<u64>,
        opts: Options,
    ) -> Result<Self, Error> {
        let HostSide { tree, dev, mount } = host;
        let uring = opts.uring;
        let (fs, threads, member) = build(tree, opts)?;
        Ok(Self {
            fs,
            dev,
            root: mount,
            mount_id,
            path: target,
            threads,
            member,
            uring,
        })
    }

    /// The id of the mount (as in mountinfo), to tell it from one stacked at the path later.
    pub fn mount_id(&self) -> Option<u64> {
        self.mount_id
            .or_else(|| crate::mountinfo::mount_id_of(self.root.as_fd()))
    }

    /// Detaches the mount, unserved (for a caller that cannot go on to serve it).
    pub fn detach(self) -> io::Result<()> {
        fusedev::detach_fd(self.root.as_fd())
    }

    /// Completes the handshake with the kernel and starts the worker threads. On failure
    /// the mount stays, unserved: it is the caller's to remove.
    pub fn serve(self) -> Result<Session, Error> {
        let mount_id = self.mount_id();
        let Self {
            fs,
            dev,
            root,
            path,
            threads,
            member,
            uring,
            ..
        } = self;
        let mut config = fuser::Config::default();
        config.n_threads = Some(threads);
        config.clone_fd = true;
        config.uring = match uring {
            crate::options::UringMode::Auto => fuser::UringMode::Auto,
            crate::options::UringMode::On => fuser::UringMode::On,
            crate::options::UringMode::Off => fuser::UringMode::Off,
        };
        let hub = Arc::clone(member.hub());
        match fuser::Session::from_fd(fs, dev, fuser::SessionACL::All, config).and_then(|s| {
            hub.join(&member, s.notifier());
            s.spawn().inspect_err(|_| hub.leave(&member))
        }) {
            Ok(bg) => {
                match bg.transport() {
                    fuser::Transport::Uring { queues, depth } => tracing::info!(
                        "serving {} over io_uring: {queues} queues (one per possible CPU) of \
                         {depth} entries",
                        path.display()
                    ),
                    fuser::Transport::DevFuse { why: Some(why) } => {
                        tracing::info!("serving {} through /dev/fuse: {why}", path.display())
                    }
                    fuser::Transport::DevFuse { why: None } => {}
                }
                // The kernel learns the root's attributes before any invalidation may cross
                // its first GETATTR (`share.rs`).
                if let Err(e) = rustix::fs::fstat(&root) {
                    tracing::debug!("cannot stat the new mount's root: {e}");
                }
                member.root_known();
                drop(root);
                Ok(Session {
                    stats: bg.stats(),
                    bg,
                    target: path,
                    mount_id,
                    member,
                })
            }
            Err(source)
                if uring == crate::options::UringMode::On
                    && source.kind() == io::ErrorKind::Unsupported =>
            {
                Err(Error::Uring {
                    target: path,
                    reason: source.to_string(),
                })
            }
            Err(source) => Err(Error::Handshake {
                target: path,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_plan_keeps_a_reserve_and_caps_open_files() {
        // The common case here: 20,000 fds, 4 workers.
        let p = fd_plan(20_000, 4, 0, 0);
        assert_eq!(p.max_open, (20_000 - 1024) / 4);
        assert_eq!(p.inode_fds + p.max_open, 20_000 - 1024);
        // A small limit still leaves the per-request reserve.
        let p = fd_plan(256, 4, 0, 0);
        assert_eq!(p.max_open + p.inode_fds, 256 - 128);
        // Asked-for values are kept when they fit, shrunk when they do not.
        assert_eq!(fd_plan(20_000, 4, 100, 8).max_open, 100);
        assert_eq!(fd_plan(20_000, 4, 100, 8).inode_fds, 8);
        let p = fd_plan(1024, 4, 1_000_000, 0);
        assert!(p.max_open + p.inode_fds <= 1024 - 128, "{p:?}");
    }
}
