//! What shiftfs remembers of the mounts it made, for `list` and `umount`: one JSON record per
//! mount *instance* (keyed by its mount id, not its path, so a draining daemon of a detached
//! mount never touches the record of a newer mount at the same place), the daemon's pid with
//! its start time (so a reused pid is never taken for our daemon), and a lock per target
//! that serialises mount and unmount of one place.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::mountinfo::{self, MountInfo};
use crate::options::Backend;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the record of {target} in {dir}: {source}; check that {dir} is writable")]
    Save {
        target: PathBuf,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path} to mount or unmount {target}: {source}")]
    Lock {
        path: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where records, logs and locks live; `SHIFTFS_RUN_DIR` moves it (tests).
pub fn run_dir() -> PathBuf {
    std::env::var_os("SHIFTFS_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/shiftfs"))
}

/// What `shiftfs list` knows of one mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(with = "escaped")]
    pub target: PathBuf,
    #[serde(with = "escaped")]
    pub source: PathBuf,
    #[serde(with = "backend")]
    pub backend: Backend,
    pub map: String,
    pub options: String,
    /// The id of the mount, as in mountinfo and `statx(STATX_MNT_ID)`.
    pub mount_id: u64,
    /// The FUSE daemon.
    pub pid: Option<u32>,
    /// The daemon's start time (`/proc/PID/stat` field 22), so a reused pid is not ours.
    pub pid_start: Option<u64>,
    /// The mount namespace the mount was made in (inode of `/proc/self/ns/mnt`): only a
    /// process in that namespace can see the mount, so only it may judge it gone.
    pub mnt_ns: Option<u64>,
    /// The uid of whoever asked for the mount (root = 0): only it, or root, may unmount it
    /// through the broker. Records written before owners existed have none (root's).
    #[serde(default)]
    pub owner: Option<u32>,
    /// For a kernel idmapped mount of a shared idmappable FUSE mount of its source (`-o
    /// share=idmap`): where that FUSE mount is (as `pathtext` shows it). It lives as long as
    /// any mount naming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower: Option<String>,
    /// The OCI container the mount was made for (by `shiftfs-runtime`), so `list` shows it
    /// and `gc` unmounts it once the container is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// Set by `shiftfs-runtime` for the `shiftfs mount` it runs (and so for the FUSE daemon
/// that mount starts): the container id that goes into the record.
pub const CONTAINER_ENV: &str = "SHIFTFS_CONTAINER";

/// How a recorded mount stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Active,
    /// Unmounted lazily (or by signal); the daemon serves files still open, then exits.
    Draining,
    /// In the mount table, but its FUSE daemon is gone: every access fails.
    Dead,
}

impl Record {
    /// A record of the mount `mount_id` served by this process (FUSE) or by the kernel,
    /// owned by this process's real uid (the user who ran `shiftfs`; root under sudo).
    pub fn new(
        target: &Path,
        source: &Path,
        backend: Backend,
        map: String,
        options: String,
        mount_id: u64,
        daemon: Option<u32>,
    ) -> Self {
        Self {
            target: target.to_path_buf(),
            source: source.to_path_buf(),
            backend,
            map,
            options,
            mount_id,
            pid: daemon,
            pid_start: daemon.and_then(start_time),
            mnt_ns: own_mnt_ns(),
            owner: Some(rustix::process::getuid().as_raw()),
            lower: None,
            container: std::env::var(CONTAINER_ENV).ok().filter(|c| !c.is_empty()),
        }
    }

    /// The same record, of a mount stacked on the shared FUSE mount at `lower`.
    pub fn over(self, lower: &Path) -> Self {
        Self {
            lower: Some(crate::pathtext::show(lower)),
            ..self
        }
    }

    /// The shared FUSE mount this one is stacked on, if any.
    pub fn lower(&self) -> Option<PathBuf> {
        self.lower.as_deref().map(crate::pathtext::parse)
    }

    /// The container the mount belongs to, if a runtime made it for one.
    pub fn container(&self) -> Option<&str> {
        self.container.as_deref()
    }

    /// The same record, owned by `uid` (the broker mounts for its callers).
    pub fn owned_by(self, uid: u32) -> Self {
        Self {
            owner: Some(uid),
            ..self
        }
    }

    fn file(mount_id: u64) -> PathBuf {
        run_dir().join(format!("mount-{mount_id}.json"))
    }

    /// Where the FUSE daemon of `target` writes its log (per target, so logs do not pile up).
    pub fn log_path(target: &Path) -> PathBuf {
        run_dir().join(format!("{}.log", escaped_name(target)))
    }

    pub fn save(&self) -> Result<(), Error> {
        let err = |source| Error::Save {
            target: self.target.clone(),
            dir: run_dir(),
            source,
        };
        std::fs::create_dir_all(run_dir()).map_err(err)?;
        let path = Self::file(self.mount_id);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let text = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }

    /// The record of the mount `m`, if shiftfs made it.
    pub fn of(m: &MountInfo) -> Option<Self> {
        Self::load(&Self::file(m.id)).filter(|r| r.target == m.mount_point)
    }

    fn load(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Removes this record, and only this one: mount ids are reused as soon as a mount is
    /// gone, so by the time a draining daemon ends, the file of its id may already describe
    /// a newer mount, which must stay. The owner may have changed since (the broker hands
    /// the record of a mount it made to its caller): it is still this mount's record.
    pub fn remove(&self) {
        if self.is_saved() {
            let _ = std::fs::remove_file(Self::file(self.mount_id));
        }
    }

    /// Removes this record of a mount judged gone, unless its target is being mounted or
    /// unmounted right now. Mount ids are reused at once: between our reading the table and
    /// removing the file, the target may have been unmounted and mounted again under the same
    /// id, with a record that reads the same. Under the target's lock, judged again on a fresh
    /// table, that cannot happen; a busy target is left to whoever holds its lock.
    fn prune(&self) {
        let Some(_lock) = TargetLock::try_take(&self.target) else {
            return;
        };
        if mountinfo::own_table().is_some_and(|table| self.state(&table).is_none()) {
            self.remove();
        }
    }

    /// Whether the record of this very mount is on file (its daemon removes it when the
    /// mount's session ends).
    pub fn is_saved(&self) -> bool {
        Self::load(&Self::file(self.mount_id)).is_some_and(|r| r.same_mount(self))
    }

    /// Whether `other` records the same mount: the same id, place, daemon and namespace.
    fn same_mount(&self, other: &Self) -> bool {
        (
            self.mount_id,
            &self.target,
            self.pid,
            self.pid_start,
            self.mnt_ns,
        ) == (
            other.mount_id,
            &other.target,
            other.pid,
            other.pid_start,
            other.mnt_ns,
        )
    }

    /// Whether the recorded daemon still runs: the same process that was recorded (start
    /// time), and not a zombie.
    pub fn daemon_alive(&self) -> bool {
        match (self.pid, self.pid_start) {
            (Some(pid), Some(start)) => start_time(pid) == Some(start),
            _ => false,
        }
    }

    /// How the mount stands, given this process's mount table.
    pub fn state(&self, table: &[MountInfo]) -> Option<State> {
        let mounted = table
            .iter()
            .any(|m| m.id == self.mount_id && m.mount_point == self.target);
        let fuse = self.backend == Backend::Fuse;
        match (mounted, fuse && self.daemon_alive()) {
            (true, _) if !fuse => Some(State::Active),
            (true, true) => Some(State::Active),
            (true, false) => Some(State::Dead),
            (false, true) => Some(State::Draining),
            (false, false) => None,
        }
    }

    /// Every record with its state, pruned of mounts that are gone (unmounted by umount(8),
    /// say, with no daemon left). An unreadable mount table prunes nothing.
    pub fn all() -> Vec<(Self, State)> {
        let Ok(dir) = std::fs::read_dir(run_dir()) else {
            return Vec::new();
        };
        let records: Vec<Self> = dir
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.as_bytes();
                name.starts_with(b"mount-") && name.ends_with(b".json")
            })
            .filter_map(|e| Self::load(&e.path()))
            .collect();
        // Read after the records: a record is written after its mount is attached, so a
        // mount made while we were reading is in this table, and its record is never pruned.
        let table = mountinfo::own_table();
        let ns = own_mnt_ns();
        let mut out: Vec<(Self, State)> = records
            .into_iter()
            // Mounts of another mount namespace are not in our table: neither shown nor pruned.
            .filter(|r| r.mnt_ns.is_none() || r.mnt_ns == ns)
            .filter_map(|r| {
                let Some(table) = &table else {
                    return Some((r, State::Active));
                };
                match r.state(table) {
                    Some(s) => Some((r, s)),
                    None => {
                        r.prune();
                        None
                    }
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.0.target, a.0.mount_id).cmp(&(&b.0.target, b.0.mount_id)));
        out
    }
}

/// An exclusive lock on mounting and unmounting one target path, held until dropped. Taken
/// by `shiftfs mount` around check-then-mount and by `shiftfs umount`, so two calls on one
/// target cannot interleave.
#[derive(Debug)]
pub struct TargetLock {
    _file: OwnedFd,
}

impl TargetLock {
    pub fn take(target: &Path) -> Result<Self, Error> {
        Self::at(&Self::path(target), target)
    }

    /// The lock file `path` (its directory made if needed), locking `what` (for messages):
    /// for what is not a target, e.g. a source's shared daemon.
    /// [`TargetLock::take`] if no one holds the lock (also this process through another
    /// lock), else `None` at once.
    pub fn try_take(target: &Path) -> Option<Self> {
        let file = Self::open(&Self::path(target)).ok()?;
        rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).ok()?;
        Some(Self { _file: file })
    }

    fn open(path: &Path) -> io::Result<OwnedFd> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(rustix::fs::open(
            path,
            OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )?)
    }

    fn path(target: &Path) -> PathBuf {
        run_dir()
            .join("locks")
            .join(format!("{}.lock", escaped_name(target)))
    }

    pub fn at(path: &Path, what: &Path) -> Result<Self, Error> {
        let err = |source: io::Error| Error::Lock {
            path: path.to_path_buf(),
            target: what.to_path_buf(),
            source,
        };
        let file = Self::open(path).map_err(err)?;
        loop {
            match rustix::fs::flock(&file, FlockOperation::LockExclusive) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r.map_err(|e| err(e.into()))?,
            }
        }
        Ok(Self { _file: file })
    }
}

/// The inode of this process's mount namespace.
fn own_mnt_ns() -> Option<u64> {
    rustix::fs::stat("/proc/self/ns/mnt")
        .ok()
        .map(|st| st.st_ino)
}

/// The process's start time in clock ticks after boot; `None` if it is gone or a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Field 3 was `state`; field 22 is `starttime`.
    fields.nth(18)?.parse().ok()
}

/// `target` as one file name, systemd-escape style so the name tells which mount it is.
fn escaped_name(target: &Path) -> String {
    let mut name = String::new();
    for &c in target.as_os_str().as_bytes().iter().skip(1) {
        match c {
            b'/' => name.push('-'),
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' => name.push(c as char),
            c => name.push_str(&format!("\\x{c:02x}")),
        }
    }
    if name.is_empty() {
        name.push('-');
    }
    // NAME_MAX is 255: a long target keeps a readable prefix and a hash of the whole path.
    if name.len() > 180 {
        let hash = target
            .as_os_str()
            .as_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let mut cut = 160;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name = format!("{}-{hash:016x}", &name[..cut]);
    }
    name
}

/// Paths as [`crate::pathtext`]: JSON strings must be UTF-8, paths need not be.
mod escaped {
    use super::*;

    pub fn serialize<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::pathtext::show(p))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Ok(crate::pathtext::parse(&String::deserialize(d)?))
    }
}

mod backend {
    use super::*;

    pub fn serialize<S: serde::Serializer>(b: &Backend, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(b)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Backend, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn records_round_trip_with_odd_paths() {
        let rec = Record {
            target: PathBuf::from(OsStr::from_bytes(b"/mnt/a b\n\\\xff")),
            source: "/srv/img".into(),
            backend: Backend::Fuse,
            map: "b:0:100000:65536".into(),
            options: "rw,nosuid,nodev,exec".into(),
            mount_id: 42,
            pid: Some(7),
            pid_start: Some(99),
            mnt_ns: Some(4026531841),
            owner: Some(1000),
            lower: Some("/run/shiftfs/shared/1-2-on".into()),
            container: Some("c1".into()),
        };
        let text = serde_json::to_string(&rec).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), rec);
    }

    #[test]
    fn old_records_without_an_owner_still_load() {
        let text = r#"{"target":"/t","source":"/s","backend":"kernel","map":"b:0:1:1",
            "options":"rw","mount_id":3,"pid":null,"pid_start":null,"mnt_ns":null}"#;
        let rec: Record = serde_json::from_str(text).unwrap();
        assert_eq!((rec.mount_id, rec.owner), (3, None));
        let mine = Record::new(
            Path::new("/t"),
            Path::new("/s"),
            Backend::Kernel,
            String::new(),
            String::new(),
            3,
            None,
        );
        assert_eq!(mine.owner, Some(rustix::process::getuid().as_raw()));
        assert_eq!(mine.owned_by(61001).owner, Some(61001));
    }

    #[test]
    fn own_start_time_is_stable_and_pid_reuse_is_caught() {
        let me = std::process::id();
        let start = start_time(me).expect("own start time");
        assert_eq!(start_time(me), Some(start));
        let rec = Record::new(
            Path::new("/t"),
            Path::new("/s"),
            Backend::Fuse,
            String::new(),
            String::new(),
            1,
            Some(me),
        );
        assert!(rec.daemon_alive());
        let reused = Record {
            pid_start: Some(start + 1),
            ..rec
        };
        assert!(
            !reused.daemon_alive(),
            "another process with our pid is not our daemon"
        );
    }

    #[test]
    fn long_and_odd_targets_make_safe_file_names() {
        let long = PathBuf::from(format!("/{}", "x/".repeat(200)));
        let name = escaped_name(&long);
        assert!(name.len() < 200 && !name.contains('/'));
        assert_eq!(escaped_name(Path::new("/")), "-");
        assert_eq!(escaped_name(Path::new("/a b/c")), "a\\x20b-c");
    }
}
