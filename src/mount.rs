//! Mount setup (SOURCE and TARGET resolved once into fds, then checked), backend choice, the
//! kernel mount and its record, the kernel mounts stacked on a source's shared idmappable
//! FUSE mount (which lives as long as records name it), and unmounting. Both `shiftfs mount` and the `mount.shiftfs` helper go through here.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::mount::UnmountFlags;

use crate::mountinfo::{self, MountInfo};
use crate::options::{Backend, FUSE_TYPE, Request, Share};
pub use crate::registry::{Record, TargetLock, run_dir};
use crate::resolve::Dir;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Options(#[from] crate::options::Error),
    #[error("source {0}: {1}")]
    Source(PathBuf, String),
    #[error("target {0}: {1}")]
    Target(PathBuf, String),
    #[error("this needs root (CAP_SYS_ADMIN); run shiftfs as root, e.g. with sudo")]
    NotRoot,
    #[error("{path} is already a shifted mount (of {of}); run shiftfs umount {path} first")]
    AlreadyMounted { path: PathBuf, of: String },
    #[error(
        "/dev/fuse is not usable ({0}); load the fuse module (modprobe fuse) or use --backend kernel"
    )]
    NoFuse(io::Error),
    #[error(
        "the kernel backend cannot serve {path}: {reason}; use --backend fuse or --backend auto"
    )]
    KernelUnsupported { path: PathBuf, reason: String },
    #[error(transparent)]
    Kernel(#[from] crate::backend::kernel::Error),
    #[error(transparent)]
    Fuse(#[from] crate::backend::fuse::Error),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::Error),
    /// What the serving process reported to its supervisor.
    #[error("{0}")]
    Daemon(String),
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error("{path} is not mounted")]
    NotMounted { path: PathBuf },
    #[error("{path} is a {fstype} mount shiftfs did not make, not a shifted mount; use umount(8)")]
    NotShifted { path: PathBuf, fstype: String },
    #[error("{path} is busy (files are open or processes use it); close them, or use --lazy")]
    Busy { path: PathBuf },
    #[error(
        "{path} has idmapped mounts stacked on it ({}), which stop working with its daemon; \
         unmount them first, or use --lazy to leave the daemon serving them",
        .stacked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Stacked {
        path: PathBuf,
        stacked: Vec<PathBuf>,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Makes a path absolute without touching the file system (a dead FUSE mount cannot be
/// stat'ed, so canonicalize is not an option for unmounting).
pub fn absolute(path: &Path) -> PathBuf {
    crate::resolve::absolute(path)
}

/// SOURCE and TARGET of a checked request, held as fds: the mount is made onto these, and
/// no name is looked up again.
#[derive(Debug)]
pub struct Resolved {
    pub source: Dir,
    pub target: Dir,
}

/// Opens SOURCE and TARGET once, without following any symlink (TARGET inside
/// `target_root` if given); `req` is updated to the names the kernel gives them. Every later
/// check and the mount itself work on these fds.
pub fn resolve(req: &mut Request) -> Result<Resolved, Error> {
    if !rustix::process::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    let source =
        Dir::open(&req.source).map_err(|e| Error::Source(req.source.clone(), e.reason()))?;
    let target_err = |path: &Path, e: crate::resolve::Error| {
        let reason = match e.raw_os_error() {
            Some(libc::ENOENT) => "does not exist; create it first (mkdir -p)".into(),
            Some(libc::ENOTCONN) => {
                "is a dead shifted mount (its daemon exited); run shiftfs umount on it".into()
            }
            _ => e.reason(),
        };
        Error::Target(path.to_path_buf(), reason)
    };
    let target = match &req.target_root {
        Some(root) => {
            let root = Dir::open(root).map_err(|e| target_err(root, e))?;
            Dir::open_in(&root, &req.target).map_err(|e| target_err(&req.target, e))?
        }
        None => Dir::open(&req.target).map_err(|e| target_err(&req.target, e))?,
    };
    req.source = source.path().to_path_buf();
    req.target = target.path().to_path_buf();
    Ok(Resolved { source, target })
}

/// Checks what can be checked before any backend runs, so each mistake gets one clear line.
/// Call it holding the target's [`TargetLock`], so that no other mount lands between the
/// check and the mount.
pub fn check(req: &Request, dirs: &Resolved) -> Result<(), Error> {
    let Resolved { source, target } = dirs;
    let tgt = req.target.clone();
    if let Some(m) = shifted_mount_at(target) {
        let of = Record::of(&m)
            .map(|r| r.source.display().to_string())
            .unwrap_or(m.source);
        return Err(Error::AlreadyMounted { path: tgt, of });
    }
    if !target
        .is_empty()
        .map_err(|e| Error::Target(tgt.clone(), e.reason()))?
    {
        return Err(Error::Target(
            tgt,
            "is not empty; mount on an empty directory".into(),
        ));
    }
    let inside = target
        .is_within(source)
        .map_err(|e| Error::Target(tgt.clone(), e.to_string()))?;
    if source.id().ok() == target.id().ok() || inside && req.recursive {
        return Err(Error::Target(
            tgt,
            "lies inside the source; pick a target outside it".into(),
        ));
    }
    Ok(())
}

/// The shifted mount whose root `dir` is, if any.
fn shifted_mount_at(dir: &Dir) -> Option<MountInfo> {
    let (id, root) = dir.mount().ok()?;
    if !root {
        return None;
    }
    mountinfo::own_table()?
        .into_iter()
        .find(|m| m.id == id)
        .filter(is_shifted)
}

/// Fails early, with advice, when the FUSE device cannot be opened.
pub fn check_fuse_device() -> Result<(), Error> {
    crate::sys::fusedev::open_dev_fuse()
        .map(drop)
        .map_err(Error::NoFuse)
}

/// The backend to use and why.
pub fn choose_backend(req: &Request, dirs: &Resolved) -> Result<(Backend, String), Error> {
    let (backend, reason) = pick_backend(req, dirs)?;
    // An option the chosen backend would ignore is a mistake worth one clear line.
    if let (Backend::Kernel, Some(opt)) = (backend, req.fuse.given.first()) {
        return Err(crate::options::Error::BadOption {
            option: opt.clone(),
            reason: format!(
                "only the FUSE backend has it, and the kernel backend was chosen ({reason}); \
                 drop it or add --backend fuse"
            ),
        }
        .into());
    }

    // The daemon reaches the source through fds that cross mounts, so below the target it
    // would find its own mount again, without end, and hold it busy for ever.
    if backend == Backend::Fuse && dirs.target.is_within(&dirs.source).unwrap_or(true) {
        return Err(Error::Target(
            req.target.clone(),
            "lies inside the source, which the FUSE backend cannot serve; pick a target outside it"
                .into(),
        ));
    }
    Ok((backend, reason))
}

fn pick_backend(req: &Request, dirs: &Resolved) -> Result<(Backend, String), Error> {
    match req.backend {
        Backend::Fuse if req.fuse.idmappable => Ok((
            Backend::Fuse,
            "idmappable: unshifted, for an idmapped mount on top".into(),
        )),
        Backend::Fuse => Ok((Backend::Fuse, "asked for with --backend fuse".into())),
        Backend::Kernel => {
            let p = crate::backend::kernel::probe_dir(&dirs.source, req.recursive);
            if p.supported {
                Ok((Backend::Kernel, p.reason))
            } else {
                Err(Error::KernelUnsupported {
                    path: req.source.clone(),
                    reason: p.reason,
                })
            }
        }
        Backend::Auto => {
            if let Some(reason) = crate::backend::kernel::map_unfit(&req.mapping) {
                return Ok((
                    Backend::Fuse,
                    format!("kernel idmapped mount not possible: {reason}"),
                ));
            }
            let p = crate::backend::kernel::probe_dir(&dirs.source, req.recursive);
            if p.supported {
                Ok((Backend::Kernel, p.reason))
            } else if over_shared_fuse(req) {
                Ok((
                    Backend::Fuse,
                    format!(
                        "kernel idmapped mount not possible: {}; a kernel idmapped mount of \
                         the source's shared idmappable FUSE mount instead",
                        p.reason
                    ),
                ))
            } else {
                Ok((
                    Backend::Fuse,
                    format!("kernel idmapped mount not possible: {}", p.reason),
                ))
            }
        }
    }
}

/// Whether `req`, bound for the FUSE backend, is served by a kernel idmapped mount of the
/// source's shared idmappable FUSE mount (`-o share=idmap`, or the default where the backend
/// was left to choose and the kernel can idmap FUSE mounts): one daemon and one cache for
/// every map, instead of a shifting FUSE session per mount.
pub fn over_shared_fuse(req: &Request) -> bool {
    let asked = match req.fuse.share {
        Share::Idmap => req.backend != Backend::Kernel,
        Share::Auto => req.backend == Backend::Auto,
        Share::Sessions | Share::Off => false,
    };
    asked
        && !req.fuse.idmappable
        && crate::backend::kernel::map_unfit(&req.mapping).is_none()
        && kernel_idmaps_fuse()
}

/// FUSE servers may opt in to idmapped mounts since Linux 6.12 (`FUSE_ALLOW_IDMAP`).
fn kernel_idmaps_fuse() -> bool {
    crate::backend::kernel::parse_kernel_version(&crate::backend::kernel::kernel_release())
        .is_some_and(|v| v >= (6, 12))
}

/// The directory of the shared idmappable FUSE mounts (one per source, see
/// [`mount_over_shared`]).
pub fn shared_dir() -> PathBuf {
    run_dir().join("shared")
}

/// Where the shared idmappable FUSE mount of the source `dirs.source` is kept: a directory
/// only root can reach, one per source directory, sandbox mode and `--recursive`.
fn shared_mount_dir(req: &Request, source: &Dir) -> Result<PathBuf, Error> {
    let (dev, ino) = source.id().map_err(|source| Error::Io {
        what: "cannot identify the source",
        path: req.source.clone(),
        source,
    })?;
    let base = shared_dir();
    let err = |source| Error::Io {
        what: "cannot make the directory of shared mounts",
        path: base.clone(),
        source,
    };
    std::fs::create_dir_all(&base).map_err(err)?;
    std::fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(err)?;
    let rec = if req.recursive { "-r" } else { "" };
    Ok(base.join(format!("{dev}-{ino}-{}{rec}", req.fuse.sandbox)))
}

/// The lock held while the users of a shared FUSE mount are counted (mounting one more, or
/// unmounting the last one and it).
fn users_lock(shared: &Path) -> Result<TargetLock, Error> {
    Ok(TargetLock::at(&shared.with_extension("lock"), shared)?)
}

/// Mounts `req` as a kernel idmapped mount of the source's shared idmappable FUSE mount,
/// starting that FUSE mount (or adding it to the source's daemon, the `shiftfs` binary at
/// `exe`) if it is not there yet.
pub fn mount_over_shared(exe: &Path, req: &Request, dirs: &Resolved) -> Result<(), Error> {
    let shared = shared_mount_dir(req, &dirs.source)?;
    let _users = users_lock(&shared)?;
    match std::fs::create_dir(&shared) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(Error::Io {
                what: "cannot make the directory of the shared mount",
                path: shared,
                source: e,
            });
        }
        _ => {}
    }
    let served = mounted_at(&shared)
        .filter(served_by_daemon)
        .and_then(|m| Record::of(&m))
        .is_some_and(|r| r.daemon_alive());
    if !served {
        start_shared(exe, req, dirs, &shared)?;
    }
    let lower = Dir::open(&shared).map_err(|e| Error::Target(shared.clone(), e.reason()))?;
    let id = crate::backend::kernel::mount_at(
        &crate::backend::kernel::Syscalls,
        &lower,
        &dirs.target,
        &req.mapping,
        req.flags,
        false,
    );
    let id = match id {
        Ok(id) => id,
        Err(e) => {
            if !served {
                stop_shared_if_unused(&shared, false);
            }
            return Err(e.into());
        }
    };
    match id {
        Some(id) => {
            if let Err(e) = record(req, Backend::Kernel, id, None).over(&shared).save() {
                tracing::warn!("mounted, but could not record it for `shiftfs list`: {e}");
            }
        }
        None => tracing::warn!("mounted, but cannot learn the mount id to record it"),
    }
    Ok(())
}

/// The shared idmappable FUSE mount of `dirs.source` at `shared`: an identity mount that
/// allows everything (the idmapped mounts on it each carry their own ro/nosuid/nodev/noexec),
/// served by the source's daemon.
fn start_shared(exe: &Path, req: &Request, dirs: &Resolved, shared: &Path) -> Result<(), Error> {
    if mounted_at(shared).is_some() {
        // A dead one (its daemon killed): out of the way.
        let _ = rustix::mount::unmount(shared, UnmountFlags::DETACH);
    }
    let mut low = req.clone();
    low.target = shared.to_path_buf();
    low.target_root = None;
    low.mapping = crate::idmap::IdMapping::identity();
    low.flags = crate::options::MountFlags {
        read_only: false,
        suid: true,
        dev: true,
        exec: true,
    };
    low.backend = Backend::Fuse;
    low.fuse.idmappable = true;
    let source = rustix::io::fcntl_dupfd_cloexec(&dirs.source, 0).map_err(|e| Error::Io {
        what: "cannot hold the source",
        path: req.source.clone(),
        source: e.into(),
    })?;
    let low_dirs = Resolved {
        source: Dir::from_fd(source, req.source.clone())
            .map_err(|e| Error::Source(req.source.clone(), e.reason()))?,
        target: Dir::open(shared).map_err(|e| Error::Target(shared.to_path_buf(), e.reason()))?,
    };
    let _lock = TargetLock::take(shared)?;
    crate::daemon::spawn_exe(exe, &low, &low_dirs)
}

/// After a mount stacked on the shared FUSE mount at `shared` went away: unmounts that
/// FUSE mount when nothing else is stacked on it, by record or in the mount table (its
/// daemon then ends, or goes on serving the source's other mounts).
fn stop_shared_if_unused(shared: &Path, lazy: bool) {
    let users = Record::all()
        .into_iter()
        .filter(|(r, _)| r.lower().as_deref() == Some(shared))
        .count();
    if users > 0 {
        return;
    }
    // Another tool's idmapped mount of it (crun's `idmap` option, say) has no record.
    let other = mounted_at(shared)
        .filter(served_by_daemon)
        .is_some_and(|info| mountinfo::own_table().is_none_or(|t| other_mounts_of(&t, &info)));
    if other {
        return;
    }
    match unmount(shared, lazy) {
        Ok(_) => {
            let _ = std::fs::remove_dir(shared);
        }
        Err(e) => tracing::warn!("cannot stop the shared mount {}: {e}", shared.display()),
    }
}

/// What [`release_if_unused`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// Another mount of its filesystem, or a record, still uses it: kept.
    InUse,
    /// Unused and unmounted: its session (and the daemon, if it served nothing else) ends.
    Released,
    /// Unused but busy (files open through it): kept, and looked at again later.
    Busy,
    /// Not mounted there (any more).
    Gone,
}

/// Unmounts the shared FUSE mount at `shared` once nothing uses it: no other mount of its
/// filesystem in this mount table (an idmapped mount stacked on it, removed with umount(8)
/// rather than `shiftfs umount`, leaves no record to say so) and no record naming it.
/// Never lazily: a busy one is kept. A dead one (its daemon killed) is detached.
pub fn release_if_unused(shared: &Path) -> Result<Shared, Error> {
    let _users = users_lock(shared)?;
    let _lock = TargetLock::take(shared)?;
    let Some(info) = mounted_at(shared).filter(served_by_daemon) else {
        let _ = std::fs::remove_dir(shared);
        return Ok(Shared::Gone);
    };
    if shared_in_use(&info, shared) {
        return Ok(Shared::InUse);
    }
    let record = Record::of(&info);
    let dead = match &record {
        Some(r) => !r.daemon_alive(),
        None => {
            matches!(std::fs::metadata(shared), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
        }
    };
    let flags = if dead {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    match rustix::mount::unmount(shared, flags | UnmountFlags::NOFOLLOW) {
        Ok(()) => {}
        Err(rustix::io::Errno::BUSY) => return Ok(Shared::Busy),
        Err(e) => return Err(unmount_error(shared.to_path_buf(), e)),
    }
    if dead && let Some(r) = &record {
        r.remove();
        let _ = std::fs::remove_file(Record::log_path(shared));
    }
    let _ = std::fs::remove_dir(shared);
    Ok(Shared::Released)
}

/// Whether anything but the shared mount `info` itself refers to its filesystem: another
/// mount with its device (the FUSE connection's), or a record stacked on it. An unreadable
/// mount table counts as in use.
fn shared_in_use(info: &MountInfo, shared: &Path) -> bool {
    let Some(table) = mountinfo::own_table() else {
        return true;
    };
    other_mounts_of(&table, info) || stacked_records(shared)
}

fn other_mounts_of(table: &[MountInfo], info: &MountInfo) -> bool {
    table.iter().any(|m| m.dev == info.dev && m.id != info.id)
}

fn stacked_records(shared: &Path) -> bool {
    Record::all()
        .iter()
        .any(|(r, _)| r.lower().as_deref() == Some(shared))
}

/// Whether the shared mount at `shared` has lost its last user: a quick look without the
/// locks, for the daemon's watcher to call on changes of the mount table (one read of the
/// table; the records only when the table shows no other mount of it).
pub fn shared_looks_unused(shared: &Path) -> bool {
    let Some(table) = mountinfo::own_table() else {
        return false;
    };
    let info = table
        .iter()
        .rev()
        .find(|m| m.mount_point == shared)
        .filter(|m| served_by_daemon(m));
    info.is_some_and(|info| !other_mounts_of(&table, info) && !stacked_records(shared))
}

/// `shiftfs gc`: the shared FUSE mounts nothing uses any more, each with what became of it.
pub fn gc_shared() -> Vec<(PathBuf, Result<Shared, Error>)> {
    let Ok(dir) = std::fs::read_dir(shared_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "lock") || !e.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        out.push((path.clone(), release_if_unused(&path)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

pub(crate) fn record(
    req: &Request,
    backend: Backend,
    mount_id: u64,
    daemon: Option<u32>,
) -> Record {
    Record::new(
        &req.target,
        &req.source,
        backend,
        req.mapping.to_string(),
        req.flags.to_string(),
        mount_id,
        daemon,
    )
}

/// Makes a kernel idmapped mount and records it, owned by this process's real uid.
pub fn mount_kernel(req: &Request, dirs: &Resolved) -> Result<(), Error> {
    mount_kernel_for(req, dirs, rustix::process::getuid().as_raw()).map(drop)
}

/// [`mount_kernel`] for the user `owner` (the broker mounting for a caller); the mount id,
/// if the kernel tells it.
pub fn mount_kernel_for(req: &Request, dirs: &Resolved, owner: u32) -> Result<Option<u64>, Error> {
    let id = crate::backend::kernel::mount_at(
        &crate::backend::kernel::Syscalls,
        &dirs.source,
        &dirs.target,
        &req.mapping,
        req.flags,
        req.recursive,
    )?;
    match id {
        Some(id) => {
            if let Err(e) = record(req, Backend::Kernel, id, None)
                .owned_by(owner)
                .save()
            {
                tracing::warn!("mounted, but could not record it for `shiftfs list`: {e}");
            }
        }
        None => tracing::warn!("mounted, but cannot learn the mount id to record it"),
    }
    Ok(id)
}

/// The topmost mount at `target`, if any.
pub fn mounted_at(target: &Path) -> Option<MountInfo> {
    mountinfo::own_table()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == target)
}

/// A mount shiftfs made: a FUSE mount of ours, or an idmapped mount we recorded (another
/// tool's idmapped mount is not ours to unmount, even of one of our idmappable FUSE mounts).
fn is_shifted(m: &MountInfo) -> bool {
    served_by_daemon(m) || m.has_option("idmapped") && Record::of(m).is_some()
}

/// A FUSE mount of ours, served by its daemon; an idmapped mount stacked on one has the same
/// filesystem type but no daemon of its own.
fn served_by_daemon(m: &MountInfo) -> bool {
    m.fstype == FUSE_TYPE && !m.has_option("idmapped")
}

/// What `unmount` did.
#[derive(Debug)]
pub struct Unmounted {
    pub record: Option<Record>,
    /// The FUSE daemon was already gone: the mount was dead.
    pub was_dead: bool,
}

/// Unmounts a shifted mount of either backend and waits for its daemon to exit; cleans up
/// a dead FUSE mount whose daemon was killed.
pub fn unmount(target: &Path, lazy: bool) -> Result<Unmounted, Error> {
    if !rustix::process::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    let target = unmount_name(target)?;
    let lock = TargetLock::take(&target)?;
    unmount_locked(&target, lazy, &lock)
}

/// The name to unmount and to lock for `target`: never reached through a symlink, since one
/// planted by a container in its rootfs must not make us unmount something of the host's.
pub fn unmount_name(target: &Path) -> Result<PathBuf, Error> {
    match Dir::open(target) {
        Ok(dir) => Ok(dir.path().to_path_buf()),
        Err(e @ crate::resolve::Error::Symlink { .. }) => {
            Err(Error::Target(absolute(target), e.reason()))
        }
        // A dead FUSE mount cannot be opened; its name is still what the table shows.
        Err(_) => Ok(absolute(target)),
    }
}

/// [`unmount`] of a name from [`unmount_name`], by a caller already holding its lock (the
/// broker checks the mount's owner under the same lock).
pub fn unmount_locked(target: &Path, lazy: bool, _lock: &TargetLock) -> Result<Unmounted, Error> {
    let target = target.to_path_buf();
    let Some(info) = mounted_at(&target) else {
        // Prunes records of mounts gone by other means.
        let _ = Record::all();
        return Err(Error::NotMounted { path: target });
    };
    let record = Record::of(&info);
    // Not any FUSE mount (bindfs, sshfs, ...): ours has its own type. A record alone is not
    // enough either: the shifted mount may be gone and something else mounted there.
    if !is_shifted(&info) {
        return Err(Error::NotShifted {
            path: target,
            fstype: info.fstype,
        });
    }
    let was_dead = served_by_daemon(&info)
        && match &record {
            Some(r) => !r.daemon_alive(),
            None => {
                matches!(std::fs::metadata(&target), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
            }
        };
    if !lazy && !was_dead {
        let stacked = stacked_on(&info, &target);
        if !stacked.is_empty() {
            return Err(Error::Stacked {
                path: target,
                stacked,
            });
        }
        unmount_submounts(&target)?;
    }
    let flags = if lazy || was_dead {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    if let Err(e) = rustix::mount::unmount(&target, flags | UnmountFlags::NOFOLLOW) {
        return Err(unmount_error(target, e));
    }
    // After a lazy unmount the daemon serves open files until the last one is closed, and
    // then exits by itself: waiting (and then SIGTERM) would only block the caller.
    if let Some(r) = record.as_ref().filter(|_| !was_dead && !lazy) {
        wait_for_end(r, Duration::from_secs(10));
    }
    if was_dead {
        let _ = std::fs::remove_file(Record::log_path(&target));
    }
    // A draining daemon keeps its record (`list` shows it draining) and removes it itself.
    if let Some(r) = record.as_ref().filter(|r| !r.daemon_alive()) {
        r.remove();
    }
    if let Some(shared) = record.as_ref().and_then(Record::lower) {
        match users_lock(&shared) {
            Ok(_users) => stop_shared_if_unused(&shared, lazy),
            Err(e) => tracing::warn!("cannot count the users of {}: {e}", shared.display()),
        }
    }
    Ok(Unmounted { record, was_dead })
}

/// The idmapped mounts of the FUSE mount `info` at `target` elsewhere (its filesystem, so its
/// daemon, serves them too): unmounting it does not fail, but stopping its daemon kills them.
fn stacked_on(info: &MountInfo, target: &Path) -> Vec<PathBuf> {
    if !served_by_daemon(info) {
        return Vec::new();
    }
    // Cached attributes are enough for the device, and ask nothing of a daemon.
    let dev = |p: &Path| {
        rustix::fs::statx(
            rustix::fs::CWD,
            p,
            rustix::fs::AtFlags::STATX_DONT_SYNC | rustix::fs::AtFlags::NO_AUTOMOUNT,
            rustix::fs::StatxFlags::empty(),
        )
        .ok()
        .map(|st| (st.stx_dev_major, st.stx_dev_minor))
    };
    let Some(own) = dev(target) else {
        return Vec::new();
    };
    mountinfo::own_table()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.fstype == FUSE_TYPE && m.has_option("idmapped") && m.mount_point != target)
        .map(|m| m.mount_point)
        .filter(|p| dev(p) == Some(own))
        .collect()
}

fn unmount_error(path: PathBuf, e: rustix::io::Errno) -> Error {
    if e == rustix::io::Errno::BUSY {
        Error::Busy { path }
    } else {
        Error::Io {
            what: "unmount",
            path,
            source: e.into(),
        }
    }
}

/// Mounts below `target` (a `--recursive` kernel mount's sub-mounts, or anything mounted
/// inside a shifted mount) keep it busy: unmount them first, deepest first.
fn unmount_submounts(target: &Path) -> Result<(), Error> {
    let mut below: Vec<PathBuf> = mountinfo::own_table()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p != target && p.starts_with(target))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    below.dedup();
    for p in below {
        match rustix::mount::unmount(&p, UnmountFlags::empty()) {
            // Gone already (with its parent).
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(unmount_error(p, e)),
        }
    }
    Ok(())
}

/// Waits for a daemon to be done with a mount that went away: the daemon gone, or, when it
/// serves other mounts of the source too, the mount's record removed (by the daemon, once
/// the mount's session ended). SIGTERM if it lingers and serves nothing else.
fn wait_for_end(rec: &Record, limit: Duration) {
    let start = Instant::now();
    let shares = || {
        Record::all()
            .iter()
            .any(|(r, _)| r.pid == rec.pid && r.pid_start == rec.pid_start && r != rec)
    };
    while rec.daemon_alive() {
        if !rec.is_saved() && shares() {
            return;
        }
        if start.elapsed() > limit {
            if shares() {
                tracing::warn!(
                    "daemon {:?} did not let go of {} after unmount",
                    rec.pid,
                    rec.target.display()
                );
                return;
            }
            tracing::warn!(
                "daemon {:?} did not exit after unmount; sending SIGTERM",
                rec.pid
            );
            if let Some(p) = rec
                .pid
                .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_folds_dots_by_name() {
        assert_eq!(absolute(Path::new("/x/../y/./z")), PathBuf::from("/y/z"));
    }
}
