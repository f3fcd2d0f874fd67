//! Backend choice, mount options, the daemon life cycle, the registry of shifted mounts,
//! and unmounting. Both `shiftfs mount` and the `mount.shiftfs` helper go through here.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use rustix::mount::UnmountFlags;

use crate::idmap::{self, IdMapping};
use crate::mountinfo::{self, MountInfo};
pub use crate::registry::{Record, TargetLock, run_dir};
use crate::resolve::Dir;
use crate::sys::daemon;

/// Which implementation serves a shifted mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// The kernel when the probe says it can serve the source, else FUSE.
    #[default]
    Auto,
    /// Kernel idmapped mount (`open_tree` + `mount_setattr(MOUNT_ATTR_IDMAP)`).
    Kernel,
    /// shiftfs' own FUSE daemon.
    Fuse,
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "fuse" => Ok(Self::Fuse),
            _ => Err(format!("unknown backend '{s}' (use auto, kernel or fuse)")),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::Fuse => "fuse",
        })
    }
}

/// The generic VFS flags of a shifted mount. Defaults are the safe ones: `nosuid,nodev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MountFlags {
    pub read_only: bool,
    pub suid: bool,
    pub dev: bool,
    pub exec: bool,
}

impl MountFlags {
    /// The restrictions as mount attributes (both backends apply them with these).
    pub fn mount_attrs(self) -> rustix::mount::MountAttrFlags {
        use rustix::mount::MountAttrFlags as A;
        let mut set = A::empty();
        for (on, attr) in [
            (self.read_only, A::MOUNT_ATTR_RDONLY),
            (!self.suid, A::MOUNT_ATTR_NOSUID),
            (!self.dev, A::MOUNT_ATTR_NODEV),
            (!self.exec, A::MOUNT_ATTR_NOEXEC),
        ] {
            if on {
                set |= attr;
            }
        }
        set
    }
}

impl Default for MountFlags {
    fn default() -> Self {
        Self {
            read_only: false,
            suid: false,
            dev: false,
            exec: true,
        }
    }
}

impl fmt::Display for MountFlags {
    /// mount(8) style, always explicit: `rw,nosuid,nodev,exec`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pick = |on: bool, yes: &'static str, no: &'static str| if on { yes } else { no };
        write!(
            f,
            "{},{},{},{}",
            pick(self.read_only, "ro", "rw"),
            pick(self.suid, "suid", "nosuid"),
            pick(self.dev, "dev", "nodev"),
            pick(self.exec, "exec", "noexec"),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "unknown mount option '{0}' (known: ro, rw, suid, nosuid, dev, nodev, exec, noexec, map=, uidmap=, gidmap=, backend=, recursive, threads=, passthrough, nopassthrough, attr_timeout=, max_open=, sandbox=)"
    )]
    UnknownOption(String),
    #[error("mount option '{option}': {reason}")]
    BadOption { option: String, reason: String },
    #[error("bad map")]
    Map(#[from] idmap::Error),
    #[error(
        "no map given: pass --map (e.g. --map b:0:100000:65536), --uid-map and --gid-map, or --map-from-pid PID"
    )]
    NoMap,
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
    Kernel(#[from] crate::kernel::Error),
    #[error(transparent)]
    Fuse(#[from] crate::fuse::Error),
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
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// More FUSE workers than this only cost file descriptors and memory.
const MAX_THREADS: usize = 256;

/// The file system type of shiftfs' FUSE mounts in the mount table.
pub const FUSE_TYPE: &str = "fuse.shiftfs";

/// Tuning knobs of the FUSE backend; asking for one on a kernel mount is an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuseTuning {
    /// 0 = the backend's default.
    pub threads: usize,
    pub passthrough: bool,
    pub attr_timeout: Duration,
    /// Files and directories callers may hold open at once; 0 = the backend's default.
    pub max_open: usize,
    pub sandbox: crate::sandbox::Mode,
    /// The FUSE-only options given explicitly, as written (for the error on a kernel mount).
    pub given: Vec<String>,
}

impl Default for FuseTuning {
    fn default() -> Self {
        Self {
            threads: 0,
            passthrough: true,
            attr_timeout: crate::fuse::DEFAULT_ATTR_TIMEOUT,
            max_open: 0,
            sandbox: crate::sandbox::Mode::default(),
            given: Vec::new(),
        }
    }
}

/// What `-o` says; maps are kept as text until every source of a map is known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionSet {
    pub flags: MountFlags,
    pub map: Option<String>,
    pub uid_map: Option<String>,
    pub gid_map: Option<String>,
    pub backend: Option<Backend>,
    pub recursive: bool,
    pub fuse: FuseTuning,
}

/// Splits `-o` text on commas, except inside double quotes; an entry that looks like a map
/// range (`u:..`, `g:..`, `b:..`, `N:N:N`) continues the `map=`/`uidmap=`/`gidmap=` before it,
/// so `map=b:0:100000:65536,u:70000:5:1` works as well as the quoted form.
fn split_options(text: &str) -> Vec<String> {
    let mut raw = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => raw.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    raw.push(cur);
    let mut out: Vec<String> = Vec::new();
    for opt in raw.into_iter().filter(|o| !o.is_empty()) {
        let continues_map = looks_like_range(&opt)
            && out.last().is_some_and(|prev| {
                ["map=", "uidmap=", "gidmap="]
                    .iter()
                    .any(|k| prev.starts_with(k))
            });
        match out.last_mut() {
            Some(prev) if continues_map => {
                prev.push(',');
                prev.push_str(&opt);
            }
            _ => out.push(opt),
        }
    }
    out
}

fn looks_like_range(s: &str) -> bool {
    let body = s
        .strip_prefix("u:")
        .or_else(|| s.strip_prefix("g:"))
        .or_else(|| s.strip_prefix("b:"))
        .unwrap_or(s);
    let parts: Vec<&str> = body.split(':').collect();
    parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok())
}

impl OptionSet {
    /// Applies mount(8)-style options on top of `self`. Options mount(8) and fstab use for
    /// themselves (`defaults`, `noauto`, `nofail`, `_netdev`, `x-*`, ...) are accepted and ignored.
    pub fn apply(&mut self, text: &str) -> Result<(), Error> {
        for opt in split_options(text) {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt.as_str(), None),
            };
            let need = |v: Option<&'_ str>| -> Result<String, Error> {
                v.filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| Error::BadOption {
                        option: opt.clone(),
                        reason: "needs a value".into(),
                    })
            };
            match key {
                "ro" => self.flags.read_only = true,
                "rw" => self.flags.read_only = false,
                "suid" => self.flags.suid = true,
                "nosuid" => self.flags.suid = false,
                "dev" => self.flags.dev = true,
                "nodev" => self.flags.dev = false,
                "exec" => self.flags.exec = true,
                "noexec" => self.flags.exec = false,
                "map" | "idmap" => self.map = Some(need(value)?),
                "uidmap" => self.uid_map = Some(need(value)?),
                "gidmap" => self.gid_map = Some(need(value)?),
                "backend" => {
                    self.backend =
                        Some(need(value)?.parse().map_err(|reason| Error::BadOption {
                            option: opt.clone(),
                            reason,
                        })?)
                }
                "recursive" | "rbind" => self.recursive = true,
                "threads" => {
                    self.fuse.threads = need(value)?
                        .parse()
                        .ok()
                        .filter(|&n| (1..=MAX_THREADS).contains(&n))
                        .ok_or_else(|| Error::BadOption {
                            option: opt.clone(),
                            reason: format!(
                                "threads must be a whole number from 1 to {MAX_THREADS}"
                            ),
                        })?
                }
                "max_open" => {
                    self.fuse.max_open =
                        need(value)?
                            .parse()
                            .ok()
                            .filter(|&n| n >= 1)
                            .ok_or_else(|| Error::BadOption {
                                option: opt.clone(),
                                reason: "max_open is a whole number of open files, at least 1"
                                    .into(),
                            })?
                }
                "passthrough" => self.fuse.passthrough = true,
                "nopassthrough" => self.fuse.passthrough = false,
                "attr_timeout" => {
                    let secs: f64 = need(value)?
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s < 1e6)
                        .ok_or_else(|| Error::BadOption {
                            option: opt.clone(),
                            reason: "attr_timeout is seconds, e.g. 1 or 0.5 or 0".into(),
                        })?;
                    self.fuse.attr_timeout = Duration::from_secs_f64(secs);
                }
                "sandbox" => {
                    self.fuse.sandbox = need(value)?.parse().map_err(|reason| Error::BadOption {
                        option: opt.clone(),
                        reason,
                    })?
                }
                "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "nouser"
                | "users" | "owner" | "group" | "comment" | "bind" => {}
                k if k.starts_with("x-") || k.starts_with("X-") => {}
                _ => return Err(Error::UnknownOption(opt.clone())),
            }
            if matches!(
                key,
                "threads"
                    | "passthrough"
                    | "nopassthrough"
                    | "attr_timeout"
                    | "max_open"
                    | "sandbox"
            ) && !self.fuse.given.contains(&opt)
            {
                self.fuse.given.push(opt.clone());
            }
        }
        Ok(())
    }

    /// The map the options (and the command line's own map arguments, already folded in)
    /// describe.
    pub fn mapping(&self) -> Result<IdMapping, Error> {
        match (&self.map, &self.uid_map, &self.gid_map) {
            (Some(m), None, None) => Ok(IdMapping::parse(m)?),
            (None, Some(u), Some(g)) => Ok(IdMapping::parse_separate(u, g)?),
            (None, None, None) => Err(Error::NoMap),
            (Some(_), _, _) => Err(Error::BadOption {
                option: "map".into(),
                reason: "give either map or uidmap+gidmap, not both".into(),
            }),
            _ => Err(Error::BadOption {
                option: "uidmap/gidmap".into(),
                reason: "give both uidmap and gidmap (or map for both)".into(),
            }),
        }
    }
}

/// Everything needed to make one shifted mount.
#[derive(Clone, Debug)]
pub struct Request {
    pub source: PathBuf,
    pub target: PathBuf,
    /// Resolve `target` inside this directory as if it were `/` (a runtime mounting into a
    /// container's rootfs): symlinks in the rootfs can never lead out of it.
    pub target_root: Option<PathBuf>,
    pub mapping: IdMapping,
    pub flags: MountFlags,
    pub backend: Backend,
    pub recursive: bool,
    pub fuse: FuseTuning,
}

impl Request {
    /// `-o` text that, with `map=`, reproduces this request (used to hand it to the daemon).
    pub fn options_text(&self) -> String {
        let mut o = format!(
            "{},{},attr_timeout={}",
            self.flags,
            if self.fuse.passthrough {
                "passthrough"
            } else {
                "nopassthrough"
            },
            self.fuse.attr_timeout.as_secs_f64()
        );
        if self.fuse.threads != 0 {
            o.push_str(&format!(",threads={}", self.fuse.threads));
        }
        if self.fuse.max_open != 0 {
            o.push_str(&format!(",max_open={}", self.fuse.max_open));
        }
        if self.fuse.sandbox != crate::sandbox::Mode::default() {
            o.push_str(&format!(",sandbox={}", self.fuse.sandbox));
        }
        if self.recursive {
            o.push_str(",recursive");
        }
        o
    }
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
        return Err(Error::BadOption {
            option: opt.clone(),
            reason: format!(
                "only the FUSE backend has it, and the kernel backend was chosen ({reason}); \
                 drop it or add --backend fuse"
            ),
        });
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
        Backend::Fuse => Ok((Backend::Fuse, "asked for with --backend fuse".into())),
        Backend::Kernel => {
            let p = crate::kernel::probe_dir(&dirs.source, req.recursive);
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
            if let Some(reason) = crate::kernel::map_unfit(&req.mapping) {
                return Ok((
                    Backend::Fuse,
                    format!("kernel idmapped mount not possible: {reason}"),
                ));
            }
            let p = crate::kernel::probe_dir(&dirs.source, req.recursive);
            if p.supported {
                Ok((Backend::Kernel, p.reason))
            } else {
                Ok((
                    Backend::Fuse,
                    format!("kernel idmapped mount not possible: {}", p.reason),
                ))
            }
        }
    }
}

fn record(req: &Request, backend: Backend, mount_id: u64, daemon: Option<u32>) -> Record {
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

/// Makes a kernel idmapped mount and records it.
pub fn mount_kernel(req: &Request, dirs: &Resolved) -> Result<(), Error> {
    let id = crate::kernel::mount_at(
        &crate::kernel::Syscalls,
        &dirs.source,
        &dirs.target,
        &req.mapping,
        req.flags,
        req.recursive,
    )?;
    match id {
        Some(id) => {
            if let Err(e) = record(req, Backend::Kernel, id, None).save() {
                tracing::warn!("mounted, but could not record it for `shiftfs list`: {e}");
            }
        }
        None => tracing::warn!("mounted, but cannot learn the mount id to record it"),
    }
    Ok(())
}

/// The signals that stop the daemon: each unmounts the target.
const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// What the serving process tells its supervisor, one byte each ('X' is followed by the
/// error text up to EOF).
mod msg {
    /// The workers run: the mount is ready.
    pub const READY: u8 = b'R';
    /// Setup failed; the error text follows.
    pub const FAILED: u8 = b'X';
    /// A stop signal came: unmount the target.
    pub const UNMOUNT: u8 = b'U';
    /// The session ended: clean up and exit.
    pub const END: u8 = b'E';
    /// Replies to UNMOUNT: detached (the session will end), or no longer ours.
    pub const DETACHED: u8 = b'D';
    pub const GONE: u8 = b'G';
}

/// The FUSE daemon's body: mounts, calls `ready` once the mount is served (or failed),
/// serves until the mount goes away (unmounted by anyone, or SIGTERM/SIGINT/SIGHUP, which
/// unmount it), then forgets the record.
///
/// After mounting, the process forks. The parent serves: it enters the sandbox
/// (`crate::sandbox`: its own mount namespace, where the host's mount table cannot be
/// reached) and starts the workers; its pid is the one recorded, shown by `list` and to be
/// signalled. The child is a small unsandboxed supervisor that keeps the host's mount
/// namespace and does for the server what needs it: reporting readiness, writing and
/// removing the record, unmounting the target when the server is told to stop, removing
/// the log after a clean end. It lives as long as the server and exits when the server's
/// end of their socket closes: a killed server leaves a dead mount, as it always did.
pub fn serve_fuse(
    req: &Request,
    dirs: Resolved,
    ready: impl FnOnce(Result<(), &Error>),
) -> Result<(), Error> {
    let started = (|| {
        let Resolved { source, target } = dirs;
        let mut opts = crate::fuse::Options::new(req.mapping.clone());
        opts.flags = req.flags;
        opts.threads = req.fuse.threads;
        opts.passthrough = req.fuse.passthrough;
        opts.attr_timeout = req.fuse.attr_timeout;
        opts.max_open = req.fuse.max_open;
        opts.recursive = req.recursive;
        opts.fsname = req.source.to_string_lossy().into_owned();
        let mounted = crate::fuse::attach(source.into_fd(), &target, opts)?;
        Ok::<_, Error>(mounted)
    })();
    let mounted = match started {
        Ok(m) => m,
        Err(e) => {
            ready(Err(&e));
            return Err(e);
        }
    };
    // A signal must only unmount *this* mount: after a lazy unmount another mount may sit at
    // the same path by the time the signal comes.
    let own_id = mounted.mount_id();
    let split = (|| {
        let null = std::fs::File::open("/dev/null")?;
        let (server, supervisor) = std::os::unix::net::UnixStream::pair()?;
        // Blocked before the fork: a stop signal that comes early waits for the watcher.
        daemon::block_signals(&STOP_SIGNALS)?;
        Ok::<_, io::Error>((null, server, supervisor, daemon::fork()?))
    })();
    let (null, sock, supervisor, pid) = match split {
        Ok((null, server, supervisor, daemon::Forked::Child)) => {
            // The supervisor must not hold the server's end, nor the mount (it would stay
            // busy), nor /dev/fuse (a killed server must leave a dead mount).
            drop((null, server, mounted));
            supervise(req, own_id, supervisor, ready)
        }
        Ok((null, server, supervisor, daemon::Forked::Parent(pid))) => {
            (null, server, supervisor, pid)
        }
        Err(e) => {
            let e = Error::Io {
                what: "cannot start the daemon's supervisor for",
                path: req.target.clone(),
                source: e,
            };
            if let Err(d) = mounted.detach() {
                tracing::error!("cannot unmount {}: {d}", req.target.display());
            }
            ready(Err(&e));
            return Err(e);
        }
    };
    drop(supervisor);
    // Plain read(2)/write(2) on the socket: std's UnixStream sends with send(2), which the
    // sandbox does not allow.
    let mut sock = std::fs::File::from(std::os::fd::OwnedFd::from(sock));
    // The supervisor reports readiness; stdout (the starter's pipe) is its business.
    let _ = rustix::stdio::dup2_stdout(&null);
    drop(null);
    // A write to a supervisor that died must fail, not kill the server.
    let _ = daemon::ignore_signals(&[libc::SIGPIPE]);
    let served = crate::sandbox::enter(req.fuse.sandbox)
        .map_err(Error::from)
        .and_then(|()| mounted.serve().map_err(Error::from));
    let session = match served {
        Ok(s) => s,
        Err(e) => {
            let mut text = vec![msg::FAILED];
            text.extend_from_slice(e.to_string().as_bytes());
            let _ = sock.write_all(&text);
            drop(sock);
            reap(pid);
            return Err(e);
        }
    };
    match sock.try_clone() {
        Ok(s) => {
            std::thread::spawn(move || watch_signals(s, pid));
        }
        Err(e) => tracing::warn!("cannot watch for SIGTERM/SIGINT: {e}"),
    }
    let _ = sock.write_all(&[msg::READY]);
    let result = session.wait().map_err(Error::from);
    let _ = sock.write_all(&[msg::END]);
    reap(pid);
    result
}

fn reap(pid: rustix::process::Pid) {
    if let Err(e) = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
        tracing::warn!("cannot wait for the supervisor {pid:?}: {e}");
    }
}

/// In the server: turns each stop signal into an unmount by the supervisor. When the mount
/// is already gone (detached lazily, files still open), a signal stops serving at once.
fn watch_signals(mut sock: std::fs::File, supervisor: rustix::process::Pid) {
    loop {
        let sig = match daemon::wait_signal(&STOP_SIGNALS) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot wait for SIGTERM/SIGINT: {e}");
                return;
            }
        };
        let mut reply = [0u8];
        let asked = sock
            .write_all(&[msg::UNMOUNT])
            .and_then(|()| sock.read_exact(&mut reply));
        match asked {
            Ok(()) if reply[0] == msg::DETACHED => {
                tracing::info!("signal {sig}: unmounted");
            }
            Ok(()) => {
                tracing::info!("signal {sig}: no longer mounted; exiting");
                let _ = sock.write_all(&[msg::END]);
                reap(supervisor);
                std::process::exit(0);
            }
            Err(e) => {
                tracing::error!(
                    "signal {sig}: the supervisor is gone ({e}), nothing can unmount; exiting, \
                     which leaves a dead mount for shiftfs umount"
                );
                std::process::exit(1);
            }
        }
    }
}

/// The supervisor (the forked child, unsandboxed, in the host's mount namespace); never
/// returns.
fn supervise(
    req: &Request,
    own_id: Option<u64>,
    mut sock: std::os::unix::net::UnixStream,
    ready: impl FnOnce(Result<(), &Error>),
) -> ! {
    let server = rustix::process::getppid();
    let _ = daemon::ignore_signals(&STOP_SIGNALS);
    let _ = daemon::unblock_signals(&STOP_SIGNALS);
    // Only the server names the target on its command line, so tools looking for the
    // daemon of a mount (and `shiftfs list`) find one process.
    if let Err(e) = daemon::set_cmdline(&["shiftfs", "supervisor"]) {
        tracing::debug!("supervisor: cannot rename itself: {e}");
    }
    let target = &req.target;
    let ours = || own_id.is_none() || mounted_at(target).map(|m| m.id) == own_id;
    let server_pid = server.map(|p| p.as_raw_nonzero().get() as u32);
    let rec = own_id.map(|id| record(req, Backend::Fuse, id, server_pid));
    let mut ready = Some(ready);
    let mut byte = [0u8];
    loop {
        match sock.read(&mut byte) {
            Ok(1) if byte[0] == msg::READY => {
                match rec.as_ref().map(Record::save) {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        tracing::warn!("could not record the mount for `shiftfs list`: {e}")
                    }
                    None => tracing::warn!("cannot learn the mount id to record the mount"),
                }
                if let Some(ready) = ready.take() {
                    ready(Ok(()));
                }
            }
            Ok(1) if byte[0] == msg::UNMOUNT => {
                let reply = if ours() {
                    tracing::info!("unmounting {}", target.display());
                    if let Err(e) = detach(target) {
                        tracing::warn!("unmount {}: {e}", target.display());
                    }
                    msg::DETACHED
                } else {
                    msg::GONE
                };
                if sock.write_all(&[reply]).is_err() {
                    break;
                }
            }
            Ok(1) if byte[0] == msg::FAILED => {
                let mut text = String::new();
                let _ = sock.read_to_string(&mut text);
                let e = Error::Daemon(text);
                unmount_unserved(target, ours());
                if let Some(ready) = ready.take() {
                    ready(Err(&e));
                }
                std::process::exit(1);
            }
            Ok(1) => {
                if byte[0] != msg::END {
                    tracing::warn!("supervisor: unexpected message {:?}", byte[0]);
                }
                break;
            }
            // The server exited (or was killed).
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("supervisor: {e}");
                break;
            }
        }
    }
    if let Some(ready) = ready.take() {
        let e = Error::Daemon(format!(
            "the daemon exited before the mount was ready; see {}",
            Record::log_path(target).display()
        ));
        unmount_unserved(target, ours());
        ready(Err(&e));
        std::process::exit(1);
    }
    if own_id.is_some() && mounted_at(target).map(|m| m.id) == own_id {
        tracing::error!(
            "the daemon ended, leaving {} a dead mount; remove it with shiftfs umount",
            target.display()
        );
        std::process::exit(1);
    }
    if let Some(rec) = rec {
        rec.remove();
    }
    remove_own_log(target);
    std::process::exit(0)
}

/// Never leave a mount nobody serves.
fn unmount_unserved(target: &Path, ours: bool) {
    if ours && let Err(e) = detach(target) {
        tracing::error!(
            "cannot unmount {} after a failed start: {e}",
            target.display()
        );
    }
}

/// A cleanly ended daemon leaves no log behind; the name may already belong to the daemon
/// of a newer mount at the same target, so only the file on our own stderr is removed.
fn remove_own_log(target: &Path) {
    let path = Record::log_path(target);
    let same =
        |a: &rustix::fs::Stat, b: &rustix::fs::Stat| a.st_dev == b.st_dev && a.st_ino == b.st_ino;
    if let (Ok(ours), Ok(named)) = (
        rustix::fs::fstat(std::io::stderr()),
        rustix::fs::stat(&path),
    ) && same(&ours, &named)
    {
        let _ = std::fs::remove_file(&path);
    }
}

/// Unmounts now if possible, else lazily: for a daemon told to stop, a busy mount must
/// still go away from the namespace.
fn detach(target: &Path) -> io::Result<()> {
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => {
            rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(Into::into)
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens the daemon's log file afresh (one per target, so logs do not pile up), making
/// the run directory if needed.
pub fn open_log(path: &Path) -> io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
}

/// The topmost mount at `target`, if any.
pub fn mounted_at(target: &Path) -> Option<MountInfo> {
    mountinfo::own_table()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == target)
}

/// A mount shiftfs made: a FUSE mount of ours, or an idmapped mount we recorded (another
/// tool's idmapped mount is not ours to unmount).
fn is_shifted(m: &MountInfo) -> bool {
    m.fstype == FUSE_TYPE || m.has_option("idmapped") && Record::of(m).is_some()
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
    // Never through a symlink: one planted by a container in its rootfs must not make us
    // unmount something of the host's.
    let target = match Dir::open(target) {
        Ok(dir) => dir.path().to_path_buf(),
        Err(e @ crate::resolve::Error::Symlink { .. }) => {
            return Err(Error::Target(absolute(target), e.reason()));
        }
        // A dead FUSE mount cannot be opened; its name is still what the table shows.
        Err(_) => absolute(target),
    };
    let _lock = TargetLock::take(&target)?;
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
    let was_dead = info.fstype == FUSE_TYPE
        && match &record {
            Some(r) => !r.daemon_alive(),
            None => {
                matches!(std::fs::metadata(&target), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
            }
        };
    if !lazy && !was_dead {
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
        wait_for_exit(r, Duration::from_secs(10));
    }
    if was_dead {
        let _ = std::fs::remove_file(Record::log_path(&target));
    }
    // A draining daemon keeps its record (`list` shows it draining) and removes it itself.
    if let Some(r) = record.as_ref().filter(|r| !r.daemon_alive()) {
        r.remove();
    }
    Ok(Unmounted { record, was_dead })
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

/// Waits for a daemon to leave after its mount went away; SIGTERM if it lingers.
fn wait_for_exit(rec: &Record, limit: Duration) {
    let start = Instant::now();
    while rec.daemon_alive() {
        if start.elapsed() > limit {
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
    fn options_parse_and_round_trip() {
        let mut o = OptionSet::default();
        o.apply("ro,suid,noexec,map=b:0:100000:65536,u:70000:5:1,backend=fuse,threads=4,nopassthrough,attr_timeout=0.5,sandbox=log,defaults,nofail,x-systemd.automount").unwrap();
        assert!(o.flags.read_only && o.flags.suid && !o.flags.exec && !o.flags.dev);
        assert_eq!(o.map.as_deref(), Some("b:0:100000:65536,u:70000:5:1"));
        assert_eq!(o.backend, Some(Backend::Fuse));
        assert_eq!(o.fuse.threads, 4);
        assert!(!o.fuse.passthrough);
        assert_eq!(o.fuse.attr_timeout, Duration::from_millis(500));
        assert_eq!(o.fuse.sandbox, crate::sandbox::Mode::Log);
        let m = o.mapping().unwrap();
        assert_eq!(m.uid.ranges().len(), 2);
        assert_eq!(m.gid.ranges().len(), 1);

        let mut q = OptionSet::default();
        q.apply("map=\"u:0:1:1,g:0:2:1\"").unwrap();
        assert_eq!(q.map.as_deref(), Some("u:0:1:1,g:0:2:1"));

        let req = Request {
            source: "/s".into(),
            target: "/t".into(),
            target_root: None,
            mapping: m,
            flags: o.flags,
            backend: Backend::Fuse,
            recursive: true,
            fuse: o.fuse.clone(),
        };
        let mut back = OptionSet::default();
        back.apply(&req.options_text()).unwrap();
        assert_eq!(back.flags, req.flags);
        let tuning = |f: &FuseTuning| (f.threads, f.passthrough, f.attr_timeout, f.sandbox);
        assert_eq!(tuning(&back.fuse), tuning(&req.fuse));
        assert!(back.recursive);
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        let err = |s: &str| OptionSet::default().apply(s).unwrap_err().to_string();
        assert!(err("bogus").contains("unknown mount option 'bogus'"));
        assert!(err("backend=zfs").contains("unknown backend 'zfs'"));
        assert!(err("threads=x").contains("whole number"));
        assert!(err("map=").contains("needs a value"));
        assert!(err("sandbox=strict").contains("unknown sandbox mode 'strict'"));
        assert!(matches!(OptionSet::default().mapping(), Err(Error::NoMap)));
    }

    #[test]
    fn absolute_folds_dots_by_name() {
        assert_eq!(absolute(Path::new("/x/../y/./z")), PathBuf::from("/y/z"));
    }
}
