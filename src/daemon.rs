//! The FUSE daemon's life cycle, both ends: starting it as a detached copy of this binary
//! (handing it the checked SOURCE and TARGET fds) and waiting for its readiness line; in the
//! daemon, leaving the caller's session, serving, the supervisor that keeps the host's mount
//! namespace, stop signals, the record and the log. With `main.rs`, the only place that
//! touches process-wide state (signals, fork, exit, the session).
//!
//! One daemon per source, as FUSE sessions (`-o share=sessions`, and `share=auto` wherever
//! the stack of `mount::mount_over_shared` is not used): every FUSE mount of one source
//! directory (same device and inode, same sandbox mode) is served by one daemon process,
//! one fuser session per mount, each with its own map, flags and inode table; the sessions
//! tell each other of every change (`backend::fuse::share`), so two containers sharing an
//! image never see stale names or write into a replaced file. The daemon's unconfined
//! supervisor listens on `RUN_DIR/sources/DEV-INO-SANDBOX.sock` (root only: mode 0600 and
//! the peer's uid checked). A later `shiftfs mount` of the source, holding the source's
//! lock, connects and hands over its checked SOURCE and TARGET fds with the request; the
//! supervisor, in the host's mount namespace, clones the source tree and mounts a new FUSE
//! connection on TARGET (what the sandboxed server can no longer do), passes the tree and
//! the `/dev/fuse` fd to the server over a seqpacket socketpair made before the sandbox
//! (`SCM_RIGHTS`; `recvmsg` is in the seccomp list), and records the mount once the server
//! serves it. Each mount keeps its own record (the server's pid in all of them, which is how
//! `list` shows the sharing). A session that ends (its mount unmounted, by anyone) is
//! dropped from the set and its record removed; the last one ends the daemon, and a join
//! that comes as it stops is told so, and starts a daemon of its own. A stop signal
//! unmounts every mount the daemon serves. Where no daemon answers (none yet, or a stale
//! socket of a killed one) `shiftfs mount` starts one as before; `-o share=off` always does.
//! The sessions share one fd budget (`backend::fuse::share::Budget`).
//!
//! A shared idmappable FUSE mount (`mount::mount_over_shared`) is served like any other
//! mount; the supervisor also watches the host's mount table (`watch_shared`) and unmounts
//! one that nothing uses any more, since an idmapped mount stacked on it may go with
//! umount(8), which tells no one.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use rustix::mount::UnmountFlags;

use crate::idmap::IdMapping;
use crate::mount::{Error, Resolved, mounted_at, record};
use crate::options::{Backend, OptionSet, Request, Share};
use crate::registry::{Record, TargetLock, run_dir};
use crate::resolve::Dir;
use crate::sys::daemon;
use crate::sys::inherit::pass_on;

/// Starts the FUSE daemon as a detached copy of this binary, handing it the checked SOURCE
/// and TARGET fds, and waits until it says the mount is in place (or why not).
pub fn spawn(req: &Request, dirs: &Resolved) -> Result<(), Error> {
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        what: "cannot find the shiftfs binary to start the daemon for",
        path: req.target.clone(),
        source,
    })?;
    spawn_exe(&exe, req, dirs)
}

/// [`spawn`] with the `shiftfs` binary at `exe` (the broker is another binary).
pub fn spawn_exe(exe: &Path, req: &Request, dirs: &Resolved) -> Result<(), Error> {
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| Error::Io { what, path, source }
    };
    if req.fuse.share == Share::Idmap
        && !req.fuse.idmappable
        && !crate::mount::over_shared_fuse(req)
    {
        return Err(Error::Daemon(
            "share=idmap needs Linux 6.12+ (FUSE_ALLOW_IDMAP) and a map a kernel idmapped \
             mount can take; use share=sessions"
                .into(),
        ));
    }
    if crate::mount::over_shared_fuse(req) {
        match crate::mount::mount_over_shared(exe, req, dirs) {
            Ok(()) => return Ok(()),
            Err(e) if req.fuse.share == Share::Auto => tracing::warn!(
                "cannot stack on a shared idmappable FUSE mount ({e}); a FUSE session of its own \
                 instead"
            ),
            Err(e) => return Err(e),
        }
    }
    // Held until this mount is served: a second mount of the source waits for the daemon
    // this one starts, and joins it.
    let _source_lock = match source_socket(req, &dirs.source) {
        Some(sock) => {
            let lock = TargetLock::at(&sock.with_extension("lock"), &req.source)?;
            if join(req, dirs, &sock)? {
                return Ok(());
            }
            Some(lock)
        }
        None => None,
    };
    let log_path = Record::log_path(&req.target);
    let log = open_log(&log_path).map_err(io_err("cannot open the daemon log", &log_path))?;
    let handing = "cannot hand the checked directories to the daemon of";
    let _src = pass_on(dirs.source.as_fd()).map_err(io_err(handing, &req.target))?;
    let _tgt = pass_on(dirs.target.as_fd()).map_err(io_err(handing, &req.target))?;
    let mut child = Command::new(exe)
        .arg0("shiftfs")
        .arg("mount")
        .arg("--daemon-child")
        .arg(format!("--source-fd={}", dirs.source.as_fd().as_raw_fd()))
        .arg(format!("--target-fd={}", dirs.target.as_fd().as_raw_fd()))
        .args(["--backend", "fuse"])
        .args(["--map", &req.mapping.to_string()])
        .args(["-o", &req.options_text()])
        .arg("--")
        .arg(&req.source)
        .arg(&req.target)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(io_err("cannot start the daemon", exe))?;
    drop((_src, _tgt));
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line).map_err(io_err(
            "cannot read the readiness of the daemon of",
            &req.target,
        ))?;
    }
    match line.trim_end().split_once(' ') {
        _ if line.trim_end() == "ready" => Ok(()),
        Some(("error", msg)) => {
            let _ = child.wait();
            Err(Error::Daemon(msg.to_string()))
        }
        _ => {
            let status = child
                .wait()
                .map_err(io_err("cannot wait for the daemon of", &req.target))?;
            Err(Error::Daemon(format!(
                "the daemon exited ({status}) before the mount was ready; see {}",
                log_path.display()
            )))
        }
    }
}

/// In the backgrounded daemon, once it holds its SOURCE and TARGET: leave the caller's
/// session, mount and serve, say `ready` (or `error MSG`) on stdout, then let go of stdout
/// so the caller's read ends.
pub fn serve_child(req: &Request, dirs: Resolved) -> Result<(), Error> {
    let _ = rustix::process::setsid();
    // The caller's working directory would stay busy as long as the mount lives; the paths
    // handed over are absolute.
    std::env::set_current_dir("/").map_err(|source| Error::Io {
        what: "cannot change to",
        path: PathBuf::from("/"),
        source,
    })?;
    serve_fuse(req, dirs, |r| {
        let mut out = std::io::stdout().lock();
        let _ = match r {
            Ok(()) => writeln!(out, "ready"),
            Err(e) => writeln!(out, "error {}", e.to_string().replace('\n', " ")),
        };
        let _ = out.flush();
        drop(out);
        if let Ok(null) = std::fs::File::open("/dev/null") {
            let _ = rustix::stdio::dup2_stdout(&null);
        }
    })
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
    /// One session ended; its mount id follows (8 bytes, little-endian).
    pub const SESSION_END: u8 = b'S';
}

/// Messages on the seqpacket sockets of joining mounts (`shiftfs mount` to the supervisor,
/// the supervisor to the server): a kind, a mount id (8 bytes little-endian), text, and
/// file descriptors (`SCM_RIGHTS`).
mod wire {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::mem::MaybeUninit;
    use std::os::fd::{BorrowedFd, OwnedFd};

    use rustix::net::{
        RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
        SendAncillaryMessage, SendFlags,
    };

    /// A mount to serve: the request's fields, and SOURCE and TARGET (to the supervisor) or
    /// the tree and /dev/fuse fd (to the server).
    pub const JOIN: u8 = b'J';
    pub const OK: u8 = b'K';
    /// Refused; the reason follows.
    pub const ERR: u8 = b'X';
    /// The daemon is stopping: start another.
    pub const GONE: u8 = b'G';

    const HEAD: usize = 9;
    const MAX: usize = 64 * 1024;

    pub struct Frame {
        pub kind: u8,
        pub id: u64,
        pub text: Vec<u8>,
        pub fds: Vec<OwnedFd>,
    }

    pub fn send(
        fd: BorrowedFd<'_>,
        kind: u8,
        id: u64,
        text: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let mut head = [0u8; HEAD];
        head[0] = kind;
        head[1..].copy_from_slice(&id.to_le_bytes());
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other(
                "too many file descriptors for one message",
            ));
        }
        let iov = [IoSlice::new(&head), IoSlice::new(text)];
        rustix::net::sendmsg(fd, &iov, &mut control, SendFlags::NOSIGNAL)?;
        Ok(())
    }

    /// The next message; None when the other end closed.
    pub fn recv(fd: BorrowedFd<'_>) -> io::Result<Option<Frame>> {
        let mut buf = vec![0u8; MAX];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match rustix::net::recvmsg(fd, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r?,
            }
        };
        let fds: Vec<OwnedFd> = control
            .drain()
            .flat_map(|m| match m {
                RecvAncillaryMessage::ScmRights(fds) => fds.collect(),
                _ => Vec::new(),
            })
            .collect();
        if got.bytes == 0 {
            return Ok(None);
        }
        if got.bytes < HEAD
            || got
                .flags
                .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
        {
            return Err(io::Error::other("malformed message"));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&buf[1..HEAD]);
        Ok(Some(Frame {
            kind: buf[0],
            id: u64::from_le_bytes(id),
            text: buf[HEAD..got.bytes].to_vec(),
            fds,
        }))
    }
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Where the daemon serving `req`'s source takes new mounts; None when this mount shares
/// no daemon (`-o share=off`).
fn source_socket(req: &Request, source: &Dir) -> Option<PathBuf> {
    if req.fuse.share == Share::Off {
        return None;
    }
    let (dev, ino) = source.id().ok()?;
    let dir = run_dir().join("sources");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::warn!(
            "cannot make {}: {e}; this mount shares no daemon",
            dir.display()
        );
        return None;
    }
    Some(dir.join(format!("{dev}-{ino}-{}.sock", req.fuse.sandbox)))
}

/// The fields of a request a joining mount sends, NUL-separated (paths cannot hold NUL).
fn encode_request(req: &Request, owner: u32) -> Vec<u8> {
    let mut text = Vec::new();
    for field in [
        req.mapping.to_string().as_bytes(),
        req.options_text().as_bytes(),
        req.source.as_os_str().as_bytes(),
        req.target.as_os_str().as_bytes(),
        owner.to_string().as_bytes(),
    ] {
        text.extend_from_slice(field);
        text.push(0);
    }
    text
}

fn decode_request(text: &[u8]) -> Result<(Request, u32), String> {
    let fields: Vec<&[u8]> = text.split(|&b| b == 0).collect();
    let [map, options, source, target, owner, _] = fields[..] else {
        return Err("malformed mount request".into());
    };
    let utf8 = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|e| e.to_string());
    let path = |b: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(b));
    let mut opts = OptionSet::default();
    opts.apply(&utf8(options)?).map_err(|e| e.to_string())?;
    let req = Request {
        source: path(source),
        target: path(target),
        target_root: None,
        mapping: IdMapping::parse(&utf8(map)?).map_err(|e| e.to_string())?,
        flags: opts.flags,
        backend: Backend::Fuse,
        recursive: opts.recursive,
        fuse: opts.fuse,
    };
    let owner = utf8(owner)?.parse().map_err(|_| "bad owner".to_string())?;
    Ok((req, owner))
}

/// Hands the mount to the daemon already serving its source, if one answers at `sock`:
/// true once it serves it; false when there is none (or it is stopping).
fn join(req: &Request, dirs: &Resolved, sock: &Path) -> Result<bool, Error> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let err = |source: io::Error| Error::Io {
        what: "cannot hand the mount to the daemon of its source, for",
        path: req.target.clone(),
        source,
    };
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| err(e.into()))?;
    let addr = SocketAddrUnix::new(sock).map_err(|e| err(e.into()))?;
    if let Err(e) = rustix::net::connect(&fd, &addr) {
        // No daemon, or the socket of one that was killed.
        tracing::debug!("no daemon to join at {}: {e}", sock.display());
        return Ok(false);
    }
    let _ = rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(60)),
    );
    let owner = rustix::process::getuid().as_raw();
    wire::send(
        fd.as_fd(),
        wire::JOIN,
        0,
        &encode_request(req, owner),
        &[dirs.source.as_fd(), dirs.target.as_fd()],
    )
    .map_err(err)?;
    match wire::recv(fd.as_fd()).map_err(err)? {
        Some(f) if f.kind == wire::OK => Ok(true),
        Some(f) if f.kind == wire::ERR => {
            Err(Error::Daemon(String::from_utf8_lossy(&f.text).into_owned()))
        }
        _ => Ok(false),
    }
}

/// What the supervisor knows of each mount its server serves, by mount id.
type Mounts = Arc<Mutex<HashMap<u64, Record>>>;

/// The supervisor's side of joining: listens at `path` (replacing the socket of a daemon
/// that is gone: the caller holds the source's lock) and serves each joining mount in turn.
fn listen_for_joins(path: PathBuf, chan: OwnedFd, mounts: Mounts, server: Option<u32>) {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let listener = (|| {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let addr = SocketAddrUnix::new(&path)?;
        // Only the socket of a daemon that is gone is replaced (a `--foreground` mount
        // starts its daemon without looking for one).
        if std::fs::symlink_metadata(&path).is_ok() {
            let probe = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )?;
            if rustix::net::connect(&probe, &addr).is_ok() {
                return Err(io::Error::other(
                    "another daemon of this source listens there",
                ));
            }
            std::fs::remove_file(&path)?;
        }
        rustix::net::bind(&fd, &addr)?;
        rustix::fs::chmod(&path, rustix::fs::Mode::from_raw_mode(0o600))?;
        rustix::net::listen(&fd, 16)?;
        Ok::<_, io::Error>(fd)
    })();
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(
                "cannot listen at {} ({e}); later mounts of this source get a daemon of their own",
                path.display()
            );
            return;
        }
    };
    let ours = rustix::fs::stat(&path)
        .ok()
        .map(|st| (st.st_dev, st.st_ino));
    std::thread::spawn(move || {
        loop {
            let conn = match rustix::net::accept(&listener) {
                Ok(c) => c,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!("cannot take joining mounts: {e}");
                    return;
                }
            };
            let (kind, text) = match take_join(&conn, &chan, &mounts, server) {
                Ok(()) => (wire::OK, String::new()),
                Err(None) => (wire::GONE, String::new()),
                Err(Some(e)) => (wire::ERR, e),
            };
            let _ = wire::send(conn.as_fd(), kind, 0, text.as_bytes(), &[]);
        }
    });
    SOCKET.get_or_init(|| (path, ours));
}

/// The join socket this supervisor made, removed when the daemon ends (if still its own).
static SOCKET: std::sync::OnceLock<(PathBuf, Option<(u64, u64)>)> = std::sync::OnceLock::new();

fn remove_socket() {
    if let Some((path, Some(ours))) = SOCKET.get()
        && rustix::fs::stat(path).is_ok_and(|st| (st.st_dev, st.st_ino) == *ours)
    {
        let _ = std::fs::remove_file(path);
    }
}

/// One joining mount: checks the caller is root, mounts it (host side), has the server
/// serve it and records it. `Err(None)`: the daemon is stopping.
fn take_join(
    conn: &OwnedFd,
    chan: &OwnedFd,
    mounts: &Mounts,
    server: Option<u32>,
) -> Result<(), Option<String>> {
    let peer = rustix::net::sockopt::socket_peercred(conn).map_err(|e| Some(e.to_string()))?;
    if peer.uid.as_raw() != 0 {
        return Err(Some("only root may add a mount to a shiftfs daemon".into()));
    }
    let frame = match wire::recv(conn.as_fd()) {
        Ok(Some(f)) if f.kind == wire::JOIN => f,
        Ok(_) => return Err(Some("malformed mount request".into())),
        Err(e) => return Err(Some(e.to_string())),
    };
    let (req, owner) = decode_request(&frame.text).map_err(Some)?;
    let [source, target]: [OwnedFd; 2] = frame
        .fds
        .try_into()
        .map_err(|_| Some("the request came without SOURCE and TARGET".to_string()))?;
    let target = Dir::from_fd(target, req.target.clone()).map_err(|e| Some(e.to_string()))?;
    let host = crate::backend::fuse::attach_host(source, &target, &fuse_options(&req))
        .map_err(|e| Some(e.to_string()))?;
    let id = crate::mountinfo::mount_id_of(host.mount.as_fd());
    let detach = |mount: &OwnedFd| {
        if let Err(e) = crate::sys::fusedev::detach_fd(mount.as_fd()) {
            tracing::error!(
                "cannot unmount {} after a failed join: {e}",
                req.target.display()
            );
        }
    };
    let sent = wire::send(
        chan.as_fd(),
        wire::JOIN,
        id.unwrap_or(0),
        &frame.text,
        &[host.tree.as_fd(), host.dev.as_fd(), host.mount.as_fd()],
    );
    let reply = sent.and_then(|()| wire::recv(chan.as_fd()));
    // Neither the tree nor /dev/fuse stays here: a killed server must leave a dead mount.
    let crate::backend::fuse::HostSide { tree, dev, mount } = host;
    drop((tree, dev));
    match reply {
        Ok(Some(f)) if f.kind == wire::OK => {}
        Ok(Some(f)) if f.kind == wire::ERR => {
            detach(&mount);
            return Err(Some(String::from_utf8_lossy(&f.text).into_owned()));
        }
        _ => {
            detach(&mount);
            return Err(None);
        }
    }
    drop(mount);
    match id {
        Some(id) => {
            let rec = record(&req, Backend::Fuse, id, server).owned_by(owner);
            if let Err(e) = rec.save() {
                tracing::warn!("could not record the mount for `shiftfs list`: {e}");
            }
            mounts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, rec);
        }
        None => tracing::warn!("cannot learn the mount id to record the mount"),
    }
    Ok(())
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
    crate::sys::process::raise_nofile_limit();
    let hub = crate::backend::fuse::Hub::new();
    let socket = source_socket(req, &dirs.source);
    let started = (|| {
        let Resolved { source, target } = dirs;
        let mut opts = fuse_options(req);
        opts.share = Some(Arc::clone(&hub));
        let mounted = crate::backend::fuse::attach(source.into_fd(), &target, opts)?;
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
        let joins = seqpacket_pair()?;
        // Blocked before the fork: a stop signal that comes early waits for the watcher.
        daemon::block_signals(&STOP_SIGNALS)?;
        Ok::<_, io::Error>((null, server, supervisor, joins, daemon::fork()?))
    })();
    let (null, sock, supervisor, joins, pid) = match split {
        Ok((null, server, supervisor, (srv_joins, sup_joins), daemon::Forked::Child)) => {
            // The supervisor must not hold the server's end, nor the mount (it would stay
            // busy), nor /dev/fuse (a killed server must leave a dead mount).
            drop((null, server, mounted, srv_joins));
            let joins = socket.map(|path| (path, sup_joins));
            supervise(req, own_id, supervisor, joins, ready)
        }
        Ok((null, server, supervisor, (srv_joins, _), daemon::Forked::Parent(pid))) => {
            (null, server, supervisor, srv_joins, pid)
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
    // The first mount's uring= decides for the daemon: a session joining later that asks
    // for io_uring after a uring=off start finds io_uring_setup refused (and falls back
    // under auto).
    let uring = req.fuse.uring != crate::options::UringMode::Off;
    let served = crate::sandbox::enter(req.fuse.sandbox, uring)
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
    let served = Arc::new(Mutex::new(Served {
        live: 1,
        closed: false,
    }));
    let (ends, ended) = mpsc::channel();
    let first_id = own_id.unwrap_or(0);
    let first_ends = ends.clone();
    std::thread::spawn(move || {
        if let Err(e) = session.wait() {
            tracing::error!("{e}");
        }
        let _ = first_ends.send(Some(first_id));
    });
    {
        let served = Arc::clone(&served);
        std::thread::spawn(move || serve_joins(&joins, &hub, &served, &ends));
    }
    // Each ended session is forgotten by the supervisor; the last one ends the daemon.
    while let Ok(end) = ended.recv() {
        if let Some(id) = end {
            let mut text = vec![msg::SESSION_END];
            text.extend_from_slice(&id.to_le_bytes());
            let _ = sock.write_all(&text);
        }
        let mut s = served.lock().unwrap_or_else(PoisonError::into_inner);
        if end.is_some() {
            s.live -= 1;
        }
        if s.live == 0 {
            s.closed = true;
            break;
        }
    }
    let _ = sock.write_all(&[msg::END]);
    reap(pid);
    Ok(())
}

/// The `-o` options of `req` as the FUSE backend takes them.
fn fuse_options(req: &Request) -> crate::backend::fuse::Options {
    let mut opts = crate::backend::fuse::Options::new(req.mapping.clone());
    opts.flags = req.flags;
    opts.threads = req.fuse.threads;
    opts.passthrough = req.fuse.passthrough;
    opts.attr_timeout = req.fuse.attr_timeout;
    opts.max_open = req.fuse.max_open;
    opts.recursive = req.recursive;
    opts.idmappable = req.fuse.idmappable;
    opts.uring = req.fuse.uring;
    opts.fsname = req.source.to_string_lossy().into_owned();
    opts
}

/// How many sessions the server serves; once none, it takes no more.
struct Served {
    live: usize,
    closed: bool,
}

/// In the server: takes each mount the supervisor made for a joining `shiftfs mount` and
/// serves it as one more session of the hub, until the supervisor's end closes.
fn serve_joins(
    chan: &OwnedFd,
    hub: &Arc<crate::backend::fuse::Hub>,
    served: &Arc<Mutex<Served>>,
    ends: &mpsc::Sender<Option<u64>>,
) {
    loop {
        let frame = match wire::recv(chan.as_fd()) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("cannot read the next mount to serve: {e}");
                return;
            }
        };
        let reply = join_session(frame, hub, served, ends);
        let (kind, text) = match &reply {
            Ok(()) => (wire::OK, &b""[..]),
            Err(None) => (wire::GONE, &b""[..]),
            Err(Some(msg)) => (wire::ERR, msg.as_bytes()),
        };
        // write(2), not sendmsg: the sandbox allows the one, and replies carry no fds.
        let mut out = vec![kind];
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(text);
        if let Err(e) = rustix::io::write(chan, &out) {
            tracing::warn!("cannot answer the supervisor: {e}");
        }
    }
}

/// Serves the mount in `frame` (its tree and /dev/fuse fd); `Err(None)` when the daemon
/// is stopping, else why it cannot.
fn join_session(
    frame: wire::Frame,
    hub: &Arc<crate::backend::fuse::Hub>,
    served: &Arc<Mutex<Served>>,
    ends: &mpsc::Sender<Option<u64>>,
) -> Result<(), Option<String>> {
    {
        let mut s = served.lock().unwrap_or_else(PoisonError::into_inner);
        if s.closed {
            return Err(None);
        }
        s.live += 1;
    }
    let id = frame.id;
    let started = (|| {
        let (req, _) = decode_request(&frame.text).map_err(Some)?;
        let [tree, dev, mount]: [OwnedFd; 3] = frame.fds.try_into().map_err(|_| {
            Some("the mount came without its tree, connection and root".to_string())
        })?;
        let mut opts = fuse_options(&req);
        opts.share = Some(Arc::clone(hub));
        let host = crate::backend::fuse::HostSide { tree, dev, mount };
        let mounted = crate::backend::fuse::Mounted::join(host, req.target.clone(), Some(id), opts)
            .map_err(|e| match e {
                // Told as "stopping": the mount then gets a daemon of its own.
                crate::backend::fuse::Error::NoFdsToShare { .. } => {
                    tracing::warn!("{e}");
                    None
                }
                e => Some(e.to_string()),
            })?;
        mounted.serve().map_err(|e| Some(e.to_string()))
    })();
    match started {
        Ok(session) => {
            let ends = ends.clone();
            std::thread::spawn(move || {
                if let Err(e) = session.wait() {
                    tracing::error!("{e}");
                }
                let _ = ends.send(Some(id));
            });
            Ok(())
        }
        Err(e) => {
            served.lock().unwrap_or_else(PoisonError::into_inner).live -= 1;
            // The main loop looks again whether anything is left to serve.
            let _ = ends.send(None);
            Err(e)
        }
    }
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
/// returns. With `joins` (the join socket's path and its end of the server's join channel)
/// it also takes later mounts of the source (see the module doc).
fn supervise(
    req: &Request,
    own_id: Option<u64>,
    mut sock: std::os::unix::net::UnixStream,
    joins: Option<(PathBuf, OwnedFd)>,
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
    let mounts: Mounts = Arc::default();
    if let (Some(id), Some(rec)) = (own_id, &rec) {
        mounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, rec.clone());
    }
    let mut joins = joins;
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
                // Listening before the starter hears `ready`: it holds the source's lock
                // until then, so the next mount of the source finds this daemon.
                if let Some((path, chan)) = joins.take() {
                    listen_for_joins(path, chan, Arc::clone(&mounts), server_pid);
                }
                watch_shared(Arc::clone(&mounts));
                if let Some(ready) = ready.take() {
                    ready(Ok(()));
                }
            }
            Ok(1) if byte[0] == msg::UNMOUNT => {
                let reply = if unmount_all(&mounts) {
                    msg::DETACHED
                } else {
                    msg::GONE
                };
                if sock.write_all(&[reply]).is_err() {
                    break;
                }
            }
            Ok(1) if byte[0] == msg::SESSION_END => {
                let mut id = [0u8; 8];
                if sock.read_exact(&mut id).is_err() {
                    break;
                }
                let gone = mounts
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&u64::from_le_bytes(id));
                if let Some(r) = gone {
                    forget(&r);
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
    remove_socket();
    if let Some(ready) = ready.take() {
        let e = Error::Daemon(format!(
            "the daemon exited before the mount was ready; see {}",
            Record::log_path(target).display()
        ));
        unmount_unserved(target, ours());
        ready(Err(&e));
        std::process::exit(1);
    }
    let left: Vec<Record> = mounts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
        .map(|(_, r)| r)
        .collect();
    let mut dead = false;
    for r in &left {
        if mounted_at(&r.target).map(|m| m.id) == Some(r.mount_id) {
            tracing::error!(
                "the daemon ended, leaving {} a dead mount; remove it with shiftfs umount",
                r.target.display()
            );
            dead = true;
        } else {
            r.remove();
        }
    }
    if dead {
        std::process::exit(1);
    }
    remove_own_log(target);
    std::process::exit(0)
}

/// How long a shared idmappable FUSE mount stays without users before the watcher
/// unmounts it: a runtime that unmounts and mounts again at once keeps it.
const SHARED_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// How long the watcher lets the mount table settle after a change before it looks: at most
/// ten looks a second, however fast mounts come and go.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// In the supervisor: the shared idmappable FUSE mounts this daemon serves
/// (`mount::mount_over_shared`) live as long as idmapped mounts are stacked on them. One
/// removed with umount(8) instead of `shiftfs umount` leaves no one to stop the shared
/// mount, so the supervisor watches the host's mount table (poll(2) wakes with POLLPRI on
/// every change to it) and hands a shared mount that lost its last user for
/// [`SHARED_GRACE`] to `mount::release_if_unused`, which decides under the users' lock.
/// Its session then ends like any unmounted one (and the daemon with the last session).
fn watch_shared(mounts: Mounts) {
    let table = match std::fs::File::open(crate::mountinfo::SELF_MOUNTINFO) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(
                "cannot watch the mount table ({e}); an unused shared mount stays until \
                 shiftfs gc"
            );
            return;
        }
    };
    let base = crate::mount::shared_dir();
    let spawned = std::thread::Builder::new()
        .name("shared-watch".into())
        .spawn(move || {
            use rustix::event::{PollFd, PollFlags, poll};
            // A missed change (none comes after the last user went) is found on the next
            // round anyway.
            let period = rustix::time::Timespec {
                tv_sec: 30,
                tv_nsec: 0,
            };
            // Told once each, not on every change while they stay busy.
            let mut busy = std::collections::HashSet::new();
            loop {
                let mut fds = [PollFd::new(&table, PollFlags::PRI)];
                match poll(&mut fds, Some(&period)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        tracing::warn!("cannot watch the mount table: {e}");
                        return;
                    }
                }
                // A burst of changes (a container starting) is looked at once: the changes
                // made meanwhile wake the next poll at once.
                std::thread::sleep(SETTLE);
                let shared = || -> Vec<PathBuf> {
                    mounts
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .values()
                        .filter(|r| r.target.starts_with(&base))
                        .map(|r| r.target.clone())
                        .collect()
                };
                let unused: Vec<PathBuf> = shared()
                    .into_iter()
                    .filter(|p| crate::mount::shared_looks_unused(p))
                    .collect();
                if unused.is_empty() {
                    continue;
                }
                std::thread::sleep(SHARED_GRACE);
                for p in unused {
                    if !shared().contains(&p) || !crate::mount::shared_looks_unused(&p) {
                        continue;
                    }
                    match crate::mount::release_if_unused(&p) {
                        Ok(crate::mount::Shared::Released) => {
                            tracing::info!("{}: no mount uses it any more; unmounted", p.display())
                        }
                        Ok(crate::mount::Shared::Busy) => {
                            if busy.insert(p.clone()) {
                                tracing::info!(
                                    "{}: no mount uses it any more, but it is busy (files open \
                                     through it); kept until it is not",
                                    p.display()
                                );
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("{}: {e}", p.display()),
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            "cannot watch the mount table ({e}); an unused shared mount stays until shiftfs gc"
        );
    }
}

/// A session ended: its mount is gone (or draining ended), so is its record.
fn forget(rec: &Record) {
    if mounted_at(&rec.target).map(|m| m.id) != Some(rec.mount_id) {
        rec.remove();
    }
}

/// Unmounts every mount the server serves that is still where it was made; whether any was.
fn unmount_all(mounts: &Mounts) -> bool {
    let all: Vec<Record> = mounts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .cloned()
        .collect();
    let mut any = false;
    for r in all {
        if mounted_at(&r.target).map(|m| m.id) == Some(r.mount_id) {
            tracing::info!("unmounting {}", r.target.display());
            if let Err(e) = detach(&r.target) {
                tracing::warn!("unmount {}: {e}", r.target.display());
            }
            any = true;
        }
    }
    any
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
/// the run directory if needed. A new file, not the old one emptied: a shared daemon that
/// was started for an earlier mount at this target may still write to that one.
pub fn open_log(path: &Path) -> io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
}
