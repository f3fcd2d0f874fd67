//! What the kernel knows about a caller and FUSE does not pass on: supplementary groups,
//! capabilities and user namespace, read from `/proc/PID`. Used where the daemon must make a
//! decision the kernel would make with the caller's credentials.

use std::path::Path;

use crate::idmap::{IdMapping, OuterGid, OuterUid};

const CAP_FSETID: u32 = 4;
const CAP_SYS_ADMIN: u32 = 21;

/// The parts of a caller's credentials a decision needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub groups: Vec<u32>,
    pub cap_eff: u64,
    /// The caller's user namespace maps; `None` when unreadable.
    pub userns: Option<IdMapping>,
}

impl Caller {
    /// Reads `PROC/PID/{status,uid_map,gid_map}`; what cannot be read stays empty, which
    /// errs on the side of fewer privileges.
    pub fn read(proc_root: &Path, pid: u32) -> Self {
        let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status"))
            .unwrap_or_default();
        let mut c = Self::parse_status(&status);
        c.userns = IdMapping::from_proc(proc_root, pid).ok();
        c
    }

    fn parse_status(status: &str) -> Self {
        let mut c = Self::default();
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("Groups:") {
                c.groups = v
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect();
            } else if let Some(v) = line.strip_prefix("CapEff:") {
                c.cap_eff = u64::from_str_radix(v.trim(), 16).unwrap_or(0);
            }
        }
        c
    }

    /// The kernel's `capable(cap)`: `cap` in the initial user namespace (whose map is the
    /// identity over all ids).
    fn host_capable(&self, cap: u32) -> bool {
        self.cap_eff & (1 << cap) != 0
            && self
                .userns
                .as_ref()
                .is_some_and(|ns| ns.uid.ranges() == IdMapping::identity().uid.ranges())
    }

    pub fn is_host_admin(&self) -> bool {
        self.host_capable(CAP_SYS_ADMIN)
    }

    pub fn is_host_fsetid(&self) -> bool {
        self.host_capable(CAP_FSETID)
    }

    /// The kernel's `in_group_or_capable(inode, gid)` for CAP_FSETID: whether a change by this
    /// caller keeps a setgid bit. `fsgid`, `file_uid` and `file_gid` are host (outer) ids.
    pub fn may_keep_setgid(&self, fsgid: u32, file_uid: u32, file_gid: u32) -> bool {
        if fsgid == file_gid || self.groups.contains(&file_gid) {
            return true;
        }
        // capable_wrt_inode_uidgid: the capability counts only over inodes whose owner and
        // group are mapped in the caller's user namespace.
        self.cap_eff & (1 << CAP_FSETID) != 0
            && self.userns.as_ref().is_some_and(|ns| {
                ns.uid.to_inner(OuterUid(file_uid)).is_some()
                    && ns.gid.to_inner(OuterGid(file_gid)).is_some()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_setgid_rule() {
        let c = Caller::parse_status("Name:\tx\nGroups:\t10 20 \nCapEff:\t0000000000000010\n");
        assert_eq!(c.groups, vec![10, 20]);
        assert_eq!(c.cap_eff, 0x10);
        assert!(c.may_keep_setgid(5, 1, 5));
        assert!(c.may_keep_setgid(5, 1, 20));
        // CAP_FSETID but no namespace known: not capable over the inode.
        assert!(!c.may_keep_setgid(5, 1, 30));
        let ns = Caller {
            userns: Some(IdMapping::parse("b:0:100000:65536").unwrap()),
            ..c
        };
        assert!(ns.may_keep_setgid(5, 100001, 100030));
        assert!(!ns.may_keep_setgid(5, 100001, 30));
        let plain = Caller::default();
        assert!(!plain.may_keep_setgid(5, 1, 30));
    }
}
