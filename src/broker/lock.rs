//! A detached mount whose flags its receiver cannot change.
//!
//! A tree cloned with `open_tree` by root and attached by a user in a mount namespace of
//! its own comes with its flags unlocked: root of that namespace could remount it `rw`,
//! `suid` or `dev` (tried here: `mount -o remount,bind,rw` succeeds). The kernel locks a
//! mount's flags only when it copies the mount into a mount namespace owned by a less
//! privileged user namespace. So the broker has a helper process (a fresh `shiftfs`, single
//! threaded, as unshare requires) attach the tree in a private copy of the host's mount
//! namespace, unshare into a new user namespace and a copy of that mount namespace, where
//! the tree's copy is locked, and clone it again from there: the clone keeps the locks and
//! is what the caller gets.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use rustix::mount::{MountPropagationFlags, MoveMountFlags, OpenTreeFlags};

use crate::sys::fdpass::{recv_with_fds, send_with_fd};

/// The argument that makes `shiftfs` this helper.
pub const HELPER_ARG: &str = "--lock-mount-helper-fd";

/// Returns a copy of the detached `tree` with its flags locked, made by `shiftfs` (`exe`)
/// started as the helper. `scratch` is a directory only root can change (the run directory)
/// where the helper attaches the tree in its private mount namespace.
pub fn locked(exe: &Path, tree: OwnedFd, scratch: &Path) -> Result<OwnedFd, String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let helper = {
        let _passed = crate::sys::inherit::pass_on(theirs.as_fd())
            .map_err(|e| format!("cannot hand a socket to the helper: {e}"))?;
        Command::new(exe)
            .arg0("shiftfs")
            .arg(format!("{HELPER_ARG}={}", theirs.as_raw_fd()))
            .arg(scratch)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    };
    drop(theirs);
    let helper = helper.map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let sent = send_with_fd(ours.as_fd(), b"T", tree.as_fd());
    drop(tree);
    let mut buf = [0u8; 4096];
    let got = sent.and_then(|_| recv_with_fds(ours.as_fd(), &mut buf));
    drop(ours);
    let out = helper
        .wait_with_output()
        .map_err(|e| format!("waiting for the mount lock helper: {e}"))?;
    match got {
        Ok((_, fds)) if out.status.success() && fds.len() == 1 => {
            Ok(fds.into_iter().next().unwrap_or_else(|| unreachable!()))
        }
        Ok((n, _)) => Err(format!(
            "the mount lock helper failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&buf[..n]),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("talking to the mount lock helper: {e}")),
    }
}

/// The helper's body: receives the tree on `sock`, sends back the locked copy (or the
/// error's text). Runs in a process of its own, before any thread is started.
pub fn helper(sock: OwnedFd, scratch: &Path) -> Result<(), String> {
    let sock = UnixStream::from(sock);
    let mut buf = [0u8; 8];
    let (_, fds) = recv_with_fds(sock.as_fd(), &mut buf).map_err(|e| format!("receive: {e}"))?;
    let Some(tree) = fds.into_iter().next() else {
        return Err("no tree received".into());
    };
    match lock(tree, scratch) {
        Ok(locked) => {
            send_with_fd(sock.as_fd(), b"L", locked.as_fd()).map_err(|e| format!("send: {e}"))?;
            Ok(())
        }
        Err(e) => {
            let _ = (&sock).write_all(e.as_bytes());
            Err(e)
        }
    }
}

fn lock(tree: OwnedFd, scratch: &Path) -> Result<OwnedFd, String> {
    crate::sys::daemon::unshare_mount_namespace()
        .map_err(|e| format!("new mount namespace: {e}"))?;
    // Nothing done in this copy may reach the host's namespace through propagation.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|e| format!("make / private: {e}"))?;
    rustix::mount::move_mount(
        &tree,
        c"",
        rustix::fs::CWD,
        scratch,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| format!("attach at {}: {e}", scratch.display()))?;
    drop(tree);
    crate::sys::daemon::unshare_user_and_mount_namespace()
        .map_err(|e| format!("new user and mount namespace: {e}"))?;
    rustix::mount::open_tree(
        rustix::fs::CWD,
        scratch,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(|e| format!("clone the locked copy at {}: {e}", scratch.display()))
}
