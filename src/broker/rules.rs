//! The broker's decision: may this caller have this mount? Pure: every fact about the
//! file system (the source's canonical path and owners, the target's owner) is resolved by
//! the caller of `decide_mount` from held fds and passed in as data, so each rule is tested
//! with a table and no root.
//!
//! Root may ask for anything (it could mount directly). For everyone else, in this order,
//! the first rule broken refuses: suid/dev; the target; the mount limit; the map's outer
//! side (`subid`); the source (policy or own image); the map's width; the inner side of a
//! read-write map (inside the image range, so nothing written to disk is a host identity).
//! A caller's own image (owned by the image range's first id, in a directory the caller
//! owns) needs no policy entry and is not subject to one, as with systemd-mountfsd.

use std::path::PathBuf;

use super::policy::{Access, ImageRange, Member, Policy};
use super::subid::{self, Db, User};
use crate::idmap::{IdMapping, Range};

/// Who asks, from `SO_PEERCRED`, `/proc/PID/status` and the password database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    /// Primary gid from the password database (newgidmap's "own gid").
    pub gid: u32,
    pub name: String,
    /// Every group of the process, with its name where the group database has one.
    pub groups: Vec<(u32, Option<String>)>,
}

impl Caller {
    fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// The source tree, already opened without following symlinks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Canonical (symlink-free by construction of the open).
    pub path: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Owner of the directory that holds it.
    pub parent_uid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Mount on this directory, opened without following symlinks.
    Directory {
        path: PathBuf,
        uid: u32,
        empty: bool,
    },
    /// Return a detached mount fd for the caller to attach itself.
    Detached,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub read_only: bool,
    pub suid: bool,
    pub dev: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountRequest {
    pub source: Source,
    pub target: Target,
    pub map: IdMapping,
    pub flags: Flags,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Mount with these flags (nosuid and nodev forced for non-root callers).
    Allow(Flags),
    Refuse(String),
}

/// Judges a mount request. `mounts` is how many mounts the caller holds now.
pub fn decide_mount(
    caller: &Caller,
    req: &MountRequest,
    policy: &Policy,
    db: &Db,
    mounts: usize,
) -> Decision {
    if caller.is_root() {
        return Decision::Allow(req.flags);
    }
    match check(caller, req, policy, db, mounts) {
        Ok(()) => Decision::Allow(Flags {
            read_only: req.flags.read_only,
            suid: false,
            dev: false,
        }),
        Err(reason) => Decision::Refuse(reason),
    }
}

fn check(
    caller: &Caller,
    req: &MountRequest,
    policy: &Policy,
    db: &Db,
    mounts: usize,
) -> Result<(), String> {
    let who = &caller.name;
    if req.flags.suid || req.flags.dev {
        return Err(format!(
            "-o suid and -o dev are for root only; {who}'s mounts are always nosuid,nodev"
        ));
    }
    if let Target::Directory { path, uid, empty } = &req.target {
        if *uid != caller.uid {
            return Err(format!(
                "target {} is owned by uid {uid}, not by {who} (uid {}); mount on a directory you own, or ask for a detached mount",
                path.display(),
                caller.uid
            ));
        }
        if !empty {
            return Err(format!(
                "target {} is not empty; mount on an empty directory",
                path.display()
            ));
        }
    }
    let limit = u64::from(policy.mounts_per_user);
    if mounts as u64 >= limit {
        return Err(format!(
            "{who} already holds {mounts} shifted mounts, the most the policy allows per user ({limit}); unmount one first"
        ));
    }
    let user = User {
        name: caller.name.clone(),
        uid: caller.uid,
        gid: caller.gid,
    };
    subid::check(db, &user, &req.map).map_err(|e| e.to_string())?;
    let image = policy.image_range;
    for (kind, r) in ranges(&req.map) {
        if image.overlaps(r.outer, r.count) {
            return Err(format!(
                "{kind} range {r} maps onto host {kind}s of the image range {}-{}, which belongs to no one",
                image.base,
                image.last()
            ));
        }
    }
    let src = &req.source;
    let own_image = src.uid == image.base && src.gid == image.base && src.parent_uid == caller.uid;
    let max_ids = if own_image {
        policy.max_map_ids
    } else {
        let Some(rule) = policy.rule_for(&src.path) else {
            return Err(format!(
                "source {} is not allowed by the policy, and is not an image (a directory owned by uid and gid {} inside a directory {who} owns)",
                src.path.display(),
                image.base
            ));
        };
        let groups = &caller.groups;
        let member = Member {
            name: who,
            uid: caller.uid,
            groups,
        };
        if !rule.grants(&member) {
            return Err(format!(
                "source {} falls under the policy's {}, which {who} may not shift",
                src.path.display(),
                rule.path.display()
            ));
        }
        if rule.access == Access::ReadOnly && !req.flags.read_only {
            return Err(format!(
                "the policy allows {} read-only; add -o ro",
                rule.path.display()
            ));
        }
        rule.max_map_ids.unwrap_or(policy.max_map_ids)
    };
    for (kind, width) in [
        ("uid", ids(req.map.uid.ranges())),
        ("gid", ids(req.map.gid.ranges())),
    ] {
        if width > max_ids {
            return Err(format!(
                "the {kind} map covers {width} ids; the policy allows at most {max_ids} for this source"
            ));
        }
    }
    if !req.flags.read_only {
        for (kind, r) in ranges(&req.map) {
            if !image.contains(r.inner, r.count) {
                return Err(format!(
                    "{kind} range {r}: a read-write mount stores its inner ids on disk, and {} are real host ids; use inner ids in the image range {}-{} (e.g. b:{}:{}:{}), or -o ro",
                    span(r),
                    image.base,
                    image.last(),
                    image.base,
                    r.outer,
                    r.count.min(image.count)
                ));
            }
        }
    }
    Ok(())
}

fn ranges(map: &IdMapping) -> impl Iterator<Item = (&'static str, Range)> + '_ {
    let u = map.uid.ranges().iter().map(|r| ("uid", *r));
    u.chain(map.gid.ranges().iter().map(|r| ("gid", *r)))
}

fn ids(ranges: &[Range]) -> u64 {
    ranges.iter().map(|r| u64::from(r.count)).sum()
}

fn span(r: Range) -> String {
    format!(
        "inner ids {}-{}",
        r.inner,
        u64::from(r.inner) + u64::from(r.count) - 1
    )
}

/// Only the user who made a mount, or root, may unmount it. `owner` is the uid recorded
/// with the mount; a mount with no recorded owner is root's.
pub fn decide_umount(caller: &Caller, target: &str, owner: Option<u32>) -> Decision {
    if caller.is_root() || owner == Some(caller.uid) {
        return Decision::Allow(Flags::default());
    }
    Decision::Refuse(format!(
        "{target} was not mounted by {} (uid {}); only its owner or root may unmount it",
        caller.name, caller.uid
    ))
}

/// A new image directory goes only into a directory the caller owns.
pub fn decide_make_image(caller: &Caller, parent: &str, parent_uid: u32) -> Decision {
    if caller.is_root() || parent_uid == caller.uid {
        return Decision::Allow(Flags::default());
    }
    Decision::Refuse(format!(
        "{parent} is owned by uid {parent_uid}, not by {} (uid {}); make images in a directory you own",
        caller.name, caller.uid
    ))
}

/// Adopting shifts a tree into the image range: only a tree the caller owns, with a map
/// whose outer side (the host ids now on disk) the caller may use, as for a mount, and whose
/// inner side (the image ids they become, counted from the range's first id) fits in the
/// range. That every inode below is owned by one of those ids is checked by the shift itself,
/// which changes nothing when one is not.
pub fn decide_adopt(
    caller: &Caller,
    path: &str,
    uid: u32,
    map: &IdMapping,
    db: &Db,
    image: ImageRange,
) -> Decision {
    if caller.is_root() {
        return Decision::Allow(Flags::default());
    }
    if uid != caller.uid {
        return Decision::Refuse(format!(
            "{path} is owned by uid {uid}, not by {} (uid {}); only your own trees can be adopted",
            caller.name, caller.uid
        ));
    }
    let user = User {
        name: caller.name.clone(),
        uid: caller.uid,
        gid: caller.gid,
    };
    if let Err(e) = subid::check(db, &user, map) {
        return Decision::Refuse(e.to_string());
    }
    for (kind, r) in ranges(map) {
        if u64::from(r.inner) + u64::from(r.count) > u64::from(image.count) {
            return Decision::Refuse(format!(
                "{kind} range {r} reaches image id {}, past the image range's {} ids",
                u64::from(r.inner) + u64::from(r.count) - 1,
                image.count
            ));
        }
    }
    Decision::Allow(Flags::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::subid::File;
    use std::path::Path;

    const BASE: u32 = 2147352576;

    fn policy() -> Policy {
        Policy::parse(
            Path::new("/etc/shiftfs/policy.toml"),
            r#"
            [limits]
            mounts_per_user = 2
            [[source]]
            path = "/srv/shared"
            users = ["alice"]
            groups = ["containers"]
            access = "rw"
            [[source]]
            path = "/srv/ro"
            users = ["*"]
            access = "ro"
            [[source]]
            path = "/srv/narrow"
            users = ["alice"]
            access = "rw"
            max_map_ids = 10
            "#,
        )
        .unwrap()
    }

    fn db() -> Db {
        let text = "alice:100000:65536\nbob:200000:65536\n";
        Db {
            subuid: File::parse(Path::new("/etc/subuid"), text),
            subgid: File::parse(Path::new("/etc/subgid"), text),
        }
    }

    fn user(name: &str, uid: u32) -> Caller {
        Caller {
            pid: 42,
            uid,
            gid: uid,
            name: name.into(),
            groups: vec![(uid, Some(name.into()))],
        }
    }

    fn alice() -> Caller {
        user("alice", 1000)
    }

    fn req(source: &str, map: &str, ro: bool) -> MountRequest {
        MountRequest {
            source: Source {
                path: source.into(),
                uid: 0,
                gid: 0,
                parent_uid: 0,
            },
            target: Target::Directory {
                path: "/home/alice/mnt".into(),
                uid: 1000,
                empty: true,
            },
            map: IdMapping::parse(map).unwrap(),
            flags: Flags {
                read_only: ro,
                ..Flags::default()
            },
        }
    }

    fn rw_map() -> String {
        format!("b:{BASE}:100000:65536")
    }

    fn judge(caller: &Caller, r: &MountRequest, mounts: usize) -> Decision {
        decide_mount(caller, r, &policy(), &db(), mounts)
    }

    fn refused(caller: &Caller, r: &MountRequest, mounts: usize) -> String {
        match judge(caller, r, mounts) {
            Decision::Refuse(why) => why,
            d => panic!("expected a refusal, got {d:?} for {r:?}"),
        }
    }

    #[test]
    fn allowed_requests_force_nosuid_nodev() {
        let forced = |ro| {
            Decision::Allow(Flags {
                read_only: ro,
                suid: false,
                dev: false,
            })
        };
        let cases = [
            req("/srv/shared/x", &rw_map(), false),
            req("/srv/shared", "b:0:100000:65536", true),
            req("/srv/ro/debian", "b:0:100000:65536", true),
            req("/srv/ro/debian", "b:0:1000:1", true),
            req("/srv/narrow/a", &format!("b:{BASE}:100000:10"), false),
        ];
        for r in &cases {
            assert_eq!(judge(&alice(), r, 0), forced(r.flags.read_only), "{r:?}");
        }
        let mut detached = req("/srv/ro/a", "b:0:100000:10", true);
        detached.target = Target::Detached;
        assert_eq!(judge(&alice(), &detached, 1), forced(true));
        let mut by_group = req("/srv/shared/x", &format!("b:{BASE}:200000:10"), false);
        let mut carol = user("bob", 1001);
        carol.groups.push((500, Some("containers".into())));
        by_group.target = Target::Detached;
        assert_eq!(judge(&carol, &by_group, 0), forced(false));
    }

    #[test]
    fn own_image_needs_no_policy_entry() {
        let mut r = req("/home/alice/img", &rw_map(), false);
        r.source.uid = BASE;
        r.source.gid = BASE;
        r.source.parent_uid = 1000;
        assert!(matches!(judge(&alice(), &r, 0), Decision::Allow(_)));
        // The same tree inside someone else's directory is not alice's image.
        r.source.parent_uid = 1001;
        assert!(refused(&alice(), &r, 0).contains("is not allowed by the policy"));
        // Nor is a tree owned by a host user.
        r.source.parent_uid = 1000;
        r.source.uid = 1000;
        assert!(refused(&alice(), &r, 0).contains("not an image"));
    }

    #[test]
    fn refusals() {
        let bob_map = req("/srv/ro/a", "b:0:200000:10", true);
        let root_map = req("/srv/ro/a", "b:0:0:10", true);
        let wide = req("/srv/narrow/a", &format!("b:{BASE}:100000:11"), false);
        let host_inner = req("/srv/shared/a", "b:0:100000:65536", false);
        let outside = req("/etc", "b:0:100000:10", true);
        let mut not_granted = req("/srv/shared/a", &format!("b:{BASE}:200000:10"), false);
        not_granted.target = Target::Detached;
        let ro_only = req("/srv/ro/a", &format!("b:{BASE}:100000:10"), false);
        let mut suid = req("/srv/ro/a", "b:0:100000:10", true);
        suid.flags.suid = true;
        let mut dev = req("/srv/ro/a", "b:0:100000:10", true);
        dev.flags.dev = true;
        let mut foreign_target = req("/srv/ro/a", "b:0:100000:10", true);
        foreign_target.target = Target::Directory {
            path: "/tmp/t".into(),
            uid: 1001,
            empty: true,
        };
        let mut full_target = req("/srv/ro/a", "b:0:100000:10", true);
        full_target.target = Target::Directory {
            path: "/home/alice/t".into(),
            uid: 1000,
            empty: false,
        };
        let onto_image = req("/srv/ro/a", &format!("b:0:{BASE}:10"), true);
        let db_with_image = Db {
            subuid: File::parse(Path::new("/etc/subuid"), &format!("alice:{BASE}:10\n")),
            subgid: File::parse(Path::new("/etc/subgid"), &format!("alice:{BASE}:10\n")),
        };
        assert!(
            matches!(decide_mount(&alice(), &onto_image, &policy(), &db_with_image, 0), Decision::Refuse(w) if w.contains("belongs to no one"))
        );
        let bob = user("bob", 1001);
        let cases: [(&Caller, &MountRequest, usize, &str); 11] = [
            (&alice(), &bob_map, 0, "delegated to bob"),
            (&alice(), &root_map, 0, "reaches host uid 0 (root)"),
            (
                &alice(),
                &wide,
                0,
                "covers 11 ids; the policy allows at most 10",
            ),
            (
                &alice(),
                &host_inner,
                0,
                "inner ids 0-65535 are real host ids",
            ),
            (
                &alice(),
                &outside,
                0,
                "source /etc is not allowed by the policy",
            ),
            (
                &bob,
                &not_granted,
                0,
                "falls under the policy's /srv/shared, which bob may not",
            ),
            (&alice(), &ro_only, 0, "allows /srv/ro read-only; add -o ro"),
            (&alice(), &suid, 0, "-o suid and -o dev are for root only"),
            (&alice(), &dev, 0, "-o suid and -o dev are for root only"),
            (
                &alice(),
                &foreign_target,
                0,
                "target /tmp/t is owned by uid 1001",
            ),
            (&alice(), &full_target, 0, "is not empty"),
        ];
        for (caller, r, mounts, want) in cases {
            let why = refused(caller, r, mounts);
            assert!(why.contains(want), "{r:?}: {why}");
        }
        let limit = refused(&alice(), &req("/srv/ro/a", "b:0:100000:10", true), 2);
        assert!(
            limit.contains("already holds 2") && limit.contains("(2)"),
            "{limit}"
        );
        assert!(matches!(
            judge(&alice(), &req("/srv/ro/a", "b:0:100000:10", true), 1),
            Decision::Allow(_)
        ));
    }

    #[test]
    fn root_may_ask_for_anything() {
        let mut r = req("/etc", "b:0:0:4294967295", false);
        r.flags.suid = true;
        r.flags.dev = true;
        assert_eq!(judge(&user("root", 0), &r, 100), Decision::Allow(r.flags));
    }

    #[test]
    fn only_the_owner_or_root_unmounts() {
        assert!(matches!(
            decide_umount(&alice(), "/m", Some(1000)),
            Decision::Allow(_)
        ));
        assert!(matches!(
            decide_umount(&user("root", 0), "/m", None),
            Decision::Allow(_)
        ));
        let Decision::Refuse(why) = decide_umount(&user("bob", 1001), "/m", Some(1000)) else {
            panic!("bob unmounted alice's mount");
        };
        assert!(why.contains("/m was not mounted by bob"), "{why}");
        assert!(matches!(
            decide_umount(&alice(), "/m", None),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn only_own_trees_are_adopted() {
        let image = policy().image_range;
        let adopt = |caller: &Caller, uid, map: &str| {
            decide_adopt(
                caller,
                "/t",
                uid,
                &IdMapping::parse(map).unwrap(),
                &db(),
                image,
            )
        };
        let own = "b:0:1000:1,b:1:100000:65535";
        assert!(matches!(adopt(&alice(), 1000, own), Decision::Allow(_)));
        assert!(matches!(
            adopt(&alice(), 0, own),
            Decision::Refuse(w) if w.contains("/t is owned by uid 0, not by alice")
        ));
        assert!(matches!(
            adopt(&alice(), 1000, "b:0:200000:10"),
            Decision::Refuse(w) if w.contains("delegated to bob")
        ));
        assert!(matches!(
            adopt(&alice(), 1000, "b:65535:100000:2"),
            Decision::Refuse(w) if w.contains("reaches image id 65536")
        ));
        assert!(matches!(
            adopt(&user("root", 0), 5, "b:0:0:10"),
            Decision::Allow(_)
        ));
    }

    #[test]
    fn images_only_in_own_directories() {
        assert!(matches!(
            decide_make_image(&alice(), "/home/alice", 1000),
            Decision::Allow(_)
        ));
        assert!(matches!(
            decide_make_image(&alice(), "/tmp", 0),
            Decision::Refuse(w) if w.contains("/tmp is owned by uid 0")
        ));
    }
}
