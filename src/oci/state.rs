//! What the wrapper remembers of each container it prepared, in `RUN_DIR/oci/ID/`:
//! `state.json` (the runtime and its global options, to ask it later whether it still knows
//! the container; the init pid with its start time; the mounts), the private bundle, the
//! mount points, and a lock held while a wrapper call works on the container.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::fs::{FlockOperation, Mode, OFlags};
use serde::{Deserialize, Serialize};

use super::Error;
use crate::registry::{run_dir, start_time};

/// Where the per-container directories live.
pub fn oci_dir() -> PathBuf {
    run_dir().join("oci")
}

/// Container ids name directories: runc's own rule (letters, digits, `_`, `+`, `-`, `.`),
/// and never `.` or `..`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    /// The real runtime, as an absolute path.
    pub runtime: PathBuf,
    /// Its global options (`--root` and the like), so `state` asks the same instance.
    pub runtime_globals: Vec<String>,
    /// The bundle the engine gave.
    pub bundle: PathBuf,
    /// The container's init, once the runtime created it.
    pub pid: Option<u32>,
    pub pid_start: Option<u64>,
    /// Shifted mounts made for it, in the order they were made.
    pub mounts: Vec<PathBuf>,
}

impl Container {
    pub fn dir_of(id: &str) -> PathBuf {
        oci_dir().join(id)
    }

    pub fn dir(&self) -> PathBuf {
        Self::dir_of(&self.id)
    }

    fn file_of(id: &str) -> PathBuf {
        Self::dir_of(id).join("state.json")
    }

    pub fn save(&self) -> Result<(), Error> {
        let path = Self::file_of(&self.id);
        let tmp = path.with_extension("tmp");
        let err = |source| Error::Io {
            what: "cannot write the container state",
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }

    pub fn load(id: &str) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(Self::file_of(id)).ok()?).ok()
    }

    /// The ids of every container with a directory.
    pub fn ids() -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(oci_dir()) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = dir
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| valid_id(id))
            .collect();
        ids.sort();
        ids
    }

    /// Remembers the init process (with its start time, so a reused pid is not taken for it).
    pub fn set_init(&mut self, pid: u32) {
        self.pid = Some(pid);
        self.pid_start = start_time(pid);
    }

    /// Whether the recorded init still runs (a zombie does not count).
    pub fn init_alive(&self) -> bool {
        match (self.pid, self.pid_start) {
            (Some(pid), Some(start)) => start_time(pid) == Some(start),
            _ => false,
        }
    }

    /// The runtime's `state` of the container: Some(pid) (0 once stopped) when it knows
    /// it, None when it does not; an error when the runtime cannot be asked.
    pub fn runtime_state(&self) -> Result<Option<u32>, Error> {
        runtime_state(&self.runtime, &self.runtime_globals, &self.id)
    }
}

/// Runs `RUNTIME GLOBALS state ID`: Ok(Some(pid)) when it knows the container, Ok(None)
/// when it answers that it does not.
pub fn runtime_state(runtime: &Path, globals: &[String], id: &str) -> Result<Option<u32>, Error> {
    let out = Command::new(runtime)
        .args(globals)
        .args(["state", id])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Io {
            what: "cannot run the runtime",
            path: runtime.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Ok(None);
    }
    // Success without the container's state document says nothing either way.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    if v["id"] != id {
        return Err(Error::Io {
            what: "the runtime's `state` answered without the container's state",
            path: runtime.to_path_buf(),
            source: io::Error::from(io::ErrorKind::InvalidData),
        });
    }
    Ok(Some(
        v["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0),
    ))
}

/// An exclusive lock on one container's directory: a wrapper call holds it from the first
/// mount until the runtime has the container (or the mounts are gone), so `gc` never takes
/// a container that is being created for a dead one.
#[derive(Debug)]
pub struct Lock {
    _file: OwnedFd,
}

impl Lock {
    fn open(id: &str) -> Result<OwnedFd, Error> {
        let path = Container::dir_of(id).join("lock");
        rustix::fs::open(
            &path,
            OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| Error::Io {
            what: "cannot open the lock",
            path,
            source: e.into(),
        })
    }

    /// Waits for the lock.
    pub fn take(id: &str) -> Result<Self, Error> {
        let file = Self::open(id)?;
        loop {
            match rustix::fs::flock(&file, FlockOperation::LockExclusive) {
                Err(rustix::io::Errno::INTR) => continue,
                r => {
                    r.map_err(|e| Error::Io {
                        what: "cannot lock",
                        path: Container::dir_of(id),
                        source: io::Error::from(e),
                    })?;
                    return Ok(Self { _file: file });
                }
            }
        }
    }

    /// The lock if nobody holds it, else None.
    pub fn try_take(id: &str) -> Result<Option<Self>, Error> {
        let file = Self::open(id)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Self { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::Io {
                what: "cannot lock",
                path: Container::dir_of(id),
                source: e.into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_leave_the_directory_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "a\nb"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        for good in ["c1", "4f2a9e0b", "my_ctr.v2", "a+b-c"] {
            assert!(valid_id(good), "{good:?}");
        }
    }

    #[test]
    fn a_dead_or_unrecorded_init_is_not_alive() {
        let mut c = Container {
            id: "x".into(),
            runtime: "/bin/false".into(),
            runtime_globals: vec![],
            bundle: "/b".into(),
            pid: None,
            pid_start: None,
            mounts: vec![],
        };
        assert!(!c.init_alive());
        c.set_init(std::process::id());
        assert!(c.init_alive());
        c.pid_start = c.pid_start.map(|s| s + 1);
        assert!(!c.init_alive(), "a reused pid is not the init");
    }

    #[test]
    fn a_runtime_that_fails_state_does_not_know_the_container() {
        assert_eq!(
            runtime_state(Path::new("/bin/false"), &[], "c").unwrap(),
            None
        );
        assert!(runtime_state(Path::new("/nonexistent/runtime"), &[], "c").is_err());
        // `runc -v state c` prints the version and succeeds: no answer about the container.
        assert!(runtime_state(Path::new("/bin/echo"), &[], "c").is_err());
    }
}
