//! What ids a tree uses, what a map leaves unmapped, and hazards, from one [`walk`].

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;
use serde::Serialize;

use super::walk::{self, Entry, Tree, WalkOptions, display, fget, io_err, open_root};
use crate::idmap::IdMapping;
use crate::xattr::{self, IdKind, IdTranslate};

/// Where the tree's current map is recorded (absent = the tree is unshifted).
pub const MAP_XATTR: &str = "trusted.shiftfs.map";
/// Present on the tree root while a shift is under way: `from=MAP to=MAP`.
pub const SHIFT_XATTR: &str = "trusted.shiftfs.shift";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Walk(#[from] walk::Error),
    #[error("{path}: {MAP_XATTR} on the tree root does not hold a valid map; fix or remove it")]
    BadRecord {
        path: PathBuf,
        #[source]
        source: crate::idmap::Error,
    },
}

/// The root's recorded map (`None` = unshifted) and the in-progress marker, if any.
pub fn recorded_state(
    root: BorrowedFd<'_>,
    root_path: &Path,
) -> Result<(Option<IdMapping>, Option<String>), Error> {
    let read = |name: &str| -> Result<Option<String>, Error> {
        match fget(root, name) {
            Ok(v) => Ok(v.map(|v| String::from_utf8_lossy(&v).into_owned())),
            Err(e) => Err(io_err(b"", "read xattr", e).into()),
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
    let tree = walk::walk(root.as_fd(), opts, progress)?;
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
    let mut ids = IdCounts::default();
    let mut h = Hazards::default();
    for e in &tree.entries {
        let path = display(&e.path);
        ids.uid(e.uid).owners += 1;
        ids.gid(e.gid).owners += 1;
        note_hazards(e, &path, &mut h);
        count_xattr_ids(e, &path, &mut ids, &mut h);
    }
    let unmapped = map.map(|(from, to)| ids.unmapped(from, to));
    Report {
        root: String::new(),
        recorded_map: None,
        interrupted_shift: None,
        inodes: tree.entries.len() as u64,
        uids: ids.uids.into_values().collect(),
        gids: ids.gids.into_values().collect(),
        unmapped,
        hazards: h,
        mount_points_skipped: tree.mount_points.iter().map(|p| display(p)).collect(),
    }
}

/// Keyed by id so that the report lists each id once, in order.
#[derive(Default)]
struct IdCounts {
    uids: BTreeMap<u32, IdUse>,
    gids: BTreeMap<u32, IdUse>,
}

impl IdCounts {
    fn uid(&mut self, id: u32) -> &mut IdUse {
        slot(&mut self.uids, id)
    }

    fn gid(&mut self, id: u32) -> &mut IdUse {
        slot(&mut self.gids, id)
    }

    fn unmapped(&self, from: &IdMapping, to: &IdMapping) -> UnmappedIds {
        let r = xattr::Reshift { from, to };
        UnmappedIds {
            map: to.to_string(),
            uids: self
                .uids
                .values()
                .filter(|u| r.uid(u.id).is_none())
                .cloned()
                .collect(),
            gids: self
                .gids
                .values()
                .filter(|g| r.gid(g.id).is_none())
                .cloned()
                .collect(),
        }
    }
}

fn slot(m: &mut BTreeMap<u32, IdUse>, id: u32) -> &mut IdUse {
    m.entry(id).or_insert_with(|| IdUse {
        id,
        ..IdUse::default()
    })
}

/// Hazards that the mode, type and link count show.
fn note_hazards(e: &Entry, path: &str, h: &mut Hazards) {
    let ft = e.file_type();
    let is_dir = ft == FileType::Directory;
    if !is_dir && e.mode & 0o4000 != 0 {
        h.setuid.push(path.to_string());
    }
    if !is_dir && e.mode & 0o2000 != 0 {
        h.setgid.push(path.to_string());
    }
    if matches!(ft, FileType::CharacterDevice | FileType::BlockDevice) {
        h.devices.push(path.to_string());
    }
    if is_dir && e.mode & 0o002 != 0 && e.mode & 0o1000 == 0 {
        h.world_writable_dirs_without_sticky.push(path.to_string());
    }
    if !is_dir && e.nlink > e.links_in_tree {
        h.hard_links_leaving_tree.push(ExternalLink {
            path: path.to_string(),
            nlink: e.nlink,
            links_in_tree: e.links_in_tree,
        });
    }
}

/// Ids inside capabilities and ACLs move with a shift too, so they count as uses.
fn count_xattr_ids(e: &Entry, path: &str, ids: &mut IdCounts, h: &mut Hazards) {
    for (kind, value) in &e.xattrs {
        match kind {
            xattr::Kind::Capability => match xattr::parse_capability(value) {
                Ok(c) => {
                    ids.uid(c.root_id()).capability_roots += 1;
                    h.capabilities.push(CapabilityFile {
                        path: path.to_string(),
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
                            IdKind::Uid => ids.uid(id).acl_entries += 1,
                            IdKind::Gid => ids.gid(id).acl_entries += 1,
                        }
                    }
                }
                Err(err) => h.malformed_xattrs.push(format!("{path}: {err}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offline::walk::Entry;

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
}
