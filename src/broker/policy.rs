//! The administrator's policy, `/etc/shiftfs/policy.toml`: which source trees users may
//! shift, how, how wide a map may be, how many mounts a user may hold, and which id range
//! images live in. A key the broker does not know is an error (a typo such as `mode = "rw"`
//! spelt `mdoe` must not silently grant or deny), and so is anything ambiguous.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// systemd's "foreign UID range" (`FOREIGN_UID_BASE` in systemd 256+): images owned by it
/// belong to no host user.
pub const FOREIGN_UID_BASE: u32 = 2_147_352_576;
pub const FOREIGN_UID_COUNT: u32 = 65_536;
pub const DEFAULT_PATH: &str = "/etc/shiftfs/policy.toml";
pub const DEFAULT_MOUNTS_PER_USER: u32 = 8;
pub const DEFAULT_MAX_MAP_IDS: u64 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the policy {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("policy {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// How a source may be mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Access {
    #[serde(rename = "ro")]
    ReadOnly,
    #[serde(rename = "rw")]
    ReadWrite,
}

/// The reserved range images are owned by on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRange {
    pub base: u32,
    pub count: u32,
}

impl Default for ImageRange {
    fn default() -> Self {
        Self {
            base: FOREIGN_UID_BASE,
            count: FOREIGN_UID_COUNT,
        }
    }
}

impl ImageRange {
    /// Whether `[start, start+count)` lies inside the range.
    pub fn contains(&self, start: u32, count: u32) -> bool {
        start >= self.base
            && u64::from(start) + u64::from(count) <= u64::from(self.base) + u64::from(self.count)
    }

    /// Whether `[start, start+count)` shares any id with the range.
    pub fn overlaps(&self, start: u32, count: u32) -> bool {
        u64::from(start) < u64::from(self.base) + u64::from(self.count)
            && u64::from(self.base) < u64::from(start) + u64::from(count)
    }

    /// The last id, for messages.
    pub fn last(&self) -> u64 {
        u64::from(self.base) + u64::from(self.count) - 1
    }
}

/// One `[[source]]` table: a tree by path prefix and who may shift it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRule {
    pub path: PathBuf,
    /// User names or numeric uids; `"*"` is every user.
    #[serde(default)]
    pub users: Vec<String>,
    /// Group names or numeric gids.
    #[serde(default)]
    pub groups: Vec<String>,
    pub access: Access,
    /// The widest map (ids in the uid map, and in the gid map) for this tree.
    pub max_map_ids: Option<u64>,
}

/// Who asks, as the rules see them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    pub name: &'a str,
    pub uid: u32,
    /// Every group the process has (primary and supplementary), by id and, where known, name.
    pub groups: &'a [(u32, Option<String>)],
}

impl SourceRule {
    pub fn grants(&self, who: &Member<'_>) -> bool {
        let uid = who.uid.to_string();
        self.users
            .iter()
            .any(|u| u == "*" || *u == who.name || *u == uid)
            || who.groups.iter().any(|(gid, name)| {
                let gid = gid.to_string();
                self.groups
                    .iter()
                    .any(|g| *g == gid || name.as_deref() == Some(g.as_str()))
            })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    mounts_per_user: Option<u32>,
    max_map_ids: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    image_range: Option<ImageRange>,
    limits: Option<LimitsFile>,
    #[serde(default)]
    source: Vec<SourceRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub image_range: ImageRange,
    /// Mounts one user may hold at once.
    pub mounts_per_user: u32,
    /// The widest map for sources no `[[source]]` entry sets a width for.
    pub max_map_ids: u64,
    pub sources: Vec<SourceRule>,
}

impl Default for Policy {
    /// No file: no shared sources, only images in the callers' own directories.
    fn default() -> Self {
        Self {
            image_range: ImageRange::default(),
            mounts_per_user: DEFAULT_MOUNTS_PER_USER,
            max_map_ids: DEFAULT_MAX_MAP_IDS,
            sources: Vec::new(),
        }
    }
}

impl Policy {
    /// Reads `path`; a missing file is the default policy.
    pub fn load(path: &Path) -> Result<Self, Error> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(Error::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |message: String| Error::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let image_range = file.image_range.unwrap_or_default();
        if image_range.count == 0
            || u64::from(image_range.base) + u64::from(image_range.count) > u64::from(u32::MAX)
        {
            return Err(invalid(format!(
                "[image_range] base {} count {} is empty or runs past the largest id 4294967294",
                image_range.base, image_range.count
            )));
        }
        for (id, what) in [(0, "root"), (crate::idmap::OVERFLOW_ID, "the overflow id")] {
            if image_range.overlaps(id, 1) {
                return Err(invalid(format!(
                    "[image_range] {}-{} contains {id} ({what}); images must belong to no one",
                    image_range.base,
                    image_range.last()
                )));
            }
        }
        let limits = file.limits.unwrap_or(LimitsFile {
            mounts_per_user: None,
            max_map_ids: None,
        });
        let max_map_ids = limits.max_map_ids.unwrap_or(DEFAULT_MAX_MAP_IDS);
        if max_map_ids == 0 {
            return Err(invalid("[limits] max_map_ids must be at least 1".into()));
        }
        for (i, s) in file.source.iter().enumerate() {
            let at = format!("[[source]] #{} (path \"{}\")", i + 1, s.path.display());
            if !s.path.is_absolute()
                || s.path
                    .components()
                    .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
            {
                return Err(invalid(format!(
                    "{at}: path must be absolute, without . or .. components"
                )));
            }
            if s.users.is_empty() && s.groups.is_empty() {
                return Err(invalid(format!(
                    "{at}: grants no one; add users = [...] or groups = [...]"
                )));
            }
            if s.max_map_ids == Some(0) {
                return Err(invalid(format!("{at}: max_map_ids must be at least 1")));
            }
            if let Some(j) = file.source[..i].iter().position(|o| o.path == s.path) {
                return Err(invalid(format!(
                    "{at}: the same path as [[source]] #{}; merge the two",
                    j + 1
                )));
            }
        }
        Ok(Self {
            image_range,
            mounts_per_user: limits.mounts_per_user.unwrap_or(DEFAULT_MOUNTS_PER_USER),
            max_map_ids,
            sources: file.source,
        })
    }

    /// The entry that decides for `source`: the one with the longest path that contains it
    /// (whole components: `/srv/img` does not contain `/srv/images`), so an administrator can
    /// carve a narrower rule out of a wider one.
    pub fn rule_for(&self, source: &Path) -> Option<&SourceRule> {
        self.sources
            .iter()
            .filter(|s| source.starts_with(&s.path))
            .max_by_key(|s| s.path.components().count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, Error> {
        Policy::parse(Path::new("/etc/shiftfs/policy.toml"), text)
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/policy.toml");
        let p = Policy::load(&path).unwrap();
        assert_eq!(p.image_range, ImageRange::default());
        assert!(!p.sources.is_empty());
        assert!(p.rule_for(Path::new("/srv/images/debian")).is_some());
    }

    #[test]
    fn empty_and_missing_files_are_the_default() {
        assert_eq!(parse("").unwrap(), Policy::default());
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Policy::load(&dir.path().join("none.toml")).unwrap(),
            Policy::default()
        );
        assert_eq!(Policy::default().image_range.base, 2147352576);
        assert_eq!(Policy::default().image_range.count, 65536);
    }

    #[test]
    fn reads_every_key() {
        let p = parse(
            r#"
            [image_range]
            base = 3000000000
            count = 1000
            [limits]
            mounts_per_user = 2
            max_map_ids = 10
            [[source]]
            path = "/srv"
            users = ["alice", "1001"]
            groups = ["staff"]
            access = "rw"
            max_map_ids = 5
            "#,
        )
        .unwrap();
        assert_eq!(
            p.image_range,
            ImageRange {
                base: 3000000000,
                count: 1000
            }
        );
        assert_eq!((p.mounts_per_user, p.max_map_ids), (2, 10));
        let s = &p.sources[0];
        assert_eq!((s.access, s.max_map_ids), (Access::ReadWrite, Some(5)));
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        for (text, key) in [
            ("mounts = 3", "mounts"),
            ("[limits]\nmounts_per_usr = 3", "mounts_per_usr"),
            (
                "[[source]]\npath = \"/a\"\nusers = [\"a\"]\naccess = \"ro\"\nmdoe = 1",
                "mdoe",
            ),
            ("[image_range]\nbase = 1\ncount = 1\nsize = 3", "size"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains("/etc/shiftfs/policy.toml"),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn bad_values_are_explained() {
        for (text, want) in [
            (
                "[[source]]\npath = \"srv\"\nusers = [\"a\"]\naccess = \"ro\"",
                "absolute",
            ),
            (
                "[[source]]\npath = \"/srv/../etc\"\nusers = [\"a\"]\naccess = \"ro\"",
                "..",
            ),
            (
                "[[source]]\npath = \"/srv\"\naccess = \"ro\"",
                "grants no one",
            ),
            (
                "[[source]]\npath = \"/srv\"\nusers = [\"a\"]\naccess = \"rwx\"",
                "rwx",
            ),
            ("[[source]]\npath = \"/srv\"\nusers = [\"a\"]", "access"),
            (
                "[[source]]\npath = \"/s\"\nusers = [\"a\"]\naccess = \"ro\"\n[[source]]\npath = \"/s\"\nusers = [\"b\"]\naccess = \"rw\"",
                "same path as [[source]] #1",
            ),
            ("[image_range]\nbase = 0\ncount = 10", "contains 0 (root)"),
            ("[image_range]\nbase = 60000\ncount = 10000", "65534"),
            ("[image_range]\nbase = 4294967290\ncount = 10", "largest id"),
            ("[limits]\nmax_map_ids = 0", "at least 1"),
            ("[limits]\nmounts_per_user = -1", "mounts_per_user"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn longest_prefix_decides_by_whole_components() {
        let p = parse(
            r#"
            [[source]]
            path = "/srv"
            groups = ["users"]
            access = "rw"
            [[source]]
            path = "/srv/secret"
            users = ["alice"]
            access = "ro"
            "#,
        )
        .unwrap();
        let path = |s: &str| p.rule_for(Path::new(s)).map(|r| r.path.clone());
        assert_eq!(path("/srv/a"), Some("/srv".into()));
        assert_eq!(path("/srv"), Some("/srv".into()));
        assert_eq!(path("/srv/secret/x"), Some("/srv/secret".into()));
        assert_eq!(path("/srv/secretive"), Some("/srv".into()));
        assert_eq!(path("/srvx"), None);
        assert_eq!(path("/"), None);
    }

    #[test]
    fn grants_by_name_uid_group_or_star() {
        let rule = |users: &[&str], groups: &[&str]| SourceRule {
            path: "/s".into(),
            users: users.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            access: Access::ReadOnly,
            max_map_ids: None,
        };
        let groups = [(100, Some("users".to_string())), (2000, None)];
        let who = Member {
            name: "alice",
            uid: 1000,
            groups: &groups,
        };
        assert!(rule(&["alice"], &[]).grants(&who));
        assert!(rule(&["1000"], &[]).grants(&who));
        assert!(rule(&["*"], &[]).grants(&who));
        assert!(rule(&[], &["users"]).grants(&who));
        assert!(rule(&[], &["2000"]).grants(&who));
        assert!(!rule(&["bob", "1001"], &["staff", "100x"]).grants(&who));
    }
}
