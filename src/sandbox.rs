//! The FUSE daemon's sandbox: once the mount is in place and before any thread starts, the
//! serving process moves into a mount namespace of its own whose root is an empty
//! read-only tmpfs holding only `/proc` and `/dev/fuse`, keeps only the capabilities
//! listed in [`CAPABILITIES`], sets no_new_privs, and installs a seccomp filter that allows
//! only the system calls in [`allowed_syscalls`].
//!
//! The daemon reaches the source only through file descriptors opened before (the source's
//! `O_PATH` root, `/proc/self/fd`), so it sees nothing of the host's files by path: a bug
//! that let a request name a path would find an empty directory. `/proc` stays because
//! callers are read from `/proc/PID/status` and xattrs of `O_PATH` fds go through
//! `/proc/self/fd/N` paths; it is the host's procfs (the daemon stays in the host's pid
//! namespace, where the kernel reports callers' pids). `/dev/fuse` stays because fuser
//! opens it by path to give each worker thread its own connection fd.
//!
//! A system call outside the allowlist fails with ENOSYS, as if the kernel did not have
//! it: the daemon is not killed (a request fails, the mount lives on), and libc's and
//! std's fallbacks from newer calls to older ones (clone3 to clone, statx to newfstatat,
//! fchmodat2 to fchmodat...) keep working with a libc newer than the one the list was made
//! with. `-o sandbox=log` lets such calls through and has the kernel log each one (`dmesg`:
//! `audit: type=1326 ... syscall=N`), to find what the list lacks; `-o sandbox=off` serves
//! without any of this.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::str::FromStr;

use rustix::fs::{Mode as FileMode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::{CapabilitySet, CapabilitySets};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::sys::{daemon, fileattr};

/// How strictly the daemon is confined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Private mount namespace, reduced capabilities, seccomp allowlist (ENOSYS otherwise).
    #[default]
    On,
    /// As `On`, but calls outside the allowlist go through and are logged by the kernel.
    Log,
    /// No sandbox: the daemon keeps root's capabilities and sees the host's files.
    Off,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" | "none" => Ok(Self::Off),
            _ => Err(format!("unknown sandbox mode '{s}' (use on, log or off)")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

/// The capabilities the sandboxed daemon keeps (effective and permitted; the inheritable,
/// ambient sets are emptied and the bounding set is cut down to these). Each is needed
/// because the daemon acts on the backing filesystem for callers whose permission the FUSE
/// kernel module already checked (`default_permissions`) on the shifted attributes:
///
/// - `CHOWN`: files are created under the caller's fsuid/fsgid and then given the
///   requested owner; chown requests.
/// - `DAC_OVERRIDE`: reads, writes and lookups in objects whose on-disk modes would refuse
///   the daemon's fsuid (the kernel has checked the caller against the shifted modes).
/// - `DAC_READ_SEARCH`: `open_by_handle_at`, used for inodes beyond the fd budget.
/// - `FOWNER`: chmod, utimes, xattrs and ACLs of files the fsuid does not own.
/// - `FSETID`: keeps setuid/setgid bits where the caller may (the kernel told the daemon
///   so), and sets setgid on files whose group is not the fsgid.
/// - `SETUID`, `SETGID`: per-request `setfsuid`/`setfsgid`/`setgroups` on the worker
///   thread (see `sys::creds`).
/// - `MKNOD`: device nodes created through a mount with `dev`.
/// - `LINUX_IMMUTABLE`: `chattr +i`/`+a` through the mount, for callers that hold it on the
///   host (the daemon raises it only for them, see `FsCreds::switch`).
/// - `SETFCAP`: `security.capability` xattrs (file capabilities) written through the
///   mount.
/// - `SYS_ADMIN`: `FUSE_DEV_IOC_BACKING_OPEN` for passthrough, and the `trusted.*` xattrs.
/// - `SYS_PTRACE`: reading a caller's `/proc/TID/ns/user` (`fuse::caller`), which the
///   kernel allows only with ptrace read access: without it every caller holding a
///   capability the daemon lacks (host root) is taken for an unprivileged one, and host
///   root loses `trusted.*` and setuid/setgid-keeping through the mount. The ptrace system
///   calls themselves are outside the seccomp allowlist, and `/proc` is read-only, but it
///   also opens every process's `/proc/PID/root` and `/proc/PID/mem` to reads: see the
///   README for what that leaves of the mount namespace.
///
/// Dropped among others: `SYS_RESOURCE` (a container's writes must not use the blocks
/// ext4 reserves for root, nor pass quota limits), `KILL`, `SETPCAP`, `SYS_CHROOT`,
/// `NET_*`, `SYS_MODULE`, `MAC_*`, `BPF`.
pub const CAPABILITIES: CapabilitySet = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::DAC_READ_SEARCH)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::FSETID)
    .union(CapabilitySet::SETUID)
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::MKNOD)
    .union(CapabilitySet::LINUX_IMMUTABLE)
    .union(CapabilitySet::SETFCAP)
    .union(CapabilitySet::SYS_ADMIN)
    .union(CapabilitySet::SYS_PTRACE);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot set up the daemon's mount namespace ({step}): {source}")]
    Namespace {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot drop the daemon's capabilities: {0}")]
    Capabilities(#[source] io::Error),
    #[error("cannot build the seccomp filter: {0}")]
    Filter(String),
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
}

/// Confines the calling process as `mode` says; `io_uring`: the daemon may serve over
/// io_uring (`-o uring=auto|on`). Must run before any thread is started.
pub fn enter(mode: Mode, io_uring: bool) -> Result<(), Error> {
    if mode == Mode::Off {
        return Ok(());
    }
    let filter = filter(mode, io_uring)?;
    // Read while the host's /proc/sys is still at hand (it is in the new root too, but
    // read-only procfs could someday hide it).
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(63)
        .min(63);
    private_root()?;
    drop_capabilities(last_cap).map_err(Error::Capabilities)?;
    rustix::thread::set_no_new_privs(true).map_err(|e| Error::Capabilities(e.into()))?;
    seccompiler::apply_filter(&filter).map_err(|e| Error::Seccomp(e.to_string()))?;
    Ok(())
}

fn ns(step: &'static str) -> impl FnOnce(rustix::io::Errno) -> Error {
    move |e| Error::Namespace {
        step,
        source: e.into(),
    }
}

/// A directory to mount the new root on, in our own namespace only: any will do, it is
/// hidden from nothing but ourselves. `/dev` exists wherever `/dev/fuse` could be opened.
fn scratch_dir() -> &'static str {
    ["/tmp", "/dev"]
        .into_iter()
        .find(|d| std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()))
        .unwrap_or("/dev")
}

/// New mount namespace, root = empty tmpfs with the host's `/proc` and `/dev/fuse` bound in,
/// everything read-only, the old root detached. The copy of the FUSE mount this namespace
/// started with goes with the old root, so unmounting it on the host still ends the session.
fn private_root() -> Result<(), Error> {
    daemon::unshare_mount_namespace().map_err(|source| Error::Namespace {
        step: "unshare",
        source,
    })?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(ns("make / private"))?;
    let base = scratch_dir();
    rustix::mount::mount(
        "shiftfs-sandbox",
        base,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"mode=0755,size=16k,nr_inodes=16",
    )
    .map_err(ns("mount tmpfs"))?;
    let dir = rustix::fs::open(
        base,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        FileMode::empty(),
    )
    .map_err(ns("open new root"))?;
    rustix::fs::mkdirat(&dir, "proc", FileMode::from_raw_mode(0o555)).map_err(ns("mkdir proc"))?;
    rustix::fs::mkdirat(&dir, "dev", FileMode::from_raw_mode(0o755)).map_err(ns("mkdir dev"))?;
    drop(
        rustix::fs::openat(
            &dir,
            "dev/fuse",
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
            FileMode::from_raw_mode(0o600),
        )
        .map_err(ns("create dev/fuse"))?,
    );
    let at = |rel: &str| format!("{base}/{rel}");
    rustix::mount::mount_bind("/proc", at("proc")).map_err(ns("bind /proc"))?;
    rustix::mount::mount_bind(crate::sys::fusedev::DEV_FUSE, at("dev/fuse"))
        .map_err(ns("bind /dev/fuse"))?;
    rustix::process::fchdir(&dir).map_err(ns("chdir to new root"))?;
    rustix::process::pivot_root(".", ".").map_err(ns("pivot_root"))?;
    // The old root now sits on top of the new one at "/": detach it and all below it.
    rustix::mount::unmount(".", UnmountFlags::DETACH).map_err(ns("detach old root"))?;
    rustix::process::chdir("/").map_err(ns("chdir /"))?;
    let ro = MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID;
    rustix::mount::mount_remount("/", ro | MountFlags::NODEV | MountFlags::NOEXEC, "")
        .map_err(ns("remount / read-only"))?;
    rustix::mount::mount_remount("/proc", ro | MountFlags::NODEV | MountFlags::NOEXEC, "")
        .map_err(ns("remount /proc read-only"))?;
    rustix::mount::mount_remount("/dev/fuse", ro | MountFlags::NOEXEC, "")
        .map_err(ns("remount /dev/fuse read-only"))?;
    Ok(())
}

/// Cuts the bounding set down to [`CAPABILITIES`] (needs CAP_SETPCAP, so first), empties
/// the ambient and inheritable sets, and keeps only those in the permitted and effective
/// ones (those of them the process has).
fn drop_capabilities(last_cap: u32) -> io::Result<()> {
    for cap in 0..=last_cap {
        let c = CapabilitySet::from_bits_retain(1 << cap);
        if !CAPABILITIES.contains(c) && rustix::thread::capability_is_in_bounding_set(c)? {
            rustix::thread::remove_capability_from_bounding_set(c)?;
        }
    }
    rustix::thread::clear_ambient_capability_set()?;
    let now = rustix::thread::capabilities(None)?;
    let keep = now.permitted & CAPABILITIES;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    Ok(())
}

/// An ioctl request number as `_IOC` makes it on the architectures seccompiler supports.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const FUSE_DEV_IOC_MAGIC: u64 = 229;
/// The ioctls the daemon makes: on `/dev/fuse` fds `FUSE_DEV_IOC_CLONE` (a connection fd
/// per worker) and `FUSE_DEV_IOC_BACKING_OPEN`/`_CLOSE` (passthrough); on files the inode
/// attribute requests it passes on (`lsattr`/`chattr`, project ids).
const IOCTLS: [u64; 7] = [
    ioc(IOC_READ, FUSE_DEV_IOC_MAGIC, 0, 4),
    ioc(IOC_WRITE, FUSE_DEV_IOC_MAGIC, 1, 16),
    ioc(IOC_WRITE, FUSE_DEV_IOC_MAGIC, 2, 4),
    fileattr::FS_IOC_GETFLAGS as u64,
    fileattr::FS_IOC_SETFLAGS as u64,
    fileattr::FS_IOC_FSGETXATTR as u64,
    fileattr::FS_IOC_FSSETXATTR as u64,
];

/// The system calls the sandboxed daemon makes, with the argument conditions some of them
/// carry (empty: any arguments). Found by tracing the daemon (`strace -f`) through the
/// FUSE test suites and pjdfstest, and by reading what fuser, std and glibc call. A new
/// system call in the daemon's code must be added here: without it the call fails with
/// ENOSYS in every daemon started by `shiftfs mount` (the CLI-level suites show it; the
/// in-process library tests in `tests/fuse_backend.rs` run without the sandbox).
pub fn allowed_syscalls(io_uring: bool) -> Vec<(i64, Vec<SeccompRule>)> {
    use libc::*;
    let any = |nrs: &[c_long]| -> Vec<(i64, Vec<SeccompRule>)> {
        nrs.iter().map(|&n| (n, Vec::new())).collect()
    };
    let arg_eq = |arg: u8, values: &[u64]| -> Vec<SeccompRule> {
        values
            .iter()
            .filter_map(|&v| {
                SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                    .and_then(|c| SeccompRule::new(vec![c]))
                    .ok()
            })
            .collect()
    };
    let mut list = any(&[
        // Memory, threads, time, exit.
        SYS_brk,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        SYS_futex,
        SYS_clone,
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_getrandom,
        SYS_clock_gettime,
        SYS_gettid,
        SYS_getpid,
        SYS_exit,
        SYS_exit_group,
        // Signals: the signal-watching thread, panics (abort), thread start-up.
        SYS_rt_sigprocmask,
        SYS_rt_sigaction,
        SYS_rt_sigreturn,
        SYS_rt_sigtimedwait,
        SYS_sigaltstack,
        SYS_tgkill,
        // Reaping the supervisor at the end.
        SYS_wait4,
        // I/O on fds the daemon holds: /dev/fuse, files, the supervisor's socket, stderr.
        // recvmsg: mounts joining the daemon come with their fds (`SCM_RIGHTS`).
        SYS_recvmsg,
        SYS_read,
        SYS_write,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_lseek,
        SYS_close,
        SYS_fcntl,
        SYS_fsync,
        SYS_fdatasync,
        SYS_fallocate,
        SYS_ftruncate,
        SYS_copy_file_range,
        // Files, relative to held fds.
        SYS_openat,
        SYS_openat2,
        SYS_open_by_handle_at,
        SYS_name_to_handle_at,
        SYS_newfstatat,
        SYS_fstat,
        SYS_statx,
        SYS_fstatfs,
        SYS_getdents64,
        SYS_mkdirat,
        SYS_mknodat,
        SYS_symlinkat,
        SYS_linkat,
        SYS_unlinkat,
        SYS_renameat2,
        SYS_readlinkat,
        SYS_fchmodat,
        SYS_fchmodat2,
        SYS_fchownat,
        SYS_utimensat,
        SYS_setxattr,
        SYS_getxattr,
        SYS_fgetxattr,
        SYS_listxattr,
        SYS_removexattr,
        // Credentials per request (sys::creds).
        SYS_setfsuid,
        SYS_setfsgid,
        SYS_setgroups,
        SYS_getgroups,
        SYS_capget,
        SYS_capset,
        SYS_umask,
        SYS_geteuid,
    ]);
    // rustix's `open` (callers' /proc/TID) and glibc's `readlink` (names of held fds, for
    // messages) are the old calls where the architecture has them.
    #[cfg(target_arch = "x86_64")]
    list.extend(any(&[SYS_open, SYS_readlink]));
    // Thread names (std names fuser's threads); nothing else of prctl.
    list.push((SYS_prctl, arg_eq(0, &[PR_SET_NAME as u64])));
    // A private fs_struct for the per-thread umask (sys::creds::set_thread_umask).
    list.push((SYS_unshare, arg_eq(0, &[CLONE_FS as u64])));
    list.push((SYS_ioctl, arg_eq(1, &IOCTLS)));
    if io_uring {
        // FUSE over io_uring: the rings, the eventfd that wakes a ring's thread, and pinning
        // each ring's thread to its CPU. io_uring operations bypass this filter, so these
        // are allowed only when the transport may be used.
        list.extend(any(&[
            SYS_io_uring_setup,
            SYS_io_uring_enter,
            SYS_io_uring_register,
            SYS_eventfd2,
            SYS_sched_setaffinity,
        ]));
    }
    list
}

/// The daemon's seccomp program for `mode` (`On` or `Log`) on this architecture.
pub fn filter(mode: Mode, io_uring: bool) -> Result<BpfProgram, Error> {
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Errno(libc::ENOSYS as u32),
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Filter(e.to_string()))?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls(io_uring).into_iter().collect();
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| Error::Filter(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Filter(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        for m in [Mode::On, Mode::Log, Mode::Off] {
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
        }
        assert_eq!("none".parse::<Mode>(), Ok(Mode::Off));
        assert!("strict".parse::<Mode>().is_err());
    }

    #[test]
    fn the_filter_builds_and_lists_no_dangerous_call() {
        filter(Mode::On, false).expect("filter");
        filter(Mode::Log, false).expect("filter");
        filter(Mode::On, true).expect("filter");
        let allowed: Vec<i64> = allowed_syscalls(false)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(!allowed.contains(&libc::SYS_io_uring_setup));
        let with_uring: Vec<i64> = allowed_syscalls(true).into_iter().map(|(n, _)| n).collect();
        assert!(with_uring.contains(&libc::SYS_io_uring_enter));
        for bad in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_setns,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_bpf,
            libc::SYS_setuid,
            libc::SYS_setresuid,
            libc::SYS_kill,
        ] {
            assert!(!allowed.contains(&bad), "syscall {bad} must not be allowed");
        }
    }
}
