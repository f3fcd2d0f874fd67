//! The broker's socket server: accepts connections, learns who is at the other end from
//! the kernel alone (`SO_PEERCRED`, then a pidfd and `/proc` for groups and executable),
//! reads JSON-line requests under a size limit and a deadline, judges them with `rules`,
//! records every decision with `audit` before acting on it, performs it, and replies.
//!
//! Each connection has its own thread, so a slow or idle client holds only its own. Threads
//! are capped in total and per uid: one user opening connections and sending nothing uses
//! up its own share and is answered "busy", while other users are still served.
//!
//! What is performed: `mount` onto a target directory on the fds opened as the caller
//! (kernel backend, or a sandboxed FUSE daemon of root's), recorded with the caller as
//! owner; `mount` of a detached idmapped tree, returned over `SCM_RIGHTS`; `umount` of the
//! caller's own mounts (root: any); `list` of the caller's own mounts (root: all);
//! `make-image` and `adopt` (the offline shift engine) for trees in the caller's directories.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::net::UCred;
use serde_json::{Value, json};

use rustix::fs::{Mode, OFlags};

use super::audit::{self, Audit};
use super::policy::{self, ImageRange, Policy};
use super::protocol::{self, Request};
use super::rules::{self, Caller, Decision, Flags, MountRequest, Source, Target};
use super::subid;
use crate::backend::kernel;
use crate::idmap::{IdMapping, OuterGid, OuterUid};
use crate::mount::Resolved;
use crate::offline::shift;
use crate::offline::walk::WalkOptions;
use crate::options::{self, MountFlags};
use crate::registry::{Record, TargetLock};
use crate::resolve::Dir;
use crate::sys::creds::{FsCreds, FsIds};

pub const DEFAULT_SOCKET: &str = "/run/shiftfs/broker.sock";

/// Where the broker listens and which files it reads; every path can be moved for tests.
#[derive(Clone, Debug)]
pub struct Config {
    pub socket: PathBuf,
    pub policy: PathBuf,
    pub subuid: PathBuf,
    pub subgid: PathBuf,
    pub passwd: PathBuf,
    pub group: PathBuf,
    pub audit_log: PathBuf,
    /// The syslog datagram socket; `None` sends nothing there.
    pub syslog: Option<PathBuf>,
    /// Connections served at once, in all.
    pub max_connections: usize,
    /// Connections one uid may hold at once.
    pub max_per_uid: usize,
    /// How long a client may take to send one whole request (and to read its reply).
    pub timeout: Duration,
    /// The `shiftfs` binary, started as the FUSE daemon of FUSE-backend mounts.
    pub shiftfs: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            policy: policy::DEFAULT_PATH.into(),
            subuid: "/etc/subuid".into(),
            subgid: "/etc/subgid".into(),
            passwd: "/etc/passwd".into(),
            group: "/etc/group".into(),
            audit_log: audit::DEFAULT_LOG.into(),
            syslog: Some(audit::DEFAULT_SYSLOG.into()),
            max_connections: 512,
            max_per_uid: 32,
            timeout: Duration::from_secs(10),
            shiftfs: default_shiftfs(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is in use by a running broker; stop it first")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; remove it or choose another --socket")]
    NotSocket(PathBuf),
    #[error("cannot accept connections: {0}")]
    Accept(#[source] io::Error),
}

/// Binds the socket (mode 0666: the broker itself decides who may do what), replacing a
/// stale socket of a broker that is gone but never another file or a live broker's socket.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    let bind_err = |source| Error::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(Error::NotSocket(path.to_path_buf())),
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
    Ok(listener)
}

/// `shiftfs` next to this binary (both are installed side by side), else in `PATH`.
pub fn default_shiftfs() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("shiftfs")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "shiftfs".into())
}

/// Held while starting a child that is handed fds: handing them over clears their
/// close-on-exec flag for a moment, and no other child may be started meanwhile and inherit
/// them.
static SPAWNING: Mutex<()> = Mutex::new(());

/// Counts of connections being served, in all and per uid.
#[derive(Default)]
struct Slots {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

struct Slot {
    slots: Arc<Mutex<Slots>>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.total -= 1;
        if let Some(n) = s.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                s.by_uid.remove(&self.uid);
            }
        }
    }
}

fn take_slot(slots: &Arc<Mutex<Slots>>, uid: u32, config: &Config) -> Option<Slot> {
    let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
    let mine = s.by_uid.get(&uid).copied().unwrap_or(0);
    if s.total >= config.max_connections || mine >= config.max_per_uid {
        return None;
    }
    s.total += 1;
    s.by_uid.insert(uid, mine + 1);
    Some(Slot {
        slots: slots.clone(),
        uid,
    })
}

/// Serves connections until accepting fails for good.
pub fn serve(listener: UnixListener, config: Config) -> Result<(), Error> {
    let config = Arc::new(config);
    let audit = Arc::new(Audit::new(&config.audit_log, config.syslog.as_deref()));
    let slots = Arc::new(Mutex::new(Slots::default()));
    tracing::info!(socket = %config.socket.display(), "shiftfsd serving");
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ECONNABORTED)) => {
                continue;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                tracing::warn!("out of file descriptors: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(Error::Accept(e)),
        };
        let accepted = boot_ticks();
        let Ok(cred) = rustix::net::sockopt::socket_peercred(&stream) else {
            continue;
        };
        let Some(slot) = take_slot(&slots, cred.uid.as_raw(), &config) else {
            refuse_busy(stream, cred.uid.as_raw());
            continue;
        };
        let (config, audit) = (config.clone(), audit.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{}", cred.pid.as_raw_nonzero()))
            .spawn(move || {
                let _slot = slot;
                Connection::new(stream, cred, accepted, &config, &audit).run();
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a connection thread: {e}");
        }
    }
}

fn refuse_busy(mut stream: UnixStream, uid: u32) {
    tracing::debug!(uid, "connection refused: too many at once");
    let _ = stream.set_nonblocking(true);
    let _ = stream.write_all(
        protocol::error(
            "broker busy: too many connections at once from this user or in all; retry later",
        )
        .as_bytes(),
    );
}

/// Clock ticks since boot, the unit of `/proc/PID/stat`'s start time.
fn boot_ticks() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let hz = rustix::param::clock_ticks_per_second();
    t.tv_sec as u64 * hz + t.tv_nsec as u64 * hz / 1_000_000_000
}

/// The peer process as the kernel describes it.
struct Peer {
    pid: u32,
    uid: u32,
    /// The `SO_PEERCRED` gid.
    gid: u32,
    /// Every group: the `SO_PEERCRED` gid first, then the supplementary ones.
    groups: Vec<u32>,
    exe: Option<String>,
}

/// Learns the peer's groups and executable through `/proc/PID`, making sure PID is still
/// the process that connected: it started no later than the connection was accepted, and it
/// has not exited while we read (the pidfd pins it; a pid is reused only after exit).
fn identify(cred: UCred, accepted: u64) -> Result<Peer, String> {
    let pid = cred.pid.as_raw_nonzero().get() as u32;
    let gone = || format!("the connecting process {pid} is gone");
    let pidfd = rustix::process::pidfd_open(cred.pid, rustix::process::PidfdFlags::empty())
        .map_err(|_| gone())?;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(proc_dir.join("stat")).map_err(|_| gone())?;
    let started = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(gone)?;
    if started > accepted {
        return Err(gone());
    }
    let status = std::fs::read_to_string(proc_dir.join("status")).map_err(|_| gone())?;
    let mut groups: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let exe = std::fs::read_link(proc_dir.join("exe"))
        .ok()
        .map(|p| p.display().to_string());
    if exited(&pidfd) {
        return Err(gone());
    }
    let gid = cred.gid.as_raw();
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(Peer {
        pid,
        uid: cred.uid.as_raw(),
        gid,
        groups,
        exe,
    })
}

fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    !matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(0))
}

/// The name and primary gid of `uid` in a passwd-format file.
fn passwd_entry(path: &Path, uid: u32) -> Option<(String, u32)> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[2].parse() == Ok(uid))
            .then(|| f[3].parse().ok().map(|g| (f[0].to_string(), g)))
            .flatten()
    })
}

/// Group names by gid from a group-format file.
fn group_names(path: &Path) -> HashMap<u32, String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.get(2)?.parse().ok()?, f.first()?.to_string()))
        })
        .collect()
}

struct Connection<'a> {
    stream: UnixStream,
    cred: UCred,
    accepted: u64,
    config: &'a Config,
    audit: &'a Audit,
    /// Bytes read past the end of the last request.
    pending: Vec<u8>,
}

enum Line {
    Request(Vec<u8>),
    /// The client closed, or broke a limit (and was told so).
    Done,
}

impl<'a> Connection<'a> {
    fn new(
        stream: UnixStream,
        cred: UCred,
        accepted: u64,
        config: &'a Config,
        audit: &'a Audit,
    ) -> Self {
        Self {
            stream,
            cred,
            accepted,
            config,
            audit,
            pending: Vec::new(),
        }
    }

    fn run(mut self) {
        let _ = self.stream.set_write_timeout(Some(self.config.timeout));
        let peer = identify(self.cred, self.accepted);
        while let Line::Request(line) = self.read_line() {
            let reply = match &peer {
                Ok(peer) => self.handle(peer, &line),
                Err(e) => Reply::error(e),
            };
            if reply.send(&self.stream).is_err() {
                return;
            }
        }
    }

    /// One request line, read under the line limit and within the timeout.
    fn read_line(&mut self) -> Line {
        let deadline = Instant::now() + self.config.timeout;
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=i).collect();
                line.pop();
                return Line::Request(line);
            }
            if self.pending.len() >= protocol::MAX_LINE {
                return self.give_up(&format!(
                    "request longer than {} bytes; closing the connection",
                    protocol::MAX_LINE
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return self.give_up("request not received in time; closing the connection");
            }
            let _ = self.stream.set_read_timeout(Some(left));
            match self.stream.read(&mut chunk) {
                Ok(0) => return Line::Done,
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Line::Done,
            }
        }
    }

    fn give_up(&mut self, why: &str) -> Line {
        let _ = self.stream.write_all(protocol::error(why).as_bytes());
        Line::Done
    }

    fn handle(&self, peer: &Peer, line: &[u8]) -> Reply {
        let req = match protocol::parse(line) {
            Ok(r) => r,
            Err(e) => return Reply::error(&e),
        };
        match &req {
            Request::Version(_) => Reply::ok(json!({
                "version": protocol::VERSION,
                "broker": env!("CARGO_PKG_VERSION"),
            })),
            Request::List(_) => self.list(peer),
            _ => self.decide(peer, &req),
        }
    }

    /// The caller's own mounts; root sees all (a record with no owner is root's).
    fn list(&self, peer: &Peer) -> Reply {
        let mounts: Vec<Value> = Record::all()
            .into_iter()
            .filter(|(r, _)| peer.uid == 0 || r.owner == Some(peer.uid))
            .map(|(r, state)| {
                json!({
                    "target": r.target.display().to_string(),
                    "source": r.source.display().to_string(),
                    "backend": r.backend.to_string(),
                    "map": r.map,
                    "options": r.options,
                    "mount_id": r.mount_id,
                    "owner": r.owner.unwrap_or(0),
                    "pid": r.pid,
                    "state": format!("{state:?}").to_lowercase(),
                })
            })
            .collect();
        Reply::ok(json!({ "mounts": mounts }))
    }

    /// Takes the locks, judges, audits the decision, performs an allowed operation, and
    /// audits its result. The facts judged (the caller's mount count, the owner of the mount
    /// to unmount, the target's state) are read under the locks the operation holds, so two
    /// requests cannot both pass a check that only one of them may pass.
    fn decide(&self, peer: &Peer, req: &Request) -> Reply {
        let mut rec = audit::Record {
            uid: peer.uid,
            pid: peer.pid,
            exe: peer.exe.clone(),
            op: req.op().into(),
            ..audit::Record::default()
        };
        describe(req, &mut rec);
        let mut held = Held::default();
        // A name that cannot even be locked (a symlink to unmount, say) is refused, audited.
        let (locks, decision) = match Locks::take(peer, req) {
            Ok(locks) => {
                let decision = self.judge(peer, req, &locks, &mut held);
                (locks, decision)
            }
            Err(why) => (Locks::default(), Decision::Refuse(why)),
        };
        rec.allowed = matches!(decision, Decision::Allow(_));
        if let Decision::Refuse(why) = &decision {
            rec.reason = Some(why.clone());
        }
        if let Err(e) = self.audit.record(&rec) {
            tracing::error!("{e}");
            return Reply::error(&format!("refused: the decision could not be audited ({e})"));
        }
        tracing::info!(uid = peer.uid, pid = peer.pid, op = req.op(), allowed = rec.allowed, reason = ?rec.reason, "decision");
        let flags = match decision {
            Decision::Refuse(why) => return Reply::error(&why),
            Decision::Allow(flags) => flags,
        };
        let done = match req {
            Request::Mount(m) => self.mount(peer, m, held, flags),
            Request::Umount(_) => unmount(peer, &locks),
            Request::MakeImage(_) => make_image(held),
            Request::Adopt(a) => adopt(a, held),
            Request::Version(_) | Request::List(_) => Err("not a decision".into()),
        };
        let outcome = rec.outcome(done.as_ref().map(drop).map_err(String::as_str));
        if let Err(e) = self.audit.record(&outcome) {
            // Done already: the decision is on record; the caller still learns the result.
            tracing::error!("{e}");
        }
        drop(locks);
        match done {
            Ok(reply) => reply,
            Err(e) => Reply::error(&e),
        }
    }

    /// Performs an allowed mount on the SOURCE and TARGET fds opened as the caller, with
    /// the flags the rules decided (nosuid and nodev forced for non-root callers).
    fn mount(
        &self,
        peer: &Peer,
        m: &protocol::Mount,
        held: Held,
        flags: Flags,
    ) -> Result<Reply, String> {
        let lost = || "mount was allowed, but its source or target was not kept".to_string();
        let mapping = IdMapping::parse(&m.map).map_err(|e| e.to_string())?;
        let source = held.source.ok_or_else(lost)?;
        let mount_flags = MountFlags {
            read_only: flags.read_only,
            suid: flags.suid,
            dev: flags.dev,
            exec: true,
        };
        if m.detached {
            let tree = detached_tree(&source, &mapping, mount_flags)
                .map_err(|e| format!("mount failed: {e}"))?;
            let scratch = crate::registry::run_dir();
            std::fs::create_dir_all(&scratch)
                .map_err(|e| format!("mount failed: {}: {e}", scratch.display()))?;
            let tree = {
                let _one = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
                super::lock::locked(&self.config.shiftfs, tree, &scratch)
            }
            .map_err(|e| format!("mount failed: cannot lock its flags: {e}"))?;
            tracing::info!(uid = peer.uid, source = %source.path().display(), "detached mount handed over");
            return Ok(Reply {
                line: protocol::ok(json!({
                    "source": source.path().display().to_string(),
                    "backend": "kernel",
                    "options": mount_flags.to_string(),
                    "detached": true,
                })),
                fd: Some(tree),
            });
        }
        let dirs = Resolved {
            source,
            target: held.target.ok_or_else(lost)?,
        };
        let mut req = options::Request {
            source: dirs.source.path().to_path_buf(),
            target: dirs.target.path().to_path_buf(),
            target_root: None,
            mapping,
            flags: mount_flags,
            backend: match m.backend {
                protocol::Backend::Kernel => options::Backend::Kernel,
                protocol::Backend::Fuse => options::Backend::Fuse,
                protocol::Backend::Auto => options::Backend::Auto,
            },
            recursive: false,
            fuse: options::FuseTuning::default(),
        };
        let fail = |e: crate::mount::Error| format!("mount failed: {e}");
        // Held until the mount is in place: no other mount lands on the target meanwhile.
        let _target = TargetLock::take(&req.target).map_err(|e| fail(e.into()))?;
        crate::mount::check(&req, &dirs).map_err(fail)?;
        let (backend, _) = crate::mount::choose_backend(&req, &dirs).map_err(fail)?;
        req.backend = backend;
        let id = match backend {
            options::Backend::Kernel => {
                crate::mount::mount_kernel_for(&req, &dirs, peer.uid).map_err(fail)?
            }
            _ => self.mount_fuse(peer, &req, &dirs).map_err(fail)?,
        };
        tracing::info!(uid = peer.uid, target = %req.target.display(), %backend, "mounted");
        Ok(Reply::ok(json!({
            "target": req.target.display().to_string(),
            "source": req.source.display().to_string(),
            "backend": backend.to_string(),
            "options": req.flags.to_string(),
            "mount_id": id,
        })))
    }

    /// Starts the sandboxed FUSE daemon (a `shiftfs` process of root's, which the caller
    /// cannot signal or trace), then hands the mount's record to the caller.
    fn mount_fuse(
        &self,
        peer: &Peer,
        req: &options::Request,
        dirs: &Resolved,
    ) -> Result<Option<u64>, crate::mount::Error> {
        crate::mount::check_fuse_device()?;
        {
            let _one = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
            crate::daemon::spawn_exe(&self.config.shiftfs, req, dirs)?;
        }
        // The daemon recorded the mount as root's before saying it was ready; the target lock,
        // held until the reply, keeps anyone from acting on that record meanwhile.
        let rec = crate::mount::mounted_at(&req.target).and_then(|m| Record::of(&m));
        match &rec {
            Some(r) => r.clone().owned_by(peer.uid).save()?,
            None => tracing::warn!("mounted, but the daemon left no record to give the caller"),
        }
        // The daemon is the target's own, or (stacked on a shared idmappable mount) the
        // shared mount's, which this broker may have started for this request. Waiting on a
        // daemon that is not our child returns at once.
        let daemon = rec.as_ref().and_then(|r| match r.lower() {
            Some(lower) => crate::mount::mounted_at(&lower)
                .and_then(|m| Record::of(&m))
                .and_then(|low| low.pid),
            None => r.pid,
        });
        if let Some(pid) = daemon {
            reap_when_done(pid);
        }
        Ok(rec.map(|r| r.mount_id))
    }

    /// Resolves what the rules need, fills the audit record, and applies the rule.
    ///
    /// Paths are opened with the caller's file system credentials (this connection's thread
    /// only): a caller can name only what it could reach itself, and learns nothing from the
    /// answers about directories it cannot search.
    fn judge(&self, peer: &Peer, req: &Request, locks: &Locks, held: &mut Held) -> Decision {
        let caller = match self.caller(peer) {
            Ok(c) => c,
            Err(why) => return Decision::Refuse(why),
        };
        // Records are read as root, before taking the caller's credentials, under the locks.
        let owner = match (req, &locks.name) {
            (Request::Umount(_), Some(t)) => crate::mount::mounted_at(t)
                .and_then(|m| Record::of(&m))
                .and_then(|r| r.owner),
            _ => None,
        };
        let mounts = match req {
            Request::Mount(_) => Record::all()
                .iter()
                .filter(|(r, _)| r.owner == Some(peer.uid))
                .count(),
            _ => 0,
        };
        // The policy and subid files are the administrator's, read as root (they need not be
        // readable by users).
        let context = match req {
            Request::Mount(_) | Request::MakeImage(_) | Request::Adopt(_) => self.context(),
            _ => Err(String::new()),
        };
        let _as_caller = if peer.uid == 0 {
            None
        } else {
            match FsCreds::switch_checked(
                FsIds::Host(OuterUid::new(peer.uid), OuterGid::new(peer.gid)),
                &peer.groups,
            ) {
                Ok(c) => Some(c),
                Err(e) => {
                    return Decision::Refuse(format!(
                        "cannot take the caller's credentials to look up its paths: {e}"
                    ));
                }
            }
        };
        match req {
            Request::Mount(m) => match (self.mount_request(m, held), context) {
                (Ok(r), Ok((policy, db))) => rules::decide_mount(&caller, &r, &policy, &db, mounts),
                (Err(why), _) | (_, Err(why)) => Decision::Refuse(why),
            },
            Request::Umount(u) => rules::decide_umount(&caller, &u.target, owner),
            Request::MakeImage(p) => {
                let parent = checked_path(&p.path).and_then(|path| {
                    let parent = path.parent().ok_or("/ has no parent")?.to_path_buf();
                    let name = path.file_name().ok_or("no name")?.to_os_string();
                    Ok((parent, name))
                });
                let judged = parent.and_then(|(dir, name)| {
                    let (fd, uid, _) = open_owner(&dir)?;
                    let (policy, _) = context?;
                    Ok((dir, name, fd, uid, policy.image_range))
                });
                match judged {
                    Ok((dir, name, fd, uid, image)) => {
                        held.parent = Some((fd, name));
                        held.image = Some(image);
                        rules::decide_make_image(&caller, &dir.display().to_string(), uid)
                    }
                    Err(why) => Decision::Refuse(why),
                }
            }
            Request::Adopt(a) => {
                let judged = (|| {
                    let map = IdMapping::parse(&a.map).map_err(|e| e.to_string())?;
                    let (dir, uid, _) = checked_path(&a.path).and_then(|p| open_owner(&p))?;
                    let (policy, db) = context?;
                    Ok::<_, String>((map, dir, uid, policy, db))
                })();
                match judged {
                    Ok((map, dir, uid, policy, db)) => {
                        let image = policy.image_range;
                        held.source = Some(dir);
                        held.image = Some(image);
                        rules::decide_adopt(&caller, &a.path, uid, &map, &db, image)
                    }
                    Err(why) => Decision::Refuse(why),
                }
            }
            Request::Version(_) | Request::List(_) => Decision::Allow(Flags::default()),
        }
    }

    fn caller(&self, peer: &Peer) -> Result<Caller, String> {
        let (name, gid) = passwd_entry(&self.config.passwd, peer.uid).ok_or_else(|| {
            format!(
                "uid {} has no entry in {}; the broker serves only known users",
                peer.uid,
                self.config.passwd.display()
            )
        })?;
        let names = group_names(&self.config.group);
        Ok(Caller {
            pid: peer.pid,
            uid: peer.uid,
            gid,
            name,
            groups: peer
                .groups
                .iter()
                .map(|g| (*g, names.get(g).cloned()))
                .collect(),
        })
    }

    fn context(&self) -> Result<(Policy, subid::Db), String> {
        let policy = Policy::load(&self.config.policy).map_err(|e| e.to_string())?;
        let db = subid::Db::read(&self.config.subuid, &self.config.subgid)
            .map_err(|e| format!("cannot read the subordinate id files: {e}"))?;
        Ok((policy, db))
    }

    /// The facts the rules need; SOURCE and TARGET, opened as the caller without following
    /// symlinks, are kept in `held` for the mount itself.
    fn mount_request(&self, m: &protocol::Mount, held: &mut Held) -> Result<MountRequest, String> {
        let map = IdMapping::parse(&m.map).map_err(|e| e.to_string())?;
        let source_path = checked_path(&m.source)?;
        let parent = source_path
            .parent()
            .ok_or_else(|| "source / cannot be shifted".to_string())?;
        let (_, parent_uid, _) = open_owner(parent)?;
        let (source, uid, gid) = open_owner(&source_path)?;
        let target = match (&m.target, m.detached) {
            (Some(_), true) => {
                return Err("give a target or ask for a detached mount, not both".into());
            }
            (None, false) => return Err("no target; give one or ask for a detached mount".into()),
            (None, true) if m.backend == protocol::Backend::Fuse => {
                return Err(
                    "a detached mount fd comes from the kernel backend only; ask for backend kernel (or auto), or mount the FUSE backend on a target"
                        .into(),
                );
            }
            (None, true) => Target::Detached,
            (Some(t), false) => {
                let path = checked_path(t)?;
                let dir = Dir::open(&path).map_err(|e| format!("target {e}"))?;
                let st = rustix::fs::fstat(dir.as_fd()).map_err(|e| format!("target {t}: {e}"))?;
                let empty = dir.is_empty().map_err(|e| format!("target {e}"))?;
                held.target = Some(dir);
                Target::Directory {
                    path,
                    uid: st.st_uid,
                    empty,
                }
            }
        };
        held.source = Some(source);
        Ok(MountRequest {
            source: Source {
                path: source_path,
                uid,
                gid,
                parent_uid,
            },
            target,
            map,
            flags: Flags {
                read_only: m.read_only,
                suid: m.suid,
                dev: m.dev,
            },
        })
    }
}

/// A reply line, and the mount fd that goes with it (over `SCM_RIGHTS`, with the line's
/// bytes, so a client reading the line gets the fd in the same receive).
struct Reply {
    line: String,
    fd: Option<OwnedFd>,
}

impl Reply {
    fn ok(fields: Value) -> Self {
        Self {
            line: protocol::ok(fields),
            fd: None,
        }
    }

    fn error(message: &str) -> Self {
        Self {
            line: protocol::error(message),
            fd: None,
        }
    }

    fn send(&self, stream: &UnixStream) -> io::Result<()> {
        let Some(fd) = &self.fd else {
            return (&*stream).write_all(self.line.as_bytes());
        };
        let bytes = self.line.as_bytes();
        let sent = crate::sys::fdpass::send_with_fd(stream.as_fd(), bytes, fd.as_fd())?;
        (&*stream).write_all(&bytes[sent..])
    }
}

/// What the request names, for its audit lines.
fn describe(req: &Request, rec: &mut audit::Record) {
    match req {
        Request::Mount(m) => {
            rec.source = Some(m.source.clone());
            rec.target = m.target.clone();
            rec.map = Some(m.map.clone());
            rec.backend = Some(format!("{:?}", m.backend).to_lowercase());
        }
        Request::Umount(u) => rec.target = Some(u.target.clone()),
        Request::MakeImage(p) => rec.target = Some(p.path.clone()),
        Request::Adopt(a) => {
            rec.source = Some(a.path.clone());
            rec.map = Some(a.map.clone());
        }
        Request::Version(_) | Request::List(_) => {}
    }
}

/// What the judging opened and the operation uses: no name is looked up twice.
#[derive(Default)]
struct Held {
    source: Option<Dir>,
    target: Option<Dir>,
    /// For `make-image`: the directory to make it in and the new name.
    parent: Option<(Dir, std::ffi::OsString)>,
    image: Option<ImageRange>,
}

/// The locks held from before a request is judged until it is done, so that what was judged
/// still holds when it is performed: for `mount`, the caller's own (its mount count); for
/// `umount` of a mount point, the target's (its owner; the same [`TargetLock`] `shiftfs
/// mount` and `umount` take). A mount takes its target's lock once allowed, before the
/// target is checked again and mounted on. Lock files are made only for the caller's uid
/// and for mount points, so requests cannot fill the run directory with them.
#[derive(Default)]
struct Locks {
    _user: Option<TargetLock>,
    target: Option<TargetLock>,
    /// For `umount`, the name to unmount.
    name: Option<PathBuf>,
}

impl Locks {
    fn take(peer: &Peer, req: &Request) -> Result<Self, String> {
        let lock = |p: &Path| TargetLock::take(p).map_err(|e| e.to_string());
        let mut locks = Locks::default();
        match req {
            Request::Mount(_) => {
                // Not a real path: the name of the per-user lock of the mount count.
                let user = PathBuf::from(format!("/.shiftfsd-user-{}", peer.uid));
                locks._user = Some(lock(&user)?);
            }
            Request::Umount(u) => {
                let path = checked_path(&u.target)?;
                let name = crate::mount::unmount_name(&path).map_err(|e| e.to_string())?;
                if crate::mount::mounted_at(&name).is_some() {
                    locks.target = Some(lock(&name)?);
                }
                locks.name = Some(name);
            }
            Request::MakeImage(_) | Request::Adopt(_) | Request::Version(_) | Request::List(_) => {}
        }
        Ok(locks)
    }
}

/// The daemon (recorded as the process serving, which is the child started) is a child of
/// the broker's for as long as it serves: wait for it, so that it leaves no zombie.
fn reap_when_done(pid: u32) {
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name(format!("reap-{pid:?}"))
        .spawn(move || {
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread to wait for the daemon {pid:?}: {e}");
    }
}

/// An idmapped clone of SOURCE's mount, attached nowhere: the caller attaches it with
/// `move_mount` in a mount namespace of its own.
fn detached_tree(
    source: &Dir,
    mapping: &IdMapping,
    flags: MountFlags,
) -> Result<OwnedFd, kernel::Error> {
    let api = kernel::Syscalls;
    let tree = kernel::clone_tree(&api, source, false)?;
    let userns = kernel::userns_fd(mapping)?;
    kernel::set_idmap(&api, tree.as_fd(), source, userns.as_fd(), flags, false)?;
    Ok(tree)
}

/// Performs an allowed unmount of the name locked (never through a symlink; see
/// [`crate::mount::unmount_name`]), under the lock the owner was checked under.
fn unmount(peer: &Peer, locks: &Locks) -> Result<Reply, String> {
    let Some(name) = &locks.name else {
        return Err("umount was allowed, but its target was not kept".into());
    };
    let fail = |e: crate::mount::Error| format!("umount failed: {e}");
    // Only root gets here for a name that was no mount point when judged.
    let taken;
    let lock = match &locks.target {
        Some(l) => l,
        None => {
            taken = TargetLock::take(name).map_err(|e| fail(e.into()))?;
            &taken
        }
    };
    crate::mount::unmount_locked(name, false, lock).map_err(fail)?;
    tracing::info!(uid = peer.uid, target = %name.display(), "unmounted");
    Ok(Reply::ok(json!({ "target": name.display().to_string() })))
}

/// Makes the new image directory in the held parent, as root (only root can give it to the
/// image range), owned by the range's first id, mode 0755.
fn make_image(held: Held) -> Result<Reply, String> {
    let (Some((parent, name)), Some(image)) = (held.parent, held.image) else {
        return Err("make-image was allowed, but its directory was not kept".into());
    };
    let path = parent.path().join(&name);
    let fail = |e: rustix::io::Errno| format!("cannot make the image {}: {e}", path.display());
    // Created inaccessible and opened without following a symlink, so what is chowned is
    // the directory made here, whatever the caller does to its directory meanwhile.
    rustix::fs::mkdirat(&parent, &name, Mode::empty()).map_err(|e| match e {
        rustix::io::Errno::EXIST => format!("{} already exists; choose a new name", path.display()),
        e => fail(e),
    })?;
    let dir = rustix::fs::openat(
        &parent,
        &name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail)?;
    let id = image.base;
    rustix::fs::fchown(
        &dir,
        Some(rustix::fs::Uid::from_raw(id)),
        Some(rustix::fs::Gid::from_raw(id)),
    )
    .map_err(fail)?;
    rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o755)).map_err(fail)?;
    Ok(Reply::ok(json!({
        "path": path.display().to_string(),
        "uid": id,
        "gid": id,
    })))
}

/// Shifts the held tree into the image range with the offline shift engine: each host id
/// `OUTER + k` of the map becomes the image id `base + INNER + k`. An inode owned by any
/// other id stops the shift before anything is written, so a tree that is not wholly the
/// caller's is refused unchanged, as is one with hard links to files outside it.
fn adopt(a: &protocol::Adopt, held: Held) -> Result<Reply, String> {
    let (Some(dir), Some(image)) = (held.source, held.image) else {
        return Err("adopt was allowed, but its tree was not kept".into());
    };
    let map = IdMapping::parse(&a.map).map_err(|e| e.to_string())?;
    let mut to = Vec::new();
    for (kind, ranges) in [("u", map.uid.ranges()), ("g", map.gid.ranges())] {
        for r in ranges {
            to.push(format!(
                "{kind}:{}:{}:{}",
                r.outer,
                u64::from(image.base) + u64::from(r.inner),
                r.count
            ));
        }
    }
    let to = IdMapping::parse(&to.join(",")).map_err(|e| format!("adopt: {e}"))?;
    let opts = shift::Options {
        from: IdMapping::identity(),
        to,
        unmapped: shift::OnUnmapped::Fail,
        walk: WalkOptions::default(),
        dry_run: false,
        allow_external_links: false,
    };
    // The engine opens the root by name again, refusing a symlink; whatever it finds there
    // must pass the same every-inode check.
    let done = shift::shift(dir.path(), &opts, &shift::NoProgress)
        .map_err(|e| format!("adopt failed: {e}"))?;
    Ok(Reply::ok(json!({
        "path": dir.path().display().to_string(),
        "inodes": done.inodes,
        "changed": done.changed,
    })))
}

/// A path from a request: absolute, with no `.` or `..`, so that (opened without following
/// symlinks) its text is its canonical name.
fn checked_path(p: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(p);
    if !path.is_absolute() || p.split('/').any(|c| c == "." || c == "..") {
        return Err(format!(
            "{p}: paths sent to the broker must be absolute, without . or .. components"
        ));
    }
    Ok(path.components().collect())
}

/// Opens a directory without following symlinks; its fd and owner.
fn open_owner(path: &Path) -> Result<(Dir, u32, u32), String> {
    let dir = Dir::open(path).map_err(|e| e.to_string())?;
    let st = rustix::fs::fstat(dir.as_fd()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((dir, st.st_uid, st.st_gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_are_absolute_and_plain() {
        assert_eq!(checked_path("/a//b/").unwrap(), PathBuf::from("/a/b"));
        for bad in ["a/b", "/a/../b", "/a/./b", ""] {
            assert!(checked_path(bad).unwrap_err().contains("absolute"), "{bad}");
        }
    }

    #[test]
    fn reads_passwd_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("passwd");
        std::fs::write(
            &pw,
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/h:/bin/sh\nbad\n",
        )
        .unwrap();
        assert_eq!(passwd_entry(&pw, 1000), Some(("alice".into(), 1000)));
        assert_eq!(passwd_entry(&pw, 5), None);
        let gr = dir.path().join("group");
        std::fs::write(&gr, "users:x:100:alice\ncontainers:x:500:\n").unwrap();
        let g = group_names(&gr);
        assert_eq!(g.get(&500).map(String::as_str), Some("containers"));
    }

    #[test]
    fn slots_cap_per_uid_and_in_all() {
        let config = Config {
            max_connections: 3,
            max_per_uid: 2,
            ..Config::default()
        };
        let slots = Arc::new(Mutex::new(Slots::default()));
        let a1 = take_slot(&slots, 1000, &config).unwrap();
        let _a2 = take_slot(&slots, 1000, &config).unwrap();
        assert!(take_slot(&slots, 1000, &config).is_none());
        let _b = take_slot(&slots, 1001, &config).unwrap();
        assert!(take_slot(&slots, 1002, &config).is_none());
        drop(a1);
        assert!(take_slot(&slots, 1000, &config).is_some());
    }
}
