//! FUSE over io_uring (issue 16): requests really travel over the rings (the daemon's
//! per-transport request count at exit, so a silent fallback to /dev/fuse cannot pass), the
//! fallback and `uring=on`'s refusal when the kernel does not offer it, and that a SIGKILLed
//! daemon or an unmount under load leaves no stuck process and no mount.
//!
//! The tests set the machine-wide `fuse.enable_uring` (one at a time) and always put back
//! what they found.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::*;

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sets `fuse.enable_uring` for one test; the tests of this file take turns, and the value
/// found is written back on drop, whether the test passed or not.
struct EnableUring {
    found: String,
    _turn: MutexGuard<'static, ()>,
}

impl EnableUring {
    #[track_caller]
    fn set(on: bool) -> Option<Self> {
        static TURN: Mutex<()> = Mutex::new(());
        if !require(Backend::Fuse) {
            return None;
        }
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(found) = fs::read_to_string(ENABLE_URING) else {
            skip("the kernel has no FUSE over io_uring (needs 6.14+ with CONFIG_FUSE_IO_URING)");
            return None;
        };
        let guard = Self {
            found: found.trim().to_owned(),
            _turn: turn,
        };
        guard.write(on);
        Some(guard)
    }

    #[track_caller]
    fn write(&self, on: bool) {
        fs::write(ENABLE_URING, if on { "1" } else { "0" })
            .unwrap_or_else(|e| panic!("cannot write {ENABLE_URING}: {e}"));
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        if let Err(e) = fs::write(ENABLE_URING, &self.found) {
            eprintln!("cannot restore {ENABLE_URING} to {}: {e}", self.found);
        }
    }
}

/// A `shiftfs -v mount --foreground` whose log (stderr) goes to a file, for what the daemon
/// says when it starts and ends.
struct Foreground {
    child: Child,
    log: std::path::PathBuf,
    guard: ShiftMount,
}

impl Foreground {
    #[track_caller]
    fn mount(dir: &TestDir, src: &Path, mnt: &Path, options: &[&str]) -> Self {
        let log = dir.path().join("daemon.log");
        let mut c = shiftfs([
            "-v",
            "mount",
            "--foreground",
            "--backend",
            "fuse",
            "--map",
            MAP,
        ]);
        for o in options {
            c.args(["-o", o]);
        }
        c.arg(src)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let guard = ShiftMount::adopt(mnt);
        let child = c.spawn().expect("start shiftfs mount --foreground");
        let mounted = wait_mounted(mnt, true, Duration::from_secs(20));
        let me = Self { child, log, guard };
        assert!(mounted, "not mounted; daemon log:\n{}", me.log_text());
        me
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts, waits for the daemon to end and returns its log.
    #[track_caller]
    fn unmount(mut self, mnt: &Path) -> String {
        run(&mut sh(&format!("umount {}", q(mnt)))).assert_ok();
        let ended = wait_timeout(&mut self.child, Duration::from_secs(30));
        let log = self.log_text();
        assert!(
            ended.is_some_and(|s| s.success()),
            "the daemon did not end cleanly after the unmount ({ended:?}); log:\n{log}"
        );
        self.guard.disarm();
        log
    }
}

/// (over io_uring, over /dev/fuse) from the daemon's closing line.
#[track_caller]
fn served(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find_map(|l| l.split_once("requests served: ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no request count in the daemon log:\n{log}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(nums.len(), 2, "cannot read {line:?}");
    (nums[0], nums[1])
}

fn possible_cpus() -> usize {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    text.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

fn fixture(dir: &TestDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    (src, mnt)
}

/// Files made, written, synced, preallocated, renamed, read back and partly removed through
/// the mount by the namespace root's host id (100000): the daemon counts its requests per
/// transport, and almost all of them must have come over the rings, one queue per possible
/// CPU. fsync and fallocate are answered from the daemon's pool threads, so replies from a
/// thread other than the ring's own are covered too. On disk, everything is as on any mount.
#[test]
fn requests_are_served_over_the_rings() {
    let Some(_uring) = EnableUring::set(true) else {
        return;
    };
    let dir = TestDir::new("uring-served");
    let (src, mnt) = fixture(&dir);
    let daemon = Foreground::mount(&dir, &src, &mnt, &["uring=on"]);
    let script = format!(
        "set -e; cd {}; mkdir d; for i in $(seq 1 200); do echo \"file $i\" > d/f$i; done; \
         for i in $(seq 1 200); do stat -c %u d/f$i >/dev/null; done; \
         sync d/f1 d/f2; fallocate -l 1M d/big; mv d/f1 d/moved; cat d/* > /dev/null; \
         for i in $(seq 101 200); do rm d/f$i; done",
        q(&mnt)
    );
    run(&mut sh_as(100000, 100000, &script)).assert_ok();
    // What the caller sees, and what is on disk: the same as over /dev/fuse.
    assert_eq!(stat_ids(mnt.join("d/f2")), (100000, 100000));
    assert_eq!(fs::read_to_string(src.join("d/moved")).unwrap(), "file 1\n");
    assert_eq!(stat_ids(src.join("d/f50")), (0, 0));
    assert_eq!(fs::metadata(src.join("d/big")).unwrap().len(), 1 << 20);
    assert!(!src.join("d/f150").exists());
    // f2..f100, moved (was f1) and big.
    assert_eq!(fs::read_dir(src.join("d")).unwrap().count(), 101);
    let log = daemon.unmount(&mnt);
    assert!(
        log.contains(&format!(
            "over io_uring: {} queues (one per possible CPU)",
            possible_cpus()
        )),
        "the daemon did not report serving over io_uring:\n{log}"
    );
    let (ring, dev) = served(&log);
    // At least a CREATE per file made and an UNLINK per file removed came over the rings;
    // /dev/fuse only carries FORGETs and what came before the rings were ready.
    assert!(
        ring >= 300,
        "only {ring} requests over io_uring ({dev} over /dev/fuse):\n{log}"
    );
    assert!(
        ring > dev,
        "{ring} over io_uring, {dev} over /dev/fuse:\n{log}"
    );
    dir.finish();
}

/// With `fuse.enable_uring` off, `-o uring=on` fails the mount saying what to do and leaves
/// nothing behind, while the default (auto) mounts and serves through /dev/fuse, saying why
/// in its log; once the parameter is on, the default uses the rings.
#[test]
fn uring_on_refuses_auto_falls_back_and_picks_the_rings_when_enabled() {
    let Some(uring) = EnableUring::set(false) else {
        return;
    };
    let dir = TestDir::new("uring-modes");
    let (src, mnt) = fixture(&dir);

    let (out, guard) = ShiftMount::run_mount(
        Some(Backend::Fuse),
        &["--map", MAP, "-o", "uring=on"],
        &src,
        &mnt,
    );
    assert!(
        !out.ok(),
        "uring=on mounted although the kernel does not offer it:\n{out}"
    );
    let text = out.to_string();
    assert!(
        text.contains("enable_uring") && text.contains("uring=auto"),
        "the error does not say what to do:\n{out}"
    );
    assert!(!is_mountpoint(&mnt), "a refused mount was left in place");
    assert!(
        wait_gone(&shiftfs_pids_mentioning(&mnt), Duration::from_secs(10)),
        "a refused mount left a daemon"
    );
    guard.disarm();

    let daemon = Foreground::mount(&dir, &src, &mnt, &["uring=auto"]);
    run(&mut sh_as(
        100000,
        100000,
        &format!("echo x > {}/a", q(&mnt)),
    ))
    .assert_ok();
    let log = daemon.unmount(&mnt);
    assert!(
        log.contains("through /dev/fuse: the kernel does not offer FUSE over io_uring"),
        "no line saying why io_uring is not used:\n{log}"
    );
    let (ring, dev) = served(&log);
    assert_eq!(ring, 0, "{log}");
    assert!(dev > 0, "{log}");
    assert_eq!(fs::read_to_string(src.join("a")).unwrap(), "x\n");

    uring.write(true);
    let daemon = Foreground::mount(&dir, &src, &mnt, &[]);
    run(&mut sh_as(100000, 100000, &format!("cat {}/a", q(&mnt)))).assert_ok();
    let log = daemon.unmount(&mnt);
    let (ring, _) = served(&log);
    assert!(ring > 0, "the default (auto) did not use the rings:\n{log}");
    dir.finish();
}

/// Four writers making files through an io_uring mount, as the namespace root's host id;
/// each stops at its first failure, and all are bounded.
fn workload(mnt: &Path) -> Child {
    // Absolute paths, no working directory inside: a lazily detached mount then goes away
    // once the writers' last open file does.
    let script = format!(
        "m={}; for j in 1 2 3 4; do ( mkdir -p $m/w$j || exit 0; i=0; \
         while [ $i -lt 20000 ]; do i=$((i+1)); echo $i > $m/w$j/f$i || exit 0; \
         cat $m/w$j/f$i > /dev/null || exit 0; done ) & done; wait",
        q(mnt)
    );
    sh_as(100000, 100000, &script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the workload")
}

/// Processes in D state (uninterruptible sleep) whose command line or working directory
/// is under `dir`.
fn stuck_under(dir: &Path) -> Vec<(u32, String)> {
    let mut stuck = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let ours = cwd.starts_with(dir) || cmdline.contains(&*dir.to_string_lossy());
        if ours && proc_stat(pid).is_some_and(|(s, _)| s == 'D') {
            stuck.push((pid, cmdline));
        }
    }
    stuck
}

/// Waits for the workload to stop by itself; it must not hang in the kernel.
#[track_caller]
fn workload_ends(mut w: Child, dir: &Path) {
    let ended = wait_timeout(&mut w, Duration::from_secs(60));
    if ended.is_none() {
        let stuck = stuck_under(dir);
        let _ = w.kill();
        let _ = w.wait();
        panic!("the workload did not end within 60 s; in D state: {stuck:?}");
    }
    assert_eq!(stuck_under(dir), Vec::new(), "processes left in D state");
}

/// SIGKILL of the daemon in the middle of a workload: the callers get errors instead of
/// hanging, no process stays in D state, and `shiftfs umount` removes the dead mount.
#[test]
fn sigkill_mid_workload_leaves_no_stuck_process_and_no_mount() {
    let Some(_uring) = EnableUring::set(true) else {
        return;
    };
    let dir = TestDir::new("uring-sigkill");
    let (src, mnt) = fixture(&dir);
    let m = ShiftMount::with_args(Backend::Fuse, &["--map", MAP, "-o", "uring=on"], &src, &mnt);
    let w = workload(&mnt);
    std::thread::sleep(Duration::from_millis(700));
    let daemons = shiftfs_pids_mentioning(&mnt);
    assert!(!daemons.is_empty(), "no daemon serves {}", mnt.display());
    kill_and_wait(&daemons);
    workload_ends(w, dir.path());
    assert!(
        fs::read_dir(src.join("w1")).is_ok_and(|d| d.count() > 0),
        "the workload made no file before the kill: it did not run"
    );
    m.unmount();
    dir.finish();
}

/// `shiftfs umount --lazy` while four writers are busy: the daemon ends, the writers get errors
/// and stop, nothing stays in D state, no mount or daemon is left.
#[test]
fn unmount_under_load_ends_the_daemon_and_leaves_nothing() {
    let Some(_uring) = EnableUring::set(true) else {
        return;
    };
    let dir = TestDir::new("uring-unmount");
    let (src, mnt) = fixture(&dir);
    let m = ShiftMount::with_args(Backend::Fuse, &["--map", MAP, "-o", "uring=on"], &src, &mnt);
    let w = workload(&mnt);
    std::thread::sleep(Duration::from_millis(700));
    let daemons = shiftfs_pids_mentioning(&mnt);
    assert!(!daemons.is_empty(), "no daemon serves {}", mnt.display());
    run_timeout(
        &mut shiftfs([
            std::ffi::OsStr::new("umount"),
            std::ffi::OsStr::new("--lazy"),
            mnt.as_os_str(),
        ]),
        Duration::from_secs(30),
    )
    .assert_ok();
    assert!(!is_mountpoint(&mnt), "still mounted after `shiftfs umount`");
    workload_ends(w, dir.path());
    assert!(
        wait_gone(&daemons, Duration::from_secs(30)),
        "the daemon still runs after the unmount"
    );
    m.disarm();
    dir.finish();
}
