//! The mount life cycle from the command line: `shiftfs mount` (and mount(8), fstab) shows
//! shifted owners, picks a backend and says why, refuses bad input with one clear line;
//! `umount`, `list`, `doctor` and `--foreground` manage the mount, and nothing (mount, daemon,
//! log) is left behind. Backend-independent cases run for both backends; daemon life-cycle
//! cases are FUSE only.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A source tree whose owners are 0, 1000 and 70000 (outside the 65536-id map).
fn owned_tree(dir: &TestDir) -> PathBuf {
    fill_tree(&dir.dir("src"))
}

/// The usual start: `b`'s prerequisites, a test dir with `owned_tree` as `src` and an empty
/// `mnt`; None when the test is skipped.
fn fixture(b: Backend, name: &str) -> Option<(TestDir, PathBuf, PathBuf)> {
    if !require(b) {
        return None;
    }
    let dir = TestDir::new(name);
    let src = owned_tree(&dir);
    let mnt = dir.dir("mnt");
    Some((dir, src, mnt))
}

fn fill_tree(src: &Path) -> PathBuf {
    let src = src.to_path_buf();
    file(&src.join("root-file"), b"alpha\n", 0o644, 0, 0);
    file(&src.join("user-file"), b"beta\n", 0o640, 1000, 1000);
    file(&src.join("far-file"), b"gamma\n", 0o600, 70000, 70000);
    mkdir(&src.join("user-dir"), 0o750, 1000, 1000);
    file(&src.join("user-dir/mixed"), b"delta\n", 0o644, 0, 1000);
    src
}

/// What `owned_tree` holds, seen through a mount shifted by MAP.
#[track_caller]
fn assert_shifted(mnt: &Path) {
    assert_eq!(
        stat_ids(mnt.join("root-file")),
        (100000, 100000),
        "root shifted"
    );
    assert_eq!(
        stat_ids(mnt.join("user-file")),
        (101000, 101000),
        "user shifted"
    );
    assert_eq!(
        stat_ids(mnt.join("user-dir")),
        (101000, 101000),
        "dir shifted"
    );
    assert_eq!(
        stat_ids(mnt.join("far-file")),
        (OVERFLOW, OVERFLOW),
        "overflow id"
    );
    assert_eq!(
        fs::read(mnt.join("user-file")).expect("read through"),
        b"beta\n"
    );
}

/// The `shiftfs list` row of `target`, split into columns.
fn list_row(target: &Path) -> Option<Vec<String>> {
    let out = shiftfs_list();
    out.assert_ok();
    out.stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cols| cols.first().is_some_and(|c| Path::new(c) == target))
}

/// How long a FUSE daemon may take to exit once its mount is gone.
const DAEMON_EXIT: Duration = Duration::from_secs(10);

/// After an unmount by any means: the daemons `pids` exit and nothing serves `mnt` any more.
#[track_caller]
fn assert_daemons_exit(pids: &[u32], mnt: &Path) {
    assert!(
        wait_gone(pids, DAEMON_EXIT),
        "daemon(s) {pids:?} of {} still run {DAEMON_EXIT:?} after unmount",
        mnt.display()
    );
    assert_eq!(shiftfs_pids_mentioning(mnt), Vec::<u32>::new());
}

fn shows_shifted_owners(b: Backend) {
    let Some((dir, src, mnt)) = fixture(b, "owners") else {
        return;
    };
    let before = snapshot(&src);
    let m = ShiftMount::new(b, MAP, &src, &mnt);

    assert_eq!(stat_ids(&mnt), (100000, 100000), "mount root");
    assert_eq!(stat_ids(mnt.join("root-file")), (100000, 100000));
    assert_eq!(stat_ids(mnt.join("user-file")), (101000, 101000));
    assert_eq!(stat_ids(mnt.join("far-file")), (OVERFLOW, OVERFLOW));
    assert_eq!(stat_ids(mnt.join("user-dir")), (101000, 101000));
    assert_eq!(stat_ids(mnt.join("user-dir/mixed")), (100000, 101000));
    assert_eq!(
        ls(&mnt),
        ["far-file", "root-file", "user-dir", "user-file"],
        "readdir through the mount"
    );
    assert_eq!(fs::read(mnt.join("root-file")).expect("read"), b"alpha\n");
    assert_eq!(
        fs::read(mnt.join("user-dir/mixed")).expect("read"),
        b"delta\n"
    );
    // Modes pass through unchanged.
    assert_eq!(lstat_mode(mnt.join("user-file")) & 0o7777, 0o640);
    assert_eq!(lstat_mode(mnt.join("user-dir")) & 0o7777, 0o750);

    m.unmount();
    assert_eq!(snapshot(&src), before, "looking must not change the source");
    assert!(ls(&mnt).is_empty(), "target is empty again after umount");
    dir.finish();
}

fn list_shows_mount(b: Backend) {
    let Some((dir, src, mnt)) = fixture(b, "list") else {
        return;
    };
    let m = ShiftMount::new(b, MAP, &src, &mnt);

    let out = shiftfs_list();
    out.assert_ok();
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(mnt.to_str().expect("utf-8 path")))
        .unwrap_or_else(|| panic!("`shiftfs list` does not show {}:\n{out}", mnt.display()));
    assert!(
        line.contains(src.to_str().expect("utf-8")),
        "source missing: {line}"
    );
    assert!(line.contains(b.name()), "backend missing: {line}");
    assert!(line.contains("100000"), "map missing: {line}");
    if b == Backend::Fuse {
        let pids = shiftfs_pids_mentioning(&mnt);
        assert!(
            pids.iter().any(|p| line
                .split(|c: char| !c.is_ascii_digit())
                .any(|w| w == p.to_string())),
            "daemon pid (one of {pids:?}) missing: {line}"
        );
    }

    m.unmount();
    let out = shiftfs_list();
    out.assert_ok();
    assert!(
        !out.stdout.contains(mnt.to_str().expect("utf-8")),
        "`shiftfs list` still shows the mount after umount:\n{out}"
    );
    dir.finish();
}

fn mount_options(b: Backend) {
    let Some((dir, src, mnt)) = fixture(b, "opts") else {
        return;
    };

    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let e = mount_at(&mnt).expect("mounted");
    for opt in ["rw", "nosuid", "nodev"] {
        assert!(
            e.mount_options.iter().any(|o| o == opt),
            "default mount lacks {opt}: {e:?}"
        );
    }
    // Host root has no inner id, so the container's root (host 100000) writes.
    let w = run(&mut sh_as(
        100000,
        100000,
        &format!("echo x > {}", q(mnt.join("new"))),
    ));
    assert!(w.ok(), "a rw mount is writable:\n{w}");
    assert_eq!(stat_ids(src.join("new")), (0, 0), "stored as inner root");
    fs::remove_file(src.join("new")).expect("rm new");
    m.unmount();

    let m = ShiftMount::with_args(b, &["--map", MAP, "-o", "ro,noexec"], &src, &mnt);
    let e = mount_at(&mnt).expect("mounted");
    for opt in ["ro", "noexec", "nosuid", "nodev"] {
        assert!(
            e.mount_options.iter().any(|o| o == opt),
            "-o ro,noexec mount lacks {opt}: {e:?}"
        );
    }
    assert_shifted(&mnt);
    let erofs = |what: &str, e: std::io::Error| {
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(
        "create",
        fs::write(mnt.join("new"), b"x").expect_err("create on a ro mount"),
    );
    erofs(
        "overwrite",
        fs::write(mnt.join("user-file"), b"x").expect_err("write on a ro mount"),
    );
    erofs(
        "mkdir",
        fs::create_dir(mnt.join("dir")).expect_err("mkdir on a ro mount"),
    );
    let w = run(&mut sh_as(
        100000,
        100000,
        &format!("echo x > {}", q(mnt.join("root-file"))),
    ));
    assert!(
        w.stderr.contains("Read-only file system"),
        "the shell sees EROFS:\n{w}"
    );
    assert!(!src.join("new").exists() && !src.join("dir").exists());
    assert_eq!(
        fs::read(src.join("user-file")).expect("read src"),
        b"beta\n"
    );
    m.unmount();

    let m = ShiftMount::with_args(b, &["--map", MAP, "-o", "suid,dev"], &src, &mnt);
    let e = mount_at(&mnt).expect("mounted");
    for opt in ["nosuid", "nodev"] {
        assert!(
            !e.mount_options.iter().any(|o| o == opt),
            "-o suid,dev mount still has {opt}: {e:?}"
        );
    }
    m.unmount();
    dir.finish();
}

/// Asserts the contract for a refused command: exit 1, exactly one line `shiftfs: ...` that
/// names `mentions`, and nothing mounted on `tgt`.
#[track_caller]
fn assert_one_line_error(out: &Out, mentions: &str, tgt: &Path) {
    assert_one_line_error_allow_mounted(out, mentions);
    assert!(
        !is_mountpoint(tgt),
        "a refused mount left {} mounted",
        tgt.display()
    );
}

/// The refusal contract for a command on something that stays mounted (a busy mount, another
/// tool's mount).
#[track_caller]
fn assert_one_line_error_allow_mounted(out: &Out, mentions: &str) {
    assert_eq!(out.code(), Some(1), "exit code:\n{out}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "want exactly one line on stderr:\n{out}");
    assert!(
        lines[0].starts_with("shiftfs: "),
        "error line must start with `shiftfs: `:\n{out}"
    );
    assert!(
        lines[0].contains(mentions),
        "error line should name `{mentions}`:\n{out}"
    );
    let clauses: Vec<&str> = lines[0].split(": ").filter(|c| c.len() > 12).collect();
    for (i, c) in clauses.iter().enumerate() {
        assert!(
            !clauses[i + 1..].contains(c),
            "error line repeats itself (`{c}`):\n{out}"
        );
    }
}

fn mount_cmd(b: Backend, map: &str, src: &Path, tgt: &Path) -> Command {
    let mut c = shiftfs(["mount", "--backend", b.name(), "--map", map]);
    c.arg(src).arg(tgt);
    c
}

fn refuses_bad_input(b: Backend) {
    let Some((dir, src, mnt)) = fixture(b, "errors") else {
        return;
    };

    let missing = dir.path().join("no-such-source");
    let out = run(&mut mount_cmd(b, MAP, &missing, &mnt));
    assert_one_line_error(&out, "no-such-source", &mnt);

    let no_tgt = dir.path().join("no-such-target");
    let out = run(&mut mount_cmd(b, MAP, &src, &no_tgt));
    assert_one_line_error(&out, "no-such-target", &no_tgt);

    let file_tgt = dir.path().join("file-target");
    file(&file_tgt, b"", 0o644, 0, 0);
    let out = run(&mut mount_cmd(b, MAP, &src, &file_tgt));
    assert_one_line_error(&out, "file-target", &file_tgt);

    let full = dir.dir("full-target");
    file(&full.join("occupant"), b"", 0o644, 0, 0);
    let out = run(&mut mount_cmd(b, MAP, &src, &full));
    assert_one_line_error(&out, "full-target", &full);
    assert_eq!(ls(&full), ["occupant"]);

    for bad in [
        "b:0:100000",                   // no count
        "b:0:100000:0",                 // empty range
        "x:0:100000:10",                // unknown kind
        "b:0:100000:10,b:5:200000:10",  // inner ids overlap
        "b:0:100000:10,b:20:100005:10", // outer ids overlap
        "b:4294967295:0:2",             // wraps past the last id
        "b:zero:100000:65536",          // not a number
    ] {
        let out = run(&mut mount_cmd(b, bad, &src, &mnt));
        assert_one_line_error(&out, "", &mnt);
        // The message must point at the map, not at a path.
        assert!(
            out.stderr.contains("map") || out.stderr.contains(bad),
            "error for map {bad:?} does not mention the map:\n{out}"
        );
    }

    // Issue 12, defect 6: options that would be ignored are refused, each with its reason.
    let mut cases = vec![
        (&["-o", "map=b:0:200000:65536"][..], "given twice"),
        (&["-o", "threads=0"][..], "threads must be"),
        (&["-o", "max_open=0"][..], "max_open is"),
    ];
    if b == Backend::Kernel {
        cases.push((&["-o", "nopassthrough"][..], "only the FUSE backend"));
        cases.push((&["-o", "max_open=100"][..], "only the FUSE backend"));
    }
    for (args, says) in cases {
        let out = run(mount_cmd(b, MAP, &src, &mnt).args(args));
        assert_one_line_error(&out, "", &mnt);
        assert!(out.stderr.contains(says), "{b} {args:?}:\n{out}");
    }

    let out = run(&mut shiftfs(["mount"]));
    assert_eq!(
        out.code(),
        Some(2),
        "missing operands is a usage error:\n{out}"
    );

    dir.finish();
}

/// A copy of the binary that any uid can execute, wherever cargo's target dir is.
fn world_executable_bin(dir: &TestDir) -> PathBuf {
    let p = dir.path().join("shiftfs");
    fs::copy(BIN, &p).expect("copy binary");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

fn refuses_non_root(b: Backend) {
    let Some((dir, src, mnt)) = fixture(b, "nonroot") else {
        return;
    };
    let bin = world_executable_bin(&dir);
    // Not root: the CLI goes to the broker, here one that is not running.
    let socket = dir.path().join("no-broker.sock");
    let try_mount = || {
        run(
            cmd_as(65534, 65534, bin.to_str().expect("utf-8"), ["mount"])
                .args(["--backend", b.name(), "--map", MAP])
                .arg(&src)
                .arg(&mnt)
                .env("SHIFTFS_BROKER", &socket),
        )
    };
    // A child another test thread forked while the copy was being written holds it open for
    // writing until that child execs: exec fails with ETXTBSY meanwhile.
    let mut out = try_mount();
    for _ in 0..50 {
        if !out.stderr.contains("Text file busy") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        out = try_mount();
    }
    // One line says the broker is asked, then one error line says what to do.
    assert_eq!(out.code(), Some(1), "exit code:\n{out}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains("asking the shiftfs broker"), "{out}");
    assert!(
        lines[1].starts_with("shiftfs: cannot reach the shiftfs broker")
            && lines[1].contains("shiftfsd must be running for users other than root"),
        "the refusal should say a broker (or root) is needed:\n{out}"
    );
    assert!(
        !is_mountpoint(&mnt),
        "a refused mount left {} mounted",
        mnt.display()
    );
    dir.finish();
}

// ---------------------------------------------------------------------------------------------
// FUSE daemon life cycle

#[test]
fn fuse_refuses_without_dev_fuse() {
    if !require_root() {
        return;
    }
    let dir = TestDir::new("nofuse");
    let src = owned_tree(&dir);
    let mnt = dir.dir("mnt");
    // A private mount namespace whose /dev has no fuse node.
    let script = format!(
        "mount --make-rprivate / && mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 \
         && exec {} mount --backend fuse --map {MAP} {} {}",
        q(BIN),
        q(&src),
        q(&mnt)
    );
    let out = run(Command::new("unshare")
        .args(["--mount", "--", "sh", "-c"])
        .arg(script)
        .current_dir("/"));
    assert_one_line_error(&out, "/dev/fuse", &mnt);
    dir.finish();
}

/// The daemon serving `mnt`: the one live shiftfs process naming it.
#[track_caller]
fn daemon_pid(mnt: &Path) -> u32 {
    let pids = shiftfs_pids_mentioning(mnt);
    assert_eq!(
        pids.len(),
        1,
        "want one daemon for {}: {pids:?}",
        mnt.display()
    );
    pids[0]
}

/// A daemon killed with SIGKILL leaves a dead mount (ENOTCONN) that `list` shows as dead;
/// `shiftfs umount` removes it, its record and its log, and says what happened.
#[test]
fn fuse_umount_cleans_up_after_killed_daemon() {
    let Some((dir, src, mnt)) = fixture(Backend::Fuse, "kill9") else {
        return;
    };
    let m = ShiftMount::new(Backend::Fuse, MAP, &src, &mnt);
    assert_shifted(&mnt);

    let pid = daemon_pid(&mnt);
    kill_and_wait(&[pid]);
    assert!(
        wait_gone(&[pid], DAEMON_EXIT),
        "daemon {pid} survived SIGKILL"
    );
    let err = fs::metadata(mnt.join("user-file")).expect_err("dead mount must not answer");
    // Over io_uring, a request made while the kernel still tears the dead daemon's rings
    // down is ended with ECONNABORTED; later ones get ENOTCONN.
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED)
        ),
        "{err}"
    );
    assert!(
        is_mountpoint(&mnt),
        "the dead mount is still there before umount"
    );
    let row = list_row(&mnt).expect("shiftfs list still shows the dead mount");
    assert!(row.iter().any(|c| c.contains("dead")), "{row:?}");

    let log = shiftfs::mount::Record::log_path(&mnt);
    assert!(log.exists(), "the daemon's log {} exists", log.display());
    let out = run(&mut shiftfs([OsStr::new("umount"), mnt.as_os_str()]));
    out.assert_ok();
    assert!(out.stderr.contains("daemon had exited"), "{out}");
    m.disarm();
    assert!(!is_mountpoint(&mnt), "dead mount removed");
    assert!(list_row(&mnt).is_none(), "gone from shiftfs list");
    assert!(ls(&mnt).is_empty());
    // Issue 12, defect 6: the dead daemon's log goes with its mount.
    assert!(!log.exists(), "{} left behind", log.display());
    assert_eq!(stat_ids(src.join("root-file")), (0, 0), "source untouched");
    // The target can be mounted again.
    let m = ShiftMount::new(Backend::Fuse, MAP, &src, &mnt);
    assert_eq!(stat_ids(mnt.join("user-file")), (101000, 101000));
    m.unmount();
    dir.finish();
}

fn foreground_signal_unmounts(signal: rustix::process::Signal, name: &str) {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new(name);
    let src = owned_tree(&dir);
    let mnt = dir.dir("mnt");
    let log = tempfile::tempfile().expect("log file");
    let read_log = || {
        let mut l = log.try_clone().expect("dup");
        let mut s = String::new();
        let _ = l.rewind();
        let _ = l.read_to_string(&mut s);
        s
    };
    let mut child = shiftfs(["mount", "--foreground", "--backend", "fuse", "--map", MAP])
        .arg(&src)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log.try_clone().expect("dup"))
        .spawn()
        .expect("spawn shiftfs --foreground");
    // Kills the child and unmounts if an assertion below fails.
    let guard = ShiftMount::adopt(&mnt);
    let start = std::time::Instant::now();
    while !is_mountpoint(&mnt) && start.elapsed() < Duration::from_secs(15) {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("--foreground exited ({st}) before mounting: {}", read_log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        is_mountpoint(&mnt),
        "--foreground did not mount within 15 s"
    );
    assert_eq!(stat_ids(mnt.join("user-file")), (101000, 101000));
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "--foreground must keep running while mounted"
    );

    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, signal).expect("signal");
    let status = wait_timeout(&mut child, Duration::from_secs(15))
        .unwrap_or_else(|| panic!("--foreground ignored {signal:?} for 15 s"));
    assert!(
        status.success(),
        "exit after {signal:?}: {status}: {}",
        read_log()
    );
    assert!(!is_mountpoint(&mnt), "still mounted after {signal:?}");
    guard.disarm();
    dir.finish();
}

#[test]
fn fuse_foreground_sigterm_unmounts() {
    foreground_signal_unmounts(rustix::process::Signal::TERM, "sigterm");
}

#[test]
fn fuse_foreground_sigint_unmounts() {
    foreground_signal_unmounts(rustix::process::Signal::INT, "sigint");
}

/// `x=$(shiftfs mount ...)` must return: the backgrounded daemon may not hold the caller's
/// stdout or stderr open.
#[test]
fn fuse_mount_detaches_from_callers_output() {
    let Some((dir, src, mnt)) = fixture(Backend::Fuse, "detach") else {
        return;
    };
    let guard = ShiftMount::adopt(&mnt);
    let script = format!(
        "out=$({} mount --backend fuse --map {MAP} {} {} 2>&1); echo \"rc=$? out=$out\"",
        q(BIN),
        q(&src),
        q(&mnt)
    );
    let out = run_timeout(&mut sh(&script), Duration::from_secs(20));
    out.assert_ok();
    assert!(out.stdout.starts_with("rc=0"), "{out}");
    assert!(is_mountpoint(&mnt));
    guard.unmount();
    dir.finish();
}

fn separate_maps_and_map_from_pid(b: Backend) {
    let Some((dir, src, mnt)) = fixture(b, "maps") else {
        return;
    };

    let m = ShiftMount::with_args(
        b,
        &["--uid-map", "0:100000:65536", "--gid-map", "0:200000:65536"],
        &src,
        &mnt,
    );
    assert_eq!(stat_ids(mnt.join("user-file")), (101000, 201000));
    assert_eq!(stat_ids(mnt.join("user-dir/mixed")), (100000, 201000));
    m.unmount();

    let ns = UserNs::new("0 300000 65536");
    let pid = ns.pid().to_string();
    let m = ShiftMount::with_args(b, &["--map-from-pid", &pid], &src, &mnt);
    assert_eq!(stat_ids(mnt.join("user-file")), (301000, 301000));
    assert_eq!(stat_ids(mnt.join("far-file")), (OVERFLOW, OVERFLOW));
    m.unmount();
    drop(ns);
    dir.finish();
}

/// Paths with spaces, given relative to the caller's cwd, survive into the daemon, mountinfo,
/// `shiftfs list` and `shiftfs umount`.
fn relative_paths_with_spaces(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("spaces");
    let src = dir.path().join("my source");
    mkdir(&src, 0o755, 0, 0);
    file(&src.join("f"), b"x", 0o644, 1000, 1000);
    let mnt = dir.path().join("my mount");
    mkdir(&mnt, 0o755, 0, 0);
    let guard = ShiftMount::adopt(&mnt);
    let out = run(shiftfs([
        "mount",
        "--backend",
        b.name(),
        "--map",
        MAP,
        "my source",
        "my mount",
    ])
    .current_dir(dir.path()));
    out.assert_ok();
    assert!(is_mountpoint(&mnt), "not mounted at {}", mnt.display());
    assert_eq!(stat_ids(mnt.join("f")), (101000, 101000));
    let list = shiftfs_list();
    assert!(
        list.stdout.contains(mnt.to_str().expect("utf-8")),
        "list should show the absolute target:\n{list}"
    );
    let out = run(shiftfs(["umount", "my mount"]).current_dir(dir.path()));
    out.assert_ok();
    assert!(!is_mountpoint(&mnt));
    guard.disarm();
    dir.finish();
}

/// A target whose name holds a newline and an escape sequence is listed on one line, with
/// those bytes shown as `\xNN` (as findmnt does), and can be unmounted by its real name.
fn list_escapes_control_characters(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("ctrl");
    let src = owned_tree(&dir);
    let mnt = dir.path().join("two\nlines\x1b[7m");
    mkdir(&mnt, 0o755, 0, 0);
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let list = shiftfs_list();
    list.assert_ok();
    let shown = format!("{}/two\\x0alines\\x1b[7m", dir.path().display());
    let line = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&shown))
        .unwrap_or_else(|| panic!("no line starting with {shown}:\n{list}"));
    assert!(line.contains(b.name()), "{line}");
    assert!(
        !list.stdout.contains('\u{1b}'),
        "raw escape byte in the listing:\n{list}"
    );
    m.unmount();
    dir.finish();
}

/// A busy mount is not torn away: one clear line naming `--lazy`, the mount stays and still
/// serves; `-l` detaches it at once, a FUSE daemon shows as draining in `list` while it serves
/// the files still open and exits when the last one is closed.
fn umount_busy(b: Backend) {
    let Some((dir, src, mnt)) = fixture(b, "busy") else {
        return;
    };
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let daemons = shiftfs_pids_mentioning(&mnt);
    let open = fs::File::open(mnt.join("user-file")).expect("open through the mount");
    let mut holder = Command::new("sleep")
        .arg("60")
        .current_dir(mnt.join("user-dir"))
        .spawn()
        .expect("spawn a process inside the mount");
    let out = run(&mut shiftfs([OsStr::new("umount"), mnt.as_os_str()]));
    let still = is_mountpoint(&mnt);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_one_line_error_allow_mounted(&out, "busy");
    assert!(
        out.stderr.contains("--lazy"),
        "the refusal names --lazy:\n{out}"
    );
    assert!(still, "a busy mount must stay mounted");
    assert_eq!(
        stat_ids(mnt.join("user-file")),
        (101000, 101000),
        "still served"
    );

    let start = Instant::now();
    let out = run(&mut shiftfs([
        OsStr::new("umount"),
        OsStr::new("-l"),
        mnt.as_os_str(),
    ]));
    out.assert_ok();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "-l returns at once, took {:?}",
        start.elapsed()
    );
    assert!(!is_mountpoint(&mnt), "-l detaches at once");
    m.disarm();
    // A FUSE daemon still serves the open file and `list` says so; a kernel mount is gone.
    let row = list_row(&mnt);
    match b {
        Backend::Fuse => assert!(
            row.as_ref()
                .is_some_and(|r| r.iter().any(|c| c == "draining")),
            "listed as draining: {row:?}"
        ),
        Backend::Kernel => assert!(row.is_none(), "gone from shiftfs list: {row:?}"),
        Backend::Stack => unreachable!("not run on the stack"),
    }
    let mut text = String::new();
    (&open)
        .read_to_string(&mut text)
        .expect("the open file is still readable");
    assert_eq!(text, "beta\n");
    drop(open);
    assert_daemons_exit(&daemons, &mnt);
    dir.finish();
}

/// A target inside its own source: shiftfs may refuse it, or serve it, but must not end up
/// serving itself (a FUSE daemon that follows its own mount point deadlocks on itself, so
/// the FUSE backend refuses it).
fn target_inside_source(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("inside");
    let src = owned_tree(&dir);
    let tgt = src.join("inner-mnt");
    mkdir(&tgt, 0o755, 0, 0);
    let mounted = ShiftMount::try_mount(Some(b), &["--map", MAP], &src, &tgt);
    if b == Backend::Fuse {
        let out = mounted
            .as_ref()
            .err()
            .expect("FUSE must refuse a target inside its source");
        assert!(out.stderr.contains("inside the source"), "{out}");
        assert!(
            shiftfs_pids_mentioning(&tgt).is_empty(),
            "no daemon started"
        );
    }
    match mounted {
        Err(out) => assert_one_line_error(&out, "inner-mnt", &tgt),
        Ok(m) => {
            let script = format!(
                "ls -la {t}/inner-mnt/ >/dev/null 2>&1; ls -la {t}/inner-mnt/inner-mnt/ >/dev/null 2>&1; \
                 stat -c %u {t}/user-file",
                t = q(&tgt)
            );
            let out = run_timeout(&mut sh(&script), Duration::from_secs(10));
            out.assert_ok();
            assert_eq!(out.stdout.trim(), "101000", "{out}");
            m.unmount();
        }
    }
    dir.finish();
}

/// Issue 11, finding 1: a symlink a container planted at (or above) the target must not
/// redirect a later mount onto a host directory; the refusal names the link.
fn symlink_target_is_refused(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("symlink-target");
    let src = owned_tree(&dir);
    let rootfs = dir.dir("rootfs");
    let host = dir.dir("host");
    mkdir(&host.join("sub"), 0o755, 0, 0);
    // The container's root writes these inside its rootfs.
    symlink(&host, &rootfs.join("data"), 100000, 100000);
    symlink(&host, &rootfs.join("up"), 100000, 100000);
    for target in [rootfs.join("data"), rootfs.join("up/sub")] {
        // Guards for where a redirected mount would land, so a regression leaks nothing.
        let _guards = [
            ShiftMount::adopt(&host),
            ShiftMount::adopt(&host.join("sub")),
        ];
        let out = ShiftMount::try_mount(Some(b), &["--map", MAP], &src, &target)
            .err()
            .unwrap_or_else(|| {
                panic!(
                    "{b}: mount through a symlink at {} succeeded",
                    target.display()
                )
            });
        assert!(
            out.stderr.contains("symbolic link") && out.stderr.contains("pass the real path"),
            "{b}: the refusal must name the symlink:\n{out}"
        );
        assert!(
            out.stderr.contains(
                &*rootfs
                    .join(if target.ends_with("data") {
                        "data"
                    } else {
                        "up"
                    })
                    .to_string_lossy()
            ),
            "{b}: the refusal must name the link itself:\n{out}"
        );
        assert!(
            !is_mountpoint(&host) && !is_mountpoint(&host.join("sub")),
            "{b}: host dir mounted over"
        );
        let left = mounts_under(dir.path());
        assert!(
            left.is_empty(),
            "{b}: nothing may be mounted anywhere: {left:?}"
        );
    }
    assert!(ls(&host).contains(&"sub".to_string()), "host dir untouched");
    dir.finish();
}

/// `--target-root`: a runtime mounting into a rootfs resolves TARGET as if the rootfs were
/// `/`, so an absolute symlink planted there means the rootfs' own directory.
fn target_root_keeps_links_inside(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("target-root");
    let src = owned_tree(&dir);
    let rootfs = dir.dir("rootfs");
    let host = dir.dir("host");
    mkdir(&rootfs.join("vol"), 0o755, 100000, 100000);
    // An absolute link to the host directory's full path, as a container would plant it.
    symlink(&host, &rootfs.join("data"), 100000, 100000);
    let inside = rootfs.join(host.strip_prefix("/").expect("absolute"));
    fs::create_dir_all(&inside).expect("mkdir inside rootfs");
    let root = rootfs.to_str().expect("utf-8 path");
    let mount_in_root = |target: &str| {
        run_timeout(
            shiftfs([
                "mount",
                "--backend",
                b.name(),
                "--map",
                MAP,
                "--target-root",
                root,
            ])
            .arg(&src)
            .arg(target),
            Duration::from_secs(30),
        )
    };
    let guards = [
        ShiftMount::adopt(&host),
        ShiftMount::adopt(&inside),
        ShiftMount::adopt(&rootfs.join("vol")),
    ];
    let out = mount_in_root("/data");
    out.assert_ok();
    assert!(
        is_mountpoint(&inside),
        "{b}: the mount must land inside the rootfs:\n{out}"
    );
    assert!(
        !is_mountpoint(&host),
        "{b}: the host directory must not be mounted over"
    );
    assert_eq!(
        stat_ids(&inside),
        (100000, 100000),
        "{b}: shifted root inside the rootfs"
    );
    let list = shiftfs_list();
    assert!(
        list.stdout.contains(&*inside.to_string_lossy()),
        "{b}: list names the real target:\n{list}"
    );
    // `..` stops at the rootfs root.
    let out = mount_in_root("../../../../../../../../../vol");
    out.assert_ok();
    assert!(
        is_mountpoint(&rootfs.join("vol")),
        "{b}: `..` must stop at the rootfs:\n{out}"
    );
    drop(guards);
    dir.finish();
}

/// `shiftfs umount` through a planted symlink must not unmount what it points at.
fn umount_refuses_symlink(b: Backend) {
    let Some((dir, src, mnt)) = fixture(b, "umount-symlink") else {
        return;
    };
    let rootfs = dir.dir("rootfs");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    symlink(&mnt, &rootfs.join("data"), 100000, 100000);
    let out = run(&mut shiftfs([
        OsStr::new("umount"),
        rootfs.join("data").as_os_str(),
    ]));
    out.assert_fails();
    assert!(out.stderr.contains("symbolic link"), "{b}:\n{out}");
    assert!(
        is_mountpoint(&mnt),
        "{b}: the mount the link points at must stay"
    );
    m.unmount();
    dir.finish();
}

/// Issue 12, defect 1: mounts and unmounts of one target raced from 20 processes leave the
/// mount table, `shiftfs list` and the running daemons in agreement, with at most one mount.
fn racing_mounts_agree(b: Backend) {
    let Some((dir, src, mnt)) = fixture(b, "race") else {
        return;
    };
    let _guard = ShiftMount::adopt(&mnt);
    // The racing umounts of a target not (yet) mounted prune records.
    let mut kids = Children::default();
    for i in 0..20 {
        let mut c = if i % 3 == 2 {
            shiftfs([OsStr::new("umount"), mnt.as_os_str()])
        } else {
            let mut c = shiftfs(["mount", "--backend", b.name(), "--map", MAP]);
            c.arg(&src).arg(&mnt);
            c
        };
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        kids.push(c.spawn().expect("spawn shiftfs"));
    }
    let outs = kids.wait_all(Duration::from_secs(60));
    assert_eq!(outs.len(), 20, "{b}: every racer finished");
    let stacked = mountinfo().iter().filter(|m| m.mount_point == mnt).count();
    assert!(stacked <= 1, "{b}: {stacked} mounts stacked on one target");
    let list = shiftfs_list();
    let rows = list
        .stdout
        .lines()
        .filter(|l| l.contains(&*mnt.to_string_lossy()))
        .collect::<Vec<_>>();
    assert_eq!(
        rows.len(),
        stacked,
        "{b}: list agrees with the mount table:\n{list}"
    );
    assert!(rows.iter().all(|r| r.contains("active")), "{b}:\n{list}");
    if b == Backend::Fuse {
        let daemons = shiftfs_pids_mentioning(&mnt);
        assert_eq!(
            daemons.is_empty(),
            stacked == 0,
            "{b}: daemons {daemons:?} for {stacked} mounts"
        );
    }
    if stacked == 1 {
        let out = run(&mut shiftfs([OsStr::new("umount"), mnt.as_os_str()]));
        out.assert_ok();
    }
    assert!(
        !is_mountpoint(&mnt),
        "{b}: one umount removes the only mount"
    );
    assert!(
        shiftfs_pids_mentioning(&mnt).is_empty(),
        "{b}: no daemon left"
    );
    dir.finish();
}

/// Issue 12, defect 2: a daemon draining a lazily unmounted mount must not delete the record
/// of a newer mount on the same target; `list` shows both for what they are.
fn draining_daemon_keeps_new_record(b: Backend) {
    if b != Backend::Fuse || !require(b) {
        return;
    }
    let dir = TestDir::new("drain");
    let src = owned_tree(&dir);
    let mnt = dir.dir("mnt");
    let first = ShiftMount::new(b, MAP, &src, &mnt);
    let held = fs::File::open(mnt.join("root-file")).expect("open through the mount");
    let out = run(&mut shiftfs([
        OsStr::new("umount"),
        OsStr::new("--lazy"),
        mnt.as_os_str(),
    ]));
    out.assert_ok();
    first.disarm();
    let second = ShiftMount::new(b, "b:0:200000:65536", &src, &mnt);
    let list = shiftfs_list();
    assert!(
        list.stdout.contains("draining"),
        "{b}: the detached mount shows as draining:\n{list}"
    );
    assert!(
        list.stdout.contains("200000"),
        "{b}: the new mount is listed:\n{list}"
    );
    drop(held);
    // The old daemon ends once its last file is closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shiftfs_list().stdout.contains("draining") {
        assert!(
            std::time::Instant::now() < deadline,
            "{b}: the draining daemon did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let list = shiftfs_list();
    let row = list
        .stdout
        .lines()
        .find(|l| l.contains(&*mnt.to_string_lossy()))
        .unwrap_or_else(|| panic!("{b}: the new mount's record is gone:\n{list}"));
    assert!(
        row.contains("200000") && row.contains("active"),
        "{b}: {row}"
    );
    second.unmount();
    dir.finish();
}

/// `shiftfs umount` unmounts only what shiftfs mounted: a plain or missing directory is "not
/// mounted"; a bind mount, another FUSE file system (bindfs) and an idmapped mount another
/// tool made (issue 12) are "not a shifted mount" and stay.
#[test]
fn umount_refuses_what_shiftfs_did_not_mount() {
    let Some((dir, src, mnt)) = fixture(Backend::Kernel, "umount-foreign") else {
        return;
    };
    let umount = |p: &Path| run(&mut shiftfs([OsStr::new("umount"), p.as_os_str()]));

    let out = umount(&mnt);
    assert_one_line_error(&out, "is not mounted", &mnt);
    assert!(
        out.stderr.contains(&*mnt.to_string_lossy()),
        "names it:\n{out}"
    );
    let missing = dir.path().join("missing");
    assert_one_line_error(&umount(&missing), "is not mounted", &missing);

    rustix::mount::mount_bind(&src, &mnt).expect("bind mount");
    let bind = Detach(mnt.clone());
    assert_one_line_error_allow_mounted(&umount(&mnt), "not a shifted mount");
    assert!(is_mountpoint(&mnt), "the bind mount is left alone");
    drop(bind);

    let map = shiftfs::idmap::IdMapping::parse(MAP).expect("map");
    shiftfs::backend::kernel::mount(&src, &mnt, &map, Default::default(), false)
        .expect("idmapped mount");
    let idmapped = Detach(mnt.clone());
    assert_one_line_error_allow_mounted(&umount(&mnt), "not a shifted mount");
    assert!(is_mountpoint(&mnt), "another tool's mount must stay");
    drop(idmapped);

    if require_bindfs() {
        let view = dir.path().join("bindfs");
        let _bindfs = Bindfs::start(&src, &view);
        assert_one_line_error_allow_mounted(&umount(&view), "not a shifted mount");
        assert!(is_mountpoint(&view), "the bindfs mount is left alone");
    }
    dir.finish();
}

/// Issue 12: with the same target, a second `shiftfs mount` (letting shiftfs pick) is refused,
/// even when the shifted mount is empty, and one umount removes the mount.
fn second_mount_is_refused(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("second");
    // An empty source leaves the target empty, which once let a second mount stack on it.
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let daemons = shiftfs_pids_mentioning(&mnt);
    let (again, again_guard) = ShiftMount::run_mount(None, &["--map", MAP], &src, &mnt);
    assert_one_line_error_allow_mounted(&again, "already a shifted mount");
    again_guard.disarm();
    m.unmount();
    assert_daemons_exit(&daemons, &mnt);
    assert!(!is_mountpoint(&mnt), "{b}: one umount removes it");
    dir.finish();
}

/// `mount -t shiftfs -o map=..,backend=B SRC TGT`, or the same as an fstab line and
/// `mount TGT`: shiftfs' mount helper mounts it, `list` shows it and umount(8) removes it
/// (and stops the daemon).
fn via_mount8(b: Backend, fstab: bool) {
    if !require(b) || !install_mount_helper() {
        return;
    }
    let dir = TestDir::new(if fstab { "fstab" } else { "mount8" });
    let src = owned_tree(&dir);
    let mnt = dir.dir("mnt");
    let options = format!("map={MAP},backend={b}");
    let guard = ShiftMount::adopt(&mnt);
    let out = if fstab {
        let _line = FstabLine::add(format!(
            "{} {} shiftfs {options},noauto 0 0",
            src.display(),
            mnt.display()
        ));
        run(Command::new("mount").arg(&mnt))
    } else {
        run(Command::new("mount")
            .args(["-t", "shiftfs", "-o", &options])
            .arg(&src)
            .arg(&mnt))
    };
    out.assert_ok();
    assert_shifted(&mnt);
    let info = mount_at(&mnt).expect("mounted");
    let daemons = shiftfs_pids_mentioning(&mnt);
    match b {
        Backend::Kernel => {
            assert!(
                info.mount_options.iter().any(|o| o == "idmapped"),
                "{info:?}"
            );
            assert!(daemons.is_empty(), "no daemon for a kernel mount");
        }
        Backend::Fuse => {
            assert!(info.fstype.starts_with("fuse"), "{info:?}");
            assert_eq!(daemons.len(), 1, "one daemon: {daemons:?}");
        }
        Backend::Stack => unreachable!("not run on the stack"),
    }
    let row = list_row(&mnt).expect("shiftfs list shows it");
    assert_eq!(row[2], b.name(), "{row:?}");

    run(Command::new("umount").arg(&mnt)).assert_ok();
    assert!(!is_mountpoint(&mnt), "unmounted by umount(8)");
    guard.disarm();
    assert_daemons_exit(&daemons, &mnt);
    assert!(list_row(&mnt).is_none(), "gone from shiftfs list");
    dir.finish();
}

fn mount_t_shiftfs(b: Backend) {
    via_mount8(b, false);
}

fn fstab(b: Backend) {
    via_mount8(b, true);
}

#[test]
fn mount_t_shiftfs_without_a_map_says_how_to_give_one() {
    if !require_root() || !install_mount_helper() {
        return;
    }
    let dir = TestDir::new("mount8-nomap");
    let src = owned_tree(&dir);
    let mnt = dir.dir("mnt");
    let _guard = ShiftMount::adopt(&mnt);
    let out = run(Command::new("mount")
        .args(["-t", "shiftfs"])
        .arg(&src)
        .arg(&mnt));
    out.assert_fails();
    assert!(out.stderr.contains("-o map="), "{out}");
    assert!(!is_mountpoint(&mnt));
    dir.finish();
}

backend_tests!(
    shows_shifted_owners,
    list_shows_mount,
    mount_options,
    refuses_bad_input,
    refuses_non_root,
    separate_maps_and_map_from_pid,
    relative_paths_with_spaces,
    list_escapes_control_characters,
    umount_busy,
    target_inside_source,
    symlink_target_is_refused,
    target_root_keeps_links_inside,
    umount_refuses_symlink,
    racing_mounts_agree,
    draining_daemon_keeps_new_record,
    second_mount_is_refused,
    mount_t_shiftfs,
    fstab,
);

/// Without --backend, a source on a file system with idmapped mounts gets the kernel backend
/// and the mount says so and why; `list` shows it column by column.
fn auto_picks_kernel(src: &Path, mnt: &Path, fstype: &str) {
    let (out, m) = ShiftMount::run_mount(None, &["--map", MAP], src, mnt);
    out.assert_ok();
    assert!(
        out.stdout.contains("kernel:") && out.stdout.contains(fstype),
        "auto should say it picked the kernel and why ({fstype}):\n{out}"
    );
    assert!(
        shiftfs_pids_mentioning(mnt).is_empty(),
        "no daemon for a kernel mount"
    );
    assert_shifted(mnt);
    let e = mount_at(mnt).expect("mounted");
    assert_eq!(e.fstype, fstype);
    for opt in ["rw", "nosuid", "nodev", "idmapped"] {
        assert!(e.mount_options.iter().any(|o| o == opt), "{opt} in {e:?}");
    }
    let row = list_row(mnt).expect("shiftfs list shows the mount");
    assert_eq!(row[1], src.to_string_lossy(), "source column: {row:?}");
    assert_eq!(row[2], "kernel", "backend column: {row:?}");
    assert_eq!(row[3], MAP, "map column: {row:?}");
    assert_eq!(row.last().map(String::as_str), Some("active"), "{row:?}");
    m.unmount();
    assert!(list_row(mnt).is_none(), "gone from shiftfs list");
    assert_eq!(stat_ids(src.join("root-file")), (0, 0), "source untouched");
}

/// Auto on ext4 picks the kernel; a FUSE mount as the source (the kernel cannot idmap it) falls
/// back to FUSE, and the two maps compose.
#[test]
fn auto_backend_choice() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("auto");
    if !require_fstype(dir.path(), "ext4") {
        return;
    }
    let src = owned_tree(&dir);
    let mnt = dir.dir("mnt");
    auto_picks_kernel(&src, &mnt, "ext4");

    let m = ShiftMount::new(Backend::Fuse, MAP, &src, &mnt);
    let mnt2 = dir.dir("mnt2");
    let m2 = ShiftMount::with_args_auto(&["--map", IDENTITY_MAP], &mnt, &mnt2);
    let e2 = mount_at(&mnt2).expect("mounted");
    assert!(e2.fstype.starts_with("fuse"), "{e2:?}");
    assert_eq!(
        stat_ids(mnt2.join("user-file")),
        (101000, 101000),
        "maps compose"
    );
    m2.unmount();
    m.unmount();
    dir.finish();
}

#[test]
fn auto_picks_kernel_on_tmpfs() {
    if !require(Backend::Kernel) {
        return;
    }
    let dir = TestDir::new("auto-tmpfs");
    let src = dir.dir("src");
    let _tmpfs = mount_tmpfs(&src);
    fill_tree(&src);
    let mnt = dir.dir("mnt");
    auto_picks_kernel(&src, &mnt, "tmpfs");
    drop(_tmpfs);
    dir.finish();
}

/// A source on a FUSE file system without idmapped mounts (bindfs): `--backend kernel`
/// refuses, naming `--backend fuse`; auto picks FUSE and says why.
#[test]
fn auto_picks_fuse_on_bindfs_and_kernel_refuses() {
    if !require_bindfs() {
        return;
    }
    let dir = TestDir::new("auto-bindfs");
    let src = owned_tree(&dir);
    let mnt = dir.dir("mnt");
    let view = dir.path().join("bindfs");
    let _bindfs = Bindfs::start(&src, &view);

    let out = ShiftMount::try_mount(Some(Backend::Kernel), &["--map", MAP], &view, &mnt)
        .err()
        .expect("--backend kernel on bindfs must fail");
    assert_one_line_error(&out, "--backend fuse", &mnt);
    assert!(
        out.stderr.contains("does not support idmapped mounts"),
        "{out}"
    );
    assert!(out.stdout.is_empty(), "{out}");

    // The per-mount shifting daemon (the default stacks on a shared idmappable FUSE mount
    // where the kernel can idmap FUSE mounts: tests/coherence.rs).
    let (out, m) =
        ShiftMount::run_mount(None, &["--map", MAP, "-o", "share=sessions"], &view, &mnt);
    out.assert_ok();
    assert!(
        out.stdout.contains("(fuse: ") && out.stdout.contains("idmapped mount not possible"),
        "auto should say it picked FUSE and why:\n{out}"
    );
    let daemon = daemon_pid(&mnt);
    assert_shifted(&mnt);
    let row = list_row(&mnt).expect("shiftfs list shows the mount");
    assert_eq!(row[2], "fuse", "{row:?}");
    assert_eq!(row[3], MAP, "{row:?}");
    assert_eq!(row[5], "root", "owner column: {row:?}");
    assert_eq!(row[6], daemon.to_string(), "pid column: {row:?}");
    assert_eq!(row.last().map(String::as_str), Some("active"), "{row:?}");
    m.unmount();
    assert_daemons_exit(&[daemon], &mnt);
    drop(_bindfs);
    dir.finish();
}

#[test]
fn doctor_reports_this_machine_ok() {
    if !require_root() {
        return;
    }
    let out = run(&mut shiftfs(["doctor"]));
    out.assert_ok();
    for name in ["kernel", "user namespaces", "/dev/fuse", "idmapped mounts"] {
        assert!(
            out.stdout.lines().any(|l| {
                let mut cols = l.splitn(2, "  ");
                cols.next() == Some("OK")
                    && cols
                        .next()
                        .is_some_and(|rest| rest.trim_start().starts_with(&format!("{name}  ")))
            }),
            "doctor: an OK line for {name}:\n{out}"
        );
    }
    assert!(out.stdout.contains("--backend kernel: usable"), "{out}");
    assert!(out.stdout.contains("--backend fuse: usable"), "{out}");
}

/// The daemon runs from `/`: the file system the caller ran `shiftfs mount` from can still be
/// unmounted.
#[test]
fn fuse_daemon_does_not_hold_the_callers_directory() {
    let Some((dir, src, mnt)) = fixture(Backend::Fuse, "cwd") else {
        return;
    };
    let cwd = dir.dir("tmpfs");
    let tmpfs = mount_tmpfs(&cwd);
    let guard = ShiftMount::adopt(&mnt);
    run(shiftfs(["mount", "--backend", "fuse", "--map", MAP])
        .arg(&src)
        .arg(&mnt)
        .current_dir(&cwd))
    .assert_ok();
    let daemon_cwd = fs::read_link(format!("/proc/{}/cwd", daemon_pid(&mnt))).expect("daemon cwd");
    assert_eq!(
        daemon_cwd,
        Path::new("/"),
        "the daemon keeps no directory busy"
    );
    rustix::mount::unmount(&cwd, rustix::mount::UnmountFlags::empty())
        .expect("unmount the caller's file system");
    drop(tmpfs);
    guard.unmount();
    dir.finish();
}

/// A descriptor the caller leaks into `shiftfs mount` (no close-on-exec) is not kept open by
/// the daemon.
#[test]
fn fuse_daemon_keeps_no_inherited_descriptor() {
    let Some((dir, src, mnt)) = fixture(Backend::Fuse, "fds") else {
        return;
    };
    let leak = dir.path().join("inherited");
    let guard = ShiftMount::adopt(&mnt);
    // The shell opens fd 7 without close-on-exec, as `exec 7>file` in a script would.
    let script = format!(
        "exec 7>{}; exec {} mount --backend fuse --map {MAP} {} {}",
        q(&leak),
        q(BIN),
        q(&src),
        q(&mnt)
    );
    run(&mut sh(&script)).assert_ok();
    let fds: Vec<PathBuf> = fs::read_dir(format!("/proc/{}/fd", daemon_pid(&mnt)))
        .expect("daemon fds")
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .collect();
    assert!(
        !fds.iter().any(|p| p == &leak),
        "the daemon holds the caller's fd 7: {fds:?}"
    );
    guard.unmount();
    dir.finish();
}

#[test]
fn clean_daemon_exit_removes_its_log() {
    let Some((dir, src, mnt)) = fixture(Backend::Fuse, "log") else {
        return;
    };
    let log = shiftfs::mount::Record::log_path(&mnt);
    let m = ShiftMount::new(Backend::Fuse, MAP, &src, &mnt);
    let daemons = shiftfs_pids_mentioning(&mnt);
    assert!(log.exists(), "the running daemon logs to {}", log.display());
    m.unmount();
    assert_daemons_exit(&daemons, &mnt);
    assert!(!log.exists(), "{} left behind", log.display());
    dir.finish();
}

#[test]
fn umount_removes_a_recursive_kernel_mount_with_its_submounts() {
    let Some((dir, src, mnt)) = fixture(Backend::Kernel, "recursive") else {
        return;
    };
    let sub = src.join("sub");
    mkdir(&sub, 0o755, 0, 0);
    let _sub = mount_tmpfs(&sub);
    fs::write(sub.join("f"), "x").expect("write in sub");
    let m = ShiftMount::with_args(Backend::Kernel, &["--map", MAP, "--recursive"], &src, &mnt);
    assert_eq!(stat_ids(mnt.join("sub/f")), (100000, 100000));
    m.unmount();
    assert!(!is_mountpoint(&mnt.join("sub")), "the submount went too");
    drop(_sub);
    dir.finish();
}

#[test]
fn fuse_mount_on_a_long_target_path() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("long");
    let src = owned_tree(&dir);
    let long = dir.path().join("pod-".repeat(60));
    mkdir(&long, 0o755, 0, 0);
    let m = ShiftMount::new(Backend::Fuse, MAP, &src, &long);
    assert_shifted(&long);
    assert!(list_row(&long).is_some(), "shiftfs list shows it");
    m.unmount();
    dir.finish();
}

/// Issue 12: a `shiftfs list` run in another mount namespace (a container's, or `unshare -m`)
/// cannot see our mounts and must not prune their records as gone.
#[test]
fn list_in_another_mount_namespace_prunes_nothing() {
    let Some((dir, src, mnt)) = fixture(Backend::Kernel, "list-ns") else {
        return;
    };
    let m = ShiftMount::new(Backend::Kernel, MAP, &src, &mnt);
    let bin = env!("CARGO_BIN_EXE_shiftfs");
    let inside = run(&mut sh(&format!(
        "unshare -m --propagation private sh -c 'umount -l {t} && {bin} list'",
        t = q(&mnt)
    )));
    inside.assert_ok();
    assert!(
        !inside.stdout.contains(&*mnt.to_string_lossy()),
        "the other namespace does not see the mount:\n{inside}"
    );
    let host = shiftfs_list();
    assert!(
        host.stdout.contains(&*mnt.to_string_lossy()) && host.stdout.contains("active"),
        "the record must survive a list in another namespace:\n{host}"
    );
    m.unmount();
    dir.finish();
}

/// A record whose mount is gone (unmounted with umount(8)) is pruned by the next `shiftfs
/// list`, but not while its target's lock is held: whoever holds it may be mounting there
/// again, and mount ids are reused at once, so a new mount's record can read like the old.
/// (A run directory of its own: another test's mount reusing the freed id would overwrite
/// the record file, keyed by mount id.)
#[test]
fn list_prunes_a_gone_mount_only_when_its_target_is_free() {
    let Some((dir, src, mnt)) = fixture(Backend::Kernel, "list-prune") else {
        return;
    };
    let run_dir = dir.dir("run");
    let with_run_dir = |args: &[&OsStr]| {
        let mut c = shiftfs(args);
        c.env("SHIFTFS_RUN_DIR", &run_dir);
        run(&mut c)
    };
    with_run_dir(&[
        OsStr::new("mount"),
        OsStr::new("--backend"),
        OsStr::new("kernel"),
        OsStr::new("--map"),
        OsStr::new(MAP),
        src.as_os_str(),
        mnt.as_os_str(),
    ])
    .assert_ok();
    let _mounted = Detach(mnt.clone());
    let records = || -> usize {
        fs::read_dir(&run_dir)
            .expect("the run directory")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("mount-"))
            .count()
    };
    assert_eq!(records(), 1, "the mount is recorded");
    run(Command::new("umount").arg(&mnt)).assert_ok();

    // The lock file `shiftfs mount` took for the target (named as systemd-escape would).
    let mut name = String::new();
    for c in mnt.to_string_lossy().bytes().skip(1) {
        match c {
            b'/' => name.push('-'),
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' => name.push(c as char),
            c => name.push_str(&format!("\\x{c:02x}")),
        }
    }
    let lock = fs::File::open(run_dir.join("locks").join(format!("{name}.lock")))
        .expect("the target's lock");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    with_run_dir(&[OsStr::new("list")]).assert_ok();
    assert_eq!(records(), 1, "kept while the target is locked");
    drop(lock);
    let list = with_run_dir(&[OsStr::new("list")]);
    list.assert_ok();
    assert!(!list.stdout.contains(&*mnt.to_string_lossy()), "{list}");
    assert_eq!(records(), 0, "pruned once the target is free");
    dir.finish();
}
