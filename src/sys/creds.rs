//! Per-thread filesystem credentials for the FUSE daemon's worker threads.
//!
//! `setfsuid`/`setfsgid` are issued as raw syscalls: glibc's `setuid` family broadcasts a
//! change to every thread of the process, the raw syscalls change only the calling thread,
//! which is what a multi-threaded server handling requests of different users needs.

use std::cell::Cell;
use std::io;

use rustix::fs::Mode;
use rustix::process::Gid;
use rustix::thread::{
    CapabilitySet, CapabilitySets, UnshareFlags, capabilities, set_capabilities, set_thread_groups,
};

use crate::idmap::{InnerGid, InnerUid, OuterGid, OuterUid};

/// Any id the kernel rejects: `setfsuid(-1)` changes nothing and returns the current fsuid.
const QUERY: u32 = u32::MAX;

// The 32-bit architectures that began with 16-bit ids keep `setfsuid`/`setfsgid` as the 16-bit
// calls and have `*32` ones for full ids (the same set rustix uses for `setgroups32`). m68k
// has them too, but the libc crate's numbers for it do not say which is which: refuse to build
// there rather than switch to a truncated id.
#[cfg(target_arch = "m68k")]
compile_error!("shiftfs does not know m68k's 32-bit setfsuid/setfsgid syscall numbers");
#[cfg(not(any(target_arch = "x86", target_arch = "arm", target_arch = "sparc")))]
use libc::{SYS_setfsgid as SYS_SETFSGID, SYS_setfsuid as SYS_SETFSUID};
#[cfg(any(target_arch = "x86", target_arch = "arm", target_arch = "sparc"))]
use libc::{SYS_setfsgid32 as SYS_SETFSGID, SYS_setfsuid32 as SYS_SETFSUID};

fn raw_setfsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid takes an integer and touches no memory; it cannot fail, it returns
    // the previous fsuid (the current one when the change was refused).
    unsafe { libc::syscall(SYS_SETFSUID, uid as libc::c_long) as u32 }
}

fn raw_setfsgid(gid: u32) -> u32 {
    // SAFETY: as for setfsuid.
    unsafe { libc::syscall(SYS_SETFSGID, gid as libc::c_long) as u32 }
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
///
/// Every creating request switches, so the switch is priced in syscalls: the thread's
/// credentials are remembered (`Known`) and only what differs is changed, and only what was
/// changed is put back (a container root creating as on-disk 0 changes no id at all).
#[must_use]
pub struct FsCreds {
    old: Known,
    /// The fsuid and fsgid the thread has now, as far as this guard has changed them.
    ids: (u32, u32),
    /// What this guard may have changed (marked before the syscall), so what `restore`
    /// must put back.
    touched: Touched,
    /// Supplementary groups to restore, when they were replaced.
    groups: Option<Vec<Gid>>,
    _not_send: std::marker::PhantomData<*const ()>,
}

/// The calling thread's fsuid, fsgid and capabilities, as last set or read by this module.
/// Nothing else in the daemon changes them on a worker thread (the sandbox drops
/// capabilities before any request is served), so they need not be read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Known {
    fsuid: u32,
    fsgid: u32,
    caps: CapabilitySets,
}

#[derive(Clone, Copy, Debug, Default)]
struct Touched {
    fsuid: bool,
    fsgid: bool,
    caps: bool,
}

thread_local! {
    static KNOWN: Cell<Option<Known>> = const { Cell::new(None) };
}

impl Known {
    /// The remembered credentials, read from the kernel on the thread's first switch.
    fn get() -> io::Result<Self> {
        if let Some(k) = KNOWN.with(Cell::get) {
            return Ok(k);
        }
        let k = Self {
            fsuid: fsuid(),
            fsgid: fsgid(),
            caps: capabilities(None)?,
        };
        KNOWN.with(|c| c.set(Some(k)));
        Ok(k)
    }

    fn remember(k: Option<Self>) {
        KNOWN.with(|c| c.set(k));
    }
}

/// Which ids a thread acts with. `Disk`: the caller's ids on disk, so what it creates is
/// theirs in the image. `Host`: the caller's ids on the host, for what only checks or charges
/// the acting ids (ext4's reserve for `resuid`, inode flags), so a container's root, which is
/// 0 on disk, is not taken for the host's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsIds {
    Disk(InnerUid, InnerGid),
    Host(OuterUid, OuterGid),
}

impl FsIds {
    fn raw(self) -> (u32, u32) {
        match self {
            FsIds::Disk(u, g) => (u.get(), g.get()),
            FsIds::Host(u, g) => (u.get(), g.get()),
        }
    }
}

impl FsCreds {
    /// Switches the calling thread's fsgid then fsuid, with every effective capability but
    /// `without`. Fails with EPERM when the kernel refuses either id (the daemon lacks
    /// CAP_SETUID/CAP_SETGID).
    ///
    /// Whatever allocates space on a caller's behalf (creates, data writes, xattrs, links)
    /// goes without CAP_SYS_RESOURCE unless the caller holds it on the host: with it ext4
    /// hands out the blocks reserved for root and quotas pass their hard limits.
    pub fn switch(ids: FsIds, without: CapabilitySet) -> io::Result<Self> {
        Self::switch_raw(ids.raw(), without)
    }

    /// Like `switch`, keeping the thread's own fsuid and fsgid (the daemon's, outside any
    /// other guard): for work whose outcome does not depend on the acting ids. Costs no
    /// syscall when the effective set lacks `without` already (the sandbox drops
    /// CAP_SYS_RESOURCE for good).
    pub fn keep_ids(without: CapabilitySet) -> io::Result<Self> {
        let k = Known::get()?;
        Self::switch_raw((k.fsuid, k.fsgid), without)
    }

    fn switch_raw((uid, gid): (u32, u32), without: CapabilitySet) -> io::Result<Self> {
        let mut guard = Self::set(uid, gid, None)?;
        let mut now = guard.old.caps;
        now.effective -= without;
        // Leaving fsuid 0 (or coming back to it) made the kernel change the effective set.
        if guard.touched.fsuid || now != guard.old.caps {
            guard.set_caps(now)?;
        }
        Ok(guard)
    }

    /// Like `switch`, but the backing filesystem checks permissions for real: the thread
    /// keeps only the capabilities the kernel leaves after the fsuid change (none of the
    /// filesystem ones unless `uid` is 0) and has `groups` (on the same side of the map as
    /// `ids`) as supplementary groups.
    pub fn switch_checked(ids: FsIds, groups: &[u32]) -> io::Result<Self> {
        let (uid, gid) = ids.raw();
        let saved = rustix::process::getgroups()?;
        let groups: Vec<Gid> = groups.iter().map(|&g| Gid::from_raw_unchecked(g)).collect();
        // Marked before the change: a failed or partial one is put back too.
        let mut guard = Self::set(uid, gid, Some(saved))?;
        // The raw syscall, unlike glibc's setgroups, changes only the calling thread.
        set_thread_groups(&groups)?;
        // fsuid 0 keeps the filesystem capabilities, but the caller has not been shown to hold
        // them (and a namespace root's cover only inodes mapped in its namespace).
        use CapabilitySet as C;
        guard.touched.caps = true;
        let mut now = capabilities(None)?;
        now.effective -= C::CHOWN
            | C::DAC_OVERRIDE
            | C::DAC_READ_SEARCH
            | C::FOWNER
            | C::FSETID
            | C::LINUX_IMMUTABLE
            | C::MAC_OVERRIDE
            | C::MKNOD;
        guard.set_caps(now)?;
        Ok(guard)
    }

    /// Changes fsgid and fsuid where they differ from what the thread has; the returned
    /// guard (also when this fails half-way) restores them, the capabilities and `groups`.
    fn set(uid: u32, gid: u32, groups: Option<Vec<Gid>>) -> io::Result<Self> {
        let old = Known::get()?;
        let mut guard = Self {
            old,
            ids: (old.fsuid, old.fsgid),
            touched: Touched::default(),
            groups,
            _not_send: std::marker::PhantomData,
        };
        // Unknown until checked: a failure below leaves `restore` to find out.
        Known::remember(None);
        if old.fsgid != gid {
            guard.touched.fsgid = true;
            raw_setfsgid(gid);
            if fsgid() != gid {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            guard.ids.1 = gid;
        }
        if old.fsuid != uid {
            guard.touched.fsuid = true;
            raw_setfsuid(uid);
            if fsuid() != uid {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            guard.ids.0 = uid;
        }
        if !guard.touched.fsuid {
            // The capabilities are as they were: only the ids may have moved.
            Known::remember(Some(Known {
                fsuid: uid,
                fsgid: gid,
                caps: old.caps,
            }));
        }
        Ok(guard)
    }

    fn set_caps(&mut self, caps: CapabilitySets) -> io::Result<()> {
        self.touched.caps = true;
        Known::remember(None);
        set_capabilities(None, caps)?;
        Known::remember(Some(Known {
            fsuid: self.ids.0,
            fsgid: self.ids.1,
            caps,
        }));
        Ok(())
    }
}

impl FsCreds {
    /// Puts back what the guard changed (fsuid, fsgid, groups, capabilities), and checks
    /// the ids took.
    fn restore(&self) -> io::Result<()> {
        let Touched {
            fsuid: u,
            fsgid: g,
            caps,
        } = self.touched;
        if u {
            raw_setfsuid(self.old.fsuid);
        }
        if g {
            raw_setfsgid(self.old.fsgid);
        }
        if (u && fsuid() != self.old.fsuid) || (g && fsgid() != self.old.fsgid) {
            return Err(io::Error::other(format!(
                "fsuid/fsgid are {}/{}, not {}/{}",
                fsuid(),
                fsgid(),
                self.old.fsuid,
                self.old.fsgid
            )));
        }
        if let Some(groups) = &self.groups {
            set_thread_groups(groups)?;
        }
        // Going back to fsuid 0 already re-raises the filesystem capabilities from the
        // permitted set; this makes the restore exact whatever the starting point was.
        if u || caps {
            set_capabilities(None, self.old.caps)?;
        }
        Known::remember(Some(self.old));
        Ok(())
    }
}

impl Drop for FsCreds {
    /// A thread that cannot get its own credentials back would serve the next request
    /// with a caller's ids, groups or capabilities: stop the daemon instead. Its mount then
    /// fails every access (ENOTCONN) until unmounted, which is the safe way to fail.
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            tracing::error!("cannot restore the worker thread's credentials: {e}; aborting");
            std::process::abort();
        }
    }
}

thread_local! {
    static OWN_FS_STRUCT: Cell<bool> = const { Cell::new(false) };
    /// The umask last set on this thread's own `fs_struct`.
    static UMASK: Cell<Option<u32>> = const { Cell::new(None) };
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
    // Only this function sets the thread's umask once it has its own.
    let mask = mask & 0o777;
    if UMASK.with(Cell::get) != Some(mask) {
        rustix::process::umask(Mode::from_bits_truncate(mask));
        UMASK.with(|c| c.set(Some(mask)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn disk(uid: u32, gid: u32) -> FsIds {
        FsIds::Disk(InnerUid::new(uid), InnerGid::new(gid))
    }

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
                    let _g = FsCreds::switch(disk(4321, 8765), CapabilitySet::empty()).unwrap();
                    assert_eq!((fsuid(), fsgid()), (4321, 8765));
                    std::fs::File::create(&p).unwrap();
                }
                assert_eq!((fsuid(), fsgid()), before);
                let had = capabilities(None).unwrap();
                {
                    let _g =
                        FsCreds::switch(disk(4321, 8765), CapabilitySet::SYS_RESOURCE).unwrap();
                    let caps = capabilities(None).unwrap();
                    assert!(!caps.effective.contains(CapabilitySet::SYS_RESOURCE));
                    assert!(caps.effective.contains(CapabilitySet::DAC_OVERRIDE));
                }
                let caps = capabilities(None).unwrap();
                assert_eq!(caps.effective, had.effective);
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

    /// The remembered credentials follow every change: a switch to the ids the thread has
    /// already, nested switches and a switch after a checked one all act as the ids asked.
    #[test]
    fn remembered_credentials_follow_nested_switches() {
        if !is_root() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // The checked switch creates without DAC_OVERRIDE.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let p = dir.path().to_owned();
        std::thread::spawn(move || {
            let had = capabilities(None).unwrap();
            let owner = |name: &str| {
                std::fs::File::create(p.join(name)).unwrap();
                let md = std::fs::metadata(p.join(name)).unwrap();
                (md.uid(), md.gid())
            };
            {
                let _same = FsCreds::switch(disk(0, 0), CapabilitySet::empty()).unwrap();
                assert_eq!(owner("same"), (0, 0));
                let _outer = FsCreds::switch(disk(4321, 8765), CapabilitySet::empty()).unwrap();
                assert_eq!(owner("outer"), (4321, 8765));
                {
                    let _inner =
                        FsCreds::switch(disk(0, 8765), CapabilitySet::SYS_RESOURCE).unwrap();
                    assert_eq!(owner("inner"), (0, 8765));
                    let caps = capabilities(None).unwrap();
                    assert!(!caps.effective.contains(CapabilitySet::SYS_RESOURCE));
                }
                assert_eq!((fsuid(), fsgid()), (4321, 8765));
                assert_eq!(owner("outer-again"), (4321, 8765));
                assert_eq!(capabilities(None).unwrap().effective, had.effective);
            }
            assert_eq!((fsuid(), fsgid()), (0, 0));
            assert_eq!(capabilities(None).unwrap(), had);
            {
                let _g = FsCreds::switch_checked(disk(4321, 8765), &[]).unwrap();
                assert_eq!(owner("checked"), (4321, 8765));
            }
            assert_eq!(capabilities(None).unwrap(), had);
            {
                let _g = FsCreds::switch(disk(4321, 0), CapabilitySet::empty()).unwrap();
                assert_eq!(owner("after-checked"), (4321, 0));
            }
            assert_eq!((fsuid(), fsgid()), (0, 0));
            assert_eq!(capabilities(None).unwrap(), had);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn checked_switch_lets_the_filesystem_refuse() {
        if !is_root() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::thread::spawn(move || {
            let groups = rustix::process::getgroups().unwrap();
            {
                let _g = FsCreds::switch_checked(disk(4321, 8765), &[]).unwrap();
                let e = std::fs::File::open(&secret).unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EACCES));
            }
            // A supplementary group grants what it would grant the caller.
            std::os::unix::fs::chown(&secret, Some(0), Some(5555)).unwrap();
            std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o640))
                .unwrap();
            {
                let _g = FsCreds::switch_checked(disk(4321, 8765), &[5555]).unwrap();
                std::fs::File::open(&secret).unwrap();
            }
            // Everything is back: root reads it again.
            std::fs::File::open(&secret).unwrap();
            assert_eq!(rustix::process::getgroups().unwrap(), groups);
        })
        .join()
        .unwrap();
    }

    const ABORT_CHILD: &str = "SHIFTFS_TEST_FAILED_RESTORE";

    /// The child of `failed_restore_aborts`: a guard whose fsuid cannot be put back.
    #[test]
    fn failed_restore_child() {
        if std::env::var_os(ABORT_CHILD).is_none() {
            return;
        }
        // Without CAP_SETUID, setfsuid only goes to one of our own uids.
        let mut caps = capabilities(None).unwrap();
        caps.effective -= rustix::thread::CapabilitySet::SETUID;
        set_capabilities(None, caps).unwrap();
        let guard = FsCreds {
            old: Known {
                fsuid: rustix::process::getuid().as_raw().wrapping_add(1),
                fsgid: fsgid(),
                caps,
            },
            ids: (fsuid(), fsgid()),
            touched: Touched {
                fsuid: true,
                ..Touched::default()
            },
            groups: None,
            _not_send: std::marker::PhantomData,
        };
        drop(guard);
        // Still here with the wrong fsuid: what the parent must not see.
        std::process::exit(3);
    }

    /// A worker that cannot restore its credentials stops the daemon rather than serve on.
    #[test]
    fn failed_restore_aborts() {
        use std::os::unix::process::ExitStatusExt;
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sys::creds::tests::failed_restore_child",
                "--nocapture",
            ])
            .env(ABORT_CHILD, "1")
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "{:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
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
