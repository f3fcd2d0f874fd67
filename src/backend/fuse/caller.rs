//! What the kernel knows about a caller and FUSE does not pass on: supplementary groups,
//! capabilities and user namespace, read from `/proc/TID`. Used where the daemon must make a
//! decision the kernel would make with the caller's credentials.
//!
//! A request names its caller by thread id only. The thread cannot go away while we hold its
//! request (once the daemon has read a request, `request_wait_answer` waits for the reply
//! uninterruptibly, even after SIGKILL), so the number cannot be reused meanwhile, unless the
//! connection is aborted (`fusectl` abort, `fs.fuse.max_request_timeout`). So everything is
//! read through one fd of `/proc/TID`, which is bound to that task (reads fail once it is
//! gone, whatever process gets the number next), and the fsuid/fsgid found there must be the
//! ones the request carries. Anything that cannot be read or does not match leaves the caller
//! without groups, capabilities or namespace: fewer privileges, never more.
//!
//! `/proc` must be that of the PID namespace the mount was made in (request ids are in it),
//! and `ns/user` of another user's task is readable only with ptrace read access
//! (CAP_SYS_PTRACE when the caller holds capabilities the daemon lacks).

use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::OnceLock;

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::idmap::{IdMapping, InnerGid, InnerUid, OuterGid, OuterUid};

const CAP_FSETID: u32 = 4;
const CAP_LINUX_IMMUTABLE: u32 = 9;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;

/// What a request carries when it has no caller ids (`FUSE_INVALID_UIDGID`).
pub const NO_ID: u32 = u32::MAX;

/// A user namespace, known by the nsfs inode `/proc/TID/ns/user` leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserNsId {
    dev: u64,
    ino: u64,
}

impl UserNsId {
    fn of(st: &rustix::fs::Stat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// The daemon's own user namespace, read once. It never changes: a multi-threaded process
/// cannot `setns` or `unshare` into another user namespace.
fn own_userns() -> Option<UserNsId> {
    static OWN: OnceLock<Option<UserNsId>> = OnceLock::new();
    *OWN.get_or_init(|| {
        rustix::fs::stat("/proc/self/ns/user")
            .map(|st| UserNsId::of(&st))
            .map_err(|e| tracing::warn!("cannot identify our own user namespace: {e}"))
            .ok()
    })
}

/// The parts of a caller's credentials a decision needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub groups: Vec<u32>,
    pub cap_eff: u64,
    /// The caller's user namespace maps; `None` when unreadable.
    pub userns: Option<IdMapping>,
    /// Which user namespace that is; `None` when unreadable.
    pub userns_id: Option<UserNsId>,
    /// The fsuid and fsgid `/proc` shows, as the host sees them; `None` when unreadable.
    pub fs_ids: Option<(u32, u32)>,
}

/// One task's `/proc/TID` directory: every file opened through it describes that task, or
/// fails once it has exited.
struct Task(OwnedFd);

impl Task {
    fn open(proc_root: &Path, tid: u32) -> io::Result<Self> {
        let fd = rustix::fs::open(
            proc_root.join(tid.to_string()),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self(fd))
    }

    fn read(&self, name: &str) -> io::Result<String> {
        let fd = rustix::fs::openat(
            &self.0,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        // proc files report size 0: read to the end without asking.
        let mut text = String::with_capacity(1024);
        std::fs::File::from(fd).read_to_string(&mut text)?;
        Ok(text)
    }

    fn userns(&self) -> io::Result<UserNsId> {
        let st = rustix::fs::statat(&self.0, "ns/user", AtFlags::empty())?;
        Ok(UserNsId::of(&st))
    }
}

impl Caller {
    /// The thread that sent `req`, as `/proc` shows it.
    pub fn of(req: &fuser::Request) -> Self {
        Self::read(Path::new("/proc"), req.pid(), req.uid(), req.gid())
    }

    /// Reads `PROC/TID/{status,uid_map,gid_map,ns/user}` through one fd of `PROC/TID`. When
    /// that task's fsuid/fsgid are not `fsuid`/`fsgid` (the request's), it is not the caller
    /// and nothing is taken from it; `NO_ID` skips that check.
    pub fn read(proc_root: &Path, tid: u32, fsuid: u32, fsgid: u32) -> Self {
        let Ok(task) = Task::open(proc_root, tid) else {
            return Self::default();
        };
        let Ok(status) = task.read("status") else {
            return Self::default();
        };
        let (c, ids) = Self::parse_status(&status);
        let claimed = |want: u32, seen: Option<u32>| want == NO_ID || seen == Some(want);
        if !claimed(fsuid, ids.0) || !claimed(fsgid, ids.1) {
            tracing::debug!(
                "task {tid} has fsuid/fsgid {ids:?}, the request {fsuid}/{fsgid}: not trusted"
            );
            return Self::default();
        }
        let userns = match (task.read("uid_map"), task.read("gid_map")) {
            (Ok(u), Ok(g)) => IdMapping::parse_separate(&u, &g).ok(),
            _ => None,
        };
        Self {
            userns,
            userns_id: task.userns().ok(),
            fs_ids: ids.0.zip(ids.1),
            ..c
        }
    }

    /// Only the fsuid and fsgid of task `tid` as the host sees them (one read of its status).
    pub fn read_fs_ids(proc_root: &Path, tid: u32) -> Option<(u32, u32)> {
        let status = Task::open(proc_root, tid).ok()?.read("status").ok()?;
        let (_, (uid, gid)) = Self::parse_status(&status);
        uid.zip(gid)
    }

    /// Groups and effective capabilities, and the fsuid/fsgid (last columns of `Uid:` and
    /// `Gid:`).
    fn parse_status(status: &str) -> (Self, (Option<u32>, Option<u32>)) {
        let mut c = Self::default();
        let (mut fsuid, mut fsgid) = (None, None);
        let fs_id = |v: &str| v.split_whitespace().nth(3).and_then(|i| i.parse().ok());
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("Groups:") {
                c.groups = v
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect();
            } else if let Some(v) = line.strip_prefix("CapEff:") {
                c.cap_eff = u64::from_str_radix(v.trim(), 16).unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("Uid:") {
                fsuid = fs_id(v);
            } else if let Some(v) = line.strip_prefix("Gid:") {
                fsgid = fs_id(v);
            }
        }
        (c, (fsuid, fsgid))
    }

    /// The kernel's `capable(cap)`: `cap` in the initial user namespace itself, not merely
    /// in one whose map is the identity (a namespace created with `0 0 4294967295` is not
    /// the initial one). The daemon's namespace stands for the initial one: it lists
    /// `trusted.*` and keeps setgid with its own capabilities in it.
    fn host_capable(&self, cap: u32) -> bool {
        self.cap_eff & (1 << cap) != 0 && self.userns_id.is_some() && self.userns_id == own_userns()
    }

    pub fn is_host_admin(&self) -> bool {
        self.host_capable(CAP_SYS_ADMIN)
    }

    pub fn is_host_fsetid(&self) -> bool {
        self.host_capable(CAP_FSETID)
    }

    /// May set or clear the immutable and append-only inode flags.
    pub fn is_host_immutable(&self) -> bool {
        self.host_capable(CAP_LINUX_IMMUTABLE)
    }

    /// May use ext4's blocks reserved for root and pass quota hard limits.
    pub fn is_host_resource(&self) -> bool {
        self.host_capable(CAP_SYS_RESOURCE)
    }

    /// In the daemon's own user namespace (the kernel's `current_user_ns() == &init_user_ns`):
    /// only there may project ids change.
    pub fn in_host_userns(&self) -> bool {
        self.userns_id.is_some() && self.userns_id == own_userns()
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
                ns.uid.to_inner(OuterUid::new(file_uid)).is_some()
                    && ns.gid.to_inner(OuterGid::new(file_gid)).is_some()
            })
    }

    /// `may_keep_setgid` for a request that carries no caller ids (an idmapped mount stacked
    /// on an idmappable one), whose file ids `file_uid`/`file_gid` are the filesystem's: the
    /// idmapping the caller went through is unknown to FUSE, so its ids are taken as its own
    /// user namespace sees them. That is exact when the stacked mount's map is that
    /// namespace's (a container's rootfs or volume) or there is no idmapped mount in between
    /// (the host directly); otherwise setgid may go where the kernel would keep it.
    /// The caller's fsuid and fsgid as its own user namespace sees them; `None` when unknown
    /// or unmapped there. Stands for the ids a request through an idmapped mount would carry,
    /// under the assumption `may_keep_setgid_in_own_ns` explains.
    pub fn fs_ids_in_own_ns(&self) -> Option<(u32, u32)> {
        let (ns, (uid, gid)) = (self.userns.as_ref()?, self.fs_ids?);
        Some((
            ns.uid.to_inner(OuterUid::new(uid))?.get(),
            ns.gid.to_inner(OuterGid::new(gid))?.get(),
        ))
    }

    pub fn may_keep_setgid_in_own_ns(&self, file_uid: u32, file_gid: u32) -> bool {
        let (Some(ns), Some((_, fsgid))) = (&self.userns, self.fs_ids) else {
            return false;
        };
        let in_ns = |g: u32| ns.gid.to_inner(OuterGid::new(g)).map(InnerGid::get);
        if in_ns(fsgid) == Some(file_gid) || self.groups.iter().any(|&g| in_ns(g) == Some(file_gid))
        {
            return true;
        }
        self.cap_eff & (1 << CAP_FSETID) != 0
            && ns.uid.to_outer(InnerUid::new(file_uid)).is_some()
            && ns.gid.to_outer(InnerGid::new(file_gid)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn status_and_setgid_rule() {
        let (c, ids) = Caller::parse_status(
            "Name:\tx\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t10 20 \nCapEff:\t0000000000000010\n",
        );
        assert_eq!(ids, (Some(4), Some(8)));
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

    #[test]
    fn setgid_rule_without_request_ids_uses_the_callers_namespace() {
        let ns = |groups: Vec<u32>, cap_eff: u64| Caller {
            groups,
            cap_eff,
            userns: Some(IdMapping::parse("b:0:100000:65536").unwrap()),
            fs_ids: Some((101000, 102000)),
            ..Caller::default()
        };
        // fsgid 102000 is the namespace's 2000, the file's group on the filesystem.
        assert_eq!(ns(vec![], 0).fs_ids_in_own_ns(), Some((1000, 2000)));
        assert!(ns(vec![], 0).may_keep_setgid_in_own_ns(1000, 2000));
        assert!(!ns(vec![], 0).may_keep_setgid_in_own_ns(1000, 3000));
        assert!(ns(vec![103000], 0).may_keep_setgid_in_own_ns(1000, 3000));
        // CAP_FSETID over ids the namespace maps, not over others.
        let cap = 1 << CAP_FSETID;
        assert!(ns(vec![], cap).may_keep_setgid_in_own_ns(1000, 3000));
        assert!(!ns(vec![], cap).may_keep_setgid_in_own_ns(1000, 70000));
        // Nothing known, nothing kept.
        assert!(!Caller::default().may_keep_setgid_in_own_ns(0, 0));
    }

    /// Capable in the host's sense only in our own namespace, whatever its map says.
    #[test]
    fn host_capability_needs_our_namespace() {
        let all = u64::MAX;
        let ours = Caller {
            cap_eff: all,
            userns: Some(IdMapping::identity()),
            userns_id: own_userns(),
            ..Caller::default()
        };
        assert!(ours.is_host_admin() && ours.is_host_fsetid());
        assert!(ours.is_host_immutable() && ours.is_host_resource() && ours.in_host_userns());
        let other = Caller {
            userns_id: Some(UserNsId { dev: 0, ino: 1 }),
            ..ours
        };
        assert!(!other.is_host_admin() && !other.is_host_fsetid());
        assert!(!other.is_host_immutable() && !other.is_host_resource() && !other.in_host_userns());
        let unknown = Caller {
            userns_id: None,
            ..other
        };
        assert!(!unknown.is_host_admin());
        let no_cap = Caller {
            cap_eff: 0,
            userns_id: own_userns(),
            ..unknown
        };
        assert!(!no_cap.is_host_admin());
    }

    fn fs_ids() -> (u32, u32) {
        (crate::sys::creds::fsuid(), crate::sys::creds::fsgid())
    }

    #[test]
    fn reads_the_calling_thread() {
        let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        let (uid, gid) = fs_ids();
        let me = Caller::read(Path::new("/proc"), tid, uid, gid);
        assert_eq!(me.userns_id, own_userns());
        assert!(me.userns_id.is_some());
        assert_eq!(me.fs_ids, Some((uid, gid)));
        assert_eq!(
            Caller::read_fs_ids(Path::new("/proc"), tid),
            Some((uid, gid))
        );
        assert!(me.userns.is_some());
        let groups: Vec<u32> = rustix::process::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        assert_eq!(me.groups, groups);
        assert_eq!(me, Caller::read(Path::new("/proc"), tid, NO_ID, NO_ID));
        // Ids other than the request's: another task, or not the caller's view; nothing
        // is taken from it.
        assert_eq!(
            Caller::read(Path::new("/proc"), tid, uid.wrapping_add(1), gid),
            Caller::default()
        );
        assert_eq!(
            Caller::read(Path::new("/proc"), tid, uid, gid.wrapping_add(1)),
            Caller::default()
        );
        assert_eq!(
            Caller::read(Path::new("/proc"), 0, uid, gid),
            Caller::default()
        );
    }

    /// The fd of `/proc/TID` stays with that task: after it has exited and been reaped,
    /// nothing is read through it, whichever process gets the number next.
    #[test]
    fn task_fd_outlives_no_task() {
        let mut child = Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let task = Task::open(Path::new("/proc"), child.id()).unwrap();
        // Not the name: the child may not have exec'd `sleep` yet.
        let pid_line = format!("\nPid:\t{}\n", child.id());
        assert!(task.read("status").unwrap().contains(&pid_line));
        task.userns().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(task.read("status").is_err());
        assert!(task.userns().is_err());
    }
}
