//! The one tree walker of `scan` and `shift`: every name is resolved one component at a time
//! relative to a held directory fd, never as a path string, so a tree of any depth the file
//! system allows is walked (no `PATH_MAX`), and never more than a budget of directory fds
//! is kept open (no open-file limit either).
//!
//! Each step is `openat2(dir, NAME, O_NOFOLLOW | O_DIRECTORY, RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS [| RESOLVE_NO_XDEV])`, so a symlink is never
//! followed and, by default, no mount is entered. Entries are read with `getdents64` on the
//! directory's fd, `statx`ed with `AT_SYMLINK_NOFOLLOW` relative to it, and their xattrs
//! read with `listxattrat` (or `llistxattr` / `lgetxattr` on `/proc/self/fd/DIRFD/NAME`,
//! which resolves NAME inside the held directory and never follows it). Nothing is opened
//! for I/O, so fifos and devices are safe to visit.
//!
//! File descriptors. [`walk`] runs on all cores: a directory's entries are read by one task,
//! and each subdirectory found becomes a queued task holding a shared reference to an open
//! ancestor directory (its parent while fewer than [`fd_budget`] directories are held, the
//! parent's own ancestor past that), from which it opens itself component by component.
//! A chain of any depth so holds two or three fds; a tree with many directories waiting for
//! their turn holds at most about the budget. [`Cursor`] does the same for journaled paths:
//! it keeps the fds of the directories on its current path up to a budget, dropping the
//! outermost ones first, and re-opens a dropped one from the nearest kept ancestor.
//! The budget is half the soft `RLIMIT_NOFILE`; `shiftfs scan` and `shift` raise that to the
//! hard limit at start (process-wide state stays in the CLI), so the budget is rarely reached.
//!
//! File systems: like `du -x` and `find -xdev`, the walk stays on the tree root's mount;
//! a mount point below it (a different mount id, bind mounts included) is reported and
//! skipped unless `cross_file_systems` is set.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, RawDir, ResolveFlags, StatxFlags, openat2, statx,
};

use crate::sys::xattr::read_whole;
use crate::xattr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open tree {path} (it must be a directory; a symlink is not followed)")]
    OpenRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {op}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{count} error(s) while walking the tree; the first")]
    Walk {
        count: usize,
        #[source]
        first: Box<Error>,
    },
}

pub(crate) fn io_err(path: &[u8], op: &'static str, e: impl Into<io::Error>) -> Error {
    Error::Io {
        path: display(path),
        op,
        source: e.into(),
    }
}

/// A tree-relative path for messages: "." for the root.
pub fn display(path: &[u8]) -> String {
    if path.is_empty() {
        ".".to_string()
    } else {
        String::from_utf8_lossy(path).into_owned()
    }
}

/// One inode of the tree (hard links appear once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the tree root; empty for the root itself. For messages and the journal:
    /// it is resolved again only through [`Cursor`], one component at a time.
    pub path: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
    /// `st_mode`, type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    /// How many names of this inode the walk found in the tree.
    pub links_in_tree: u64,
    /// The id-bearing xattrs (ACLs, capability) with their values.
    pub xattrs: Vec<(xattr::Kind, Vec<u8>)>,
}

impl Entry {
    pub fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.mode)
    }
}

/// The walk's result, sorted by path.
#[derive(Debug, Default)]
pub struct Tree {
    pub entries: Vec<Entry>,
    /// Mount points below the root that were not entered.
    pub mount_points: Vec<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct WalkOptions {
    pub cross_file_systems: bool,
}

/// Opens a tree root as a directory, never following a symlink in its last component.
pub fn open_root(path: &Path) -> Result<OwnedFd, Error> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::OpenRoot {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

pub(crate) fn resolve_flags(cross_file_systems: bool) -> ResolveFlags {
    let base = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    if cross_file_systems {
        base
    } else {
        base | ResolveFlags::NO_XDEV
    }
}

/// How many directory fds a walk (or all of a shift's cursors together) may keep open: half
/// the soft open-file limit, less a few per worker thread for the fds each opens for a
/// moment; at least 4.
pub fn fd_budget() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let soft = usize::try_from(soft).unwrap_or(usize::MAX).min(1 << 20);
    (soft / 2)
        .saturating_sub(4 * rayon::current_num_threads())
        .max(4)
}

/// Opens one directory entry `name` (a single component) beneath `dir`, following no
/// symlink and, unless `resolve` allows it, crossing no mount.
pub(crate) fn open_child(
    dir: BorrowedFd<'_>,
    name: &[u8],
    flags: OFlags,
    resolve: ResolveFlags,
) -> io::Result<OwnedFd> {
    if name.is_empty() || name.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(openat2(
        dir,
        OsStr::from_bytes(name),
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        resolve,
    )?)
}

/// The components of a tree-relative path ("" has none).
pub(crate) fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&c| c == b'/').filter(|c| !c.is_empty())
}

/// Opens the directory `rel` below `base` one component at a time (intermediate ones as
/// `O_PATH`, the last with `flags`); `rel` empty re-opens `base` itself.
fn open_path(
    base: BorrowedFd<'_>,
    rel: &[u8],
    flags: OFlags,
    resolve: ResolveFlags,
) -> io::Result<OwnedFd> {
    let mut comps = components(rel).peekable();
    if comps.peek().is_none() {
        return open_child(base, b".", flags | OFlags::DIRECTORY, resolve);
    }
    let mut cur: Option<OwnedFd> = None;
    while let Some(c) = comps.next() {
        let f = if comps.peek().is_some() {
            OFlags::PATH
        } else {
            flags
        };
        let at = cur.as_ref().map_or(base, |fd| fd.as_fd());
        cur = Some(open_child(at, c, f | OFlags::DIRECTORY, resolve)?);
    }
    cur.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
}

/// `fgetxattr` on a regular fd; `None` when the attribute is absent.
pub(crate) fn fget(fd: BorrowedFd<'_>, name: &str) -> io::Result<Option<Vec<u8>>> {
    absent_is_none(read_whole(|b| rustix::fs::fgetxattr(fd, name, b)))
}

/// `lgetxattr` on a path; `None` when the attribute is absent.
pub(crate) fn lget(path: &OsStr, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    absent_is_none(read_whole(|b| {
        rustix::fs::lgetxattr(path, OsStr::from_bytes(name), b)
    }))
}

/// `getxattr` (following) on a path; `None` when the attribute is absent.
pub(crate) fn get(path: &OsStr, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    absent_is_none(read_whole(|b| {
        rustix::fs::getxattr(path, OsStr::from_bytes(name), b)
    }))
}

fn absent_is_none(r: rustix::io::Result<Vec<u8>>) -> io::Result<Option<Vec<u8>>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Where to read an inode's xattrs: a name in a held directory, never followed, or an fd
/// opened for reading (the tree root; `/proc/self/fd/N` with the `l*` calls would name the
/// proc symlink itself rather than the directory).
#[derive(Clone, Copy)]
enum Source<'a> {
    At(BorrowedFd<'a>, &'a CStr),
    Fd(BorrowedFd<'a>),
}

/// Set once `listxattrat` turned out to be missing (kernels before 6.13).
static NO_LISTXATTRAT: AtomicBool = AtomicBool::new(false);

fn list_names(src: Source<'_>, buf: &mut [u8]) -> rustix::io::Result<usize> {
    let errno =
        |e: io::Error| rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO);
    match src {
        Source::Fd(fd) => rustix::fs::flistxattr(fd, &mut *buf),
        Source::At(dir, name) => {
            if !NO_LISTXATTRAT.load(Ordering::Relaxed) {
                match crate::sys::xattr::listxattrat_nofollow(dir, name, buf) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                        NO_LISTXATTRAT.store(true, Ordering::Relaxed);
                    }
                    r => return r.map_err(errno),
                }
            }
            let path = proc_path(dir, name.to_bytes());
            rustix::fs::llistxattr(OsStr::from_bytes(&path), &mut *buf)
        }
    }
}

/// The id-bearing xattrs of an inode.
fn id_xattrs(src: Source<'_>, rel: &[u8]) -> Result<Vec<(xattr::Kind, Vec<u8>)>, Error> {
    let names = match read_whole(|b| list_names(src, b)) {
        Ok(names) => names,
        Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(io_err(rel, "list xattrs", e)),
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Some(kind) = xattr::Kind::of(name) else {
            continue;
        };
        let value = match src {
            Source::At(dir, file) => {
                lget(OsStr::from_bytes(&proc_path(dir, file.to_bytes())), name)
            }
            Source::Fd(fd) => fget(fd, kind.name()),
        };
        match value {
            Ok(Some(v)) => out.push((kind, v)),
            Ok(None) => {}
            Err(e) => return Err(io_err(rel, "read xattr", e)),
        }
    }
    Ok(out)
}

pub(crate) use crate::sys::procfd::link as proc_path;

pub(crate) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        p.extend_from_slice(dir);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

const STATX_WANT: StatxFlags = StatxFlags::BASIC_STATS.union(StatxFlags::MNT_ID);

/// An open directory that queued subdirectories are opened beneath; counted against the
/// walk's budget while alive.
struct Anchor<'a> {
    fd: OwnedFd,
    /// The directory's tree-relative path is the first `rel_len` bytes of its
    /// descendants' paths.
    rel_len: usize,
    held: &'a AtomicUsize,
}

impl<'a> Anchor<'a> {
    fn new(fd: OwnedFd, rel_len: usize, held: &'a AtomicUsize) -> Arc<Self> {
        held.fetch_add(1, Ordering::Relaxed);
        Arc::new(Anchor { fd, rel_len, held })
    }

    /// The part of a descendant's path below this directory.
    fn below<'p>(&self, rel: &'p [u8]) -> &'p [u8] {
        rel.get(self.rel_len..).unwrap_or_default()
    }
}

impl Drop for Anchor<'_> {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A directory waiting for its turn: no fd of its own, only a share of an ancestor's.
struct Pending<'a> {
    base: Arc<Anchor<'a>>,
    rel: Vec<u8>,
    /// (dev, ino) its parent listed: what it must still be when opened.
    key: (u64, u64),
    mnt_id: u64,
}

struct Shared<'p> {
    opts: WalkOptions,
    resolve: ResolveFlags,
    budget: usize,
    held: AtomicUsize,
    entries: Mutex<Vec<Entry>>,
    /// (dev, ino) of multiply linked non-directories -> links seen.
    links: Mutex<HashMap<(u64, u64), u64>>,
    mount_points: Mutex<Vec<Vec<u8>>>,
    errors: Mutex<Vec<Error>>,
    visited: AtomicU64,
    progress: &'p (dyn Fn(u64) + Sync),
}

/// Walks the tree below `root` in parallel on all cores. `progress` is called with the
/// running count of inodes found.
pub fn walk(
    root: BorrowedFd<'_>,
    opts: WalkOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Tree, Error> {
    walk_with_budget(root, opts, fd_budget(), progress)
}

/// [`walk`] keeping at most about `budget` directory fds open.
pub fn walk_with_budget(
    root: BorrowedFd<'_>,
    opts: WalkOptions,
    budget: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Tree, Error> {
    let stx = statx(
        root,
        "",
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        STATX_WANT,
    )
    .map_err(|e| io_err(b"", "stat", e))?;
    let root_xattrs = id_xattrs(Source::Fd(root), b"")?;
    let key = (dev_of(&stx), stx.stx_ino);
    let root_entry = Entry {
        path: Vec::new(),
        dev: key.0,
        ino: key.1,
        mode: u32::from(stx.stx_mode),
        uid: stx.stx_uid,
        gid: stx.stx_gid,
        nlink: u64::from(stx.stx_nlink),
        links_in_tree: 1,
        xattrs: root_xattrs,
    };
    let shared = Shared {
        opts,
        resolve: resolve_flags(opts.cross_file_systems),
        budget,
        held: AtomicUsize::new(0),
        entries: Mutex::new(vec![root_entry]),
        links: Mutex::new(HashMap::new()),
        mount_points: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
        visited: AtomicU64::new(1),
        progress,
    };
    let root_dup = rustix::io::fcntl_dupfd_cloexec(root, 0).map_err(|e| io_err(b"", "dup", e))?;
    let first = Pending {
        base: Anchor::new(root_dup, 0, &shared.held),
        rel: Vec::new(),
        key,
        mnt_id: stx.stx_mnt_id,
    };
    rayon::scope(|s| walk_dir(s, &shared, first));

    let mut errors = take(shared.errors);
    if !errors.is_empty() {
        let count = errors.len();
        return Err(Error::Walk {
            count,
            first: Box::new(errors.swap_remove(0)),
        });
    }
    let links = take(shared.links);
    let mut entries = take(shared.entries);
    for e in &mut entries {
        if let Some(&n) = links.get(&(e.dev, e.ino)) {
            e.links_in_tree = n;
        }
    }
    entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    let mut mount_points = take(shared.mount_points);
    mount_points.sort();
    Ok(Tree {
        entries,
        mount_points,
    })
}

fn take<T: Default>(m: Mutex<T>) -> T {
    m.into_inner().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn dev_of(stx: &rustix::fs::Statx) -> u64 {
    rustix::fs::makedev(stx.stx_dev_major, stx.stx_dev_minor)
}

/// Opens a queued directory beneath its anchor, one component at a time, and checks it is
/// still the inode its parent listed.
fn open_pending(shared: &Shared<'_>, p: &Pending<'_>) -> Result<OwnedFd, Error> {
    let fd = open_path(
        p.base.fd.as_fd(),
        p.base.below(&p.rel),
        OFlags::RDONLY,
        shared.resolve,
    )
    .map_err(|e| io_err(&p.rel, "open directory", e))?;
    let again =
        statx(&fd, "", AtFlags::EMPTY_PATH, STATX_WANT).map_err(|e| io_err(&p.rel, "stat", e))?;
    if (dev_of(&again), again.stx_ino) != p.key {
        return Err(io_err(
            &p.rel,
            "open directory",
            io::Error::other("replaced while the tree was walked"),
        ));
    }
    Ok(fd)
}

fn walk_dir<'s>(s: &rayon::Scope<'s>, shared: &'s Shared<'s>, p: Pending<'s>) {
    let result = open_pending(shared, &p).and_then(|fd| {
        let me = Anchor::new(fd, p.rel.len(), &shared.held);
        // Within the budget, the subdirectories found here open themselves from this
        // directory; past it, from the ancestor this one was opened from, and this
        // directory's fd is closed once it has been read.
        let base = if shared.held.load(Ordering::Relaxed) <= shared.budget {
            &me
        } else {
            &p.base
        };
        read_dir(s, shared, &me.fd, base, &p.rel, p.mnt_id)
    });
    if let Err(e) = result {
        lock(&shared.errors).push(e);
    }
}

fn read_dir<'s>(
    s: &rayon::Scope<'s>,
    shared: &'s Shared<'s>,
    dir: &OwnedFd,
    base: &Arc<Anchor<'s>>,
    rel: &[u8],
    mnt_id: u64,
) -> Result<(), Error> {
    let mut local = Vec::new();
    let mut buf = Vec::<u8>::with_capacity(32 * 1024);
    let mut reader = RawDir::new(dir, buf.spare_capacity_mut());
    while let Some(item) = reader.next() {
        let item = item.map_err(|e| io_err(rel, "read directory", e))?;
        let name = item.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let child = join(rel, name);
        let stx = match statx(dir, item.file_name(), AtFlags::SYMLINK_NOFOLLOW, STATX_WANT) {
            Ok(s) => s,
            // Removed while we walked: nothing to shift or report.
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(io_err(&child, "stat", e)),
        };
        if stx.stx_mnt_id != mnt_id && !shared.opts.cross_file_systems {
            lock(&shared.mount_points).push(child);
            continue;
        }
        let ft = FileType::from_raw_mode(u32::from(stx.stx_mode));
        let key = (dev_of(&stx), stx.stx_ino);
        if ft != FileType::Directory && stx.stx_nlink > 1 {
            let mut links = lock(&shared.links);
            let seen = links.entry(key).or_insert(0);
            *seen += 1;
            if *seen > 1 {
                continue;
            }
        }
        let xattrs = id_xattrs(Source::At(dir.as_fd(), item.file_name()), &child)?;
        if ft == FileType::Directory {
            let pending = Pending {
                base: Arc::clone(base),
                rel: child.clone(),
                key,
                mnt_id: stx.stx_mnt_id,
            };
            s.spawn(move |s| walk_dir(s, shared, pending));
        }
        local.push(Entry {
            path: child,
            dev: key.0,
            ino: key.1,
            mode: u32::from(stx.stx_mode),
            uid: stx.stx_uid,
            gid: stx.stx_gid,
            nlink: u64::from(stx.stx_nlink),
            links_in_tree: 1,
            xattrs,
        });
    }
    let n = local.len() as u64;
    lock(&shared.entries).append(&mut local);
    let total = shared.visited.fetch_add(n, Ordering::Relaxed) + n;
    (shared.progress)(total);
    Ok(())
}

/// Resolves directories of the tree by tree-relative path, one component at a time from the
/// root, keeping the `O_PATH` fds of the directories on its current path (up to `budget`,
/// dropping the outermost first). Visiting directories in sorted order (where every
/// directory's subtree is contiguous) opens each about once; a dropped one is re-opened from
/// the nearest kept ancestor.
pub struct Cursor<'r> {
    root: BorrowedFd<'r>,
    resolve: ResolveFlags,
    budget: usize,
    /// The directories from the root (exclusive) down to the current one: name and, if
    /// kept, fd.
    levels: Vec<(Vec<u8>, Option<OwnedFd>)>,
    held: usize,
}

impl<'r> Cursor<'r> {
    pub fn new(root: BorrowedFd<'r>, resolve: ResolveFlags, budget: usize) -> Self {
        Cursor {
            root,
            resolve,
            budget: budget.max(1),
            levels: Vec::new(),
            held: 0,
        }
    }

    /// An `O_PATH` fd of the directory at `rel` ("" = the root), opened beneath the root
    /// without following any symlink.
    pub fn dir(&mut self, rel: &[u8]) -> io::Result<BorrowedFd<'_>> {
        let want: Vec<&[u8]> = components(rel).collect();
        let common = self
            .levels
            .iter()
            .zip(&want)
            .take_while(|((have, _), w)| have == *w)
            .count();
        for (_, fd) in self.levels.drain(common..) {
            self.held -= usize::from(fd.is_some());
        }
        // The deepest shared level may have been dropped: re-open it from the nearest
        // kept ancestor.
        if let Some(top) = common.checked_sub(1)
            && self.levels[top].1.is_none()
        {
            let from = self.levels[..top].iter().rposition(|(_, fd)| fd.is_some());
            let base = from.map_or(self.root, |i| self.fd_at(i));
            let start = from.map_or(0, |i| i + 1);
            let mut cur: Option<OwnedFd> = None;
            for (name, _) in &self.levels[start..=top] {
                let at = cur.as_ref().map_or(base, |fd| fd.as_fd());
                cur = Some(open_child(
                    at,
                    name,
                    OFlags::PATH | OFlags::DIRECTORY,
                    self.resolve,
                )?);
            }
            self.levels[top].1 = cur;
            self.kept();
        }
        for name in &want[common..] {
            let at = self.levels.last().map_or(self.root, |(_, fd)| {
                fd.as_ref().map_or(self.root, |fd| fd.as_fd())
            });
            let fd = open_child(at, name, OFlags::PATH | OFlags::DIRECTORY, self.resolve)?;
            self.levels.push((name.to_vec(), Some(fd)));
            self.kept();
        }
        Ok(match self.levels.last() {
            Some((_, Some(fd))) => fd.as_fd(),
            _ => self.root,
        })
    }

    fn fd_at(&self, i: usize) -> BorrowedFd<'_> {
        self.levels[i].1.as_ref().map_or(self.root, |fd| fd.as_fd())
    }

    /// Counts a newly kept fd and drops the outermost kept one (never the deepest) past the
    /// budget.
    fn kept(&mut self) {
        self.held += 1;
        if self.held > self.budget {
            let last = self.levels.len() - 1;
            if let Some(i) = self.levels[..last].iter().position(|(_, fd)| fd.is_some()) {
                self.levels[i].1 = None;
                self.held -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::CWD;

    #[test]
    fn a_wide_tree_does_not_run_out_of_fds() {
        // More subdirectories than this process may have open files: queued directories
        // hold no fd of their own. The limit is lowered for the walk only (other tests in
        // this binary open few files).
        use rustix::process::{Resource, getrlimit, setrlimit};
        let n = 2000u64;
        let dir = tempfile::tempdir().unwrap();
        for i in 0..n {
            std::fs::create_dir(dir.path().join(i.to_string())).unwrap();
            std::fs::create_dir(dir.path().join(format!("{i}/sub"))).unwrap();
        }
        let root = open_root(dir.path()).unwrap();
        let saved = getrlimit(Resource::Nofile);
        let mut low = saved;
        low.current = Some(256);
        setrlimit(Resource::Nofile, low).unwrap();
        let tree = walk(root.as_fd(), WalkOptions::default(), &|_| {});
        setrlimit(Resource::Nofile, saved).unwrap();
        let tree = tree.unwrap();
        assert_eq!(tree.entries.len() as u64, 2 * n + 1);
    }

    /// `DEPTH` nested directories `d` with a file `f` at each level, made by fd (the path
    /// is longer than PATH_MAX).
    fn deep(root: &Path, depth: usize) {
        let mut dir = open_root(root).unwrap();
        for _ in 0..depth {
            rustix::fs::mkdirat(&dir, "dir", Mode::from_raw_mode(0o755)).unwrap();
            drop(
                rustix::fs::openat(
                    &dir,
                    "f",
                    OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o644),
                )
                .unwrap(),
            );
            let next = rustix::fs::openat(
                &dir,
                "dir",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .unwrap();
            dir = next;
        }
    }

    fn remove_deep(root: &Path) {
        let _ = std::process::Command::new("rm")
            .arg("-rf")
            .arg(root)
            .status();
    }

    #[test]
    fn a_deep_tree_is_walked_within_any_budget() {
        let depth = 1500; // "dir/" x 1500 = 6000 bytes, past PATH_MAX
        let dir = tempfile::tempdir().unwrap();
        deep(dir.path(), depth);
        let root = open_root(dir.path()).unwrap();
        let mut inos = HashMap::new();
        for budget in [3, 1000] {
            let tree = walk_with_budget(root.as_fd(), WalkOptions::default(), budget, &|_| {});
            let tree = tree.unwrap();
            assert_eq!(tree.entries.len(), 2 * depth + 1, "budget {budget}");
            let deepest = tree.entries.iter().map(|e| e.path.len()).max().unwrap();
            assert_eq!(deepest, depth * 4 - 1, "dir/dir/.../dir");
            for e in tree.entries {
                inos.insert(e.path, e.ino);
            }
        }
        // And back by path, down and up in sorted order, within any budget.
        let mut dirs: Vec<Vec<u8>> = (0..=depth)
            .map(|d| "dir/".repeat(d).trim_end_matches('/').as_bytes().to_vec())
            .collect();
        dirs.sort();
        for budget in [1, 7, 5000] {
            let mut c = Cursor::new(root.as_fd(), resolve_flags(false), budget);
            for d in dirs.iter().chain(dirs.iter().rev()).step_by(7) {
                let fd = c.dir(d).unwrap();
                assert_eq!(rustix::fs::fstat(fd).unwrap().st_ino, inos[d]);
                assert!(c.held <= budget);
            }
        }
        remove_deep(dir.path());
    }

    #[test]
    fn the_cursor_follows_no_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("a/b")).unwrap();
        std::os::unix::fs::symlink("a", p.join("l")).unwrap();
        std::os::unix::fs::symlink("/", p.join("a/up")).unwrap();
        let root = open_root(p).unwrap();
        let mut c = Cursor::new(root.as_fd(), resolve_flags(false), 8);
        assert!(c.dir(b"a/b").is_ok());
        assert!(c.dir(b"l/b").is_err());
        assert!(c.dir(b"a/up").is_err());
        assert!(c.dir(b"a/../..").is_err());
        assert!(c.dir(b"").is_ok());
    }

    #[test]
    fn proc_fallback_reads_the_same_xattrs() {
        // The path used before Linux 6.13 (no listxattrat) must see what listxattrat sees,
        // for files, directories, fifos and symlinks, without following the symlinks.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir(p.join("d")).unwrap();
        std::fs::write(p.join("d/f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", p.join("d/l")).unwrap();
        rustix::fs::mknodat(
            CWD,
            p.join("d/p"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let acl = xattr::encode_acl(&[
            xattr::AclEntry {
                tag: xattr::ACL_USER_OBJ,
                perm: 6,
                id: xattr::ACL_UNDEFINED_ID,
            },
            xattr::AclEntry {
                tag: xattr::ACL_USER,
                perm: 4,
                id: 4242,
            },
            xattr::AclEntry {
                tag: xattr::ACL_GROUP_OBJ,
                perm: 4,
                id: xattr::ACL_UNDEFINED_ID,
            },
            xattr::AclEntry {
                tag: xattr::ACL_MASK,
                perm: 4,
                id: xattr::ACL_UNDEFINED_ID,
            },
            xattr::AclEntry {
                tag: xattr::ACL_OTHER,
                perm: 0,
                id: xattr::ACL_UNDEFINED_ID,
            },
        ]);
        for f in ["d/f", "d/p", "d"] {
            rustix::fs::setxattr(
                p.join(f),
                "system.posix_acl_access",
                &acl,
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
        }
        let root = open_root(p).unwrap();
        let fast = walk(root.as_fd(), WalkOptions::default(), &|_| {}).unwrap();
        NO_LISTXATTRAT.store(true, Ordering::Relaxed);
        let slow = walk(root.as_fd(), WalkOptions::default(), &|_| {}).unwrap();
        assert_eq!(fast.entries, slow.entries);
        let with_acl = slow.entries.iter().filter(|e| !e.xattrs.is_empty()).count();
        assert_eq!(with_acl, 3);
    }

    #[test]
    fn walks_a_tree_without_root() {
        // Runs as any user: plain files, a symlink, a fifo, a hard link, a dangling link.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("a/b/c")).unwrap();
        std::fs::write(p.join("a/f"), b"x").unwrap();
        std::fs::hard_link(p.join("a/f"), p.join("a/b/g")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", p.join("a/b/c/pw")).unwrap();
        std::os::unix::fs::symlink("nowhere", p.join("dangling")).unwrap();
        rustix::fs::mknodat(
            CWD,
            p.join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let root = open_root(p).unwrap();
        let seen = AtomicU64::new(0);
        let tree = walk(root.as_fd(), WalkOptions::default(), &|n| {
            seen.store(n, Ordering::Relaxed)
        })
        .unwrap();
        let paths: Vec<String> = tree.entries.iter().map(|e| display(&e.path)).collect();
        assert_eq!(paths.len(), 8, "{paths:?}");
        assert_eq!(paths[0], ".");
        assert!(paths.contains(&"a/b/c/pw".to_string()) && paths.contains(&"fifo".to_string()));
        let linked: Vec<_> = tree
            .entries
            .iter()
            .filter(|e| e.nlink == 2 && e.file_type() != FileType::Directory)
            .collect();
        assert_eq!(linked.len(), 1);
        assert_eq!(linked[0].links_in_tree, 2);
        assert_eq!(seen.load(Ordering::Relaxed), 8);
    }
}
