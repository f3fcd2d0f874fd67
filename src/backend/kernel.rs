//! The kernel backend: an idmapped mount (Linux >= 5.12). No daemon: the kernel translates
//! every id through the mount's user namespace, whose `uid_map`/`gid_map` are our map
//! (first column = on disk, second = what callers see).
//!
//! Steps, one function each: [`clone_tree`] (a detached copy of SOURCE), [`userns_fd`]
//! (a user namespace holding the map), [`set_idmap`] (one `mount_setattr` with IDMAP and
//! the VFS flags), [`attach`] (`move_mount` onto TARGET). [`probe`] runs the first three on
//! a throw-away tree to learn whether a source's filesystem supports idmapped mounts.
//!
//! A source that is itself an idmapped mount is cloned and re-idmapped in one step instead
//! ([`reidmap_tree`], `open_tree_attr`, Linux 6.15+; `mount_setattr` refuses to change an
//! idmapping). Its idmapping is replaced, not composed: the map goes from the filesystem's
//! own ids, as every shiftfs map does, whatever ids the source mount shows.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::AtFlags;
use rustix::io::Errno;
use rustix::mount::{MountAttrFlags, MoveMountFlags, OpenTreeFlags};

use crate::idmap::IdMapping;
use crate::mountinfo::fstype_name;
use crate::options::MountFlags;
use crate::resolve::Dir;
use crate::sys::mount::{AT_RECURSIVE, MountAttr, mount_setattr, open_tree_attr};
use crate::sys::userns::UsernsChild;

/// The first kernel with `mount_setattr` and `MOUNT_ATTR_IDMAP`.
pub const MIN_KERNEL: (u32, u32) = (5, 12);

/// The kernel accepts a map write only if it is shorter than a page.
const MAP_WRITE_MAX: usize = 4095;

/// Messages leave the cause to `source()`, so `{:#}` chains print each part once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the mount tree of {path}")]
    OpenTree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a user namespace for the map")]
    Userns {
        #[source]
        source: io::Error,
    },
    #[error(
        "the {name} text is {len} bytes; the kernel takes at most {MAP_WRITE_MAX}: use fewer or larger ranges"
    )]
    MapTooLong { name: &'static str, len: usize },
    #[error("cannot open the new user namespace {path}")]
    OpenNs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path} (map {text:?})")]
    WriteMap {
        path: PathBuf,
        text: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "filesystem {fstype} on {path} does not support idmapped mounts; use --backend fuse, or \
         idmap a `shiftfs mount --idmappable` mount of it"
    )]
    Unsupported {
        fstype: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is already an idmapped mount, and this kernel cannot re-idmap one \
         (open_tree_attr needs Linux 6.15+): shift the mount below it, or use --backend fuse"
    )]
    AlreadyIdmapped {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "not permitted to idmap {path}: it needs CAP_SYS_ADMIN over its filesystem (root in the \
         initial user namespace for a host filesystem)"
    )]
    NotPermitted {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("this kernel has no idmapped mounts (Linux >= 5.12 needed); use --backend fuse")]
    NoKernelSupport {
        #[source]
        source: io::Error,
    },
    #[error("cannot set the idmapping on the tree of {path}")]
    SetAttr {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the id maps of the mount at {path} (statmount needs Linux >= 6.15)")]
    Statmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the kernel reported an id map for {path} that shiftfs cannot read")]
    BadIdmap {
        path: PathBuf,
        #[source]
        source: crate::idmap::Error,
    },
    #[error("cannot attach the shifted tree of {src} at {target}")]
    MoveMount {
        src: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Resolve(#[from] crate::resolve::Error),
}

impl Error {
    /// The errno a caller (or a FUSE reply) should see for this error.
    pub fn errno(&self) -> Errno {
        let io = match self {
            Self::MapTooLong { .. } | Self::BadIdmap { .. } => return Errno::INVAL,
            Self::Resolve(e) => {
                return e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error);
            }
            Self::OpenTree { source, .. }
            | Self::Userns { source }
            | Self::OpenNs { source, .. }
            | Self::WriteMap { source, .. }
            | Self::Unsupported { source, .. }
            | Self::NotPermitted { source, .. }
            | Self::AlreadyIdmapped { source, .. }
            | Self::NoKernelSupport { source }
            | Self::SetAttr { source, .. }
            | Self::Statmount { source, .. }
            | Self::MoveMount { source, .. } => source,
        };
        io.raw_os_error()
            .map_or(Errno::IO, Errno::from_raw_os_error)
    }
}

/// Mounts SOURCE at TARGET with every owner id shifted through `mapping`: on-disk `d`
/// shows as `mapping.to_outer(d)`, a write by host id `h` stores `mapping.to_inner(h)`.
/// Both paths are opened once without following any symlink ([`Dir::open`]).
///
/// `flags` only add restrictions: a source mount that is already `ro`, `nosuid`, ... stays
/// so. `recursive` carries SOURCE's submounts along (each must support idmapped mounts).
/// Nothing is left behind on failure: the detached tree is freed when its fd closes.
pub fn mount(
    source: &Path,
    target: &Path,
    mapping: &IdMapping,
    flags: MountFlags,
    recursive: bool,
) -> Result<(), Error> {
    let source = Dir::open(source)?;
    let target = Dir::open(target)?;
    mount_at(&Syscalls, &source, &target, mapping, flags, recursive).map(drop)
}

/// [`mount`] of held directories through `api`: the call sequence, testable with a fake.
/// The tree is cloned from the SOURCE fd and moved onto the TARGET fd; no name is looked
/// up again. Returns the new mount's id (as in mountinfo), `None` if it cannot be read.
pub fn mount_at(
    api: &impl MountApi,
    source: &Dir,
    target: &Dir,
    mapping: &IdMapping,
    flags: MountFlags,
    recursive: bool,
) -> Result<Option<u64>, Error> {
    let tree = if api.is_idmapped(source.as_fd()) {
        let userns = api.userns_fd(mapping)?;
        reidmap_tree(api, source, userns.as_fd(), flags, recursive)?
    } else {
        let tree = clone_tree(api, source, recursive)?;
        let userns = api.userns_fd(mapping)?;
        set_idmap(api, tree.as_fd(), source, userns.as_fd(), flags, recursive)?;
        tree
    };
    attach(api, &tree, source.path(), target)?;
    tracing::info!(
        source = %source.path().display(),
        target = %target.path().display(),
        %mapping,
        "idmapped mount attached"
    );
    Ok(crate::mountinfo::mount_id_of(tree.as_fd()))
}

/// The system calls of the kernel backend.
pub trait MountApi {
    /// `open_tree(dir, "", flags | AT_EMPTY_PATH)`.
    fn open_tree(&self, dir: BorrowedFd<'_>, flags: OpenTreeFlags) -> io::Result<OwnedFd>;
    /// A user namespace holding `mapping`, see [`userns_fd`].
    fn userns_fd(&self, mapping: &IdMapping) -> Result<OwnedFd, Error>;
    /// `mount_setattr(tree, "", flags, attr)`.
    fn mount_setattr(
        &self,
        tree: BorrowedFd<'_>,
        flags: AtFlags,
        attr: &MountAttr<'_>,
    ) -> io::Result<()>;
    /// `move_mount(tree, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)`.
    fn move_mount(&self, tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()>;
    /// `open_tree_attr(dir, "", flags | AT_EMPTY_PATH, attr)`.
    fn open_tree_attr(
        &self,
        dir: BorrowedFd<'_>,
        flags: OpenTreeFlags,
        attr: &MountAttr<'_>,
    ) -> io::Result<OwnedFd>;
    /// Whether the mount `dir` is on is an idmapped mount.
    fn is_idmapped(&self, dir: BorrowedFd<'_>) -> bool;
}

/// The real system calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct Syscalls;

impl MountApi for Syscalls {
    fn open_tree(&self, dir: BorrowedFd<'_>, flags: OpenTreeFlags) -> io::Result<OwnedFd> {
        Ok(rustix::mount::open_tree(
            dir,
            c"",
            flags | OpenTreeFlags::AT_EMPTY_PATH,
        )?)
    }

    fn userns_fd(&self, mapping: &IdMapping) -> Result<OwnedFd, Error> {
        userns_fd(mapping)
    }

    fn mount_setattr(
        &self,
        tree: BorrowedFd<'_>,
        flags: AtFlags,
        attr: &MountAttr<'_>,
    ) -> io::Result<()> {
        mount_setattr(tree, c"", flags | AtFlags::EMPTY_PATH, attr)
    }

    fn move_mount(&self, tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
        Ok(rustix::mount::move_mount(
            tree,
            c"",
            target,
            c"",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )?)
    }

    fn open_tree_attr(
        &self,
        dir: BorrowedFd<'_>,
        flags: OpenTreeFlags,
        attr: &MountAttr<'_>,
    ) -> io::Result<OwnedFd> {
        open_tree_attr(dir, c"", flags | OpenTreeFlags::AT_EMPTY_PATH, attr)
    }

    fn is_idmapped(&self, dir: BorrowedFd<'_>) -> bool {
        let Some(id) = crate::mountinfo::mount_id_of(dir) else {
            return false;
        };
        crate::mountinfo::own_table()
            .is_some_and(|t| t.iter().any(|m| m.id == id && m.has_option("idmapped")))
    }
}

/// A detached copy of the mount at `source` (and its submounts if `recursive`): visible
/// nowhere until [`attach`]ed, freed when the fd is closed.
pub fn clone_tree(api: &impl MountApi, source: &Dir, recursive: bool) -> Result<OwnedFd, Error> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    api.open_tree(source.as_fd(), flags)
        .map_err(|source_err| Error::OpenTree {
            path: source.path().to_path_buf(),
            source: source_err,
        })
}

/// A detached copy of the idmapped mount at `source` (with its submounts if `recursive`)
/// whose idmapping is `userns`'s instead, with `flags` applied, in one `open_tree_attr`: the
/// copy never exists with the old idmapping or without the restrictions. Needs Linux 6.15.
pub fn reidmap_tree(
    api: &impl MountApi,
    source: &Dir,
    userns: BorrowedFd<'_>,
    flags: MountFlags,
    recursive: bool,
) -> Result<OwnedFd, Error> {
    let mut tree_flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        tree_flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let attr = MountAttr {
        set: mount_attr_flags(flags),
        clr: MountAttrFlags::empty(),
        userns: Some(userns),
    };
    api.open_tree_attr(source.as_fd(), tree_flags, &attr)
        .map_err(|e| {
            let path = source.path().to_path_buf();
            match e.raw_os_error() {
                // Before 6.15 there is no such call, and nothing else changes an idmapping.
                Some(libc::ENOSYS) => Error::AlreadyIdmapped { path, source: e },
                Some(libc::EPERM) => Error::NotPermitted { path, source: e },
                Some(libc::EINVAL) => Error::Unsupported {
                    fstype: fstype_name(&path),
                    path,
                    source: e,
                },
                _ => Error::SetAttr { path, source: e },
            }
        })
}

/// Why the kernel cannot take `mapping` as a user namespace map, if it cannot (its text
/// is longer than one write to `uid_map` may be).
pub fn map_unfit(mapping: &IdMapping) -> Option<String> {
    [
        ("uid_map", mapping.uid.to_proc_text()),
        ("gid_map", mapping.gid.to_proc_text()),
    ]
    .into_iter()
    .find(|(_, text)| text.len() > MAP_WRITE_MAX)
    .map(|(name, text)| {
        format!(
            "the {name} text is {} bytes; the kernel takes at most {MAP_WRITE_MAX}",
            text.len()
        )
    })
}

/// An fd of a fresh user namespace whose `uid_map`/`gid_map` are `mapping`. The helper
/// process that created it is killed and reaped before this returns; the fd alone keeps
/// the namespace alive, and an idmapped mount keeps its own reference.
pub fn userns_fd(mapping: &IdMapping) -> Result<OwnedFd, Error> {
    let uid_text = mapping.uid.to_proc_text();
    let gid_text = mapping.gid.to_proc_text();
    for (name, text) in [("uid_map", &uid_text), ("gid_map", &gid_text)] {
        if text.len() > MAP_WRITE_MAX {
            return Err(Error::MapTooLong {
                name,
                len: text.len(),
            });
        }
    }
    let child = UsernsChild::spawn().map_err(|source| Error::Userns { source })?;
    let proc_dir = PathBuf::from(format!("/proc/{}", child.pid().as_raw_nonzero()));
    // Root holds CAP_SETGID over the parent namespace, so gid_map may be written without
    // first denying setgroups.
    write_map(&proc_dir.join("uid_map"), uid_text)?;
    write_map(&proc_dir.join("gid_map"), gid_text)?;
    let ns = proc_dir.join("ns/user");
    let fd = rustix::fs::open(
        &ns,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| Error::OpenNs {
        path: ns.clone(),
        source: e.into(),
    })?;
    drop(child);
    Ok(fd)
}

/// The kernel wants the whole map in one `write`.
fn write_map(path: &Path, text: String) -> Result<(), Error> {
    let result = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| rustix::io::write(&f, text.as_bytes()).map_err(io::Error::from));
    match result {
        Ok(n) if n == text.len() => Ok(()),
        Ok(n) => Err(Error::WriteMap {
            path: path.to_path_buf(),
            text,
            source: io::Error::other(format!("short write of {n} bytes")),
        }),
        Err(source) => Err(Error::WriteMap {
            path: path.to_path_buf(),
            text,
            source,
        }),
    }
}

/// The `mount_setattr` attributes for `flags`: IDMAP plus the restrictions asked for.
pub fn mount_attr_flags(flags: MountFlags) -> MountAttrFlags {
    MountAttrFlags::MOUNT_ATTR_IDMAP | flags.mount_attrs()
}

/// Makes the detached `tree` idmapped through `userns` and applies `flags`, in one
/// `mount_setattr` so the tree never has the idmapping without the restrictions.
/// `source` is only for messages.
pub fn set_idmap(
    api: &impl MountApi,
    tree: BorrowedFd<'_>,
    source: &Dir,
    userns: BorrowedFd<'_>,
    flags: MountFlags,
    recursive: bool,
) -> Result<(), Error> {
    let at = if recursive {
        AT_RECURSIVE
    } else {
        AtFlags::empty()
    };
    let attr = MountAttr {
        set: mount_attr_flags(flags),
        clr: MountAttrFlags::empty(),
        userns: Some(userns),
    };
    api.mount_setattr(tree, at, &attr).map_err(|e| {
        // A recursive call fails as a whole: name the submount that cannot be idmapped.
        if recursive
            && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EPERM))
            && let Some(err) = failing_submount(api, source, userns)
        {
            return err;
        }
        classify(e, source.path())
    })
}

fn classify(e: io::Error, path: &Path) -> Error {
    let path = path.to_path_buf();
    match e.raw_os_error() {
        // Our attr struct, flags and fresh detached tree are valid, so EINVAL means the
        // filesystem lacks FS_ALLOW_IDMAP.
        Some(libc::EINVAL) => Error::Unsupported {
            fstype: fstype_name(&path),
            path,
            source: e,
        },
        Some(libc::EPERM) if is_idmapped(&path) => Error::AlreadyIdmapped { path, source: e },
        Some(libc::EPERM) => Error::NotPermitted { path, source: e },
        Some(libc::ENOSYS) => Error::NoKernelSupport { source: e },
        _ => Error::SetAttr { path, source: e },
    }
}

fn is_idmapped(path: &Path) -> bool {
    crate::mountinfo::mount_of(path, Path::new(crate::mountinfo::SELF_MOUNTINFO))
        .is_ok_and(|m| m.has_option("idmapped"))
}

/// The first mount below `source` that refuses an idmapping on its own, as an error.
fn failing_submount(api: &impl MountApi, source: &Dir, userns: BorrowedFd<'_>) -> Option<Error> {
    let root = source.path();
    let mounts = crate::mountinfo::own_table()?;
    let attr = MountAttr {
        set: MountAttrFlags::MOUNT_ATTR_IDMAP,
        clr: MountAttrFlags::empty(),
        userns: Some(userns),
    };
    mounts
        .iter()
        .filter(|m| m.mount_point != root && m.mount_point.starts_with(root))
        .find_map(|m| {
            let sub = Dir::open(&m.mount_point).ok()?;
            let tree = clone_tree(api, &sub, false).ok()?;
            let e = api
                .mount_setattr(tree.as_fd(), AtFlags::empty(), &attr)
                .err()?;
            Some(classify(e, &m.mount_point))
        })
}

/// Moves the detached `tree` onto `target`, where it becomes visible.
pub fn attach(
    api: &impl MountApi,
    tree: &OwnedFd,
    source: &Path,
    target: &Dir,
) -> Result<(), Error> {
    api.move_mount(tree.as_fd(), target.as_fd())
        .map_err(|e| Error::MoveMount {
            src: source.to_path_buf(),
            target: target.path().to_path_buf(),
            source: e,
        })
}

/// The id mapping of the idmapped mount `path` is on, `None` if that mount is not idmapped.
/// Outer ids are as this process sees them. Needs Linux >= 6.15 (`statmount` with
/// `STATMOUNT_MNT_UIDMAP`); older kernels give [`Error::Statmount`].
pub fn mount_idmapping(path: &Path) -> Result<Option<IdMapping>, Error> {
    let statmount_err = |source: io::Error| Error::Statmount {
        path: path.to_path_buf(),
        source,
    };
    let st = rustix::fs::statx(
        rustix::fs::CWD,
        path,
        AtFlags::empty(),
        rustix::fs::StatxFlags::from_bits_retain(crate::sys::statmount::STATX_MNT_ID_UNIQUE),
    )
    .map_err(|e| statmount_err(e.into()))?;
    if st.stx_mask & crate::sys::statmount::STATX_MNT_ID_UNIQUE == 0 {
        return Err(statmount_err(io::Error::from_raw_os_error(libc::ENOSYS)));
    }
    let maps = crate::sys::statmount::statmount_idmaps(st.stx_mnt_id).map_err(statmount_err)?;
    if !maps.idmapped {
        return Ok(None);
    }
    IdMapping::parse_separate(&maps.uid.join("\n"), &maps.gid.join("\n"))
        .map(Some)
        .map_err(|source| Error::BadIdmap {
            path: path.to_path_buf(),
            source,
        })
}

/// What [`probe`] found out about one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub supported: bool,
    /// Why not, or what was seen (e.g. "ext4 supports idmapped mounts").
    pub reason: String,
    /// The source's filesystem type as mount(8) names it (`ext4`, `fuse.bindfs`, ...).
    pub fstype: String,
    /// What the user can do about it, when not supported.
    pub advice: Option<String>,
}

/// Whether an idmapped mount of `source` would work here: kernel version, CAP_SYS_ADMIN,
/// then a real `open_tree` + `mount_setattr(IDMAP)` on a detached copy that is never
/// attached anywhere and is freed on return. Leaves nothing mounted and no process behind.
pub fn probe(source: &Path) -> Probe {
    probe_tree(source, false)
}

/// [`probe`] for a `--recursive` mount: every mount under `source` must support idmapped
/// mounts, and the reason names the first one that does not.
pub fn probe_tree(source: &Path, recursive: bool) -> Probe {
    match Dir::open(source) {
        Ok(dir) => probe_dir(&dir, recursive),
        Err(e) => Probe {
            supported: false,
            reason: e.to_string(),
            fstype: fstype_name(source),
            advice: Some("check SOURCE, or use --backend fuse".to_string()),
        },
    }
}

/// [`probe_tree`] of a held directory.
pub fn probe_dir(source: &Dir, recursive: bool) -> Probe {
    let fstype = fstype_name(source.path());
    let no = |reason: String, advice: &str| Probe {
        supported: false,
        reason,
        fstype: fstype.clone(),
        advice: Some(advice.to_string()),
    };
    let release = kernel_release();
    match parse_kernel_version(&release) {
        Some(v) if v < MIN_KERNEL => {
            return no(
                format!("kernel {release} is older than 5.12, which introduced idmapped mounts"),
                "use --backend fuse, or upgrade the kernel",
            );
        }
        _ => {}
    }
    if !has_cap_sys_admin() {
        return no(
            "this process lacks CAP_SYS_ADMIN, which idmapped mounts need".to_string(),
            "run shiftfs as root, or use --backend fuse",
        );
    }
    let attempt = || -> Result<(), Error> {
        if Syscalls.is_idmapped(source.as_fd()) {
            let userns = userns_fd(&IdMapping::identity())?;
            let flags = MountFlags::default();
            return reidmap_tree(&Syscalls, source, userns.as_fd(), flags, recursive).map(drop);
        }
        let tree = clone_tree(&Syscalls, source, recursive)?;
        let userns = userns_fd(&IdMapping::identity())?;
        set_idmap(
            &Syscalls,
            tree.as_fd(),
            source,
            userns.as_fd(),
            MountFlags::default(),
            recursive,
        )
    };
    match attempt() {
        Ok(()) => Probe {
            supported: true,
            reason: format!("{fstype} supports idmapped mounts"),
            fstype,
            advice: None,
        },
        Err(Error::Unsupported {
            fstype: culprit,
            path,
            ..
        }) if path != source.path() => no(
            format!(
                "{culprit} mounted at {} does not support idmapped mounts",
                path.display()
            ),
            "use --backend fuse, or leave out --recursive",
        ),
        Err(Error::Unsupported { .. }) => no(
            format!("{fstype} does not support idmapped mounts"),
            "use --backend fuse, or idmap a `shiftfs mount --idmappable` mount of it",
        ),
        Err(e @ Error::NotPermitted { .. }) => no(
            with_causes(&e),
            "run as root in the initial user namespace, or use --backend fuse",
        ),
        Err(Error::AlreadyIdmapped { path, .. }) => no(
            format!(
                "{} is already an idmapped mount, and this kernel cannot re-idmap one \
                 (Linux 6.15+)",
                path.display()
            ),
            "shift the mount below it, or use --backend fuse",
        ),
        Err(e @ Error::NoKernelSupport { .. }) => {
            no(with_causes(&e), "use --backend fuse, or upgrade the kernel")
        }
        Err(e) => no(with_causes(&e), "check SOURCE, or use --backend fuse"),
    }
}

/// `error: cause: cause ...` on one line.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// `uname -r`.
pub fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// `(major, minor)` of a release string like `6.18.44-fc-v669`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether this thread has CAP_SYS_ADMIN in its effective set.
pub fn has_cap_sys_admin() -> bool {
    rustix::thread::capabilities(None).is_ok_and(|c| {
        c.effective
            .contains(rustix::thread::CapabilitySet::SYS_ADMIN)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Debug, PartialEq, Eq)]
    enum Call {
        OpenTree((u64, u64), OpenTreeFlags),
        Userns(String, String),
        SetAttr {
            recursive: bool,
            set: MountAttrFlags,
            clr: MountAttrFlags,
            userns: bool,
        },
        MoveMount((u64, u64)),
        OpenTreeAttr {
            dir: (u64, u64),
            flags: OpenTreeFlags,
            set: MountAttrFlags,
            userns: bool,
        },
    }

    fn ino(fd: BorrowedFd<'_>) -> (u64, u64) {
        let st = rustix::fs::fstat(fd).unwrap();
        (st.st_dev, st.st_ino)
    }

    /// Two real directories: the fake records which fd each call was given.
    fn dirs() -> (tempfile::TempDir, Dir, Dir) {
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir(base.path().join("src")).unwrap();
        std::fs::create_dir(base.path().join("dst")).unwrap();
        let src = Dir::open(&base.path().join("src")).unwrap();
        let dst = Dir::open(&base.path().join("dst")).unwrap();
        (base, src, dst)
    }

    /// Records the calls; `mount_setattr` fails with `setattr_errno` if set.
    #[derive(Default)]
    struct Fake {
        calls: RefCell<Vec<Call>>,
        setattr_errno: Option<i32>,
        /// The source is an idmapped mount; `open_tree_attr` fails with this errno if set.
        idmapped: bool,
        attr_errno: Option<i32>,
    }

    fn null_fd() -> io::Result<OwnedFd> {
        Ok(std::fs::File::open("/dev/null")?.into())
    }

    impl MountApi for Fake {
        fn open_tree(&self, dir: BorrowedFd<'_>, flags: OpenTreeFlags) -> io::Result<OwnedFd> {
            self.calls
                .borrow_mut()
                .push(Call::OpenTree(ino(dir), flags));
            null_fd()
        }
        fn userns_fd(&self, mapping: &IdMapping) -> Result<OwnedFd, Error> {
            self.calls.borrow_mut().push(Call::Userns(
                mapping.uid.to_proc_text(),
                mapping.gid.to_proc_text(),
            ));
            null_fd().map_err(|source| Error::Userns { source })
        }
        fn mount_setattr(
            &self,
            _tree: BorrowedFd<'_>,
            flags: AtFlags,
            attr: &MountAttr<'_>,
        ) -> io::Result<()> {
            self.calls.borrow_mut().push(Call::SetAttr {
                recursive: flags.contains(AT_RECURSIVE),
                set: attr.set,
                clr: attr.clr,
                userns: attr.userns.is_some(),
            });
            self.setattr_errno
                .map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
        }
        fn move_mount(&self, _tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
            self.calls.borrow_mut().push(Call::MoveMount(ino(target)));
            Ok(())
        }
        fn open_tree_attr(
            &self,
            dir: BorrowedFd<'_>,
            flags: OpenTreeFlags,
            attr: &MountAttr<'_>,
        ) -> io::Result<OwnedFd> {
            self.calls.borrow_mut().push(Call::OpenTreeAttr {
                dir: ino(dir),
                flags,
                set: attr.set,
                userns: attr.userns.is_some(),
            });
            match self.attr_errno {
                Some(e) => Err(io::Error::from_raw_os_error(e)),
                None => null_fd(),
            }
        }
        fn is_idmapped(&self, _dir: BorrowedFd<'_>) -> bool {
            self.idmapped
        }
    }

    fn map() -> IdMapping {
        IdMapping::parse("u:0:100000:65536 g:0:200000:1000").unwrap()
    }

    #[test]
    fn mount_is_clone_userns_one_setattr_move() {
        for recursive in [false, true] {
            let fake = Fake::default();
            let (_base, src, dst) = dirs();
            mount_at(&fake, &src, &dst, &map(), MountFlags::default(), recursive).unwrap();
            let mut tree_flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
            if recursive {
                tree_flags |= OpenTreeFlags::AT_RECURSIVE;
            }
            assert_eq!(
                fake.calls.into_inner(),
                vec![
                    Call::OpenTree(src.id().unwrap(), tree_flags),
                    Call::Userns("0 100000 65536\n".into(), "0 200000 1000\n".into()),
                    Call::SetAttr {
                        recursive,
                        set: MountAttrFlags::MOUNT_ATTR_IDMAP
                            | MountAttrFlags::MOUNT_ATTR_NOSUID
                            | MountAttrFlags::MOUNT_ATTR_NODEV,
                        clr: MountAttrFlags::empty(),
                        userns: true,
                    },
                    Call::MoveMount(dst.id().unwrap()),
                ]
            );
        }
    }

    #[test]
    fn idmapped_source_is_reidmapped_in_one_call() {
        let fake = Fake {
            idmapped: true,
            ..Fake::default()
        };
        let (_base, src, dst) = dirs();
        let flags = MountFlags {
            read_only: true,
            ..MountFlags::default()
        };
        mount_at(&fake, &src, &dst, &map(), flags, true).unwrap();
        assert_eq!(
            fake.calls.into_inner(),
            vec![
                Call::Userns("0 100000 65536\n".into(), "0 200000 1000\n".into()),
                Call::OpenTreeAttr {
                    dir: src.id().unwrap(),
                    flags: OpenTreeFlags::OPEN_TREE_CLONE
                        | OpenTreeFlags::OPEN_TREE_CLOEXEC
                        | OpenTreeFlags::AT_RECURSIVE,
                    set: MountAttrFlags::MOUNT_ATTR_IDMAP
                        | MountAttrFlags::MOUNT_ATTR_RDONLY
                        | MountAttrFlags::MOUNT_ATTR_NOSUID
                        | MountAttrFlags::MOUNT_ATTR_NODEV,
                    userns: true,
                },
                Call::MoveMount(dst.id().unwrap()),
            ]
        );
    }

    #[test]
    fn reidmap_on_an_old_kernel_says_so_and_attaches_nothing() {
        let fake = Fake {
            idmapped: true,
            attr_errno: Some(libc::ENOSYS),
            ..Fake::default()
        };
        let (_base, src, dst) = dirs();
        let err = mount_at(&fake, &src, &dst, &map(), MountFlags::default(), false).unwrap_err();
        assert!(matches!(err, Error::AlreadyIdmapped { .. }), "{err:?}");
        assert!(err.to_string().contains("Linux 6.15"), "{err}");
        let calls = fake.calls.into_inner();
        assert!(
            !calls.iter().any(|c| matches!(c, Call::MoveMount(_))),
            "{calls:?}"
        );
    }

    #[test]
    fn failed_setattr_attaches_nothing() {
        let fake = Fake {
            setattr_errno: Some(libc::EINVAL),
            ..Fake::default()
        };
        let (_base, src, dst) = dirs();
        let err = mount_at(&fake, &src, &dst, &map(), MountFlags::default(), false).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
        assert_eq!(err.errno(), Errno::INVAL);
        assert!(err.to_string().contains("--backend fuse"), "{err}");
        let calls = fake.calls.into_inner();
        assert!(
            !calls.iter().any(|c| matches!(c, Call::MoveMount(_))),
            "{calls:?}"
        );
    }

    #[test]
    fn map_too_long_for_one_write_is_refused() {
        let spec: Vec<String> = (0..300)
            .map(|i| format!("b:{}:{}:1", i * 2 + 1_000_000_000, i * 2 + 3_000_000_000u32))
            .collect();
        let m = IdMapping::parse(&spec.join(",")).unwrap();
        let err = userns_fd(&m).unwrap_err();
        assert!(matches!(err, Error::MapTooLong { .. }), "{err:?}");
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.12.0"), Some((5, 12)));
        assert_eq!(parse_kernel_version("5.4"), Some((5, 4)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert!(parse_kernel_version("5.11.22").is_some_and(|v| v < MIN_KERNEL));
        assert!(parse_kernel_version("5.12.1").is_some_and(|v| v >= MIN_KERNEL));
    }

    #[test]
    fn default_flags_are_idmap_nosuid_nodev() {
        let f = mount_attr_flags(MountFlags::default());
        assert_eq!(
            f,
            MountAttrFlags::MOUNT_ATTR_IDMAP
                | MountAttrFlags::MOUNT_ATTR_NOSUID
                | MountAttrFlags::MOUNT_ATTR_NODEV
        );
        let all = mount_attr_flags(MountFlags {
            read_only: true,
            suid: true,
            dev: true,
            exec: false,
        });
        assert_eq!(
            all,
            MountAttrFlags::MOUNT_ATTR_IDMAP
                | MountAttrFlags::MOUNT_ATTR_RDONLY
                | MountAttrFlags::MOUNT_ATTR_NOEXEC
        );
    }
}
