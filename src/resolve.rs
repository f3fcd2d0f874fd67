//! Turning the SOURCE and TARGET a user names into held `O_PATH` fds, once, at the edge.
//!
//! Everything after this works on the fds: a container that swaps a directory for a
//! symlink after the check cannot redirect the mount. No symlink is followed anywhere in
//! either path (`RESOLVE_NO_SYMLINKS`): a runtime mounting into a rootfs that the container
//! writes must not be sent elsewhere by a link the container planted. Inside a given root
//! (`--target-root`), links are resolved as if that root were `/` (`RESOLVE_IN_ROOT`), so
//! they can never leave it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxAttributes, StatxFlags};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path}: {link} is a symbolic link (to {to}); shiftfs follows no symlink when mounting: pass the real path"
    )]
    Symlink {
        path: PathBuf,
        link: PathBuf,
        to: PathBuf,
    },
    #[error("{0}: does not exist")]
    NotFound(PathBuf),
    #[error("{0}: is not a directory")]
    NotDir(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// What is wrong, without the path the message starts with.
    pub fn reason(&self) -> String {
        match self {
            Error::Symlink { link, to, .. } => format!(
                "{} is a symbolic link (to {}); shiftfs follows no symlink when mounting: pass the real path",
                link.display(),
                to.display()
            ),
            Error::NotFound(_) => "does not exist".into(),
            Error::NotDir(_) => "is not a directory".into(),
            Error::Io { source, .. } => source.to_string(),
        }
    }

    /// The errno a caller would have seen from the failing lookup.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Symlink { .. } => Some(libc::ELOOP),
            Error::NotFound(_) => Some(libc::ENOENT),
            Error::NotDir(_) => Some(libc::ENOTDIR),
            Error::Io { source, .. } => source.raw_os_error(),
        }
    }
}

/// A directory held as an `O_PATH` fd, with the name it had when it was opened (for
/// messages and records only: nothing is ever looked up by that name again).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Dir {
    /// Opens the directory `path` without following any symlink on the way.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let path = absolute(path);
        let fd = openat2_dir(rustix::fs::CWD, &path, ResolveFlags::NO_SYMLINKS)
            .map_err(|e| explain(e, &path, &path))?;
        Ok(Self { fd, path })
    }

    /// Opens `path` inside `root` as if `root` were `/`: symlinks are followed but can
    /// never lead out of `root`, and `..` stops at it.
    pub fn open_in(root: &Dir, path: &Path) -> Result<Self, Error> {
        let shown = root.path.join(path.strip_prefix("/").unwrap_or(path));
        let fd = openat2_dir(root, path, ResolveFlags::IN_ROOT)
            .map_err(|e| explain(e, &shown, &shown))?;
        // The name the kernel gives it, since links inside the root may have been followed.
        let path = crate::sys::procfd::fd_path(fd.as_fd()).unwrap_or(shown);
        Ok(Self { fd, path })
    }

    /// Takes a directory fd handed over by a parent process, checking that it is one.
    pub fn from_fd(fd: OwnedFd, path: PathBuf) -> Result<Self, Error> {
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(Error::NotDir(path));
        }
        Ok(Self { fd, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The (device, inode) of the directory.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        let st = rustix::fs::fstat(&self.fd)?;
        Ok((st.st_dev, st.st_ino))
    }

    /// The id of the mount this directory is on (as in mountinfo), and whether it is that
    /// mount's root.
    pub fn mount(&self) -> io::Result<(u64, bool)> {
        let st = rustix::fs::statx(&self.fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
        let root = st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
            && st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
        Ok((st.stx_mnt_id, root))
    }

    /// Whether the directory has no entries.
    pub fn is_empty(&self) -> Result<bool, Error> {
        let io_err = |e: rustix::io::Errno| Error::Io {
            path: self.path.clone(),
            source: e.into(),
        };
        let dir = rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)?;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
        let mut entries = rustix::fs::RawDir::new(&dir, &mut buf);
        while let Some(entry) = entries.next() {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether this directory is `other` or lies below it, found by walking `..` from the
    /// fd up to the root (crossing mounts), never by comparing names.
    pub fn is_within(&self, other: &Dir) -> io::Result<bool> {
        let want = other.id()?;
        let mut cur = rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        loop {
            let st = rustix::fs::fstat(&cur)?;
            if (st.st_dev, st.st_ino) == want {
                return Ok(true);
            }
            let parent = rustix::fs::openat(
                &cur,
                "..",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let pst = rustix::fs::fstat(&parent)?;
            if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino) {
                return Ok(false);
            }
            cur = parent;
        }
    }
}

fn openat2_dir(dir: impl AsFd, path: &Path, resolve: ResolveFlags) -> rustix::io::Result<OwnedFd> {
    loop {
        match rustix::fs::openat2(
            &dir,
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            r => return r,
        }
    }
}

/// Turns a failed lookup of `path` into an error that names the culprit.
fn explain(e: rustix::io::Errno, path: &Path, shown: &Path) -> Error {
    match e {
        rustix::io::Errno::LOOP => match first_symlink(path) {
            Some((link, to)) => Error::Symlink {
                path: shown.to_path_buf(),
                link,
                to,
            },
            None => Error::Io {
                path: shown.to_path_buf(),
                source: e.into(),
            },
        },
        rustix::io::Errno::NOENT => Error::NotFound(shown.to_path_buf()),
        rustix::io::Errno::NOTDIR => Error::NotDir(shown.to_path_buf()),
        e => Error::Io {
            path: shown.to_path_buf(),
            source: e.into(),
        },
    }
}

/// The first component of `path` that is a symlink, and what it points to; for the
/// message only (the lookup has already been refused).
fn first_symlink(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut cur = PathBuf::from("/");
    for c in path.components() {
        if let Component::Normal(n) = c {
            cur.push(n);
            if let Ok(to) = std::fs::read_link(&cur) {
                return Some((cur, to));
            }
        }
    }
    None
}

/// Makes a path absolute without touching the file system, folding `.` and `..` by name
/// (sound here, since no symlink in it will be followed).
pub fn absolute(path: &Path) -> PathBuf {
    let base = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"))
    };
    let mut out = base;
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_anywhere_is_refused_and_named() {
        let base = tempfile::tempdir().unwrap();
        let real = base.path().join("real");
        std::fs::create_dir_all(real.join("sub")).unwrap();
        std::os::unix::fs::symlink(&real, base.path().join("link")).unwrap();
        let err = Dir::open(&base.path().join("link/sub")).unwrap_err();
        match &err {
            Error::Symlink { link, to, .. } => {
                assert_eq!(link, &base.path().join("link"));
                assert_eq!(to, &real);
            }
            other => panic!("expected a symlink error, got {other:?}"),
        }
        assert!(err.to_string().contains("pass the real path"), "{err}");
        assert!(Dir::open(&real.join("sub")).is_ok());
    }

    #[test]
    fn in_root_links_stay_inside() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("rootfs");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(base.path().join("etc")).unwrap();
        // An absolute link planted in the rootfs means the rootfs' own /etc.
        std::os::unix::fs::symlink("/etc", root.join("data")).unwrap();
        let r = Dir::open(&root).unwrap();
        let d = Dir::open_in(&r, Path::new("/data")).unwrap();
        assert_eq!(
            d.id().unwrap(),
            Dir::open(&root.join("etc")).unwrap().id().unwrap()
        );
        assert_eq!(d.path(), root.join("etc"));
        std::os::unix::fs::symlink("../../..", root.join("up")).unwrap();
        let up = Dir::open_in(&r, Path::new("up")).unwrap();
        assert_eq!(up.id().unwrap(), r.id().unwrap());
    }

    #[test]
    fn within_walks_parents_and_emptiness() {
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("a/b/c")).unwrap();
        let a = Dir::open(&base.path().join("a")).unwrap();
        let c = Dir::open(&base.path().join("a/b/c")).unwrap();
        assert!(c.is_within(&a).unwrap());
        assert!(a.is_within(&a).unwrap());
        assert!(!a.is_within(&c).unwrap());
        assert!(c.is_empty().unwrap());
        assert!(!a.is_empty().unwrap());
        assert!(matches!(
            Dir::open(&base.path().join("nope")),
            Err(Error::NotFound(_))
        ));
    }
}
