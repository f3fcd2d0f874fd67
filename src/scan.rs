//! What ids a tree uses, what a map leaves unmapped, and hazards; plus the parallel walk
//! that `shift` shares.
//!
//! The walk only resolves names relative to held directory fds: each directory is opened
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, each entry
//! is `statx`ed with `AT_SYMLINK_NOFOLLOW`, and its xattrs are read with `llistxattr` /
//! `lgetxattr` on `/proc/self/fd/DIRFD/NAME`, which resolves NAME inside the held directory
//! and never follows it. Nothing is opened for I/O, so fifos and devices are safe to visit.
//!
//! File systems: like `du -x` and `find -xdev`, the walk stays on the tree root's mount;
//! a mount point below it (a different mount id, bind mounts included) is reported and
//! skipped unless `cross_file_systems` is set.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, StatxFlags, openat2, statx};
use serde::Serialize;

use crate::idmap::IdMapping;
use crate::xattr::{self, IdKind, IdTranslate};

/// Where the tree's current map is recorded (absent = the tree is unshifted).
pub const MAP_XATTR: &str = "trusted.shiftfs.map";
/// Present on the tree root while a shift is under way: `from=MAP to=MAP`.
pub const SHIFT_XATTR: &str = "trusted.shiftfs.shift";

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
    #[error("{path}: cannot translate an id-bearing xattr")]
    Xattr {
        path: String,
        #[source]
        source: xattr::Error,
    },
    #[error("{count} error(s) while walking the tree; the first")]
    Walk {
        count: usize,
        #[source]
        first: Box<Error>,
    },
    #[error("{path}: {MAP_XATTR} on the tree root does not hold a valid map; fix or remove it")]
    BadRecord {
        path: PathBuf,
        #[source]
        source: crate::idmap::Error,
    },
}

fn io_err(path: &[u8], op: &'static str, e: impl Into<io::Error>) -> Error {
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
    /// Relative to the tree root; empty for the root itself.
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

/// The root's recorded map (`None` = unshifted) and the in-progress marker, if any.
pub fn recorded_state(
    root: BorrowedFd<'_>,
    root_path: &Path,
) -> Result<(Option<IdMapping>, Option<String>), Error> {
    let read = |name: &str| -> Result<Option<String>, Error> {
        match fget(root, name) {
            Ok(v) => Ok(v.map(|v| String::from_utf8_lossy(&v).into_owned())),
            Err(e) => Err(io_err(b"", "read xattr", e)),
        }
    };
    let map = match read(MAP_XATTR)? {
        None => None,
        Some(text) => Some(IdMapping::parse(&text).map_err(|source| Error::BadRecord {
            path: root_path.to_path_buf(),
            source,
        })?),
    };
    Ok((map, read(SHIFT_XATTR)?))
}

/// `fgetxattr` on a regular fd; `None` when the attribute is absent.
pub(crate) fn fget(fd: BorrowedFd<'_>, name: &str) -> io::Result<Option<Vec<u8>>> {
    let mut size = 256;
    loop {
        let mut buf = Vec::with_capacity(size);
        match rustix::fs::fgetxattr(fd, name, rustix::buffer::spare_capacity(&mut buf)) {
            Ok(_) => return Ok(Some(buf)),
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(rustix::io::Errno::RANGE) if size < 1 << 20 => size *= 4,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `lgetxattr` on a path; `None` when the attribute is absent.
pub(crate) fn lget(path: &OsStr, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    get_with(path, name, |p, n, b| rustix::fs::lgetxattr(p, n, b))
}

/// `getxattr` (following) on a path; `None` when the attribute is absent.
pub(crate) fn get(path: &OsStr, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    get_with(path, name, |p, n, b| rustix::fs::getxattr(p, n, b))
}

type GetFn = fn(&OsStr, &OsStr, rustix::buffer::SpareCapacity<'_, u8>) -> rustix::io::Result<usize>;

fn get_with(path: &OsStr, name: &[u8], f: GetFn) -> io::Result<Option<Vec<u8>>> {
    let name = OsStr::from_bytes(name);
    let mut size = 256;
    loop {
        let mut buf = Vec::with_capacity(size);
        match f(path, name, rustix::buffer::spare_capacity(&mut buf)) {
            Ok(_) => return Ok(Some(buf)),
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(rustix::io::Errno::RANGE) if size < 1 << 20 => size *= 4,
            Err(e) => return Err(e.into()),
        }
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
                match crate::sys::xattrat::listxattrat_nofollow(dir, name, buf) {
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
    let mut buf = vec![0u8; 256];
    let len = loop {
        match list_names(src, &mut buf) {
            Ok(n) => break n,
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(rustix::io::Errno::RANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(io_err(rel, "list xattrs", e)),
        }
    };
    let mut out = Vec::new();
    for name in buf[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
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

/// `/proc/self/fd/FD/NAME` (or `/proc/self/fd/FD` for an empty name).
pub(crate) fn proc_path(fd: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let mut p = format!("/proc/self/fd/{}", fd.as_raw_fd()).into_bytes();
    if !name.is_empty() {
        p.push(b'/');
        p.extend_from_slice(name);
    }
    p
}

pub(crate) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        p.extend_from_slice(dir);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

pub(crate) fn resolve_flags(cross_file_systems: bool) -> ResolveFlags {
    let base = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    if cross_file_systems {
        base
    } else {
        base | ResolveFlags::NO_XDEV
    }
}

const STATX_WANT: StatxFlags = StatxFlags::BASIC_STATS.union(StatxFlags::MNT_ID);

struct Shared<'p> {
    root: BorrowedFd<'p>,
    opts: WalkOptions,
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
    let stx = statx(
        root,
        "",
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        STATX_WANT,
    )
    .map_err(|e| io_err(b"", "stat", e))?;
    let root_xattrs = id_xattrs(Source::Fd(root), b"")?;
    let root_entry_key = (dev_of(&stx), stx.stx_ino);
    let root_entry = Entry {
        path: Vec::new(),
        dev: dev_of(&stx),
        ino: stx.stx_ino,
        mode: u32::from(stx.stx_mode),
        uid: stx.stx_uid,
        gid: stx.stx_gid,
        nlink: u64::from(stx.stx_nlink),
        links_in_tree: 1,
        xattrs: root_xattrs,
    };
    let shared = Shared {
        root,
        opts,
        entries: Mutex::new(vec![root_entry]),
        links: Mutex::new(HashMap::new()),
        mount_points: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
        visited: AtomicU64::new(1),
        progress,
    };
    let key = (root_entry_key.0, root_entry_key.1);
    rayon::scope(|s| walk_dir(s, &shared, Vec::new(), key, stx.stx_mnt_id));

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

/// A queued directory holds no fd (a wide tree would run out of them): it is opened when
/// its turn comes, beneath the root without following any symlink, and must still be the
/// inode its parent listed.
fn walk_dir<'s>(
    s: &rayon::Scope<'s>,
    shared: &'s Shared<'s>,
    rel: Vec<u8>,
    key: (u64, u64),
    mnt_id: u64,
) {
    let open = || -> Result<OwnedFd, Error> {
        let path: &OsStr = if rel.is_empty() {
            OsStr::new(".")
        } else {
            OsStr::from_bytes(&rel)
        };
        let fd = openat2(
            shared.root,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            resolve_flags(shared.opts.cross_file_systems),
        )
        .map_err(|e| io_err(&rel, "open directory", e))?;
        let again =
            statx(&fd, "", AtFlags::EMPTY_PATH, STATX_WANT).map_err(|e| io_err(&rel, "stat", e))?;
        if (dev_of(&again), again.stx_ino) != key {
            return Err(io_err(
                &rel,
                "open directory",
                io::Error::other("replaced while the tree was walked"),
            ));
        }
        Ok(fd)
    };
    if let Err(e) = open().and_then(|dir| walk_dir_inner(s, shared, dir, &rel, mnt_id)) {
        lock(&shared.errors).push(e);
    }
}

fn walk_dir_inner<'s>(
    s: &rayon::Scope<'s>,
    shared: &'s Shared<'s>,
    dir: OwnedFd,
    rel: &[u8],
    mnt_id: u64,
) -> Result<(), Error> {
    let mut local = Vec::new();
    let mut reader = Dir::new(dir).map_err(|e| io_err(rel, "read directory", e))?;
    while let Some(item) = reader.read() {
        let item = item.map_err(|e| io_err(rel, "read directory", e))?;
        let dir = reader.fd().map_err(|e| io_err(rel, "read directory", e))?;
        let name = item.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let child = join(rel, name);
        let stx = match statx(
            dir,
            OsStr::from_bytes(name),
            AtFlags::SYMLINK_NOFOLLOW,
            STATX_WANT,
        ) {
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
        let xattrs = id_xattrs(Source::At(dir, item.file_name()), &child)?;
        if ft == FileType::Directory {
            let child_path = child.clone();
            let child_mnt = stx.stx_mnt_id;
            s.spawn(move |s| walk_dir(s, shared, child_path, key, child_mnt));
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

/// How one id is used in the tree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IdUse {
    pub id: u32,
    /// Inodes owned by it.
    pub owners: u64,
    /// ACL_USER / ACL_GROUP entries naming it (access and default ACLs).
    pub acl_entries: u64,
    /// File capabilities whose root id it is (uids only).
    pub capability_roots: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CapabilityFile {
    pub path: String,
    pub version: u8,
    pub root_id: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExternalLink {
    pub path: String,
    pub nlink: u64,
    pub links_in_tree: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Hazards {
    pub setuid: Vec<String>,
    pub setgid: Vec<String>,
    pub capabilities: Vec<CapabilityFile>,
    pub devices: Vec<String>,
    pub world_writable_dirs_without_sticky: Vec<String>,
    pub hard_links_leaving_tree: Vec<ExternalLink>,
    /// Values that could not be parsed (path: reason).
    pub malformed_xattrs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnmappedIds {
    pub map: String,
    pub uids: Vec<IdUse>,
    pub gids: Vec<IdUse>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    pub root: String,
    /// The map recorded on the tree root by an earlier shift (None = unshifted).
    pub recorded_map: Option<String>,
    /// Set while a shift is under way or was interrupted.
    pub interrupted_shift: Option<String>,
    pub inodes: u64,
    pub uids: Vec<IdUse>,
    pub gids: Vec<IdUse>,
    /// With a map: the ids (as stored on disk) that `shift` to that map, from the tree's
    /// recorded map, would find no mapping for.
    pub unmapped: Option<UnmappedIds>,
    pub hazards: Hazards,
    pub mount_points_skipped: Vec<String>,
}

/// Scans the tree at `path`.
pub fn scan(
    path: &Path,
    map: Option<&IdMapping>,
    opts: WalkOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report, Error> {
    let root = open_root(path)?;
    let (recorded, shifting) = recorded_state(root.as_fd(), path)?;
    let tree = walk(root.as_fd(), opts, progress)?;
    // The ids on disk are laid out for the recorded map: that is what a shift starts from.
    let from = recorded.clone().unwrap_or_else(IdMapping::identity);
    let mut report = summarize(&tree, map.map(|m| (&from, m)));
    report.root = path.display().to_string();
    report.recorded_map = recorded.map(|m| m.to_string());
    report.interrupted_shift = shifting;
    Ok(report)
}

/// Counts and hazards of a walked tree.
/// With `map = Some((from, to))`, also lists the ids `shift --from FROM --to TO` has no
/// mapping for.
pub fn summarize(tree: &Tree, map: Option<(&IdMapping, &IdMapping)>) -> Report {
    let mut uids: BTreeMap<u32, IdUse> = BTreeMap::new();
    let mut gids: BTreeMap<u32, IdUse> = BTreeMap::new();
    let mut h = Hazards::default();
    fn slot(m: &mut BTreeMap<u32, IdUse>, id: u32) -> &mut IdUse {
        m.entry(id).or_insert_with(|| IdUse {
            id,
            ..IdUse::default()
        })
    }
    for e in &tree.entries {
        let path = display(&e.path);
        slot(&mut uids, e.uid).owners += 1;
        slot(&mut gids, e.gid).owners += 1;
        let ft = e.file_type();
        let is_dir = ft == FileType::Directory;
        if !is_dir && e.mode & 0o4000 != 0 {
            h.setuid.push(path.clone());
        }
        if !is_dir && e.mode & 0o2000 != 0 {
            h.setgid.push(path.clone());
        }
        if matches!(ft, FileType::CharacterDevice | FileType::BlockDevice) {
            h.devices.push(path.clone());
        }
        if is_dir && e.mode & 0o002 != 0 && e.mode & 0o1000 == 0 {
            h.world_writable_dirs_without_sticky.push(path.clone());
        }
        if !is_dir && e.nlink > e.links_in_tree {
            h.hard_links_leaving_tree.push(ExternalLink {
                path: path.clone(),
                nlink: e.nlink,
                links_in_tree: e.links_in_tree,
            });
        }
        for (kind, value) in &e.xattrs {
            match kind {
                xattr::Kind::Capability => match xattr::parse_capability(value) {
                    Ok(c) => {
                        slot(&mut uids, c.root_id()).capability_roots += 1;
                        h.capabilities.push(CapabilityFile {
                            path: path.clone(),
                            version: c.version,
                            root_id: c.root_id(),
                        });
                    }
                    Err(err) => h.malformed_xattrs.push(format!("{path}: {err}")),
                },
                _ => match xattr::parse_acl(kind.name(), value) {
                    Ok(entries) => {
                        for (k, id) in entries.iter().filter_map(xattr::AclEntry::id) {
                            match k {
                                IdKind::Uid => slot(&mut uids, id).acl_entries += 1,
                                IdKind::Gid => slot(&mut gids, id).acl_entries += 1,
                            }
                        }
                    }
                    Err(err) => h.malformed_xattrs.push(format!("{path}: {err}")),
                },
            }
        }
    }
    let unmapped = map.map(|(from, to)| {
        let r = xattr::Reshift { from, to };
        UnmappedIds {
            map: to.to_string(),
            uids: uids
                .values()
                .filter(|u| r.uid(u.id).is_none())
                .cloned()
                .collect(),
            gids: gids
                .values()
                .filter(|g| r.gid(g.id).is_none())
                .cloned()
                .collect(),
        }
    });
    Report {
        root: String::new(),
        recorded_map: None,
        interrupted_shift: None,
        inodes: tree.entries.len() as u64,
        uids: uids.into_values().collect(),
        gids: gids.into_values().collect(),
        unmapped,
        hazards: h,
        mount_points_skipped: tree.mount_points.iter().map(|p| display(p)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::CWD;

    fn entry(path: &str, mode: u32, uid: u32, gid: u32) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            dev: 1,
            ino: path.len() as u64,
            mode,
            uid,
            gid,
            nlink: 1,
            links_in_tree: 1,
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn summary_counts_ids_and_flags_hazards() {
        let acl = xattr::encode_acl(&[
            xattr::AclEntry {
                tag: xattr::ACL_USER,
                perm: 6,
                id: 1000,
            },
            xattr::AclEntry {
                tag: xattr::ACL_GROUP,
                perm: 4,
                id: 70000,
            },
        ]);
        let mut cap = vec![0u8; 24];
        cap[..4].copy_from_slice(&xattr::VFS_CAP_REVISION_3.to_le_bytes());
        cap[20..].copy_from_slice(&1000u32.to_le_bytes());
        let mut with_acl = entry("a", 0o100644, 1000, 1000);
        with_acl.xattrs.push((xattr::Kind::AclAccess, acl));
        let mut with_cap = entry("bin/ping", 0o100755, 0, 0);
        with_cap.xattrs.push((xattr::Kind::Capability, cap));
        let mut linked = entry("l", 0o100644, 0, 0);
        linked.nlink = 3;
        linked.links_in_tree = 2;
        let tree = Tree {
            entries: vec![
                entry("", 0o40755, 0, 0),
                with_acl,
                with_cap,
                entry("bin/su", 0o104755, 0, 0),
                entry("bin/wall", 0o102755, 0, 5),
                entry("sgid-dir", 0o42775, 0, 5),
                entry("tmp", 0o40777, 0, 0),
                entry("tmp2", 0o41777, 0, 0),
                entry("dev/null", 0o20666, 0, 0),
                linked,
            ],
            mount_points: vec![b"proc".to_vec()],
        };
        let map = IdMapping::parse("b:0:100000:65536").unwrap();
        let r = summarize(&tree, Some((&IdMapping::identity(), &map)));
        assert_eq!(r.inodes, 10);
        let u1000 = r.uids.iter().find(|u| u.id == 1000).unwrap();
        assert_eq!(
            (u1000.owners, u1000.acl_entries, u1000.capability_roots),
            (1, 1, 1)
        );
        let u0 = r.uids.iter().find(|u| u.id == 0).unwrap();
        assert_eq!(u0.owners, 9);
        let un = r.unmapped.unwrap();
        assert!(un.uids.is_empty());
        assert_eq!(
            un.gids.iter().map(|g| g.id).collect::<Vec<_>>(),
            vec![70000]
        );
        assert_eq!(r.hazards.setuid, vec!["bin/su"]);
        assert_eq!(r.hazards.setgid, vec!["bin/wall"]);
        assert_eq!(r.hazards.devices, vec!["dev/null"]);
        assert_eq!(r.hazards.world_writable_dirs_without_sticky, vec!["tmp"]);
        assert_eq!(r.hazards.capabilities[0].root_id, 1000);
        assert_eq!(r.hazards.hard_links_leaving_tree[0].path, "l");
        assert_eq!(r.mount_points_skipped, vec!["proc"]);
    }

    #[test]
    fn a_wide_tree_does_not_run_out_of_fds() {
        // More subdirectories than this process may have open files: queued directories
        // hold no fd. The limit is lowered for the walk only (other tests in this binary
        // open few files).
        use rustix::process::{Resource, getrlimit, setrlimit};
        let n = 2000u64;
        let dir = tempfile::tempdir().unwrap();
        for i in 0..n {
            std::fs::create_dir(dir.path().join(i.to_string())).unwrap();
        }
        let root = open_root(dir.path()).unwrap();
        let saved = getrlimit(Resource::Nofile);
        let mut low = saved;
        low.current = Some(256);
        setrlimit(Resource::Nofile, low).unwrap();
        let tree = walk(root.as_fd(), WalkOptions::default(), &|_| {});
        setrlimit(Resource::Nofile, saved).unwrap();
        let tree = tree.unwrap();
        assert_eq!(tree.entries.len() as u64, n + 1);
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
