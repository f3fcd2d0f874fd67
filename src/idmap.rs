//! The id map model: which *inner* ids (on disk, the container's view) correspond to
//! which *outer* ids (the host's view), with the kernel's `uid_map` semantics.
//!
//! Pure: no I/O except the explicit `from_proc`/`subid` readers, which take their paths
//! as arguments so tests can point them at temp files.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// The kernel's default `overflowuid`/`overflowgid`: what an unmapped id is shown as.
pub const OVERFLOW_ID: u32 = 65534;
/// The kernel's limit on extents in one `uid_map`.
pub const MAX_RANGES: usize = 340;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u32);
        impl $name {
            /// Says which side of the map a raw id is on: at the edge only, where it is read
            /// from a stat, a request or a value.
            pub const fn new(v: u32) -> Self {
                Self(v)
            }
            pub const fn get(self) -> u32 {
                self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A uid as stored on disk (the container's view).
    InnerUid
);
id_type!(
    /// A uid as the host sees it.
    OuterUid
);
id_type!(
    /// A gid as stored on disk (the container's view).
    InnerGid
);
id_type!(
    /// A gid as the host sees it.
    OuterGid
);

/// Which id space a map is for; ties the inner and outer newtypes together.
pub trait Kind: Copy + fmt::Debug + Send + Sync + 'static {
    type Inner: Copy + fmt::Debug;
    type Outer: Copy + fmt::Debug;
    const NAME: &'static str;
    fn inner_raw(id: Self::Inner) -> u32;
    fn outer_raw(id: Self::Outer) -> u32;
    fn inner(raw: u32) -> Self::Inner;
    fn outer(raw: u32) -> Self::Outer;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uids;
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gids;

impl Kind for Uids {
    type Inner = InnerUid;
    type Outer = OuterUid;
    const NAME: &'static str = "uid";
    fn inner_raw(id: InnerUid) -> u32 {
        id.0
    }
    fn outer_raw(id: OuterUid) -> u32 {
        id.0
    }
    fn inner(raw: u32) -> InnerUid {
        InnerUid(raw)
    }
    fn outer(raw: u32) -> OuterUid {
        OuterUid(raw)
    }
}

impl Kind for Gids {
    type Inner = InnerGid;
    type Outer = OuterGid;
    const NAME: &'static str = "gid";
    fn inner_raw(id: InnerGid) -> u32 {
        id.0
    }
    fn outer_raw(id: OuterGid) -> u32 {
        id.0
    }
    fn inner(raw: u32) -> InnerGid {
        InnerGid(raw)
    }
    fn outer(raw: u32) -> OuterGid {
        OuterGid(raw)
    }
}

/// One extent: inner `inner..inner+count` <-> outer `outer..outer+count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Range {
    pub inner: u32,
    pub outer: u32,
    pub count: u32,
}

impl Range {
    fn inner_end(&self) -> u64 {
        u64::from(self.inner) + u64::from(self.count)
    }
    fn outer_end(&self) -> u64 {
        u64::from(self.outer) + u64::from(self.count)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.inner, self.outer, self.count)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "bad map entry '{entry}': {reason} (expected [u:|g:|b:]INNER:OUTER:COUNT, e.g. b:0:100000:65536)"
    )]
    Syntax { entry: String, reason: String },
    #[error("{kind} range {range}: count must be at least 1")]
    ZeroCount { kind: &'static str, range: Range },
    #[error("{kind} range {range}: runs past the largest id 4294967294 on the {side} side")]
    TooLarge {
        kind: &'static str,
        range: Range,
        side: &'static str,
    },
    #[error("{kind} ranges {a} and {b} overlap on the {side} side; each id may be mapped once")]
    Overlap {
        kind: &'static str,
        a: Range,
        b: Range,
        side: &'static str,
    },
    #[error("{kind} map has {n} ranges; the kernel allows at most {MAX_RANGES}")]
    TooMany { kind: &'static str, n: usize },
    #[error(
        "the map has no {kind} ranges; add a {prefix}:INNER:OUTER:COUNT entry or use b: for both"
    )]
    Empty {
        kind: &'static str,
        prefix: &'static str,
    },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has no entry for {user}; add one (e.g. with usermod --add-subuids) or pass a map"
    )]
    NoSubid { user: String, path: PathBuf },
    #[error("{path}:{line}: bad entry '{text}' (expected NAME:START:COUNT)")]
    SubidSyntax {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// A validated map for one id space (uids or gids).
#[derive(Clone, PartialEq, Eq)]
pub struct IdMap<K: Kind> {
    /// Sorted by inner start.
    by_inner: Vec<Range>,
    /// Sorted by outer start.
    by_outer: Vec<Range>,
    _kind: PhantomData<K>,
}

pub type UidMap = IdMap<Uids>;
pub type GidMap = IdMap<Gids>;

impl<K: Kind> fmt::Debug for IdMap<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}Map[", K::NAME)?;
        for (i, r) in self.by_inner.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        f.write_str("]")
    }
}

impl<K: Kind> IdMap<K> {
    /// Validates `ranges` with the kernel's rules: non-empty counts, no id past
    /// 4294967294 (the all-ones id is "invalid"), no overlap on either side, at most 340.
    pub fn new(ranges: Vec<Range>) -> Result<Self, Error> {
        if ranges.len() > MAX_RANGES {
            return Err(Error::TooMany {
                kind: K::NAME,
                n: ranges.len(),
            });
        }
        for r in &ranges {
            if r.count == 0 {
                return Err(Error::ZeroCount {
                    kind: K::NAME,
                    range: *r,
                });
            }
            for (side, end) in [("inner", r.inner_end()), ("outer", r.outer_end())] {
                if end > u64::from(u32::MAX) {
                    return Err(Error::TooLarge {
                        kind: K::NAME,
                        range: *r,
                        side,
                    });
                }
            }
        }
        let mut by_inner = ranges.clone();
        by_inner.sort_by_key(|r| r.inner);
        for w in by_inner.windows(2) {
            if w[0].inner_end() > u64::from(w[1].inner) {
                return Err(Error::Overlap {
                    kind: K::NAME,
                    a: w[0],
                    b: w[1],
                    side: "inner",
                });
            }
        }
        let mut by_outer = ranges;
        by_outer.sort_by_key(|r| r.outer);
        for w in by_outer.windows(2) {
            if w[0].outer_end() > u64::from(w[1].outer) {
                return Err(Error::Overlap {
                    kind: K::NAME,
                    a: w[0],
                    b: w[1],
                    side: "outer",
                });
            }
        }
        Ok(Self {
            by_inner,
            by_outer,
            _kind: PhantomData,
        })
    }

    /// The identity map over every valid id.
    pub fn identity() -> Self {
        Self {
            by_inner: vec![IDENTITY],
            by_outer: vec![IDENTITY],
            _kind: PhantomData,
        }
    }

    /// Ranges in inner order.
    pub fn ranges(&self) -> &[Range] {
        &self.by_inner
    }

    /// The outer id for an on-disk id, if mapped.
    pub fn to_outer(&self, id: K::Inner) -> Option<K::Outer> {
        let id = K::inner_raw(id);
        let i = self.by_inner.partition_point(|r| r.inner <= id);
        let r = self.by_inner.get(i.checked_sub(1)?)?;
        (u64::from(id) < r.inner_end()).then(|| K::outer(r.outer + (id - r.inner)))
    }

    /// The on-disk id for a host id, if mapped.
    pub fn to_inner(&self, id: K::Outer) -> Option<K::Inner> {
        let id = K::outer_raw(id);
        let i = self.by_outer.partition_point(|r| r.outer <= id);
        let r = self.by_outer.get(i.checked_sub(1)?)?;
        (u64::from(id) < r.outer_end()).then(|| K::inner(r.inner + (id - r.outer)))
    }

    /// `/proc/PID/uid_map` text (first column = on disk, as the kernel's idmapped mounts use it).
    pub fn to_proc_text(&self) -> String {
        self.by_inner
            .iter()
            .map(|r| format!("{} {} {}\n", r.inner, r.outer, r.count))
            .collect()
    }

    /// Parses a `uid_map`-style text: lines of `INNER OUTER COUNT`, or comma/space separated
    /// `INNER:OUTER:COUNT` entries (no prefix).
    pub fn parse(text: &str) -> Result<Self, Error> {
        Self::new(parse_plain_ranges(text)?)
    }

    /// The same map with inner and outer swapped.
    pub fn inverse(&self) -> Self {
        let flip = |r: &Range| Range {
            inner: r.outer,
            outer: r.inner,
            count: r.count,
        };
        Self {
            by_inner: self.by_outer.iter().map(flip).collect(),
            by_outer: self.by_inner.iter().map(flip).collect(),
            _kind: PhantomData,
        }
    }
}

const IDENTITY: Range = Range {
    inner: 0,
    outer: 0,
    count: u32::MAX,
};

fn parse_num(entry: &str, field: &str, what: &str) -> Result<u32, Error> {
    field.parse::<u32>().map_err(|_| Error::Syntax {
        entry: entry.to_string(),
        reason: format!("{what} '{field}' is not a number from 0 to 4294967295"),
    })
}

fn parse_triple(entry: &str, fields: &[&str]) -> Result<Range, Error> {
    let [inner, outer, count] = fields else {
        return Err(Error::Syntax {
            entry: entry.to_string(),
            reason: format!("expected 3 numbers, found {}", fields.len()),
        });
    };
    Ok(Range {
        inner: parse_num(entry, inner, "INNER")?,
        outer: parse_num(entry, outer, "OUTER")?,
        count: parse_num(entry, count, "COUNT")?,
    })
}

/// Lines of `A B C` (proc style) or separated `A:B:C` entries.
fn parse_plain_ranges(text: &str) -> Result<Vec<Range>, Error> {
    let mut out = Vec::new();
    if text.contains(':') {
        for entry in split_entries(text) {
            let fields: Vec<&str> = entry.split(':').collect();
            out.push(parse_triple(entry, &fields)?);
        }
    } else {
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            out.push(parse_triple(line, &fields)?);
        }
    }
    Ok(out)
}

fn split_entries(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
}

/// The uid and gid maps of one shifted mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMapping {
    pub uid: UidMap,
    pub gid: GidMap,
}

impl IdMapping {
    /// Parses `[u:|g:|b:]INNER:OUTER:COUNT` entries separated by spaces or commas, as
    /// util-linux `X-mount.idmap` and `mount-idmapped --map-mount` do; no prefix means both.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let mut uids = Vec::new();
        let mut gids = Vec::new();
        for entry in split_entries(spec) {
            let fields: Vec<&str> = entry.split(':').collect();
            let (u, g, nums) = match fields.first().copied() {
                Some("u") => (true, false, &fields[1..]),
                Some("g") => (false, true, &fields[1..]),
                Some("b") => (true, true, &fields[1..]),
                Some(p) if p.parse::<u32>().is_err() => {
                    return Err(Error::Syntax {
                        entry: entry.to_string(),
                        reason: format!("unknown prefix '{p}' (use u:, g: or b:)"),
                    });
                }
                _ => (true, true, &fields[..]),
            };
            let r = parse_triple(entry, nums)?;
            if u {
                uids.push(r);
            }
            if g {
                gids.push(r);
            }
        }
        Self::from_ranges(uids, gids)
    }

    /// Separate uid and gid maps, each in `INNER:OUTER:COUNT` or `uid_map` text form.
    pub fn parse_separate(uid_spec: &str, gid_spec: &str) -> Result<Self, Error> {
        Self::from_ranges(parse_plain_ranges(uid_spec)?, parse_plain_ranges(gid_spec)?)
    }

    fn from_ranges(uids: Vec<Range>, gids: Vec<Range>) -> Result<Self, Error> {
        if uids.is_empty() {
            return Err(Error::Empty {
                kind: "uid",
                prefix: "u",
            });
        }
        if gids.is_empty() {
            return Err(Error::Empty {
                kind: "gid",
                prefix: "g",
            });
        }
        Ok(Self {
            uid: UidMap::new(uids)?,
            gid: GidMap::new(gids)?,
        })
    }

    /// The maps of a running process's user namespace, read from `PROC/PID/{uid,gid}_map`.
    pub fn from_proc(proc_root: &Path, pid: u32) -> Result<Self, Error> {
        let read = |name: &str| {
            let path = proc_root.join(pid.to_string()).join(name);
            std::fs::read_to_string(&path).map_err(|source| Error::Io { path, source })
        };
        Self::parse_separate(&read("uid_map")?, &read("gid_map")?)
    }

    /// The identity mapping (every id maps to itself).
    pub fn identity() -> Self {
        Self {
            uid: UidMap::identity(),
            gid: GidMap::identity(),
        }
    }

    /// The same mapping with inner and outer swapped.
    pub fn inverse(&self) -> Self {
        Self {
            uid: self.uid.inverse(),
            gid: self.gid.inverse(),
        }
    }
}

impl fmt::Display for IdMapping {
    /// The canonical `u:/g:/b:` form, which `parse` reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.uid.ranges() == self.gid.ranges() {
            parts.extend(self.uid.ranges().iter().map(|r| format!("b:{r}")));
        } else {
            parts.extend(self.uid.ranges().iter().map(|r| format!("u:{r}")));
            parts.extend(self.gid.ranges().iter().map(|r| format!("g:{r}")));
        }
        f.write_str(&parts.join(","))
    }
}

/// `/etc/subuid` and `/etc/subgid`: which host id ranges belong to which user.
pub mod subid {
    use super::{Error, MAX_RANGES, Range};
    use std::path::Path;

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Entry {
        /// A user name or a numeric uid, as written in the file.
        pub owner: String,
        pub start: u32,
        pub count: u32,
    }

    /// Parses the file's text; blank lines and `#` comments are skipped.
    pub fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, Error> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || Error::SubidSyntax {
                path: path.to_path_buf(),
                line: i + 1,
                text: line.to_string(),
            };
            let mut f = line.split(':');
            let (Some(owner), Some(start), Some(count), None) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                return Err(bad());
            };
            let start = start.parse().map_err(|_| bad())?;
            let count: u32 = count.parse().map_err(|_| bad())?;
            if owner.is_empty() || count == 0 {
                return Err(bad());
            }
            out.push(Entry {
                owner: owner.to_string(),
                start,
                count,
            });
        }
        Ok(out)
    }

    /// Reads `path` (a missing file has no entries).
    pub fn read(path: &Path) -> Result<Vec<Entry>, Error> {
        match std::fs::read_to_string(path) {
            Ok(text) => parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(Error::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The entries owned by a user, matched by name or by numeric uid, as shadow-utils does.
    pub fn owned_by<'a>(entries: &'a [Entry], name: &str, uid: u32) -> Vec<&'a Entry> {
        let uid = uid.to_string();
        entries
            .iter()
            .filter(|e| e.owner == name || e.owner == uid)
            .collect()
    }

    /// The ranges a container of this user gets: inner ids from 0 laid over the user's
    /// subordinate ranges in file order, as `newuidmap` would be asked to.
    pub fn ranges_for(
        path: &Path,
        entries: &[Entry],
        name: &str,
        uid: u32,
    ) -> Result<Vec<Range>, Error> {
        let mut inner = 0u64;
        let mut out = Vec::new();
        for e in owned_by(entries, name, uid).into_iter().take(MAX_RANGES) {
            if inner + u64::from(e.count) > u64::from(u32::MAX) {
                break;
            }
            out.push(Range {
                inner: inner as u32,
                outer: e.start,
                count: e.count,
            });
            inner += u64::from(e.count);
        }
        if out.is_empty() {
            return Err(Error::NoSubid {
                user: name.to_string(),
                path: path.to_path_buf(),
            });
        }
        Ok(out)
    }

    /// Whether `[start, start+count)` lies inside one of the user's entries.
    pub fn covers(entries: &[Entry], name: &str, uid: u32, start: u32, count: u32) -> bool {
        let end = u64::from(start) + u64::from(count);
        owned_by(entries, name, uid)
            .iter()
            .any(|e| start >= e.start && end <= u64::from(e.start) + u64::from(e.count))
    }
}

impl IdMapping {
    /// The map a user's containers get from `/etc/subuid` and `/etc/subgid`.
    pub fn from_subid(subuid: &Path, subgid: &Path, name: &str, uid: u32) -> Result<Self, Error> {
        let u = subid::ranges_for(subuid, &subid::read(subuid)?, name, uid)?;
        let g = subid::ranges_for(subgid, &subid::read(subgid)?, name, uid)?;
        Self::from_ranges(u, g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(inner: u32, outer: u32, count: u32) -> Range {
        Range {
            inner,
            outer,
            count,
        }
    }

    #[test]
    fn parses_the_common_forms() {
        let m = IdMapping::parse("b:0:100000:65536").unwrap();
        assert_eq!(m.uid.ranges(), &[r(0, 100000, 65536)]);
        assert_eq!(m.gid.ranges(), &[r(0, 100000, 65536)]);
        let m = IdMapping::parse("u:0:1000:1, g:0:2000:1 u:1:100000:1000").unwrap();
        assert_eq!(m.uid.ranges(), &[r(0, 1000, 1), r(1, 100000, 1000)]);
        assert_eq!(m.gid.ranges(), &[r(0, 2000, 1)]);
        let m = IdMapping::parse("0:100000:65536").unwrap();
        assert_eq!(m.uid.ranges(), m.gid.ranges());
        let m = IdMapping::parse_separate("0 100000 65536\n", "0:200000:10").unwrap();
        assert_eq!(m.gid.ranges(), &[r(0, 200000, 10)]);
        assert!(IdMapping::parse("b:0:0:4294967295").is_ok());
    }

    #[test]
    fn bad_maps_name_the_range_and_reason() {
        let e = |s: &str| IdMapping::parse(s).unwrap_err().to_string();
        assert!(
            e("b:0:100000").contains("expected 3 numbers"),
            "{}",
            e("b:0:100000")
        );
        assert!(e("x:0:1:1").contains("unknown prefix 'x'"));
        assert!(e("b:0:-1:5").contains("OUTER '-1'"));
        assert!(e("b:0:1:0").contains("0:1:0") && e("b:0:1:0").contains("count"));
        assert!(e("b:1:0:4294967295").contains("inner side"));
        let ov = e("b:0:100000:100,b:50:300000:10");
        assert!(ov.contains("0:100000:100") && ov.contains("50:300000:10") && ov.contains("inner"));
        assert!(e("b:0:100000:100,b:200:100050:10").contains("outer side"));
        assert!(e("u:0:1:1").contains("no gid ranges"));
        assert!(e("").contains("no uid ranges"));
        let many: Vec<String> = (0..341).map(|i| format!("b:{i}:{}:1", 1000 + i)).collect();
        assert!(e(&many.join(",")).contains("at most 340"));
        let ok: Vec<String> = (0..340).map(|i| format!("b:{i}:{}:1", 1000 + i)).collect();
        assert!(IdMapping::parse(&ok.join(",")).is_ok());
    }

    #[test]
    fn lookups_and_boundaries() {
        let m = UidMap::new(vec![r(0, 100000, 65536), r(70000, 5, 2)]).unwrap();
        assert_eq!(m.to_outer(InnerUid(0)), Some(OuterUid(100000)));
        assert_eq!(m.to_outer(InnerUid(65535)), Some(OuterUid(165535)));
        assert_eq!(m.to_outer(InnerUid(65536)), None);
        assert_eq!(m.to_outer(InnerUid(70001)), Some(OuterUid(6)));
        assert_eq!(m.to_inner(OuterUid(6)), Some(InnerUid(70001)));
        assert_eq!(m.to_inner(OuterUid(99999)), None);
        assert_eq!(m.to_inner(OuterUid(165536)), None);
        assert_eq!(m.to_inner(OuterUid(101000)), Some(InnerUid(1000)));
        let id = UidMap::identity();
        assert_eq!(
            id.to_inner(OuterUid(u32::MAX - 1)),
            Some(InnerUid(u32::MAX - 1))
        );
        assert_eq!(id.to_inner(OuterUid(u32::MAX)), None);
    }

    #[test]
    fn display_round_trips() {
        for s in ["b:0:100000:65536", "u:0:1:1,u:5:100:2,g:0:7:9"] {
            let m = IdMapping::parse(s).unwrap();
            assert_eq!(m.to_string(), s);
            assert_eq!(IdMapping::parse(&m.to_string()).unwrap(), m);
        }
        let m = IdMapping::parse("b:0:100000:65536").unwrap();
        assert_eq!(m.uid.to_proc_text(), "0 100000 65536\n");
    }

    #[test]
    fn reads_proc_maps() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("42")).unwrap();
        std::fs::write(
            dir.path().join("42/uid_map"),
            "         0     100000      65536\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("42/gid_map"), "0 200000 10\n").unwrap();
        let m = IdMapping::from_proc(dir.path(), 42).unwrap();
        assert_eq!(m.uid.ranges(), &[r(0, 100000, 65536)]);
        assert_eq!(m.gid.ranges(), &[r(0, 200000, 10)]);
        let err = IdMapping::from_proc(dir.path(), 43)
            .unwrap_err()
            .to_string();
        assert!(err.contains("43/uid_map"), "{err}");
    }

    #[test]
    fn subid_files() {
        let dir = tempfile::tempdir().unwrap();
        let su = dir.path().join("subuid");
        let sg = dir.path().join("subgid");
        std::fs::write(
            &su,
            "# c\nalice:100000:65536\n1001:300000:10\nbob:200000:65536\n",
        )
        .unwrap();
        std::fs::write(&sg, "alice:100000:65536\n").unwrap();
        let m = IdMapping::from_subid(&su, &sg, "alice", 1000).unwrap();
        assert_eq!(m.uid.ranges(), &[r(0, 100000, 65536)]);
        let e = IdMapping::from_subid(&su, &sg, "carol", 1001)
            .unwrap_err()
            .to_string();
        assert!(e.contains("subgid") && e.contains("carol"), "{e}");
        let entries = subid::read(&su).unwrap();
        assert!(subid::covers(&entries, "alice", 1000, 100000, 65536));
        assert!(!subid::covers(&entries, "alice", 1000, 100000, 65537));
        assert!(subid::covers(&entries, "x", 1001, 300005, 5));
        std::fs::write(&su, "alice:1:x\n").unwrap();
        let e = subid::read(&su).unwrap_err().to_string();
        assert!(e.contains(":1:"), "{e}");
    }

    fn arb_ranges() -> impl Strategy<Value = Vec<Range>> {
        // Disjoint by construction: gaps then lengths, on both sides independently shuffled.
        prop::collection::vec((0u32..1000, 1u32..1000, 0u32..1000), 1..20)
            .prop_flat_map(|v| {
                let mut inner = 0u32;
                let mut ranges = Vec::new();
                for (gap, count, _) in &v {
                    inner += gap;
                    ranges.push((inner, *count));
                    inner += count;
                }
                let n = ranges.len();
                (
                    Just(ranges),
                    Just(v),
                    Just(()).prop_perturb(move |_, mut rng| {
                        let mut idx: Vec<usize> = (0..n).collect();
                        for i in (1..n).rev() {
                            idx.swap(i, rng.random_range(0..=i));
                        }
                        idx
                    }),
                )
            })
            .prop_map(|(inners, v, order)| {
                let mut outer = 0u32;
                let mut outs = vec![0u32; inners.len()];
                for &i in &order {
                    outer += v[i].2;
                    outs[i] = outer;
                    outer += inners[i].1;
                }
                inners
                    .iter()
                    .zip(outs)
                    .map(|(&(inner, count), outer)| r(inner, outer, count))
                    .collect()
            })
    }

    proptest! {
        #[test]
        fn round_trip(ranges in arb_ranges(), probe in 0u32..100_000) {
            let m = UidMap::new(ranges.clone()).unwrap();
            if let Some(o) = m.to_outer(InnerUid(probe)) {
                prop_assert_eq!(m.to_inner(o), Some(InnerUid(probe)));
            }
            if let Some(i) = m.to_inner(OuterUid(probe)) {
                prop_assert_eq!(m.to_outer(i), Some(OuterUid(probe)));
            }
            let inv = m.inverse();
            prop_assert_eq!(inv.to_inner(OuterUid(probe)).map(|i| i.0), m.to_outer(InnerUid(probe)).map(|o| o.0));
        }

        #[test]
        fn every_range_boundary(ranges in arb_ranges()) {
            let m = UidMap::new(ranges.clone()).unwrap();
            for rg in &ranges {
                prop_assert_eq!(m.to_outer(InnerUid(rg.inner)), Some(OuterUid(rg.outer)));
                let last = rg.count - 1;
                prop_assert_eq!(m.to_outer(InnerUid(rg.inner + last)), Some(OuterUid(rg.outer + last)));
                let after = rg.inner + rg.count;
                if !ranges.iter().any(|o| o.inner == after) {
                    prop_assert_eq!(m.to_outer(InnerUid(after)), None);
                }
            }
        }

        #[test]
        fn overlaps_are_rejected(ranges in arb_ranges(), pick in any::<prop::sample::Index>(), off in 0u32..1000) {
            let victim = ranges[pick.index(ranges.len())];
            let mut bad = ranges.clone();
            bad.push(r(victim.inner + off % victim.count, 4_000_000, 1));
            let overlaps_inner = matches!(UidMap::new(bad), Err(Error::Overlap { side: "inner", .. }));
            prop_assert!(overlaps_inner);
            let mut bad = ranges;
            bad.push(r(4_000_000, victim.outer + off % victim.count, 1));
            let overlaps_outer = matches!(UidMap::new(bad), Err(Error::Overlap { side: "outer", .. }));
            prop_assert!(overlaps_outer);
        }

        #[test]
        fn parse_never_panics(s in "[ubgx0-9:, \n-]{0,40}") {
            let _ = IdMapping::parse(&s);
            let _ = UidMap::parse(&s);
        }
    }
}
