//! Issue 11: the FUSE daemon serves from a sandbox. The process `shiftfs list` names (the
//! one to signal) runs in a mount namespace of its own that shows nothing of the host, with
//! only the documented capabilities, no_new_privs and a seccomp filter; system calls
//! outside the filter's allowlist are refused with ENOSYS. Its supervisor (a child that
//! stays in the host's namespace to unmount on SIGTERM) is unconfined but names no mount.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use shiftfs::sandbox::{CAPABILITIES, Mode, filter};

/// `Field:\tvalue` lines of `/proc/PID/status`.
#[track_caller]
fn status(pid: u32) -> std::collections::BTreeMap<String, String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"))
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn hex(field: &str, st: &std::collections::BTreeMap<String, String>) -> u64 {
    u64::from_str_radix(&st[field], 16).unwrap_or_else(|e| panic!("{field}: {e}"))
}

/// The daemon of `mnt`: the one live shiftfs process naming it.
#[track_caller]
fn daemon_of(mnt: &Path) -> u32 {
    let pids = shiftfs_pids_mentioning(mnt);
    assert_eq!(
        pids.len(),
        1,
        "want one daemon for {}: {pids:?}",
        mnt.display()
    );
    pids[0]
}

/// The children of `pid` (its supervisor).
fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn tree(dir: &TestDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = dir.dir("src");
    file(&src.join("f"), b"data\n", 0o644, 1000, 1000);
    (src, dir.dir("mnt"))
}

#[test]
fn daemon_runs_confined() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("sandbox");
    let (src, mnt) = tree(&dir);
    let m = ShiftMount::new(Backend::Fuse, MAP, &src, &mnt);
    assert_eq!(stat_ids(mnt.join("f")), (101000, 101000));
    let pid = daemon_of(&mnt);

    let st = status(pid);
    let own = status(std::process::id());
    // What the daemon keeps: the documented set, as far as whoever started it had it.
    let want = CAPABILITIES.bits() & hex("CapBnd", &own);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            hex(set, &st),
            want,
            "{set} of daemon {pid}: {:#x}, want {want:#x}",
            hex(set, &st)
        );
    }
    assert_eq!(hex("CapInh", &st), 0, "CapInh");
    assert_eq!(hex("CapAmb", &st), 0, "CapAmb");
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["Seccomp"], "2", "seccomp filter mode");

    // Its root shows nothing of the host: an empty tmpfs with /proc and /dev/fuse.
    let root = Path::new("/proc").join(pid.to_string()).join("root");
    assert_eq!(ls(&root), ["dev", "proc"], "the daemon's /");
    assert_eq!(ls(root.join("dev")), ["fuse"], "the daemon's /dev");
    assert!(!root.join("etc").exists(), "the daemon sees /etc");
    assert!(
        fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap()
            != fs::read_link("/proc/self/ns/mnt").unwrap(),
        "the daemon shares the host's mount namespace"
    );
    // Its mount table: those three, read-only, and neither source nor target.
    let table = fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let points: Vec<&str> = table.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    assert_eq!(points, ["/", "/proc", "/dev/fuse"], "{table}");
    assert!(
        table
            .lines()
            .all(|l| l.split(' ').nth(5).is_some_and(|o| o.starts_with("ro,"))),
        "{table}"
    );

    // The supervisor: one child, unconfined, in the host's namespace, naming no mount.
    let kids = children(pid);
    assert_eq!(kids.len(), 1, "children of daemon {pid}: {kids:?}");
    let sup = status(kids[0]);
    assert_eq!(sup["Seccomp"], "0", "supervisor");
    assert_eq!(
        fs::read_link(format!("/proc/{}/ns/mnt", kids[0])).unwrap(),
        fs::read_link("/proc/self/ns/mnt").unwrap(),
        "the supervisor must stay in the host's mount namespace"
    );

    // Served as before, and `umount` still stops both.
    assert_eq!(fs::read(mnt.join("f")).expect("read"), b"data\n");
    run(&mut sh_as(
        100000,
        100000,
        &format!("echo x > {}", q(mnt.join("new"))),
    ))
    .assert_ok();
    assert_eq!(stat_ids(src.join("new")), (0, 0), "created as image root");
    m.unmount();
    for p in [pid, kids[0]] {
        let gone = (0..250).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            fs::read(format!("/proc/{p}/cmdline")).map_or(true, |c| c.is_empty())
        });
        assert!(gone, "process {p} outlived `shiftfs umount`");
    }
    dir.finish();
}

/// SIGTERM to the listed pid still unmounts, though the daemon cannot see the target.
#[test]
fn sigterm_unmounts_from_the_sandbox() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("sandbox-term");
    let (src, mnt) = tree(&dir);
    let m = ShiftMount::new(Backend::Fuse, MAP, &src, &mnt);
    let pid = daemon_of(&mnt);
    run(&mut sh(&format!("kill -TERM {pid}"))).assert_ok();
    assert!(
        wait_mounted(&mnt, false, Duration::from_secs(10)),
        "still mounted 10 s after SIGTERM"
    );
    let gone = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        shiftfs_pids_mentioning(&mnt).is_empty()
    });
    assert!(gone, "daemon {pid} outlived its unmount");
    let list = run(&mut shiftfs(["list"]));
    assert!(
        !list.stdout.contains(mnt.to_str().expect("utf-8")),
        "the record outlived the mount:\n{list}"
    );
    m.disarm();
    dir.finish();
}

/// `-o sandbox=off` serves unconfined (the escape hatch, and the benchmark's baseline).
#[test]
fn sandbox_off_serves_unconfined() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("sandbox-off");
    let (src, mnt) = tree(&dir);
    let m = ShiftMount::with_args(
        Backend::Fuse,
        &["--map", MAP, "-o", "sandbox=off"],
        &src,
        &mnt,
    );
    let pid = daemon_of(&mnt);
    let st = status(pid);
    assert_eq!(st["Seccomp"], "0");
    assert_eq!(
        hex("CapEff", &st),
        hex("CapEff", &status(std::process::id()))
    );
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    assert_eq!(stat_ids(mnt.join("f")), (101000, 101000));
    m.unmount();
    dir.finish();
}

/// The filter the daemon installs, checked in a forked child: calls outside the allowlist
/// fail with ENOSYS (and the process lives on), calls on it work, argument conditions hold.
/// In `log` mode the same calls go through. Needs no root: seccomp with no_new_privs.
#[test]
fn calls_outside_the_allowlist_are_refused() {
    for (mode, refused) in [(Mode::On, true), (Mode::Log, false)] {
        let prog = filter(mode, false).expect("build filter");
        // SAFETY: the child only makes raw system calls and `_exit`s: nothing that could
        // wait for a lock held by another thread of this (multi-threaded) test process.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = child_checks(&prog, refused);
            // SAFETY: ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut st = 0;
        // SAFETY: waits for the child just forked; `st` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        assert_eq!(r, pid, "waitpid");
        assert!(
            libc::WIFEXITED(st),
            "{mode}: the child died of signal {} instead of seeing ENOSYS",
            libc::WTERMSIG(st)
        );
        let what = [
            "ok",
            "the filter could not be installed",
            "socket(2) was not refused with ENOSYS",
            "ptrace(2) was not refused with ENOSYS",
            "prctl(PR_SET_DUMPABLE) was not refused with ENOSYS",
            "ioctl(TCGETS) was not refused with ENOSYS",
            "getpid(2), on the list, failed",
            "prctl(PR_SET_NAME), on the list, failed",
            "log mode refused socket(2)",
            "execve(2) was not refused with ENOSYS",
        ];
        let code = libc::WEXITSTATUS(st) as usize;
        assert_eq!(code, 0, "{mode}: {}", what.get(code).unwrap_or(&"?"));
    }
}

/// Runs in the forked child: returns 0 when every call behaves as documented for the mode.
fn child_checks(prog: &[seccompiler::sock_filter], refused: bool) -> i32 {
    if seccompiler::apply_filter(prog).is_err() {
        return 1;
    }
    let errno = || std::io::Error::last_os_error().raw_os_error();
    // SAFETY (all calls below): raw system calls with integer arguments, or pointers to
    // live locals; their effects stay in this short-lived child.
    let enosys = |r: libc::c_long, e: Option<i32>| r == -1 && e == Some(libc::ENOSYS);
    if refused {
        let r = unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if !enosys(r, errno()) {
            return 2;
        }
        let r = unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
        if !enosys(r, errno()) {
            return 3;
        }
        let r = unsafe { libc::syscall(libc::SYS_prctl, libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        if !enosys(r, errno()) {
            return 4;
        }
        let mut t = [0u8; 64];
        let r = unsafe { libc::syscall(libc::SYS_ioctl, 0, libc::TCGETS, t.as_mut_ptr()) };
        if !enosys(r, errno()) {
            return 5;
        }
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        let r = unsafe {
            libc::syscall(
                libc::SYS_execve,
                c"/bin/true".as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
            )
        };
        if !enosys(r, errno()) {
            return 9;
        }
    } else {
        let r = unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if r < 0 {
            return 8;
        }
    }
    if unsafe { libc::syscall(libc::SYS_getpid) } <= 0 {
        return 6;
    }
    let name = c"sandbox-test";
    if unsafe { libc::syscall(libc::SYS_prctl, libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) } != 0 {
        return 7;
    }
    0
}
