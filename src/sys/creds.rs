//! Per-thread filesystem credentials for the FUSE daemon's worker threads.
//!
//! `setfsuid`/`setfsgid` are issued as raw syscalls: glibc's `setuid` family broadcasts a
//! change to every thread of the process, the raw syscalls change only the calling thread,
//! which is what a multi-threaded server handling requests of different users needs.

use std::cell::Cell;
use std::io;

use rustix::fs::Mode;
use rustix::thread::{CapabilitySets, UnshareFlags, capabilities, set_capabilities};

/// Any id the kernel rejects: `setfsuid(-1)` changes nothing and returns the current fsuid.
const QUERY: u32 = u32::MAX;

fn raw_setfsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid takes an integer and touches no memory; it cannot fail, it returns
    // the previous fsuid (the current one when the change was refused).
    unsafe { libc::syscall(libc::SYS_setfsuid, uid as libc::c_long) as u32 }
}

fn raw_setfsgid(gid: u32) -> u32 {
    // SAFETY: as for setfsuid.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid as libc::c_long) as u32 }
}

/// The calling thread's current fsuid.
pub fn fsuid() -> u32 {
    raw_setfsuid(QUERY)
}

/// The calling thread's current fsgid.
pub fn fsgid() -> u32 {
    raw_setfsgid(QUERY)
}

/// While alive, the calling thread creates files as (`uid`, `gid`) but keeps its effective
/// capabilities (DAC override, chown, mknod, fsetid ...). Restores everything on drop.
///
/// The kernel clears the filesystem capabilities from the effective set when the fsuid
/// leaves 0; we raise them again so the backing filesystem does not repeat permission
/// checks the FUSE kernel module already made on the translated attributes (we do not know
/// the caller's supplementary groups). Not `Send`: it must be dropped on the thread that
/// made it.
#[must_use]
pub struct FsCreds {
    old_uid: u32,
    old_gid: u32,
    caps: CapabilitySets,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl FsCreds {
    /// Switches the calling thread's fsgid then fsuid. Fails with EPERM when the kernel
    /// refuses either (the daemon lacks CAP_SETUID/CAP_SETGID).
    pub fn switch(uid: u32, gid: u32) -> io::Result<Self> {
        let caps = capabilities(None)?;
        let old_gid = raw_setfsgid(gid);
        if fsgid() != gid {
            raw_setfsgid(old_gid);
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let old_uid = raw_setfsuid(uid);
        let guard = Self {
            old_uid,
            old_gid,
            caps,
            _not_send: std::marker::PhantomData,
        };
        if fsuid() != uid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        set_capabilities(None, caps)?;
        Ok(guard)
    }
}

impl Drop for FsCreds {
    fn drop(&mut self) {
        raw_setfsuid(self.old_uid);
        raw_setfsgid(self.old_gid);
        // Going back to fsuid 0 already re-raises the filesystem capabilities from the
        // permitted set; this makes the restore exact whatever the starting point was.
        if let Err(e) = set_capabilities(None, self.caps) {
            tracing::error!("cannot restore thread capabilities: {e}");
        }
    }
}

thread_local! {
    static OWN_FS_STRUCT: Cell<bool> = const { Cell::new(false) };
}

/// Sets the umask of the calling thread only, giving the thread its own `fs_struct`
/// (umask, cwd, root) on first use so other threads are not affected.
///
/// The FUSE daemon creates files with the caller's umask so that the backing filesystem
/// applies it exactly as it would for the caller (ignoring it when the parent directory
/// has a default ACL).
pub fn set_thread_umask(mask: u32) -> io::Result<()> {
    if !OWN_FS_STRUCT.with(Cell::get) {
        // SAFETY: CLONE_FS only detaches umask, cwd and root of this thread; unlike
        // CLONE_FILES it leaves the fd table shared, so no fd becomes invalid elsewhere.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::FS) }?;
        OWN_FS_STRUCT.with(|c| c.set(true));
    }
    rustix::process::umask(Mode::from_bits_truncate(mask & 0o777));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[test]
    fn switch_creates_as_target_and_restores() {
        if !is_root() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // A directory only root may write to: with the capabilities re-raised the create
        // still succeeds although the fsuid is not the owner.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let handle = std::thread::spawn({
            let p = dir.path().join("f");
            move || {
                let before = (fsuid(), fsgid());
                {
                    let _g = FsCreds::switch(4321, 8765).unwrap();
                    assert_eq!((fsuid(), fsgid()), (4321, 8765));
                    std::fs::File::create(&p).unwrap();
                }
                assert_eq!((fsuid(), fsgid()), before);
                let caps = capabilities(None).unwrap();
                assert!(
                    caps.effective
                        .contains(rustix::thread::CapabilitySet::DAC_OVERRIDE)
                );
            }
        });
        handle.join().unwrap();
        let md = std::fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!((md.uid(), md.gid()), (4321, 8765));
        // The test thread itself was never switched.
        assert_eq!(fsuid(), 0);
    }

    #[test]
    fn thread_umask_is_private() {
        let outer = rustix::process::umask(Mode::from_bits_truncate(0o022));
        rustix::process::umask(outer);
        std::thread::spawn(|| {
            set_thread_umask(0o077).unwrap();
            let mine = rustix::process::umask(Mode::from_bits_truncate(0o077));
            assert_eq!(mine.bits(), 0o077);
        })
        .join()
        .unwrap();
        let now = rustix::process::umask(outer);
        rustix::process::umask(now);
        assert_eq!(now, outer);
    }
}
