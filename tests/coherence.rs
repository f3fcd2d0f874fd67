//! Two FUSE mounts of one source with two maps (two containers sharing an image) see each
//! other's changes at once: no stale name, no stale content, no append lost to an inode the
//! other mount replaced. One daemon serves both, and the last unmount stops it: either as
//! FUSE sessions that invalidate each other (`-o share=sessions`, and the default where the
//! backend is asked for) or as kernel idmapped mounts of one shared idmappable FUSE mount
//! (`-o share=idmap`, and the default of `--backend auto` on a source the kernel cannot
//! idmap). `-o share=off` keeps a daemon per mount.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MAP_A: &str = "b:0:100000:65536";
const MAP_B: &str = "b:0:200000:65536";
/// Image root as seen through each mount: the writers of the test.
const ROOT_A: u32 = 100000;
const ROOT_B: u32 = 200000;

fn fixture(name: &str) -> Option<(TestDir, PathBuf, PathBuf, PathBuf)> {
    if !require(Backend::Fuse) {
        return None;
    }
    let dir = TestDir::new(name);
    let src = dir.dir("src");
    let a = dir.dir("a");
    let b = dir.dir("b");
    Some((dir, src, a, b))
}

fn mount(map: &str, extra: &[&str], src: &Path, tgt: &Path) -> ShiftMount {
    let mut args = vec!["--map", map];
    args.extend_from_slice(extra);
    ShiftMount::with_args(Backend::Fuse, &args, src, tgt)
}

#[track_caller]
fn as_a(script: &str) -> Out {
    run(&mut sh_as(ROOT_A, ROOT_A, script))
}

#[track_caller]
fn as_b(script: &str) -> Out {
    run(&mut sh_as(ROOT_B, ROOT_B, script))
}

/// The shifting daemons of `src`: every `shiftfs mount` process naming it (supervisors
/// rename themselves and are not counted).
fn daemons_of(src: &Path) -> Vec<u32> {
    shiftfs_pids_mentioning(src)
}

/// The reproduction, step by step, with what a user would check after each.
fn stale_views_are_refreshed(extra: &[&str]) {
    let Some((dir, src, a, b)) = fixture("coherence") else {
        return;
    };
    let ma = mount(MAP_A, extra, &src, &a);
    let mb = mount(MAP_B, extra, &src, &b);
    let (za, wa) = (q(a.join("z")), q(a.join("w")));
    as_a(&format!("echo v1 > {za} && cat {za}")).assert_ok();
    assert_eq!(fs::read(src.join("z")).unwrap(), b"v1\n");
    // dA looks up w (a miss the kernel may cache) and reads z (pages it may cache).
    assert!(!as_a(&format!("test -e {wa}")).ok());
    assert_eq!(as_a(&format!("cat {za}")).stdout, "v1\n");

    // Through dB: create w, and replace z by rename.
    let (zb, wb, tb) = (q(b.join("z")), q(b.join("w")), q(b.join("z.tmp")));
    as_b(&format!(
        "echo w1 > {wb} && echo v2 > {tb} && mv -f {tb} {zb}"
    ))
    .assert_ok();

    // No stale name: dA sees w, with its owner shown through dA's map.
    as_a(&format!("test -e {wa}")).assert_ok();
    assert_eq!(stat_ids(a.join("w")), (ROOT_A, ROOT_A));
    assert_eq!(stat_ids(b.join("w")), (ROOT_B, ROOT_B));
    assert_eq!(as_a(&format!("cat {wa}")).stdout, "w1\n");
    // No stale content: dA reads the new z.
    assert_eq!(
        as_a(&format!("cat {za}")).stdout,
        "v2\n",
        "stale z through dA"
    );
    // No lost append: what dA appends reaches the source's z.
    as_a(&format!("echo C1-append >> {za}")).assert_ok();
    assert_eq!(
        fs::read_to_string(src.join("z")).unwrap(),
        "v2\nC1-append\n",
        "the append through dA must land in the source's z"
    );
    assert_eq!(as_b(&format!("cat {zb}")).stdout, "v2\nC1-append\n");

    // In-place changes through dB: content, size, mode, removal.
    as_b(&format!("printf v3 > {zb} && chmod 600 {zb}")).assert_ok();
    assert_eq!(
        as_a(&format!("cat {za}")).stdout,
        "v3",
        "stale content through dA"
    );
    assert_eq!(mode_of(a.join("z")) & 0o777, 0o600, "stale mode through dA");
    as_b(&format!("rm {wb} && mkdir {wb}")).assert_ok();
    as_a(&format!("test -d {wa}")).assert_ok();
    // And the other way round: dB sees what dA changes.
    as_a(&format!("rmdir {wa} && echo back > {wa}")).assert_ok();
    assert_eq!(as_b(&format!("cat {wb}")).stdout, "back\n");

    mb.unmount();
    ma.unmount();
    dir.finish();
}

#[test]
fn shared_daemon_keeps_mounts_coherent() {
    stale_views_are_refreshed(&[]);
}

#[test]
fn sessions_path_keeps_mounts_coherent() {
    stale_views_are_refreshed(&["-o", "share=sessions"]);
}

/// Kernel idmapped mounts of one shared idmappable FUSE mount: one superblock, one cache.
#[test]
fn idmap_path_keeps_mounts_coherent() {
    stale_views_are_refreshed(&["-o", "share=idmap"]);
}

/// Two mounts of one source: one daemon; unmounting the mount that started it leaves the
/// other served; the last unmount stops the daemon and removes its records.
#[test]
fn one_daemon_per_source_until_the_last_unmount() {
    let Some((dir, src, a, b)) = fixture("one-daemon") else {
        return;
    };
    file(&src.join("f"), b"data\n", 0o644, 0, 0);
    let ma = mount(MAP_A, &[], &src, &a);
    let first = daemons_of(&src);
    assert_eq!(
        first.len(),
        1,
        "one daemon after the first mount: {first:?}"
    );
    let mb = mount(MAP_B, &[], &src, &b);
    assert_eq!(
        daemons_of(&src),
        first,
        "the second mount joins the first daemon"
    );
    assert_eq!(stat_ids(a.join("f")), (ROOT_A, ROOT_A));
    assert_eq!(stat_ids(b.join("f")), (ROOT_B, ROOT_B));
    let list = shiftfs_list();
    list.assert_ok();
    let rows: Vec<&str> = list
        .stdout
        .lines()
        .filter(|l| l.contains(&*src.to_string_lossy()))
        .collect();
    assert_eq!(rows.len(), 2, "{list}");
    let pid = first[0].to_string();
    for row in &rows {
        assert!(row.contains(&pid), "both mounts name daemon {pid}:\n{list}");
        assert!(row.contains("2 mounts"), "list shows the sharing:\n{list}");
    }

    // The starter's mount goes first: the daemon stays for the other.
    run(&mut shiftfs(["umount".as_ref(), a.as_os_str()])).assert_ok();
    ma.disarm();
    assert!(!is_mountpoint(&a));
    assert_eq!(
        daemons_of(&src),
        first,
        "the daemon still serves {}",
        b.display()
    );
    assert_eq!(fs::read(b.join("f")).unwrap(), b"data\n");
    as_b(&format!("echo more >> {}", q(b.join("f")))).assert_ok();
    assert_eq!(fs::read(src.join("f")).unwrap(), b"data\nmore\n");
    let list = shiftfs_list();
    assert!(!list.stdout.contains(&*a.to_string_lossy()), "{list}");

    // The last one stops it.
    run(&mut shiftfs(["umount".as_ref(), b.as_os_str()])).assert_ok();
    mb.disarm();
    assert!(
        wait_gone(&first, std::time::Duration::from_secs(5)),
        "the daemon must exit after the last unmount"
    );
    assert!(daemons_of(&src).is_empty());
    assert!(!shiftfs_list().stdout.contains(&*src.to_string_lossy()));
    dir.finish();
}

/// `-o share=off`: a daemon per mount, as before sharing existed.
#[test]
fn share_off_keeps_a_daemon_per_mount() {
    let Some((dir, src, a, b)) = fixture("share-off") else {
        return;
    };
    let ma = mount(MAP_A, &["-o", "share=off"], &src, &a);
    let mb = mount(MAP_B, &["-o", "share=off"], &src, &b);
    assert_eq!(daemons_of(&src).len(), 2);
    mb.unmount();
    ma.unmount();
    dir.finish();
}

/// Both mounts changing one directory at the same time: the kernel takes each mount's
/// directory lock to drop an entry, so invalidations sent while both hold theirs must not
/// wait on each other for ever. Both writers finish, and afterwards each mount lists what
/// the other made.
#[test]
fn concurrent_changes_in_one_directory_do_not_hang() {
    let Some((dir, src, a, b)) = fixture("concurrent") else {
        return;
    };
    let ma = mount(MAP_A, &[], &src, &a);
    let mb = mount(MAP_B, &[], &src, &b);
    let churn = |uid: u32, at: &Path, tag: &str| {
        let at = q(at);
        let script = format!(
            "i=0; while [ $i -lt 120 ]; do echo $i > {at}/{tag}$i && mv {at}/{tag}$i {at}/{tag}-k$((i % 7)) \
             && rm -f {at}/{tag}-gone$i && mkdir {at}/{tag}d$i && rmdir {at}/{tag}d$i || exit 1; \
             i=$((i+1)); done"
        );
        let mut c = sh_as(uid, uid, &script);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c.spawn().expect("start writer")
    };
    let mut writers = Children(Vec::new());
    writers.push(churn(ROOT_A, &a, "a"));
    writers.push(churn(ROOT_B, &b, "b"));
    for out in writers.wait_all(std::time::Duration::from_secs(120)) {
        assert!(
            out.status.success(),
            "a writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut want: Vec<String> = (0..7)
        .flat_map(|k| [format!("a-k{k}"), format!("b-k{k}")])
        .collect();
    want.sort();
    assert_eq!(ls(&a), want, "dA lists what both made");
    assert_eq!(ls(&b), want, "dB lists what both made");
    assert_eq!(fs::read_to_string(a.join("b-k5")).unwrap(), "117\n");
    mb.unmount();
    ma.unmount();
    dir.finish();
}

/// SIGTERM to a daemon that serves two mounts unmounts both, removes both records and ends
/// the daemon.
#[test]
fn sigterm_unmounts_every_mount_of_a_shared_daemon() {
    let Some((dir, src, a, b)) = fixture("sigterm") else {
        return;
    };
    let ma = mount(MAP_A, &[], &src, &a);
    let mb = mount(MAP_B, &[], &src, &b);
    let daemons = daemons_of(&src);
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    let pid = rustix::process::Pid::from_raw(daemons[0] as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    assert!(
        wait_gone(&daemons, std::time::Duration::from_secs(10)),
        "the daemon must exit after SIGTERM"
    );
    assert!(wait_mounted(&a, false, std::time::Duration::from_secs(5)));
    assert!(wait_mounted(&b, false, std::time::Duration::from_secs(5)));
    let list = shiftfs_list();
    assert!(!list.stdout.contains(&*src.to_string_lossy()), "{list}");
    ma.disarm();
    mb.disarm();
    dir.finish();
}

/// A ramfs (which the kernel cannot idmap) at `dir/name`, unmounted on drop.
fn ramfs(dir: &TestDir, name: &str) -> (PathBuf, Detach) {
    let path = dir.dir(name);
    let guard = mount_ramfs(&path);
    (path, guard)
}

/// `--backend auto` on ramfs: ten targets with ten maps are kernel idmapped mounts of one
/// shared idmappable FUSE mount, served by one daemon; each shows its own owners and writes
/// land with image ids; the daemon stays until the last of them is unmounted.
#[test]
fn ten_maps_on_ramfs_share_one_daemon() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("ten-maps");
    let (src, ramfs_guard) = ramfs(&dir, "src");
    file(&src.join("f"), b"image\n", 0o644, 0, 0);
    file(&src.join("g"), b"user\n", 0o644, 1000, 1000);
    let mut mounts = Vec::new();
    for k in 0..10u32 {
        let tgt = dir.dir(&format!("m{k}"));
        let base = 100000 + k * 65536;
        let m = ShiftMount::with_args_auto(&["--map", &format!("b:0:{base}:65536")], &src, &tgt);
        let e = mount_at(&tgt).expect("mounted");
        assert!(
            e.mount_options.iter().any(|o| o == "idmapped"),
            "a kernel idmapped mount: {e:?}"
        );
        mounts.push((m, tgt, base));
    }
    let daemons = daemons_of(&src);
    assert_eq!(daemons.len(), 1, "one daemon for ten mounts: {daemons:?}");
    for (_, tgt, base) in &mounts {
        assert_eq!(stat_ids(tgt.join("f")), (*base, *base), "{}", tgt.display());
        assert_eq!(stat_ids(tgt.join("g")), (base + 1000, base + 1000));
    }
    // A file made through mount 3 by its image root lands as image root, and every mount
    // sees it at once, with its own owner.
    let (_, t3, b3) = &mounts[3];
    run(&mut sh_as(
        *b3,
        *b3,
        &format!("echo new > {}", q(t3.join("n"))),
    ))
    .assert_ok();
    assert_eq!(stat_ids(src.join("n")), (0, 0));
    for (_, tgt, base) in &mounts {
        assert_eq!(fs::read(tgt.join("n")).unwrap(), b"new\n");
        assert_eq!(stat_ids(tgt.join("n")), (*base, *base));
    }
    let list = shiftfs_list();
    assert!(
        list.stdout.contains("10 mounts"),
        "list shows the sharing:\n{list}"
    );

    let last = mounts.pop().expect("ten");
    for (m, _, _) in mounts {
        m.unmount();
        assert_eq!(daemons_of(&src), daemons, "the daemon serves the others");
    }
    assert_eq!(fs::read(last.1.join("f")).unwrap(), b"image\n");
    last.0.unmount();
    assert!(
        wait_gone(&daemons, std::time::Duration::from_secs(10)),
        "the last unmount stops the daemon"
    );
    let shared: Vec<_> = mountinfo()
        .into_iter()
        .filter(|m| {
            m.mount_point.starts_with("/run/shiftfs/shared") && m.source == src.to_string_lossy()
        })
        .collect();
    assert!(shared.is_empty(), "the shared mount is gone: {shared:?}");
    drop(ramfs_guard);
    dir.finish();
}

/// A shared daemon killed outright leaves both its mounts dead (as a daemon of one mount
/// does); `shiftfs list` says so for each, and `shiftfs umount` removes each.
#[test]
fn a_killed_shared_daemon_leaves_dead_mounts_that_umount_removes() {
    let Some((dir, src, a, b)) = fixture("killed") else {
        return;
    };
    let ma = mount(MAP_A, &["-o", "share=sessions"], &src, &a);
    let mb = mount(MAP_B, &["-o", "share=sessions"], &src, &b);
    let daemons = daemons_of(&src);
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    kill_and_wait(&daemons);
    let list = shiftfs_list();
    for t in [&a, &b] {
        let row = list
            .stdout
            .lines()
            .find(|l| l.starts_with(&*t.to_string_lossy()))
            .unwrap_or_else(|| panic!("{} listed:\n{list}", t.display()));
        assert!(row.contains("dead"), "{row}");
    }
    mb.unmount();
    ma.unmount();
    assert!(!shiftfs_list().stdout.contains(&*src.to_string_lossy()));
    dir.finish();
}

/// The shared idmappable FUSE mounts of `src` (by `--backend auto`).
fn shared_mounts_of(src: &Path) -> Vec<MountEntry> {
    mountinfo()
        .into_iter()
        .filter(|m| {
            m.mount_point.starts_with("/run/shiftfs/shared") && m.source == src.to_string_lossy()
        })
        .collect()
}

/// Held by the tests that run `shiftfs gc`, which looks at every shared mount on the
/// machine: one's gc must not take the orphan another test is about to show its gc.
static GC: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The row `shiftfs list` shows for `target`.
fn list_row(list: &Out, target: &Path) -> Option<String> {
    list.stdout
        .lines()
        .find(|l| l.starts_with(&*target.to_string_lossy()))
        .map(str::to_string)
}

/// Stacked (idmap-path) mounts removed with umount(8) instead of `shiftfs umount`: while
/// one is left, the shared FUSE mount and its daemon serve it (and `shiftfs gc` keeps
/// them); once the last is gone, the daemon's supervisor sees the mount table change and
/// unmounts the shared mount, and the daemon ends, within seconds.
#[test]
fn umount8_of_the_last_stacked_mount_stops_the_shared_daemon() {
    let _gc = GC.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("umount8");
    let (src, ramfs_guard) = ramfs(&dir, "src");
    file(&src.join("f"), b"image\n", 0o644, 0, 0);
    let (a, b) = (dir.dir("a"), dir.dir("b"));
    let ma = ShiftMount::with_args_auto(&["--map", MAP_A], &src, &a);
    let mb = ShiftMount::with_args_auto(&["--map", MAP_B], &src, &b);
    for t in [&a, &b] {
        let e = mount_at(t).expect("mounted");
        assert!(e.mount_options.iter().any(|o| o == "idmapped"), "{e:?}");
    }
    let daemons = daemons_of(&src);
    assert_eq!(daemons.len(), 1, "one daemon: {daemons:?}");
    assert_eq!(shared_mounts_of(&src).len(), 1);
    let list = shiftfs_list();
    for t in [&a, &b] {
        let row = list_row(&list, t).unwrap_or_else(|| panic!("{} listed:\n{list}", t.display()));
        assert!(row.contains("2 mounts"), "{row}");
    }

    run(Command::new("umount").arg(&a)).assert_ok();
    ma.disarm();
    // Longer than the watcher's grace: one stacked mount left keeps everything.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(daemons_of(&src), daemons, "the daemon serves b");
    assert_eq!(shared_mounts_of(&src).len(), 1, "the shared mount stays");
    assert_eq!(stat_ids(b.join("f")), (ROOT_B, ROOT_B));
    assert_eq!(fs::read(b.join("f")).unwrap(), b"image\n");
    let ours = shared_mounts_of(&src)[0].mount_point.clone();
    let gc = run(&mut shiftfs(["gc"]));
    gc.assert_ok();
    // Other tests' shared mounts may be in it (gc looks at the whole machine).
    assert!(
        !gc.stdout.contains(&*ours.to_string_lossy()),
        "gc keeps a used shared mount:\n{gc}"
    );
    assert_eq!(shared_mounts_of(&src).len(), 1, "gc keeps the shared mount");
    let list = shiftfs_list();
    assert!(
        list_row(&list, &a).is_none(),
        "a is gone from the list:\n{list}"
    );
    let row = list_row(&list, &b).unwrap_or_else(|| panic!("b listed:\n{list}"));
    assert!(!row.contains("mounts"), "b shares with no one now: {row}");

    run(Command::new("umount").arg(&b)).assert_ok();
    mb.disarm();
    assert!(
        wait_gone(&daemons, std::time::Duration::from_secs(5)),
        "the daemon ends after the last stacked mount went with umount(8)"
    );
    let shared = shared_mounts_of(&src);
    assert!(shared.is_empty(), "the shared mount is gone: {shared:?}");
    let list = shiftfs_list();
    assert!(
        !list.stdout.contains(&*src.to_string_lossy()),
        "nothing of src is listed:\n{list}"
    );
    drop(ramfs_guard);
    dir.finish();
}

/// The children of `pid` (a daemon's supervisor is its forked child).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// Sends SIGCONT to a stopped process when dropped, so a failing test leaves none stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        if let Some(p) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::CONT);
        }
    }
}

/// `shiftfs gc` unmounts a shared FUSE mount left without users when its daemon's watcher
/// could not (here: its supervisor stopped), and the daemon then ends.
#[test]
fn gc_unmounts_an_unused_shared_mount() {
    let _gc = GC.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("gc-shared");
    let (src, ramfs_guard) = ramfs(&dir, "src");
    file(&src.join("f"), b"image\n", 0o644, 0, 0);
    let a = dir.dir("a");
    let ma = ShiftMount::with_args_auto(&["--map", MAP_A], &src, &a);
    let daemons = daemons_of(&src);
    assert_eq!(daemons.len(), 1, "one daemon: {daemons:?}");
    let supervisors = children_of(daemons[0]);
    assert_eq!(supervisors.len(), 1, "one supervisor: {supervisors:?}");
    let sup = rustix::process::Pid::from_raw(supervisors[0] as i32).expect("pid");
    rustix::process::kill_process(sup, rustix::process::Signal::STOP).expect("SIGSTOP");
    let resume = Resume(supervisors[0]);

    run(Command::new("umount").arg(&a)).assert_ok();
    ma.disarm();
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(
        shared_mounts_of(&src).len(),
        1,
        "left behind, nobody watching"
    );
    let ours = shared_mounts_of(&src)[0].mount_point.clone();
    let gc = run(&mut shiftfs(["gc"]));
    gc.assert_ok();
    let said = format!("unmounted unused shared mount {}", ours.display());
    assert!(gc.stdout.contains(&said), "gc says what it did:\n{gc}");
    let shared = shared_mounts_of(&src);
    assert!(
        shared.is_empty(),
        "gc unmounted the shared mount: {shared:?}"
    );
    drop(resume);
    assert!(
        wait_gone(&daemons, std::time::Duration::from_secs(5)),
        "the daemon ends with its last session"
    );
    let list = shiftfs_list();
    assert!(
        !list.stdout.contains(&*src.to_string_lossy()),
        "nothing of src is listed:\n{list}"
    );
    drop(ramfs_guard);
    dir.finish();
}

/// A process of host uid/gid `id` holding `DIR/f0`, `DIR/f1`, .. open (up to `n`, until an
/// open fails); closed when dropped.
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// Opens as `id` in `dir` until an open fails; "COUNT ERRNO" (0 if all opened) and the holder.
fn hold_open(id: u32, dir: &Path, n: usize) -> ((usize, i32), Holder) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let script = format!(
        "import os, sys\n\
         fds, err = [], 0\n\
         for i in range({n}):\n\
         \x20   try:\n\
         \x20       fds.append(os.open('f%d' % i, os.O_RDONLY))\n\
         \x20   except OSError as e:\n\
         \x20       err = e.errno\n\
         \x20       break\n\
         print(len(fds), err, flush=True)\n\
         sys.stdin.read()\n"
    );
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .uid(id)
        .gid(id)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let out = child.stdout.take().expect("stdout");
    let holder = Holder(child);
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    let (count, err) = line.trim().split_once(' ').expect("COUNT ERRNO");
    ((count.parse().unwrap(), err.parse().unwrap()), holder)
}

/// Two sessions of one daemon (two maps, `share=sessions`) at RLIMIT_NOFILE 256, which the
/// daemon cannot raise: the open-file cap and the inode fds are the daemon's, shared by both
/// sessions. Users holding many files open through both mounts are refused with ENFILE at
/// the daemon's cap, and lookups through both mounts (a listing of 400 files, stats, a read)
/// and another user's opens keep working: nothing fails with EMFILE.
#[test]
fn two_sessions_at_a_low_fd_limit_share_one_budget() {
    if !require(Backend::Fuse)
        || !require_tool("prlimit", "util-linux")
        || !require_tool("setpriv", "util-linux")
        || !require_tool("python3", "python3")
    {
        return;
    }
    let dir = TestDir::new("fd-budget");
    let (src, a, b) = (dir.dir("src"), dir.dir("a"), dir.dir("b"));
    for i in 0..400 {
        fs::write(src.join(format!("f{i}")), format!("{i}")).unwrap();
    }
    // The daemon inherits the limit, and cannot raise it (no CAP_SYS_RESOURCE).
    run(Command::new("setpriv")
        .args(["--bounding-set=-sys_resource", "--", "prlimit"])
        .args(["--nofile=256:256", "--", BIN, "mount"])
        .args(["--backend", "fuse", "-o", "share=sessions", "--map", MAP_A])
        .arg(&src)
        .arg(&a)
        .current_dir("/"))
    .assert_ok();
    let _ma = ShiftMount::adopt(&a);
    let _mb = mount(MAP_B, &["-o", "share=sessions"], &src, &b);
    let daemons = daemons_of(&src);
    assert_eq!(daemons.len(), 1, "b joined a's daemon: {daemons:?}");
    let list = shiftfs_list();
    for t in [&a, &b] {
        let row = list_row(&list, t).unwrap_or_else(|| panic!("{} listed:\n{list}", t.display()));
        assert!(row.contains("2 mounts"), "{row}");
    }
    let limits = fs::read_to_string(format!("/proc/{}/limits", daemons[0])).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 256 ")),
        "the daemon runs at RLIMIT_NOFILE 256:\n{limits}"
    );

    // One user holds what it can through a: refused at its share of the daemon's cap.
    let ((n1, e1), _h1) = hold_open(ROOT_A + 1000, &a, 400);
    assert_eq!(
        e1,
        libc::ENFILE,
        "refused at the cap, not EMFILE ({n1} opened)"
    );
    // Another user's opens through b still work.
    let ((n2, e2), _h2) = hold_open(ROOT_B + 1000, &b, 4);
    assert_eq!((n2, e2), (4, 0), "another user opens files through b");

    // Lookups of every file through both mounts, and reads, as other users.
    for (root, m) in [(ROOT_A, &a), (ROOT_B, &b)] {
        let d = q(m);
        let out = run(&mut sh_as(
            root + 2000,
            root + 2000,
            &format!(
                "ls {d} | wc -l && stat -c %s {d}/* | sort -u | wc -l && cat {d}/f399 && \
                 echo"
            ),
        ));
        out.assert_ok();
        assert_eq!(
            out.stdout,
            "400\n3\n399\n",
            "through {}: {out}",
            m.display()
        );
    }
    // The daemon's cap full, through both mounts: opens are refused with ENFILE, and
    // lookups of every file still work through both.
    let ((n3, e3), h3) = hold_open(ROOT_B + 3000, &b, 400);
    assert_eq!(
        e3,
        libc::ENFILE,
        "refused at the cap, not EMFILE ({n3} opened)"
    );
    for (root, m) in [(ROOT_A, &a), (ROOT_B, &b)] {
        let d = q(m);
        let out = run(&mut sh_as(
            root + 2000,
            root + 2000,
            &format!("stat -c %s {d}/* | wc -l"),
        ));
        out.assert_ok();
        assert_eq!(out.stdout, "400\n", "through {}: {out}", m.display());
    }
    drop(h3);
    assert_eq!(stat_ids(b.join("f0")), (ROOT_B, ROOT_B));
    assert_eq!(fs::read(a.join("f123")).unwrap(), b"123");

    // A third mount: the daemon has no fds to spare for one more session's own, so the mount
    // gets a daemon of its own (at the default limit) rather than overcommitting this one.
    let c = dir.dir("c");
    let _mc = mount(MAP_B, &["-o", "share=sessions"], &src, &c);
    let all = daemons_of(&src);
    assert_eq!(all.len(), 2, "c has a daemon of its own: {all:?}");
    assert_eq!(fs::read(c.join("f7")).unwrap(), b"7");
    assert_eq!(stat_ids(c.join("f7")), (ROOT_B, ROOT_B));
}

/// A shared idmappable mount that joined the source's daemon as one more session (the
/// daemon already served a shifting FUSE mount of the source): umount(8) of the mount
/// stacked on it removes the shared mount within seconds, and the daemon goes on serving
/// the other mount.
#[test]
fn umount8_releases_a_shared_mount_that_joined_a_sessions_daemon() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("umount8-joined");
    let (src, ramfs_guard) = ramfs(&dir, "src");
    file(&src.join("f"), b"image\n", 0o644, 0, 0);
    let (a, b) = (dir.dir("a"), dir.dir("b"));
    let ma = mount(MAP_A, &["-o", "share=sessions"], &src, &a);
    let mb = ShiftMount::with_args_auto(&["--map", MAP_B], &src, &b);
    let e = mount_at(&b).expect("mounted");
    assert!(e.mount_options.iter().any(|o| o == "idmapped"), "{e:?}");
    let daemons = daemons_of(&src);
    assert_eq!(
        daemons.len(),
        1,
        "the shared mount joined a's daemon: {daemons:?}"
    );
    assert_eq!(shared_mounts_of(&src).len(), 1);

    run(Command::new("umount").arg(&b)).assert_ok();
    mb.disarm();
    let start = std::time::Instant::now();
    // Its session then ends, and the daemon's supervisor removes its record (until then
    // `list` shows it draining).
    let gone = || {
        shared_mounts_of(&src).is_empty() && !shiftfs_list().stdout.contains("/run/shiftfs/shared")
    };
    while !gone() && start.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let shared = shared_mounts_of(&src);
    assert!(shared.is_empty(), "the shared mount is gone: {shared:?}");
    let list = shiftfs_list();
    assert!(
        !list.stdout.contains("/run/shiftfs/shared"),
        "no shared mount listed:\n{list}"
    );
    assert!(list_row(&list, &a).is_some(), "a listed:\n{list}");
    assert_eq!(daemons_of(&src), daemons, "the daemon still serves a");
    assert_eq!(stat_ids(a.join("f")), (ROOT_A, ROOT_A));
    assert_eq!(fs::read(a.join("f")).unwrap(), b"image\n");
    ma.unmount();
    assert!(wait_gone(&daemons, std::time::Duration::from_secs(10)));
    drop(ramfs_guard);
    dir.finish();
}

/// A shared mount that is busy (a process works inside it) when its last stacked mount goes
/// with umount(8) is kept, never detached lazily; once it is free, the next change to the
/// mount table lets it go, and its daemon ends.
#[test]
fn a_busy_shared_mount_is_kept_until_free() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("umount8-busy");
    let (src, ramfs_guard) = ramfs(&dir, "src");
    file(&src.join("f"), b"image\n", 0o644, 0, 0);
    let (a, t) = (dir.dir("a"), dir.dir("t"));
    let ma = ShiftMount::with_args_auto(&["--map", MAP_A], &src, &a);
    let daemons = daemons_of(&src);
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    let shared = shared_mounts_of(&src);
    assert_eq!(shared.len(), 1);
    let inside = shared[0].mount_point.clone();
    // A process whose working directory is the shared mount keeps it busy.
    let holder = Command::new("sleep")
        .arg("600")
        .current_dir(&inside)
        .spawn()
        .unwrap();
    let mut holder = Children(vec![holder]);

    run(Command::new("umount").arg(&a)).assert_ok();
    ma.disarm();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(shared_mounts_of(&src).len(), 1, "busy: kept, not detached");
    assert_eq!(daemons_of(&src), daemons);
    assert_eq!(fs::read(inside.join("f")).unwrap(), b"image\n");

    for c in &mut holder.0 {
        let _ = c.kill();
        let _ = c.wait();
    }
    // Any change to the mount table makes the daemon look again.
    rustix::mount::mount(
        "shiftfs-test",
        &t,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"",
    )
    .expect("mount tmpfs");
    rustix::mount::unmount(&t, rustix::mount::UnmountFlags::empty()).expect("umount tmpfs");
    assert!(
        wait_gone(&daemons, std::time::Duration::from_secs(5)),
        "freed, the shared mount goes, and its daemon ends"
    );
    let left = shared_mounts_of(&src);
    assert!(left.is_empty(), "the shared mount is gone: {left:?}");
    drop(ramfs_guard);
    dir.finish();
}

/// Another tool's mount of the shared filesystem (here a bind mount of a stacked mount;
/// crun's `idmap` option makes one too) has no record: `shiftfs umount` of the last recorded
/// mount keeps the shared mount for it, and once it goes with umount(8) the shared mount and
/// its daemon go too.
#[test]
fn a_mount_without_record_keeps_the_shared_mount() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("shared-bind");
    let (src, ramfs_guard) = ramfs(&dir, "src");
    file(&src.join("f"), b"image\n", 0o644, 0, 0);
    let (a, o) = (dir.dir("a"), dir.dir("o"));
    let ma = ShiftMount::with_args_auto(&["--map", MAP_A], &src, &a);
    let daemons = daemons_of(&src);
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    rustix::mount::mount_bind(&a, &o).expect("bind mount");
    let bind = Detach(o.clone());

    ma.unmount();
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(shared_mounts_of(&src).len(), 1, "kept for the bind mount");
    assert_eq!(daemons_of(&src), daemons);
    assert_eq!(stat_ids(o.join("f")), (ROOT_A, ROOT_A));
    assert_eq!(fs::read(o.join("f")).unwrap(), b"image\n");

    run(Command::new("umount").arg(&o)).assert_ok();
    drop(bind);
    assert!(
        wait_gone(&daemons, std::time::Duration::from_secs(5)),
        "the daemon ends once the bind mount went"
    );
    let left = shared_mounts_of(&src);
    assert!(left.is_empty(), "the shared mount is gone: {left:?}");
    drop(ramfs_guard);
    dir.finish();
}
