//! Offline shift of a tree from one map to another.
//!
//! Meaning of the maps: the tree currently holds every id as `from`'s *outer* side and will
//! hold it as `to`'s outer side, so each id `x` becomes `to.to_outer(from.to_inner(x))`.
//! An unshifted (canonical) image is laid out for the identity map, so `--map M` is
//! `from = identity, to = M` and `--map M --reverse` is `from = M, to = identity`.
//!
//! What is rewritten: owner uid/gid (lchown semantics, symlinks included), ACL_USER and
//! ACL_GROUP entries of access and default ACLs, and a file capability's root id (a v2
//! capability becomes v3 when its root id becomes non-zero, and v3 becomes v2 again when
//! its root id becomes 0). `chown` clears setuid/setgid bits and the capability: both are
//! restored. Each inode is visited once however many names it has.
//!
//! Crash safety. The tree's current map is recorded in `trusted.shiftfs.map` on its root
//! (absent = unshifted), so a second identical shift is refused and the error names the
//! map the tree holds. A shift runs in two passes:
//! 1. a read-only walk plans every change; an unmapped id stops the shift here, before
//!    anything is written;
//! 2. the plan (for each inode: path, dev/ino, mode and the *old* owner and id-bearing
//!    xattrs) is written to `TREE/.shiftfs-journal` and fsynced, then `trusted.shiftfs.shift`
//!    = `from=A to=B` is set on the root; only then are inodes changed.
//!
//! Journaled paths are front-coded (the components shared with the previous record, then
//! the rest), so the journal grows with the tree's size, not its size times its depth.
//! They are resolved again, also on resume, only through [`walk::Cursor`]: one component at
//! a time beneath the root, following no symlink, and each inode must still be the dev/ino
//! the plan recorded.
//!
//! Because the new value of every field is a function of its recorded old value, a re-run
//! after a crash can tell for each field whether it is done (equals the new value), to do
//! (equals the old one, or for a capability: is missing because `chown` dropped it) or was
//! changed by someone else (an error). So killing a shift at any point and re-running the
//! same command gives exactly the uninterrupted result. When every inode is done the map
//! is recorded, the journal removed (the root's times restored) and the marker removed, in
//! that order; each step is idempotent on re-run.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use rustix::fs::{
    AtFlags, CWD, FileType, FlockOperation, Mode, OFlags, StatxFlags, Timestamps, XattrFlags,
};
use serde::{Deserialize, Serialize};

use super::scan::{self, MAP_XATTR, SHIFT_XATTR};
use super::walk::{self, Cursor, Entry, WalkOptions, display};
use crate::idmap::{IdMapping, OVERFLOW_ID};
use crate::xattr::{self, IdKind, IdTranslate, Reshift};

/// The progress journal's name in the tree root.
pub const JOURNAL: &str = ".shiftfs-journal";
/// 2: paths are front-coded (`k`). Version 1 journals (full paths) are still read.
const JOURNAL_VERSION: u32 = 2;
/// How every journal starts (the header's first field).
const JOURNAL_MAGIC: &[u8] = b"{\"shiftfs_journal\":";

/// What to do with an id the maps do not cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnUnmapped {
    /// Stop before anything is written.
    #[default]
    Fail,
    /// Leave the id as it is.
    Keep,
    /// Write the overflow id 65534.
    Overflow,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub from: IdMapping,
    pub to: IdMapping,
    pub unmapped: OnUnmapped,
    pub walk: WalkOptions,
    pub dry_run: bool,
    /// Shift inodes that also have names outside the tree (they change there too).
    pub allow_external_links: bool,
}

/// Progress reporting; the CLI shows a bar, tests use [`NoProgress`].
pub trait Progress: Sync {
    fn phase(&self, name: &'static str, total: Option<u64>);
    fn set(&self, done: u64);
    fn finish(&self);
}

pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &'static str, _: Option<u64>) {}
    fn set(&self, _: u64) {}
    fn finish(&self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Scan(#[from] scan::Error),
    #[error(transparent)]
    Walk(#[from] walk::Error),
    #[error("{tree} holds ids for map {recorded}, not for --from {from}: {hint}")]
    MapMismatch {
        tree: PathBuf,
        recorded: String,
        from: String,
        hint: String,
    },
    #[error(
        "{tree} has an interrupted shift from {from} to {to}; finish it first by re-running \
         `shiftfs shift --from {from} --to {to} {}`", tree.display()
    )]
    Interrupted {
        tree: PathBuf,
        from: String,
        to: String,
    },
    #[error(
        "{tree}: {SHIFT_XATTR} holds '{value}', which is not 'from=MAP to=MAP'; remove it only if no shift is running"
    )]
    BadMarker { tree: PathBuf, value: String },
    #[error(
        "{count} id(s) have no mapping from {from} to {to}: {list}; nothing was changed. \
         Extend the map, or pass --skip-unmapped=keep (leave them) or --skip-unmapped=overflow (write 65534)"
    )]
    Unmapped {
        count: usize,
        from: String,
        to: String,
        list: String,
    },
    #[error(
        "{count} inode(s) to change also have names outside the tree, where they would change \
         too (e.g. {examples}); nothing was written. Break those links, or pass \
         --allow-external-links"
    )]
    ExternalLinks { count: u64, examples: String },
    #[error("{path}: cannot translate an id-bearing xattr")]
    Xattr {
        path: String,
        #[source]
        source: xattr::Error,
    },
    #[error("{path}: a symlink carrying {name} is not supported; remove the attribute")]
    SymlinkXattr { path: String, name: &'static str },
    #[error("{path}: {op}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: {what} changed since this shift planned it; the tree must not be used during a shift"
    )]
    Changed { path: String, what: String },
    #[error("another shift is running on {0}")]
    Busy(PathBuf),
    #[error(
        "journal {path}: {reason}; if no shift is running, remove it and the {SHIFT_XATTR} attribute and check the tree with `shiftfs scan`"
    )]
    Journal { path: PathBuf, reason: String },
    #[error(
        "{count} inode(s) could not be shifted; fix that and re-run the same command to finish. The first"
    )]
    Apply {
        count: usize,
        #[source]
        first: Box<Error>,
    },
}

fn io_err(path: &[u8], op: &'static str, e: impl Into<io::Error>) -> Error {
    Error::Io {
        path: display(path),
        op,
        source: e.into(),
    }
}

/// A map for messages: "identity" for the identity map.
pub fn map_name(m: &IdMapping) -> String {
    if *m == IdMapping::identity() {
        "identity".to_string()
    } else {
        m.to_string()
    }
}

/// One planned change, for `--dry-run` output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub uid: (u32, u32),
    pub gid: (u32, u32),
    pub xattrs: Vec<XattrChange>,
}

/// (attribute, ids before, ids after).
pub type XattrChange = (&'static str, Vec<(IdKind, u32)>, Vec<(IdKind, u32)>);

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Inodes walked (0 when an interrupted shift was resumed from its journal).
    pub inodes: u64,
    /// Inodes changed (or to change, for a dry run).
    pub changed: u64,
    /// The planned changes, filled for dry runs only.
    pub changes: Vec<Change>,
    pub resumed: bool,
    pub mount_points_skipped: Vec<String>,
    /// Unmapped ids left alone or written as 65534 under --skip-unmapped.
    pub skipped_unmapped: u64,
    /// The tree already holds ids for `to`.
    pub nothing_to_do: bool,
    /// Changed inodes that also have names outside the tree (first few paths, and the count):
    /// the shift changes them there too.
    pub external_links: (Vec<String>, u64),
}

/// The id translation of a shift, with the unmapped policy applied.
struct Translate<'a> {
    reshift: Reshift<'a>,
    on: OnUnmapped,
}

impl Translate<'_> {
    fn fallback(&self, id: u32) -> Option<u32> {
        match self.on {
            OnUnmapped::Fail => None,
            OnUnmapped::Keep => Some(id),
            OnUnmapped::Overflow => Some(OVERFLOW_ID),
        }
    }
}

impl IdTranslate for Translate<'_> {
    fn uid(&self, id: u32) -> Option<u32> {
        self.reshift.uid(id).or_else(|| self.fallback(id))
    }
    fn gid(&self, id: u32) -> Option<u32> {
        self.reshift.gid(id).or_else(|| self.fallback(id))
    }
}

/// One inode of the plan, as journaled: everything needed to redo or recognise its change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// How many leading components the path shares with the previous record's (absent in
    /// version 1 journals: 0).
    #[serde(default)]
    k: u32,
    /// The rest of the path relative to the root, hex.
    p: String,
    d: u64,
    i: u64,
    m: u32,
    u: u32,
    g: u32,
    /// (attribute name, old value hex).
    x: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    shiftfs_journal: u32,
    from: String,
    to: String,
    unmapped: OnUnmapped,
    cross_file_systems: bool,
    root_atime: (i64, u32),
    root_mtime: (i64, u32),
    records: u64,
}

fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &c in b {
        s.push(char::from(H[usize::from(c >> 4)]));
        s.push(char::from(H[usize::from(c & 15)]));
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let d = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some(d(p[0])? << 4 | d(p[1])?))
        .collect()
}

/// Front coding of journaled paths, so a journal stays linear in the tree's size however
/// deep the tree: how many leading components `path` shares with `prev`, and the rest.
fn front_code<'a>(prev: &[u8], path: &'a [u8]) -> (u32, &'a [u8]) {
    let (mut k, mut off) = (0, 0);
    for (a, b) in walk::components(prev).zip(walk::components(path)) {
        if a != b {
            break;
        }
        k += 1;
        off += b.len() + 1;
    }
    (k, path.get(off..).unwrap_or_default())
}

/// The path [`front_code`] gave `(k, rest)` for; `None` if `prev` has fewer than `k`
/// components.
fn front_decode(prev: &[u8], k: u32, rest: &[u8]) -> Option<Vec<u8>> {
    let mut comps = walk::components(prev);
    let mut out = Vec::with_capacity(prev.len() + rest.len() + 1);
    for _ in 0..k {
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(comps.next()?);
    }
    if !rest.is_empty() {
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(rest);
    }
    Some(out)
}

fn marker(opts: &Options) -> String {
    format!("from={} to={}", opts.from, opts.to)
}

fn parse_marker(tree: &Path, value: &str) -> Result<(IdMapping, IdMapping), Error> {
    let bad = || Error::BadMarker {
        tree: tree.to_path_buf(),
        value: value.to_string(),
    };
    let (f, t) = value.split_once(' ').ok_or_else(bad)?;
    let from = f.strip_prefix("from=").ok_or_else(bad)?;
    let to = t.strip_prefix("to=").ok_or_else(bad)?;
    Ok((
        IdMapping::parse(from).map_err(|_| bad())?,
        IdMapping::parse(to).map_err(|_| bad())?,
    ))
}

/// Shifts the tree at `tree` (see the module docs).
pub fn shift(tree: &Path, opts: &Options, progress: &dyn Progress) -> Result<Outcome, Error> {
    let root = walk::open_root(tree)?;
    let lock = if opts.dry_run {
        FlockOperation::NonBlockingLockShared
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    rustix::fs::flock(&root, lock).map_err(|_| Error::Busy(tree.to_path_buf()))?;
    let (recorded, shifting) = scan::recorded_state(root.as_fd(), tree)?;

    if let Some(value) = shifting {
        let (from, to) = parse_marker(tree, &value)?;
        if from != opts.from || to != opts.to {
            return Err(Error::Interrupted {
                tree: tree.to_path_buf(),
                from: map_name(&from),
                to: map_name(&to),
            });
        }
        return resume(tree, root.as_fd(), opts, recorded, progress);
    }

    let current = recorded.unwrap_or_else(IdMapping::identity);
    // Already done (a recovery script re-running a completed shift): nothing to do, not an
    // error. Only a completed shift records its map, so this is never a half-done tree.
    if current != opts.from && current != opts.to {
        return Err(mismatch(tree, &current, opts));
    }
    if current == opts.to {
        return Ok(Outcome {
            nothing_to_do: true,
            ..Outcome::default()
        });
    }

    remove_stale_journal(tree, root.as_fd())?;
    progress.phase("checking", None);
    let walked = walk::walk(root.as_fd(), opts.walk, &|n| progress.set(n));
    progress.finish();
    let walked = walked?;
    let t = Translate {
        reshift: Reshift {
            from: &opts.from,
            to: &opts.to,
        },
        on: opts.unmapped,
    };
    let plan = plan(&walked.entries, &t, opts)?;
    let mut outcome = Outcome {
        inodes: walked.entries.len() as u64,
        changed: plan.records.len() as u64,
        mount_points_skipped: walked.mount_points.iter().map(|p| display(p)).collect(),
        skipped_unmapped: plan.skipped_unmapped,
        external_links: plan.external_links.clone(),
        ..Outcome::default()
    };
    if opts.dry_run {
        outcome.changes = plan.changes;
        return Ok(outcome);
    }
    if plan.external_links.1 > 0 && !opts.allow_external_links {
        return Err(Error::ExternalLinks {
            count: plan.external_links.1,
            examples: plan.external_links.0.join(", "),
        });
    }

    let root_stat = rustix::fs::fstat(&root).map_err(|e| io_err(b"", "stat", e))?;
    let header = Header {
        shiftfs_journal: JOURNAL_VERSION,
        from: opts.from.to_string(),
        to: opts.to.to_string(),
        unmapped: opts.unmapped,
        cross_file_systems: opts.walk.cross_file_systems,
        root_atime: (root_stat.st_atime, root_stat.st_atime_nsec as u32),
        root_mtime: (root_stat.st_mtime, root_stat.st_mtime_nsec as u32),
        records: plan.records.len() as u64,
    };
    write_journal(tree, root.as_fd(), &header, &plan.records)?;
    rustix::fs::fsetxattr(
        &root,
        SHIFT_XATTR,
        marker(opts).as_bytes(),
        XattrFlags::empty(),
    )
    .map_err(|e| io_err(b"", "set shift marker", e))?;
    rustix::fs::fsync(&root).map_err(|e| io_err(b"", "fsync", e))?;

    apply_all(root.as_fd(), &header, &plan.records, &t, progress)?;
    finalize(root.as_fd(), opts, Some(&header))?;
    Ok(outcome)
}

fn mismatch(tree: &Path, current: &IdMapping, opts: &Options) -> Error {
    let cur = map_name(current);
    let hint = if *current == IdMapping::identity() {
        format!(
            "it has no {MAP_XATTR}, so it is taken to be unshifted; shift it with --map MAP. \
             If another tool shifted it, record that map first: setfattr -n {MAP_XATTR} -v MAP {}",
            tree.display()
        )
    } else if *current == opts.to {
        format!(
            "{MAP_XATTR} on its root says it is already shifted to {cur}; to undo that use \
             --map {cur} --reverse"
        )
    } else {
        format!(
            "{MAP_XATTR} on its root records {cur}; use --from {cur} (to undo the shift: \
             --map {cur} --reverse; to move it: --from {cur} --to NEWMAP)"
        )
    };
    Error::MapMismatch {
        tree: tree.to_path_buf(),
        recorded: cur,
        from: map_name(&opts.from),
        hint,
    }
}

struct Plan {
    records: Vec<Record>,
    external_links: (Vec<String>, u64),
    changes: Vec<Change>,
    skipped_unmapped: u64,
}

fn plan(entries: &[Entry], t: &Translate<'_>, opts: &Options) -> Result<Plan, Error> {
    let mut unmapped = UnmappedUses::new(opts);
    let mut records = Vec::new();
    let mut prev_path: &[u8] = b"";
    let mut changes = Vec::new();
    let mut external_links = (Vec::new(), 0);
    for e in entries {
        unmapped.note(IdKind::Uid, e.uid, &e.path);
        unmapped.note(IdKind::Gid, e.gid, &e.path);
        let uid = t.uid(e.uid);
        let gid = t.gid(e.gid);
        let (x, xchanges) = plan_xattrs(e, t, &mut unmapped)?;
        let (Some(uid), Some(gid)) = (uid, gid) else {
            continue;
        };
        if uid == e.uid && gid == e.gid && xchanges.is_empty() {
            continue;
        }
        if e.file_type() != FileType::Directory && e.nlink > e.links_in_tree {
            if external_links.0.len() < 5 {
                external_links.0.push(display(&e.path));
            }
            external_links.1 += 1;
        }
        let (k, rest) = front_code(prev_path, &e.path);
        prev_path = &e.path;
        records.push(Record {
            k,
            p: hex(rest),
            d: e.dev,
            i: e.ino,
            m: e.mode,
            u: e.uid,
            g: e.gid,
            x,
        });
        if opts.dry_run {
            changes.push(Change {
                path: display(&e.path),
                uid: (e.uid, uid),
                gid: (e.gid, gid),
                xattrs: xchanges,
            });
        }
    }
    let skipped_unmapped = unmapped.check(opts)?;
    Ok(Plan {
        records,
        external_links,
        changes,
        skipped_unmapped,
    })
}

/// (name, hex value), as a journal record holds an xattr.
type RecordedXattr = (String, String);

/// The journal's copy of each id-bearing xattr of `e`, and the id changes its translation
/// makes (none: the xattr needs no rewrite).
fn plan_xattrs(
    e: &Entry,
    t: &Translate<'_>,
    unmapped: &mut UnmappedUses<'_>,
) -> Result<(Vec<RecordedXattr>, Vec<XattrChange>), Error> {
    let mut x = Vec::new();
    let mut xchanges = Vec::new();
    for (kind, value) in &e.xattrs {
        if e.file_type() == FileType::Symlink {
            return Err(Error::SymlinkXattr {
                path: display(&e.path),
                name: kind.name(),
            });
        }
        let xerr = |source| Error::Xattr {
            path: display(&e.path),
            source,
        };
        let name = kind.name().as_bytes();
        let ids = xattr::ids(name, value).map_err(xerr)?;
        for &(k, id) in &ids {
            unmapped.note(k, id, &e.path);
        }
        let new = match xattr::translate(name, value, t, xattr::Unmapped::Fail) {
            Ok(n) => n,
            // Already noted as unmapped above.
            Err(xattr::Error::Unmapped { .. }) => None,
            Err(err) => return Err(xerr(err)),
        };
        if let Some(new) = &new {
            xchanges.push((kind.name(), ids, xattr::ids(name, new).map_err(xerr)?));
        }
        x.push((kind.name().to_string(), hex(value)));
    }
    Ok((x, xchanges))
}

/// Ids the maps leave unmapped, counted under the strict translation whatever the policy:
/// the policy only decides whether they stop the shift.
struct UnmappedUses<'a> {
    strict: Reshift<'a>,
    /// (kind, id) -> (uses, an example path)
    seen: BTreeMap<(IdKind, u32), (u64, String)>,
}

impl<'a> UnmappedUses<'a> {
    fn new(opts: &'a Options) -> Self {
        Self {
            strict: Reshift {
                from: &opts.from,
                to: &opts.to,
            },
            seen: BTreeMap::new(),
        }
    }

    fn note(&mut self, kind: IdKind, id: u32, path: &[u8]) {
        if self.strict.id(kind, id).is_none() {
            self.seen
                .entry((kind, id))
                .or_insert_with(|| (0, display(path)))
                .0 += 1;
        }
    }

    /// The number of uses the shift leaves as they are, or, under `--skip-unmapped=fail`,
    /// the error that stops it before anything is written.
    fn check(self, opts: &Options) -> Result<u64, Error> {
        let skipped = self.seen.values().map(|(n, _)| n).sum();
        if !self.seen.is_empty() && opts.unmapped == OnUnmapped::Fail {
            let count = self.seen.len();
            let mut list: Vec<String> = self
                .seen
                .iter()
                .take(10)
                .map(|((k, id), (n, p))| format!("{k} {id} ({n} use(s), e.g. {p})"))
                .collect();
            if count > 10 {
                list.push(format!(
                    "and {} more (see `shiftfs scan --map`)",
                    count - 10
                ));
            }
            return Err(Error::Unmapped {
                count,
                from: map_name(&opts.from),
                to: map_name(&opts.to),
                list: list.join(", "),
            });
        }
        Ok(skipped)
    }
}

/// A journal without the marker is left by a crash before the shift began: nothing was
/// changed yet, so it is dropped. A file of that name that is not one of our journals (a
/// link to something else, say) is never touched.
fn remove_stale_journal(tree: &Path, root: BorrowedFd<'_>) -> Result<(), Error> {
    let not_ours = |reason: &str| Error::Journal {
        path: tree.join(JOURNAL),
        reason: format!("{reason}; it is not a shiftfs journal, move it out of the tree"),
    };
    let st = match rustix::fs::statat(root, JOURNAL, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(io_err(JOURNAL.as_bytes(), "stat", e)),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
        || st.st_nlink != 1
        || st.st_uid != 0
        || st.st_mode & 0o7777 != 0o600
    {
        return Err(not_ours(
            "it exists with another type, owner, mode or link count",
        ));
    }
    let fd = rustix::fs::openat(
        root,
        JOURNAL,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(JOURNAL.as_bytes(), "open", e))?;
    // A kill while the journal was being written can leave it empty or cut short.
    let mut start = [0u8; JOURNAL_MAGIC.len()];
    let n = rustix::io::read(&fd, &mut start).map_err(|e| io_err(JOURNAL.as_bytes(), "read", e))?;
    if n != 0 && start[..] != *JOURNAL_MAGIC {
        return Err(not_ours("it does not start like a journal"));
    }
    tracing::info!("removing the journal of a shift that never started");
    rustix::fs::unlinkat(root, JOURNAL, AtFlags::empty())
        .map_err(|e| io_err(JOURNAL.as_bytes(), "remove", e))
}

fn write_journal(
    tree: &Path,
    root: BorrowedFd<'_>,
    header: &Header,
    records: &[Record],
) -> Result<(), Error> {
    let jerr = |e: io::Error| Error::Journal {
        path: tree.join(JOURNAL),
        reason: e.to_string(),
    };
    let fd = rustix::fs::openat(
        root,
        JOURNAL,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| jerr(e.into()))?;
    let mut w = io::BufWriter::with_capacity(1 << 20, std::fs::File::from(fd));
    json_line(&mut w, header).map_err(jerr)?;
    for r in records {
        json_line(&mut w, r).map_err(jerr)?;
    }
    let file = w.into_inner().map_err(|e| jerr(e.into_error()))?;
    file.sync_all().map_err(jerr)?;
    rustix::fs::fsync(root).map_err(|e| jerr(e.into()))?;
    Ok(())
}

fn json_line(w: &mut impl Write, v: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *w, v).map_err(io::Error::other)?;
    w.write_all(b"\n")
}

fn read_journal(tree: &Path, fd: OwnedFd) -> Result<(Header, Vec<Record>), Error> {
    let jerr = |reason: String| Error::Journal {
        path: tree.join(JOURNAL),
        reason,
    };
    let mut lines = BufReader::new(std::fs::File::from(fd)).lines();
    let first = lines
        .next()
        .ok_or_else(|| jerr("empty".into()))?
        .map_err(|e| jerr(e.to_string()))?;
    let header: Header =
        serde_json::from_str(&first).map_err(|e| jerr(format!("bad header: {e}")))?;
    if !(1..=JOURNAL_VERSION).contains(&header.shiftfs_journal) {
        return Err(jerr(format!(
            "version {} is not 1 to {JOURNAL_VERSION}",
            header.shiftfs_journal
        )));
    }
    let mut records = Vec::new();
    for (n, line) in lines.enumerate() {
        let line = line.map_err(|e| jerr(e.to_string()))?;
        records
            .push(serde_json::from_str(&line).map_err(|e| jerr(format!("record {}: {e}", n + 1)))?);
    }
    if records.len() as u64 != header.records {
        return Err(jerr(format!(
            "{} records, header says {}",
            records.len(),
            header.records
        )));
    }
    Ok((header, records))
}

fn resume(
    tree: &Path,
    root: BorrowedFd<'_>,
    opts: &Options,
    recorded: Option<IdMapping>,
    progress: &dyn Progress,
) -> Result<Outcome, Error> {
    let journal = match rustix::fs::openat(
        root,
        JOURNAL,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Some(fd),
        Err(rustix::io::Errno::NOENT) => None,
        Err(e) => {
            return Err(Error::Journal {
                path: tree.join(JOURNAL),
                reason: e.to_string(),
            });
        }
    };
    let mut outcome = Outcome {
        resumed: true,
        ..Outcome::default()
    };
    let Some(fd) = journal else {
        // The journal is removed only after the new map is recorded: only the marker is left.
        let current = recorded.unwrap_or_else(IdMapping::identity);
        if current != opts.to {
            return Err(Error::Journal {
                path: tree.join(JOURNAL),
                reason: format!(
                    "missing, and the tree records map {} rather than {}",
                    map_name(&current),
                    map_name(&opts.to)
                ),
            });
        }
        if !opts.dry_run {
            finalize(root, opts, None)?;
        }
        return Ok(outcome);
    };
    let (header, records) = read_journal(tree, fd)?;
    outcome.changed = records.len() as u64;
    if opts.dry_run {
        return Ok(outcome);
    }
    let t = Translate {
        reshift: Reshift {
            from: &opts.from,
            to: &opts.to,
        },
        // The plan was made under the journaled policy: keep to it.
        on: header.unmapped,
    };
    apply_all(root, &header, &records, &t, progress)?;
    finalize(root, opts, Some(&header))?;
    Ok(outcome)
}

fn apply_all(
    root: BorrowedFd<'_>,
    header: &Header,
    records: &[Record],
    t: &Translate<'_>,
    progress: &dyn Progress,
) -> Result<(), Error> {
    progress.phase("shifting", Some(records.len() as u64));
    let done = AtomicU64::new(0);
    let errors = Mutex::new(Vec::new());
    let fail = |e| errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    // Grouped by directory, in sorted order (a directory's subtree is contiguous in it) and
    // cut into runs that share a cursor: each directory is opened about once, one component
    // at a time beneath the root, and each entry by its single name beneath its directory.
    let mut groups: BTreeMap<Vec<u8>, Vec<(Vec<u8>, &Record)>> = BTreeMap::new();
    let mut prev = Vec::new();
    for r in records {
        match unhex(&r.p).and_then(|rest| front_decode(&prev, r.k, &rest)) {
            Some(path) => {
                prev.clone_from(&path);
                let parent = match path.iter().rposition(|&c| c == b'/') {
                    Some(i) => path[..i].to_vec(),
                    None => Vec::new(),
                };
                groups.entry(parent).or_default().push((path, r));
            }
            None => fail(Error::Journal {
                path: PathBuf::from(JOURNAL),
                reason: format!("bad path '{}'", r.p),
            }),
        }
    }
    let groups: Vec<_> = groups.into_iter().collect();
    let resolve = walk::resolve_flags(header.cross_file_systems);
    let threads = rayon::current_num_threads().max(1);
    let per_cursor = (walk::fd_budget() / threads).max(4);
    let run = (groups.len() / (threads * 8)).max(1);
    groups.par_chunks(run).for_each(|chunk| {
        let mut cursor = Cursor::new(root, resolve, per_cursor);
        for (parent, members) in chunk {
            let dir = match cursor.dir(parent) {
                Ok(fd) => fd,
                Err(e) => {
                    fail(io_err(parent, "open", e));
                    continue;
                }
            };
            for (path, r) in members {
                if let Err(e) = apply(root, dir, resolve, path, r, t) {
                    fail(e);
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 256 == 0 {
                    progress.set(n);
                }
            }
        }
    });
    progress.set(records.len() as u64);
    progress.finish();
    let mut errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Apply {
            count: errors.len(),
            first: Box::new(errors.swap_remove(0)),
        })
    }
}

fn apply(
    root: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    resolve: rustix::fs::ResolveFlags,
    path: &[u8],
    r: &Record,
    t: &Translate<'_>,
) -> Result<(), Error> {
    let owned;
    let fd = if path.is_empty() {
        root
    } else {
        owned = open_member(dir, resolve, path)?;
        owned.as_fd()
    };
    let stx = statx(fd, path)?;
    let dev = rustix::fs::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    if (dev, stx.stx_ino) != (r.d, r.i) {
        return Err(changed(path, "the inode at this path"));
    }
    let is_link = FileType::from_raw_mode(u32::from(stx.stx_mode)) == FileType::Symlink;
    let proc = walk::proc_path(fd, b"");
    let proc = OsStr::from_bytes(&proc);
    let cap = shift_acls(proc, path, r, t, is_link)?;
    let chowned = shift_owner(fd, path, r, t, &stx)?;
    if is_link {
        return Ok(());
    }
    restore_mode(fd, proc, path, r, &stx, chowned)?;
    // chown drops the capability too: put the new one (back) after it.
    if let Some((old, new)) = cap {
        restore_capability(proc, path, old, new)?;
    }
    Ok(())
}

/// Opens `path`'s last component beneath `dir`, its parent directory.
fn open_member(
    dir: BorrowedFd<'_>,
    resolve: rustix::fs::ResolveFlags,
    path: &[u8],
) -> Result<OwnedFd, Error> {
    let name = match path.iter().rposition(|&c| c == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    };
    rustix::fs::openat2(
        dir,
        OsStr::from_bytes(name),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        resolve,
    )
    .map_err(|e| io_err(path, "open", e))
}

fn statx(fd: BorrowedFd<'_>, path: &[u8]) -> Result<rustix::fs::Statx, Error> {
    rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS,
    )
    .map_err(|e| io_err(path, "stat", e))
}

fn changed(path: &[u8], what: &str) -> Error {
    Error::Changed {
        path: display(path),
        what: what.to_string(),
    }
}

/// A capability's value before and after the shift.
type CapabilityChange = (Vec<u8>, Vec<u8>);

/// Rewrites the ACLs. The capability is only translated and handed back: the chown that
/// follows would drop it again.
fn shift_acls(
    proc: &OsStr,
    path: &[u8],
    r: &Record,
    t: &Translate<'_>,
    is_link: bool,
) -> Result<Option<CapabilityChange>, Error> {
    let xerr = |source| Error::Xattr {
        path: display(path),
        source,
    };
    let mut cap = None;
    for (name, old) in &r.x {
        let old = unhex(old).ok_or_else(|| changed(path, "the journal record"))?;
        let new = xattr::translate(name.as_bytes(), &old, t, xattr::Unmapped::Fail)
            .map_err(xerr)?
            .unwrap_or_else(|| old.clone());
        if name.as_bytes() == xattr::CAPABILITY {
            cap = Some((old, new));
            continue;
        }
        if is_link || new == old {
            continue;
        }
        let cur = walk::get(proc, name.as_bytes()).map_err(|e| io_err(path, "read xattr", e))?;
        if cur.as_deref() == Some(&new[..]) {
            continue;
        }
        if cur.as_deref() != Some(&old[..]) {
            return Err(changed(path, name));
        }
        rustix::fs::setxattr(proc, name.as_str(), &new, XattrFlags::REPLACE)
            .map_err(|e| io_err(path, "set xattr", e))?;
    }
    Ok(cap)
}

/// Returns whether it chowned: that is what may have cleared setuid/setgid.
fn shift_owner(
    fd: BorrowedFd<'_>,
    path: &[u8],
    r: &Record,
    t: &Translate<'_>,
    stx: &rustix::fs::Statx,
) -> Result<bool, Error> {
    let uid = t
        .uid(r.u)
        .ok_or_else(|| changed(path, "the map coverage of its uid"))?;
    let gid = t
        .gid(r.g)
        .ok_or_else(|| changed(path, "the map coverage of its gid"))?;
    let cur = (stx.stx_uid, stx.stx_gid);
    if cur == (uid, gid) {
        return Ok(false);
    }
    if cur != (r.u, r.g) {
        return Err(changed(path, "the owner"));
    }
    rustix::fs::chownat(
        fd,
        "",
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| io_err(path, "chown", e))?;
    Ok(true)
}

fn restore_mode(
    fd: BorrowedFd<'_>,
    proc: &OsStr,
    path: &[u8],
    r: &Record,
    stx: &rustix::fs::Statx,
    chowned: bool,
) -> Result<(), Error> {
    // chown clears setuid/setgid on non-directories (also on the run a crash cut short);
    // it changes no other mode bit.
    let mode = match (r.m & 0o6000 != 0, chowned) {
        (false, _) => r.m,
        (true, true) => u32::from(statx(fd, path)?.stx_mode),
        (true, false) => u32::from(stx.stx_mode),
    };
    if mode & 0o7777 != r.m & 0o7777 {
        rustix::fs::chmodat(
            CWD,
            proc,
            Mode::from_raw_mode(r.m & 0o7777),
            AtFlags::empty(),
        )
        .map_err(|e| io_err(path, "chmod", e))?;
    }
    Ok(())
}

fn restore_capability(proc: &OsStr, path: &[u8], old: Vec<u8>, new: Vec<u8>) -> Result<(), Error> {
    let cur = walk::get(proc, xattr::CAPABILITY).map_err(|e| io_err(path, "read xattr", e))?;
    match cur {
        Some(c) if c == new => {}
        Some(c) if c != old => return Err(changed(path, "security.capability")),
        _ => rustix::fs::setxattr(proc, "security.capability", &new, XattrFlags::empty())
            .map_err(|e| io_err(path, "set capability", e))?,
    }
    Ok(())
}

fn finalize(root: BorrowedFd<'_>, opts: &Options, header: Option<&Header>) -> Result<(), Error> {
    let e = |op| move |err: rustix::io::Errno| io_err(b"", op, err);
    // Every inode change must be durable before the map says the shift is done; the file
    // system's own ordering is not relied on.
    let cross = header.map_or(opts.walk.cross_file_systems, |h| h.cross_file_systems);
    if cross {
        rustix::fs::sync();
    } else {
        rustix::fs::syncfs(root).map_err(e("syncfs"))?;
    }
    if opts.to == IdMapping::identity() {
        match rustix::fs::fremovexattr(root, MAP_XATTR) {
            Ok(()) | Err(rustix::io::Errno::NODATA) => {}
            Err(err) => return Err(e("remove map record")(err)),
        }
    } else {
        rustix::fs::fsetxattr(
            root,
            MAP_XATTR,
            opts.to.to_string().as_bytes(),
            XattrFlags::empty(),
        )
        .map_err(e("record map"))?;
    }
    rustix::fs::fsync(root).map_err(e("fsync"))?;
    match rustix::fs::unlinkat(root, JOURNAL, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(err) => return Err(e("remove journal")(err)),
    }
    if let Some(h) = header {
        let ts = |(s, ns): (i64, u32)| rustix::fs::Timespec {
            tv_sec: s,
            tv_nsec: ns.into(),
        };
        let times = Timestamps {
            last_access: ts(h.root_atime),
            last_modification: ts(h.root_mtime),
        };
        rustix::fs::futimens(root, &times).map_err(e("restore times"))?;
    }
    // A marker outliving the journal is harmless: a re-run sees the recorded map and only
    // removes the marker. So no sync is needed between these two steps.
    match rustix::fs::fremovexattr(root, SHIFT_XATTR) {
        Ok(()) | Err(rustix::io::Errno::NODATA) => {}
        Err(err) => return Err(e("remove shift marker")(err)),
    }
    rustix::fs::fsync(root).map_err(e("fsync"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        for v in [&b""[..], b"\x00\xff\x10a", b"usr/bin/su"] {
            assert_eq!(unhex(&hex(v)).unwrap(), v);
        }
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn front_coding_round_trips() {
        let paths: [&[u8]; 9] = [
            b"",
            b"a",
            b"a/b",
            b"a/b/c",
            b"a/b/d",
            b"a/bc",
            b"a/bc/x/y",
            b"b",
            b"b/a/b",
        ];
        let mut prev: &[u8] = b"";
        let mut decoded = Vec::new();
        let mut coded = Vec::new();
        for p in paths {
            let (k, rest) = front_code(prev, p);
            coded.push((k, String::from_utf8_lossy(rest).into_owned()));
            decoded = front_decode(&decoded, k, rest).unwrap();
            assert_eq!(decoded, p);
            prev = p;
        }
        assert_eq!(coded[3], (2, "c".to_string()));
        assert_eq!(coded[5], (1, "bc".to_string()));
        assert_eq!(coded[8], (1, "a/b".to_string()));
        assert_eq!(front_decode(b"a", 2, b"x"), None);
        // Version 1 records have no k: the whole path.
        let r: Record =
            serde_json::from_str(r#"{"p":"612f62","d":1,"i":2,"m":0,"u":0,"g":0,"x":[]}"#).unwrap();
        assert_eq!(
            (r.k, front_decode(b"q/r", r.k, &unhex(&r.p).unwrap())),
            (0, Some(b"a/b".to_vec()))
        );
    }

    #[test]
    fn markers_round_trip() {
        let opts = Options {
            from: IdMapping::identity(),
            to: IdMapping::parse("u:0:100000:65536,g:0:200000:10").unwrap(),
            unmapped: OnUnmapped::Fail,
            walk: WalkOptions::default(),
            dry_run: false,
            allow_external_links: false,
        };
        let (f, t) = parse_marker(Path::new("/t"), &marker(&opts)).unwrap();
        assert_eq!((f, t), (opts.from.clone(), opts.to.clone()));
        let e = parse_marker(Path::new("/t"), "garbage").unwrap_err();
        assert!(e.to_string().contains("'garbage'"), "{e}");
    }

    #[test]
    fn policy_fallbacks() {
        let id = IdMapping::identity();
        let m = IdMapping::parse("b:0:100000:10").unwrap();
        let mk = |on| Translate {
            reshift: Reshift { from: &id, to: &m },
            on,
        };
        assert_eq!(mk(OnUnmapped::Fail).uid(50), None);
        assert_eq!(mk(OnUnmapped::Keep).uid(50), Some(50));
        assert_eq!(mk(OnUnmapped::Overflow).gid(50), Some(OVERFLOW_ID));
        assert_eq!(mk(OnUnmapped::Fail).gid(5), Some(100005));
    }

    #[test]
    fn map_names() {
        assert_eq!(map_name(&IdMapping::identity()), "identity");
        assert_eq!(map_name(&IdMapping::parse("b:0:1:2").unwrap()), "b:0:1:2");
    }
}
