//! ext4's root-reserved blocks: a create near a full disk that took blocks the caller may not
//! use (ext4's rule: resuid, resgid, CAP_SYS_RESOURCE) is undone with ENOSPC.

use super::*;

/// Free space of an ext2/3/4 file system so close to the blocks it keeps for root (`-m`,
/// `resuid`, `resgid`) that a create may reach into them.
pub(super) struct NearReserve {
    bfree: u64,
    /// Blocks kept back, known from a statfs that showed some available.
    reserve: Option<u64>,
}

/// Available blocks above which no create (a few blocks, one per worker at a time) can
/// reach the reserve.
pub(super) const RESERVE_MARGIN: u64 = 256;

impl NearReserve {
    /// `dev` is the device `dir` is on: ext4 always sits on a block device, so a file system
    /// on an anonymous device (major 0: tmpfs, btrfs, overlayfs, FUSE ...) is not asked.
    pub(super) fn check(dir: BorrowedFd<'_>, dev: u64) -> Option<Self> {
        if rustix::fs::major(dev) == 0 {
            return None;
        }
        let s = rustix::fs::fstatfs(dir).ok()?;
        if crate::mountinfo::statfs_name(&s) != "ext4" || s.f_bavail >= RESERVE_MARGIN {
            return None;
        }
        Some(Self {
            bfree: s.f_bfree,
            reserve: (s.f_bavail > 0).then(|| s.f_bfree.saturating_sub(s.f_bavail)),
        })
    }

    /// Whether blocks of the reserve were taken since `check`.
    pub(super) fn dipped(&self, dir: BorrowedFd<'_>) -> bool {
        let Ok(s) = rustix::fs::fstatfs(dir) else {
            return false;
        };
        match self.reserve {
            Some(r) => s.f_bfree < r,
            None => s.f_bfree < self.bfree,
        }
    }

    /// ext4's rule for the reserve, for a caller with host fsuid/fsgid `uid`/`gid`: it is
    /// the `resuid`, in the group `resgid` (unless that is 0), or has CAP_SYS_RESOURCE.
    pub(super) fn may_use(&self, dir: BorrowedFd<'_>, uid: u32, gid: u32, who: &Caller) -> bool {
        // Unreadable: ext4's defaults.
        let (resuid, resgid) = reserve_owners(dir).unwrap_or((0, 0));
        uid == resuid
            || (resgid != 0 && (gid == resgid || who.groups.contains(&resgid)))
            || who.is_host_resource()
    }
}

/// `resuid` and `resgid` of the ext4 file system holding `dir`: `/proc/fs/ext4/DEV/options`
/// lists them, defaults included. Only `/proc` is read (a sandbox keeps it for fd reopening).
pub(super) fn reserve_owners(dir: BorrowedFd<'_>) -> Option<(u32, u32)> {
    let st = rustix::fs::fstat(dir).ok()?;
    let dev = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let parts = std::fs::read_to_string("/proc/partitions").ok()?;
    let name = block_device_name(&parts, dev)?;
    let opts = std::fs::read_to_string(format!("/proc/fs/ext4/{name}/options")).ok()?;
    let get = |key: &str| {
        opts.lines()
            .find_map(|l| l.strip_prefix(key)?.parse::<u32>().ok())
    };
    Some((get("resuid=")?, get("resgid=")?))
}

/// The name `/proc/partitions` gives the block device `dev` (major, minor).
pub(super) fn block_device_name(partitions: &str, dev: (u32, u32)) -> Option<&str> {
    partitions.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (maj, min, name) = (f.first()?, f.get(1)?, f.get(3)?);
        let ok = maj.parse() == Ok(dev.0) && min.parse() == Ok(dev.1);
        (ok && !name.contains('/') && !name.starts_with('.')).then_some(*name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_devices_are_named_from_proc_partitions() {
        let parts = "major minor  #blocks  name\n\n 254        0  268435456 vda\n   7        0      32768 loop0\n";
        assert_eq!(block_device_name(parts, (7, 0)), Some("loop0"));
        assert_eq!(block_device_name(parts, (254, 0)), Some("vda"));
        assert_eq!(block_device_name(parts, (254, 1)), None);
        assert_eq!(block_device_name("8 0 1 ../x\n", (8, 0)), None);
    }
}
