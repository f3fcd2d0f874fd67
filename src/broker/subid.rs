//! `/etc/subuid` and `/etc/subgid` as shadow's `newuidmap`/`newgidmap` read them
//! (`lib/subordinateio.c`, `src/newuidmap.c`), for judging which host ids a caller may map.
//!
//! Same rules as shadow: a line is `OWNER:START:COUNT` with exactly three fields; OWNER is a
//! user name or a numeric uid; a user may have several lines; a line that does not parse
//! (comments, blank lines, junk, a zero count) is ignored, not an error, so one bad line
//! written by hand does not lock every user out. A requested range may span several of the
//! user's adjacent lines (shadow's `have_range`). Stricter than shadow: numbers are
//! decimal only (shadow's `strtoul(.., 0)` also takes hex and octal; such lines are ignored
//! here, which only ever grants less), and host ids 0 and 65534 are never granted, nor any
//! id another user's line covers, even if the files say otherwise.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::idmap::{IdMapping, OVERFLOW_ID, Range};

/// One parsed line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// A user name or a numeric uid, as written.
    pub owner: String,
    pub start: u32,
    pub count: u32,
}

impl Entry {
    fn end(&self) -> u64 {
        u64::from(self.start) + u64::from(self.count)
    }
}

/// The lines of one file, and the file's name for messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct File {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

impl File {
    /// Parses the text of `path`; lines that do not parse are skipped, as shadow does.
    pub fn parse(path: &Path, text: &str) -> Self {
        let entries = text.lines().filter_map(parse_line).collect();
        Self {
            path: path.to_path_buf(),
            entries,
        }
    }

    /// Reads `path`; a missing file delegates nothing.
    pub fn read(path: &Path) -> io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Self::parse(path, &String::from_utf8_lossy(&bytes))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self {
                path: path.to_path_buf(),
                entries: Vec::new(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Whether the line's owner is this user, by name or by numeric uid.
    fn owns(e: &Entry, user: &User) -> bool {
        e.owner == user.name || e.owner.parse::<u32>().is_ok_and(|n| n == user.uid)
    }
}

fn parse_line(line: &str) -> Option<Entry> {
    if line.starts_with('#') {
        return None;
    }
    let mut f = line.split(':');
    let (Some(owner), Some(start), Some(count), None) = (f.next(), f.next(), f.next(), f.next())
    else {
        return None;
    };
    let decimal = |s: &str| -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (start, count) = (decimal(start)?, decimal(count)?);
    if owner.is_empty() || count == 0 {
        return None;
    }
    Some(Entry {
        owner: owner.to_string(),
        start,
        count,
    })
}

/// Both files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Db {
    pub subuid: File,
    pub subgid: File,
}

impl Db {
    pub fn read(subuid: &Path, subgid: &Path) -> io::Result<Self> {
        Ok(Self {
            subuid: File::read(subuid)?,
            subgid: File::read(subgid)?,
        })
    }
}

/// Who asks: the name and ids from the password database, as `newuidmap` uses them (its own
/// gid is the primary group, `pw_gid`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Why a map's outer side is refused; each names the map range at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{kind} range {range} reaches host {kind} {id} ({what}), which is never delegated to anyone"
    )]
    Reserved {
        kind: &'static str,
        range: Range,
        id: u32,
        what: &'static str,
    },
    #[error(
        "{kind} range {range} reaches into host {kind}s {start}-{last}, delegated to {owner} in {file}, not to {user}"
    )]
    OtherUser {
        kind: &'static str,
        range: Range,
        start: u32,
        last: u32,
        owner: String,
        file: PathBuf,
        user: String,
    },
    #[error(
        "{kind} range {range} uses host {kind}s {start}-{last}, which are neither {user}'s own {kind} {own} (as a single id) nor delegated to {user} in {file}{has}"
    )]
    NotDelegated {
        kind: &'static str,
        range: Range,
        start: u32,
        last: u32,
        user: String,
        own: u32,
        file: PathBuf,
        has: Delegation,
    },
}

/// What a user does have, for the end of a refusal message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delegation(pub Vec<(u32, u32)>);

impl fmt::Display for Delegation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(" (it delegates none to them)");
        }
        f.write_str(" (theirs: ")?;
        for (i, (start, count)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{start}-{}", u64::from(*start) + u64::from(*count) - 1)?;
        }
        f.write_str(")")
    }
}

/// Checks that every outer (host) id of `map` is the user's own uid/gid (a single-id range)
/// or delegated to them, and none is 0, 65534 or another user's.
pub fn check(db: &Db, user: &User, map: &IdMapping) -> Result<(), Refusal> {
    for r in map.uid.ranges() {
        check_range(&db.subuid, user, user.uid, "uid", *r)?;
    }
    for r in map.gid.ranges() {
        check_range(&db.subgid, user, user.gid, "gid", *r)?;
    }
    Ok(())
}

fn check_range(
    file: &File,
    user: &User,
    own: u32,
    kind: &'static str,
    range: Range,
) -> Result<(), Refusal> {
    let start = u64::from(range.outer);
    let end = start + u64::from(range.count);
    for (id, what) in [(0, "root"), (OVERFLOW_ID, "the overflow id")] {
        if (start..end).contains(&u64::from(id)) {
            return Err(Refusal::Reserved {
                kind,
                range,
                id,
                what,
            });
        }
    }
    if range.count == 1 && range.outer == own {
        return Ok(());
    }
    let last = |end: u64| (end - 1) as u32;
    if let Some(e) = file
        .entries
        .iter()
        .find(|e| !File::owns(e, user) && u64::from(e.start) < end && start < e.end())
    {
        return Err(Refusal::OtherUser {
            kind,
            range,
            start: start.max(u64::from(e.start)) as u32,
            last: last(end.min(e.end())),
            owner: e.owner.clone(),
            file: file.path.clone(),
            user: user.name.clone(),
        });
    }
    let mut mine: Vec<&Entry> = file
        .entries
        .iter()
        .filter(|e| File::owns(e, user))
        .collect();
    mine.sort_by_key(|e| e.start);
    // Walk the user's lines in order, as shadow's have_range chains adjacent ones.
    let mut covered = start;
    for e in &mine {
        if u64::from(e.start) <= covered && covered < e.end() {
            covered = e.end();
        }
        if covered >= end {
            return Ok(());
        }
    }
    let gap_end = mine
        .iter()
        .map(|e| u64::from(e.start))
        .filter(|&s| s > covered)
        .min()
        .unwrap_or(end)
        .min(end);
    Err(Refusal::NotDelegated {
        kind,
        range,
        start: covered as u32,
        last: last(gap_end),
        user: user.name.clone(),
        own,
        file: file.path.clone(),
        has: Delegation(mine.iter().map(|e| (e.start, e.count)).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBUID: &str = "\
# comment: alice:1:1 is not a line
alice:100000:65536

bob:200000:65536
1002:300000:1000
alice:165536:1000
junk
carol:400000
dave:x:10
erin:500000:0
frank:0x1000:10
 gina:600000:10
alice:1:2:3
";

    fn db() -> Db {
        Db {
            subuid: File::parse(Path::new("/etc/subuid"), SUBUID),
            subgid: File::parse(
                Path::new("/etc/subgid"),
                "alice:100000:65536\nbob:200000:65536\n",
            ),
        }
    }

    fn alice() -> User {
        User {
            name: "alice".into(),
            uid: 1000,
            gid: 1000,
        }
    }

    fn map(s: &str) -> IdMapping {
        IdMapping::parse(s).unwrap()
    }

    #[test]
    fn parses_like_shadow() {
        let f = File::parse(Path::new("/x"), SUBUID);
        let owners: Vec<(&str, u32, u32)> = f
            .entries
            .iter()
            .map(|e| (e.owner.as_str(), e.start, e.count))
            .collect();
        assert_eq!(
            owners,
            [
                ("alice", 100000, 65536),
                ("bob", 200000, 65536),
                ("1002", 300000, 1000),
                ("alice", 165536, 1000),
                (" gina", 600000, 10),
            ]
        );
    }

    #[test]
    fn missing_file_delegates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::read(&dir.path().join("subuid")).unwrap();
        assert!(f.entries.is_empty());
        std::fs::write(dir.path().join("subuid"), "alice:100000:10\n").unwrap();
        assert_eq!(
            File::read(&dir.path().join("subuid"))
                .unwrap()
                .entries
                .len(),
            1
        );
    }

    #[test]
    fn allowed_maps() {
        let db = db();
        for m in [
            "b:0:100000:65536",
            "u:0:100000:66536,g:0:100000:65536",
            "u:0:1000:1,u:1:100001:10,g:0:1000:1,g:1:100000:10",
            "b:5:165535:1",
        ] {
            assert_eq!(check(&db, &alice(), &map(m)), Ok(()), "{m}");
        }
        let carl = User {
            name: "carl".into(),
            uid: 1002,
            gid: 1002,
        };
        let db2 = Db {
            subgid: File::parse(Path::new("/etc/subgid"), "carl:300000:1000\n"),
            ..db
        };
        assert_eq!(check(&db2, &carl, &map("b:0:300000:1000")), Ok(()));
    }

    #[test]
    fn refusals_name_the_range() {
        let db = db();
        let cases = [
            (
                "b:0:200000:10",
                "reaches into host uids 200000-200009, delegated to bob",
            ),
            (
                "b:0:199990:20",
                "0:199990:20 reaches into host uids 200000-200009",
            ),
            ("b:0:0:1", "reaches host uid 0 (root)"),
            ("b:0:65530:10", "reaches host uid 65534 (the overflow id)"),
            (
                "b:0:1001:1",
                "host uids 1001-1001, which are neither alice's own uid 1000",
            ),
            ("b:0:1000:2", "0:1000:2 uses host uids 1000-1001"),
            ("b:0:100000:67000", "host uids 166536-166999"),
            ("b:0:300000:10", "delegated to 1002"),
            ("u:0:100000:10,g:0:1001:1", "gid range 0:1001:1"),
            (
                "u:0:100000:10,g:0:165536:1",
                "/etc/subgid (theirs: 100000-165535)",
            ),
        ];
        for (m, want) in cases {
            let got = check(&db, &alice(), &map(m)).unwrap_err().to_string();
            assert!(got.contains(want), "{m}: {got}");
        }
        let zed = User {
            name: "zed".into(),
            uid: 1500,
            gid: 1500,
        };
        let got = check(&db, &zed, &map("b:0:700000:1"))
            .unwrap_err()
            .to_string();
        assert!(got.contains("delegates none to them"), "{got}");
    }

    #[test]
    fn own_ids_and_numeric_owners() {
        let db = db();
        assert_eq!(check(&db, &alice(), &map("b:0:1000:1")), Ok(()));
        let by_number = User {
            name: "someone".into(),
            uid: 1002,
            gid: 1002,
        };
        assert_eq!(
            check(&db, &by_number, &map("u:0:300000:1000,g:0:1002:1")),
            Ok(())
        );
        let nobody = User {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        assert!(matches!(
            check(&db, &nobody, &map("b:0:65534:1")),
            Err(Refusal::Reserved { id: 65534, .. })
        ));
    }
}
