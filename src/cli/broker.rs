//! `shiftfs` run by a user who is not root: `mount`, `umount`, `list` and `image` go through
//! the broker (shiftfsd), which judges them by the caller's real identity, performs them and
//! audits them. One line on stderr says so.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;
use shiftfs::broker::client::{self, Answer};
use shiftfs::broker::protocol::{self, Request};
use shiftfs::options::{Backend, Request as MountRequest};

/// Whether this process must ask the broker: it is not root of the initial user namespace
/// (a namespace root, as under `unshare -Ur`, has no power over the host's mounts either).
pub fn needed() -> bool {
    !rustix::process::geteuid().is_root() || !in_initial_user_namespace()
}

fn in_initial_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
}

fn ask(what: &str, req: &Request) -> anyhow::Result<Answer> {
    let socket = client::socket_path();
    eprintln!(
        "shiftfs: not root here: asking the shiftfs broker ({}) to {what}",
        socket.display()
    );
    Ok(client::ask(&socket, req)?)
}

/// Absolute and without `.` or `..`, as the broker wants them (folded by name; the broker
/// then opens them without following symlinks).
fn plain(p: &Path) -> anyhow::Result<String> {
    let abs = shiftfs::resolve::absolute(p);
    abs.to_str()
        .map(str::to_string)
        .with_context(|| format!("{}: the broker takes UTF-8 paths only", abs.display()))
}

/// `shiftfs mount` through the broker: onto TARGET, or (`detached`) as a mount fd that is
/// attached at TARGET in this process's own mount namespace, then COMMAND is run there.
pub fn mount(req: &MountRequest, detached: bool, command: &[OsString]) -> anyhow::Result<()> {
    let refuse = |what: &str| {
        anyhow::anyhow!(
            "{what} is not available through the broker; ask an administrator to mount as root"
        )
    };
    if req.recursive {
        return Err(refuse("--recursive"));
    }
    if req.target_root.is_some() {
        return Err(refuse("--target-root"));
    }
    if !req.flags.exec {
        return Err(refuse("-o noexec"));
    }
    if let Some(opt) = req.fuse.given.first() {
        return Err(refuse(&format!("-o {opt}")));
    }
    if !command.is_empty() && !detached {
        bail!("a COMMAND after -- is run only with --detached");
    }
    let m = protocol::Mount {
        source: plain(&req.source)?,
        target: (!detached).then(|| plain(&req.target)).transpose()?,
        detached,
        map: req.mapping.to_string(),
        read_only: req.flags.read_only,
        suid: req.flags.suid,
        dev: req.flags.dev,
        backend: match req.backend {
            Backend::Auto => protocol::Backend::Auto,
            Backend::Kernel => protocol::Backend::Kernel,
            Backend::Fuse => protocol::Backend::Fuse,
        },
    };
    let what = if detached {
        "make a detached mount"
    } else {
        "mount"
    };
    let answer = ask(what, &Request::Mount(m))?;
    let f = &answer.fields;
    if !detached {
        println!(
            "mounted {} on {} ({}, {})",
            text(&f["source"]),
            text(&f["target"]),
            text(&f["backend"]),
            text(&f["options"])
        );
        return Ok(());
    }
    let tree = answer
        .fd
        .context("the broker allowed the detached mount but sent no mount fd")?;
    rustix::mount::move_mount(
        &tree,
        c"",
        rustix::fs::CWD,
        &req.target,
        rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| match e {
        rustix::io::Errno::PERM => anyhow::anyhow!(
            "cannot attach the mount at {}: {e}; attaching needs a user and mount namespace of \
             your own: run this inside `unshare -Urm` (or your container's namespaces)",
            req.target.display()
        ),
        e => anyhow::anyhow!("cannot attach the mount at {}: {e}", req.target.display()),
    })?;
    drop(tree);
    eprintln!(
        "shiftfs: attached {} at {} in this mount namespace ({}, {})",
        text(&f["source"]),
        req.target.display(),
        text(&f["backend"]),
        text(&f["options"])
    );
    if let Some((prog, args)) = command.split_first() {
        let e = std::process::Command::new(prog).args(args).exec();
        bail!("cannot run {}: {e}", Path::new(prog).display());
    }
    Ok(())
}

pub fn umount(targets: &[PathBuf], lazy: bool) -> anyhow::Result<()> {
    if lazy {
        bail!("--lazy is not available through the broker; close what uses the mount and retry");
    }
    let mut failed = 0;
    for t in targets {
        let req = Request::Umount(protocol::Umount { target: plain(t)? });
        match ask(&format!("unmount {}", t.display()), &req) {
            Ok(_) => {}
            Err(e) => {
                let e = e.context(format!("umount {}", t.display()));
                if targets.len() == 1 {
                    return Err(e);
                }
                failed += 1;
                eprintln!("shiftfs: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} targets could not be unmounted",
            targets.len()
        );
    }
    Ok(())
}

/// Your own mounts, as the broker lists them, in `shiftfs list`'s columns.
pub fn list() -> anyhow::Result<Vec<[String; 8]>> {
    let answer = ask("list your mounts", &Request::List(protocol::Empty {}))?;
    let empty = Vec::new();
    let mounts = answer.fields["mounts"].as_array().unwrap_or(&empty);
    Ok(mounts
        .iter()
        .map(|m| {
            [
                text(&m["target"]),
                text(&m["source"]),
                text(&m["backend"]),
                text(&m["map"]),
                text(&m["options"]),
                m["owner"]
                    .as_u64()
                    .map_or_else(|| "-".into(), |u| u.to_string()),
                m["pid"]
                    .as_u64()
                    .map_or_else(|| "-".into(), |p| p.to_string()),
                text(&m["state"]),
            ]
        })
        .collect())
}

pub fn make_image(dir: &Path) -> anyhow::Result<()> {
    let req = Request::MakeImage(protocol::PathArg { path: plain(dir)? });
    let a = ask(&format!("make the image {}", dir.display()), &req)?;
    println!(
        "made {} (owned by {}:{}, the image range's root)",
        text(&a.fields["path"]),
        a.fields["uid"],
        a.fields["gid"]
    );
    Ok(())
}

pub fn adopt(dir: &Path, map: &str) -> anyhow::Result<()> {
    let req = Request::Adopt(protocol::Adopt {
        path: plain(dir)?,
        map: map.to_string(),
    });
    let a = ask(
        &format!("adopt {} into the image range", dir.display()),
        &req,
    )?;
    println!(
        "adopted {}: {} inodes, {} changed",
        text(&a.fields["path"]),
        a.fields["inodes"],
        a.fields["changed"]
    );
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

/// `shiftfs --lock-mount-helper-fd=N SCRATCH`, started by the broker only.
pub fn lock_helper(fd: i32, scratch: Option<OsString>) -> anyhow::Result<()> {
    let scratch = scratch.context("no scratch directory given")?;
    // SAFETY: the number comes from our parent's command line, at start-up, before anything
    // in this process opened a file: nothing else owns it.
    let sock = unsafe { shiftfs::sys::inherit::take(fd) }?;
    shiftfs::broker::lock::helper(sock, Path::new(&scratch)).map_err(anyhow::Error::msg)
}
