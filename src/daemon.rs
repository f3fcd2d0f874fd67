//! The FUSE daemon's life cycle, both ends: starting it as a detached copy of this binary
//! (handing it the checked SOURCE and TARGET fds) and waiting for its readiness line; in the
//! daemon, leaving the caller's session, serving, the supervisor that keeps the host's mount
//! namespace, stop signals, the record and the log. With `main.rs`, the only place that
//! touches process-wide state (signals, fork, exit, the session).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::mount::UnmountFlags;

use crate::mount::{Error, Resolved, mounted_at, record};
use crate::options::{Backend, Request};
use crate::registry::Record;
use crate::sys::daemon;
use crate::sys::inherit::pass_on;

/// Starts the FUSE daemon as a detached copy of this binary, handing it the checked SOURCE
/// and TARGET fds, and waits until it says the mount is in place (or why not).
pub fn spawn(req: &Request, dirs: &Resolved) -> Result<(), Error> {
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| Error::Io { what, path, source }
    };
    let exe = std::env::current_exe().map_err(io_err(
        "cannot find the shiftfs binary to start the daemon for",
        &req.target,
    ))?;
    let log_path = Record::log_path(&req.target);
    let log = open_log(&log_path).map_err(io_err("cannot open the daemon log", &log_path))?;
    let handing = "cannot hand the checked directories to the daemon of";
    let _src = pass_on(dirs.source.as_fd()).map_err(io_err(handing, &req.target))?;
    let _tgt = pass_on(dirs.target.as_fd()).map_err(io_err(handing, &req.target))?;
    let mut child = Command::new(&exe)
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
        .map_err(io_err("cannot start the daemon", &exe))?;
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
    let started = (|| {
        let Resolved { source, target } = dirs;
        let mut opts = crate::backend::fuse::Options::new(req.mapping.clone());
        opts.flags = req.flags;
        opts.threads = req.fuse.threads;
        opts.passthrough = req.fuse.passthrough;
        opts.attr_timeout = req.fuse.attr_timeout;
        opts.max_open = req.fuse.max_open;
        opts.recursive = req.recursive;
        opts.uring = req.fuse.uring;
        opts.fsname = req.source.to_string_lossy().into_owned();
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
