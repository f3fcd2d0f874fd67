//! `shiftfs mount`: validate, pick a backend, and either make a kernel idmapped mount or
//! start the FUSE daemon (backgrounded once the mount is ready, unless --foreground).

use std::path::PathBuf;

use anyhow::{Context, bail};
use shiftfs::idmap::IdMapping;
use shiftfs::mount;
use shiftfs::options::{Backend, OptionSet, Request};

#[derive(clap::Args)]
pub struct Args {
    /// The directory to present shifted (e.g. a container image).
    pub source: PathBuf,
    /// An empty directory to mount it on.
    pub target: PathBuf,
    /// Id map, `[u:|g:|b:]INNER:OUTER:COUNT` entries separated by commas or spaces; INNER is
    /// the id on disk, OUTER what the host sees (e.g. b:0:100000:65536).
    #[arg(long, short = 'm', conflicts_with_all = ["uid_map", "gid_map", "map_from_pid"])]
    pub map: Option<String>,
    /// uid map alone (`INNER:OUTER:COUNT,...` or uid_map text); needs --gid-map.
    #[arg(long, requires = "gid_map", conflicts_with = "map_from_pid")]
    pub uid_map: Option<String>,
    /// gid map alone; needs --uid-map.
    #[arg(long, requires = "uid_map", conflicts_with = "map_from_pid")]
    pub gid_map: Option<String>,
    /// Take the maps of a running process's user namespace (/proc/PID/uid_map, gid_map).
    #[arg(long, value_name = "PID")]
    pub map_from_pid: Option<u32>,
    /// Which backend serves the mount: kernel idmapped mount, FUSE, or auto (kernel where
    /// the source's filesystem supports it).
    #[arg(long, short = 'b', value_name = "auto|kernel|fuse")]
    pub backend: Option<Backend>,
    /// mount(8)-style options: ro, nosuid, nodev, noexec, suid, dev, recursive, threads=N,
    /// nopassthrough, attr_timeout=SECS, uring=auto|on|off, map=... (repeatable).
    #[arg(short = 'o', long = "options", value_name = "OPTS")]
    pub options: Vec<String>,
    /// Serve SOURCE unshifted through FUSE so the kernel can idmap the mount (Linux 6.12+):
    /// stack `shiftfs mount --backend kernel --map MAP` (or a runtime's idmapped mount) on it.
    /// Takes no map. Same as `-o idmappable`.
    #[arg(long)]
    pub idmappable: bool,
    /// Also shift the mounts below SOURCE (kernel backend).
    #[arg(long, short = 'r')]
    pub recursive: bool,
    /// Resolve TARGET inside this directory as if it were `/` (for a runtime mounting into a
    /// container's rootfs): symlinks in it are followed but never lead out of it.
    #[arg(long, value_name = "DIR")]
    pub target_root: Option<PathBuf>,
    /// Serve in the foreground (FUSE); SIGTERM or Ctrl-C unmounts.
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Ask the broker for a detached mount fd, attach it at TARGET in this process's own
    /// mount namespace (run inside `unshare -Urm` or a container's namespaces), then run
    /// COMMAND there.
    #[arg(long, conflicts_with_all = ["foreground", "daemon_child"])]
    pub detached: bool,
    /// With --detached: the command to run with the mount attached (after `--`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<std::ffi::OsString>,
    /// Internal: this process is the backgrounded daemon; report readiness on stdout.
    #[arg(long, hide = true, requires_all = ["source_fd", "target_fd"])]
    pub daemon_child: bool,
    /// Internal: the daemon's SOURCE, an fd its parent opened and checked.
    #[arg(long, hide = true)]
    pub source_fd: Option<i32>,
    /// Internal: the daemon's TARGET, an fd its parent opened and checked.
    #[arg(long, hide = true)]
    pub target_fd: Option<i32>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut opts = OptionSet::default();
    for o in &args.options {
        opts.apply(o)?;
    }
    if args.idmappable {
        opts.apply("idmappable")?;
    }
    let in_options = opts.map.is_some() || opts.uid_map.is_some() || opts.gid_map.is_some();
    let on_command_line =
        args.map.is_some() || args.uid_map.is_some() || args.map_from_pid.is_some();
    if in_options && on_command_line {
        bail!("the map is given twice (-o map=/uidmap=/gidmap= and a --map option): give it once");
    }
    if let Some(m) = &args.map {
        opts.map = Some(m.clone());
    }
    if let (Some(u), Some(g)) = (&args.uid_map, &args.gid_map) {
        opts.uid_map = Some(u.clone());
        opts.gid_map = Some(g.clone());
    }
    if let Some(b) = args.backend {
        opts.backend = Some(b);
    }
    opts.recursive |= args.recursive;
    let mapping = match args.map_from_pid {
        Some(pid) => IdMapping::from_proc(std::path::Path::new("/proc"), pid)
            .with_context(|| format!("cannot take the map of process {pid}"))?,
        None => opts.mapping()?,
    };
    let req = Request {
        source: args.source,
        target: args.target,
        target_root: args.target_root,
        mapping,
        flags: opts.flags,
        backend: opts.backend.unwrap_or_default(),
        recursive: opts.recursive,
        fuse: opts.fuse,
    };
    if let (true, Some(source), Some(target)) = (args.daemon_child, args.source_fd, args.target_fd)
    {
        return daemon_child(req, source, target);
    }
    if args.detached || super::broker::needed() {
        if args.foreground {
            bail!("--foreground is not available through the broker: its daemon is the broker's");
        }
        return super::broker::mount(&req, args.detached, &args.command);
    }
    if !args.command.is_empty() {
        bail!("a COMMAND after -- is run only with --detached");
    }
    mount_request(req, args.foreground)
}

/// The one code path of `shiftfs mount` and `mount.shiftfs`.
pub fn mount_request(mut req: Request, foreground: bool) -> anyhow::Result<()> {
    // The lock is held until the mount is in place (or failed): a second mount of the same
    // target waits for it, then opens the target afresh and finds this mount there.
    let locked = mount::resolve(&mut req.clone())?
        .target
        .path()
        .to_path_buf();
    let lock = mount::TargetLock::take(&locked)?;
    let dirs = mount::resolve(&mut req)?;
    if req.target != locked {
        bail!(
            "target {} was moved while it was being mounted; try again",
            locked.display()
        );
    }
    mount::check(&req, &dirs)?;
    let (backend, reason) = mount::choose_backend(&req, &dirs)?;
    tracing::info!(%backend, %reason, "backend chosen");
    let what = format!(
        "{} on {} ({backend}: {reason})",
        req.source.display(),
        req.target.display()
    );
    match backend {
        Backend::Kernel => {
            mount::mount_kernel(&req, &dirs)?;
            println!("mounted {what}");
            Ok(())
        }
        _ => {
            mount::check_fuse_device()?;
            if foreground {
                shiftfs::daemon::serve_fuse(&req, dirs, |r| {
                    drop(lock);
                    if r.is_ok() {
                        println!("mounted {what}; serving in the foreground, Ctrl-C unmounts");
                    }
                })?;
                Ok(())
            } else {
                shiftfs::daemon::spawn(&req, &dirs)?;
                println!("mounted {what}");
                Ok(())
            }
        }
    }
}

/// In the backgrounded daemon: leave the caller's session, mount onto the directories the
/// parent checked and passed as fds, say `ready` (or `error MSG`) on stdout, then let go of
/// stdout so the caller's read ends.
fn daemon_child(req: Request, source_fd: i32, target_fd: i32) -> anyhow::Result<()> {
    use shiftfs::sys::inherit;
    use std::os::fd::AsFd;
    // SAFETY: the numbers come from our parent's command line, at start-up, before anything
    // in this process opened a file: nothing else owns them.
    let fds = unsafe { (inherit::take(source_fd), inherit::take(target_fd)) };
    let (source, target) = match fds {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => bail!("the daemon did not get its directories: {e}"),
    };
    // SAFETY: only `source` and `target` are owned by anything in this process yet.
    if let Err(e) = unsafe { inherit::close_all_but(&[source.as_fd(), target.as_fd()]) } {
        tracing::warn!("cannot close inherited file descriptors: {e}");
    }
    let dirs = mount::Resolved {
        source: shiftfs::resolve::Dir::from_fd(source, req.source.clone())?,
        target: shiftfs::resolve::Dir::from_fd(target, req.target.clone())?,
    };
    shiftfs::daemon::serve_child(&req, dirs)?;
    Ok(())
}
