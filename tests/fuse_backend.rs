//! Real mounts of the FUSE backend, checked the way a user would: owners seen through the
//! mount and on disk, errno of refused operations, what is (not) left behind.
//!
//! Needs root and /dev/fuse; skips without them unless CI=true.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use shiftfs::backend::fuse::{Options, Session};
use shiftfs::idmap::IdMapping;

const MAP: &str = "b:0:100000:65536";

/// Skips (or fails under CI=true) when `ok` is false.
#[track_caller]
fn prerequisite(ok: bool, what: &str) -> bool {
    ok || common::skip(what)
}

fn prerequisites() -> bool {
    let root = rustix::process::geteuid().is_root();
    let fuse = Path::new("/dev/fuse").exists();
    prerequisite(
        root && fuse,
        &format!("needs root and /dev/fuse (root={root}, /dev/fuse={fuse})"),
    )
}

/// A mounted source; unmounts lazily and waits for the daemon threads on drop, also when
/// a test fails.
struct Mounted {
    _dir: tempfile::TempDir,
    src: PathBuf,
    mnt: PathBuf,
    outside: PathBuf,
    session: Option<Session>,
}

impl Mounted {
    fn new(map: &str, tweak: impl FnOnce(&mut Options), setup: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Unprivileged callers must be able to reach the mount point.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let src = dir.path().join("src");
        let mnt = dir.path().join("mnt");
        let outside = dir.path().join("outside");
        for d in [&src, &mnt, &outside] {
            fs::create_dir(d).unwrap();
        }
        fs::set_permissions(&src, fs::Permissions::from_mode(0o777)).unwrap();
        setup(&src);
        let mut opts = Options::new(IdMapping::parse(map).unwrap());
        opts.fsname = src.display().to_string();
        opts.threads = 4;
        if let Some(u) = common::test_uring() {
            opts.uring = u.parse().unwrap();
        }
        tweak(&mut opts);
        let fd = rustix::fs::open(
            &src,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let session = shiftfs::backend::fuse::mount(fd, &mnt, opts).unwrap();
        Self {
            _dir: dir,
            src,
            mnt,
            outside,
            session: Some(session),
        }
    }

    fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn s(&self, rel: &str) -> PathBuf {
        self.src.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = s.unmount() {
                eprintln!("unmount failed: {e}");
            }
        }
    }
}

fn owner(p: &Path) -> (u32, u32) {
    let md = fs::symlink_metadata(p).unwrap();
    (md.uid(), md.gid())
}

fn errno(r: io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Runs a shell snippet as host uid/gid `id` with no supplementary groups.
fn sh_as(id: u32, script: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("LC_ALL", "C")
        .uid(id)
        .gid(id)
        .output()
        .unwrap()
}

#[test]
fn owners_are_shown_shifted_and_unmapped_as_overflow() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        MAP,
        |_| {},
        |src| {
            for (name, id) in [("zero", 0), ("thousand", 1000), ("unmapped", 70000)] {
                fs::write(src.join(name), b"x").unwrap();
                std::os::unix::fs::chown(src.join(name), Some(id), Some(id)).unwrap();
            }
            std::os::unix::fs::chown(src.join("thousand"), Some(1000), Some(2000)).unwrap();
        },
    );
    assert_eq!(owner(&m.m("zero")), (100000, 100000));
    assert_eq!(owner(&m.m("thousand")), (101000, 102000));
    assert_eq!(owner(&m.m("unmapped")), (65534, 65534));
    // readdir (readdirplus) shows the same.
    let names: Vec<_> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn unmapped_caller_gets_eoverflow_and_nothing_is_created() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(MAP, |_| {}, |_| {});
    // Host uid 5 has no inner id in 0:100000:65536.
    let out = sh_as(
        5,
        &format!(
            "cd {} && touch f; mkdir d; mkfifo p; ln -s x l; echo done",
            m.mnt.display()
        ),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .matches("Value too large for defined data type")
            .count(),
        4,
        "{stderr}"
    );
    // Host root is unmapped as well; a new name by link or rename is a creation too.
    assert_eq!(
        errno(fs::File::create(m.m("by_root"))),
        Some(libc::EOVERFLOW)
    );
    assert_eq!(
        errno(fs::create_dir(m.m("dir_by_root"))),
        Some(libc::EOVERFLOW)
    );
    assert_eq!(
        fs::read_dir(&m.src).unwrap().count(),
        0,
        "nothing left on disk"
    );
    fs::write(m.s("old"), b"x").unwrap();
    assert_eq!(
        errno(fs::hard_link(m.m("old"), m.m("new"))),
        Some(libc::EOVERFLOW)
    );
    assert_eq!(
        errno(fs::rename(m.m("old"), m.m("new"))),
        Some(libc::EOVERFLOW)
    );
    assert_eq!(fs::read_dir(&m.src).unwrap().count(), 1);
}

#[test]
fn chown_to_unmapped_target_changes_nothing() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        MAP,
        |_| {},
        |src| {
            fs::write(src.join("f"), b"x").unwrap();
            std::os::unix::fs::chown(src.join("f"), Some(1000), Some(1000)).unwrap();
        },
    );
    let r = std::os::unix::fs::chown(m.m("f"), Some(5), None);
    assert_eq!(errno(r), Some(libc::EOVERFLOW));
    let r = std::os::unix::fs::chown(m.m("f"), Some(101001), Some(5));
    assert_eq!(errno(r), Some(libc::EOVERFLOW));
    assert_eq!(owner(&m.s("f")), (1000, 1000));
    // A mapped target is stored shifted back.
    std::os::unix::fs::chown(m.m("f"), Some(100007), Some(100008)).unwrap();
    assert_eq!(owner(&m.s("f")), (7, 8));
    assert_eq!(owner(&m.m("f")), (100007, 100008));
}

#[test]
fn creates_by_mapped_caller_land_with_inner_ids() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(MAP, |_| {}, |_| {});
    let out = sh_as(
        101000,
        &format!(
            "cd {} && echo hi > f && mkdir d && mkfifo p && ln -s f l && ln f hard",
            m.mnt.display()
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["f", "d", "p", "l", "hard"] {
        assert_eq!(owner(&m.s(name)), (1000, 1000), "{name} on disk");
        assert_eq!(owner(&m.m(name)), (101000, 101000), "{name} in mount");
    }
    assert_eq!(fs::read(m.s("f")).unwrap(), b"hi\n");
    assert!(
        fs::symlink_metadata(m.s("l"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read_link(m.m("l")).unwrap(), Path::new("f"));
}

#[test]
fn umask_and_mode_of_new_objects_follow_the_caller() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(MAP, |_| {}, |_| {});
    let out = sh_as(
        101000,
        &format!("cd {} && umask 027 && touch f && mkdir d", m.mnt.display()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::metadata(m.s("f")).unwrap().mode() & 0o7777, 0o640);
    assert_eq!(fs::metadata(m.s("d")).unwrap().mode() & 0o7777, 0o750);
}

#[test]
fn setgid_directory_passes_group_and_bit() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        MAP,
        |_| {},
        |src| {
            let sg = src.join("sg");
            fs::create_dir(&sg).unwrap();
            std::os::unix::fs::chown(&sg, Some(0), Some(2000)).unwrap();
            fs::set_permissions(&sg, fs::Permissions::from_mode(0o2777)).unwrap();
        },
    );
    let out = sh_as(
        101000,
        &format!("cd {}/sg && touch f && mkdir sub", m.mnt.display()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(owner(&m.s("sg/f")), (1000, 2000));
    assert_eq!(owner(&m.s("sg/sub")), (1000, 2000));
    let sub = fs::metadata(m.s("sg/sub")).unwrap().mode();
    assert_ne!(sub & libc::S_ISGID, 0, "subdir mode {sub:o} lacks S_ISGID");
    assert_eq!(owner(&m.m("sg/sub")), (101000, 102000));
}

#[test]
fn rename_noreplace_and_exchange() {
    if !prerequisites() {
        return;
    }
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    // Host root must be mapped to create the new names.
    let m = Mounted::new(
        "b:0:0:65536",
        |_| {},
        |src| {
            fs::write(src.join("a"), b"A").unwrap();
            fs::write(src.join("b"), b"B").unwrap();
        },
    );
    let r = renameat_with(CWD, m.m("a"), CWD, m.m("b"), RenameFlags::NOREPLACE);
    assert_eq!(r, Err(rustix::io::Errno::EXIST));
    renameat_with(CWD, m.m("a"), CWD, m.m("b"), RenameFlags::EXCHANGE).unwrap();
    assert_eq!(fs::read(m.s("a")).unwrap(), b"B");
    assert_eq!(fs::read(m.s("b")).unwrap(), b"A");
    renameat_with(CWD, m.m("a"), CWD, m.m("c"), RenameFlags::NOREPLACE).unwrap();
    assert!(!m.s("a").exists());
    assert_eq!(fs::read(m.m("c")).unwrap(), b"B");
}

#[test]
fn hard_links_are_one_inode() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        "b:0:0:65536",
        |_| {},
        |src| {
            fs::write(src.join("a"), b"x").unwrap();
            fs::hard_link(src.join("a"), src.join("b")).unwrap();
        },
    );
    let a = fs::metadata(m.m("a")).unwrap();
    let b = fs::metadata(m.m("b")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    fs::hard_link(m.m("a"), m.m("c")).unwrap();
    let c = fs::metadata(m.m("c")).unwrap();
    assert_eq!(c.ino(), a.ino());
    assert_eq!(fs::metadata(m.m("a")).unwrap().nlink(), 3);
    assert_eq!(
        fs::metadata(m.s("c")).unwrap().ino(),
        fs::metadata(m.s("a")).unwrap().ino()
    );
    fs::remove_file(m.m("b")).unwrap();
    assert_eq!(fs::metadata(m.m("c")).unwrap().nlink(), 2);
}

#[test]
fn chown_h_changes_the_link_not_its_target() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        MAP,
        |_| {},
        |src| {
            fs::write(src.join("t"), b"x").unwrap();
            symlink("t", src.join("l")).unwrap();
        },
    );
    assert!(
        fs::symlink_metadata(m.m("l"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    std::os::unix::fs::lchown(m.m("l"), Some(100003), Some(100004)).unwrap();
    assert_eq!(owner(&m.s("l")), (3, 4));
    assert_eq!(owner(&m.s("t")), (0, 0));
}

#[test]
fn device_nodes_need_the_dev_option() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new("b:0:0:4294967295", |_| {}, |_| {});
    let r = rustix::fs::mknodat(
        rustix::fs::CWD,
        m.m("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    );
    assert_eq!(r, Err(rustix::io::Errno::PERM));
    assert!(!m.s("null").exists());
    // A whiteout (char 0:0) is not a device: allowed, as on any filesystem.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        m.m("wh"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o000),
        0,
    )
    .unwrap();
    assert_eq!(fs::metadata(m.s("wh")).unwrap().rdev(), 0);

    let m = Mounted::new("b:0:0:4294967295", |o| o.flags.dev = true, |_| {});
    rustix::fs::mknodat(
        rustix::fs::CWD,
        m.m("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let md = fs::metadata(m.s("null")).unwrap();
    assert_eq!(md.rdev(), fs::metadata(m.m("null")).unwrap().rdev());
    assert_eq!(rustix::fs::major(md.rdev()), 1);
    assert_eq!(rustix::fs::minor(md.rdev()), 3);
}

#[test]
fn directory_replaced_by_symlink_to_outside_touches_nothing_outside() {
    if !prerequisites() {
        return;
    }
    // A long cache timeout keeps the kernel using the directory it looked up.
    let m = Mounted::new(
        MAP,
        |o| o.attr_timeout = Duration::from_secs(60),
        |src| {
            fs::create_dir(src.join("d")).unwrap();
            fs::write(src.join("d/f"), b"inside").unwrap();
            std::os::unix::fs::chown(src.join("d"), Some(1000), Some(1000)).unwrap();
            std::os::unix::fs::chown(src.join("d/f"), Some(1000), Some(1000)).unwrap();
        },
    );
    fs::write(m.outside.join("f"), b"outside").unwrap();
    let before = fs::metadata(m.outside.join("f")).unwrap();
    // Look up and open through the mount, then swap the directory for a symlink.
    assert_eq!(fs::read(m.m("d/f")).unwrap(), b"inside");
    let mut held = fs::OpenOptions::new().write(true).open(m.m("d/f")).unwrap();
    fs::rename(m.s("d"), m.s("moved")).unwrap();
    symlink(&m.outside, m.s("d")).unwrap();

    let out = sh_as(
        101000,
        &format!(
            "cd {mnt} && touch d/new; mkdir d/newdir; echo evil > d/f; chmod 777 d/f; chown 101001 d/f",
            mnt = m.mnt.display()
        ),
    );
    drop(out);
    held.write_all(b"through held fd").unwrap();
    drop(held);
    let _ = std::os::unix::fs::chown(m.m("d"), Some(100001), Some(100001));

    let mut outside: Vec<_> = fs::read_dir(&m.outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    outside.sort();
    assert_eq!(outside, [OsStr::new("f")]);
    let after = fs::metadata(m.outside.join("f")).unwrap();
    assert_eq!(fs::read(m.outside.join("f")).unwrap(), b"outside");
    assert_eq!(
        (after.mode(), after.uid(), after.gid(), after.mtime()),
        (before.mode(), before.uid(), before.gid(), before.mtime())
    );
    let o = fs::metadata(&m.outside).unwrap();
    assert_eq!((o.uid(), o.gid()), (0, 0));
}

#[test]
fn truncate_chmod_utimens_and_xattrs() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        MAP,
        |_| {},
        |src| {
            fs::write(src.join("f"), b"0123456789").unwrap();
            std::os::unix::fs::chown(src.join("f"), Some(1000), Some(1000)).unwrap();
        },
    );
    let out = sh_as(
        101000,
        &format!(
            "cd {} && truncate -s 4 f && chmod 640 f && touch -m -d @1000000000 f",
            m.mnt.display()
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = fs::metadata(m.s("f")).unwrap();
    assert_eq!(md.len(), 4);
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!(md.mtime(), 1_000_000_000);

    rustix::fs::setxattr(m.m("f"), "user.k", b"v1", rustix::fs::XattrFlags::CREATE).unwrap();
    let mut buf = [0u8; 16];
    let n = rustix::fs::getxattr(m.s("f"), "user.k", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"v1");
    let n = rustix::fs::getxattr(m.m("f"), "user.k", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"v1");
    assert_eq!(
        rustix::fs::getxattr(m.m("f"), "user.k", &mut [0u8; 1][..]),
        Err(rustix::io::Errno::RANGE)
    );
    rustix::fs::removexattr(m.m("f"), "user.k").unwrap();
    assert_eq!(
        rustix::fs::getxattr(m.s("f"), "user.k", &mut buf[..]),
        Err(rustix::io::Errno::NODATA)
    );
}

/// ctime in nanoseconds, as `stat` shows it.
fn ctime_ns(p: &Path) -> i128 {
    let md = fs::symlink_metadata(p).unwrap();
    i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec())
}

/// `chown(path, -1, -1)` changes nothing but ctime, on ext4 and through an idmapped mount;
/// through the FUSE mount it must too (the kernel sends an empty SETATTR).
#[test]
fn chown_to_the_same_owner_updates_ctime() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        MAP,
        |_| {},
        |src| {
            fs::write(src.join("f"), b"x").unwrap();
            fs::create_dir(src.join("d")).unwrap();
            symlink("f", src.join("l")).unwrap();
        },
    );
    for name in ["f", "d", "l"] {
        let before = (ctime_ns(&m.m(name)), ctime_ns(&m.s(name)));
        // ext4 stamps ctime from the coarse clock (one jiffy).
        std::thread::sleep(Duration::from_millis(20));
        std::os::unix::fs::lchown(m.m(name), None, None).unwrap();
        let after = (ctime_ns(&m.m(name)), ctime_ns(&m.s(name)));
        assert!(after.1 > before.1, "{name}: ctime on disk not updated");
        assert_eq!(
            after.0, after.1,
            "{name}: ctime through the mount is not the disk's"
        );
    }
}

#[test]
fn data_round_trips_with_and_without_passthrough() {
    if !prerequisites() {
        return;
    }
    for passthrough in [true, false] {
        let m = Mounted::new(
            MAP,
            |o| o.passthrough = passthrough,
            |src| {
                std::os::unix::fs::chown(src, Some(1000), Some(1000)).unwrap();
            },
        );
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let out = sh_as(
            101000,
            &format!("head -c 3000000 /dev/zero > {}/z", m.mnt.display()),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Root cannot create here (unmapped), but may write an existing file.
        fs::write(m.m("z"), &data).unwrap();
        assert_eq!(
            fs::read(m.s("z")).unwrap(),
            data,
            "passthrough={passthrough}"
        );
        assert_eq!(
            fs::read(m.m("z")).unwrap(),
            data,
            "passthrough={passthrough}"
        );
    }
}

#[test]
fn forgotten_inodes_close_their_fds() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        "b:0:0:65536",
        |_| {},
        |src| {
            for i in 0..2000 {
                fs::write(src.join(format!("f{i}")), b"").unwrap();
            }
        },
    );
    // Only fds of this mount's files: other tests in this process mount their own. (The
    // daemon's fds are on a private clone of the source's mount, whose paths do not show
    // the source's.)
    let ours: std::collections::HashSet<(u64, u64)> = (0..2000)
        .map(|i| {
            let md = fs::metadata(m.s(&format!("f{i}"))).unwrap();
            (md.dev(), md.ino())
        })
        .collect();
    let count_fds = || {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| fs::metadata(e.ok()?.path()).ok())
            .filter(|md| ours.contains(&(md.dev(), md.ino())))
            .count()
    };
    let before = count_fds();
    for _ in 0..2 {
        for i in 0..2000 {
            fs::metadata(m.m(&format!("f{i}"))).unwrap();
        }
    }
    let held = count_fds();
    assert!(
        held >= before + 2000,
        "one O_PATH fd per looked-up inode: {before} -> {held}"
    );
    // Deleting through the mount makes the kernel evict the inodes and send FORGET.
    for i in 0..2000 {
        fs::remove_file(m.m(&format!("f{i}"))).unwrap();
    }
    let mut after = count_fds();
    for _ in 0..50 {
        if after + 1900 < held {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        after = count_fds();
    }
    assert!(
        after + 1900 < held,
        "forget should close fds: {held} held, {after} after unlink"
    );
}

#[test]
fn objects_with_unmapped_owner_cannot_be_changed_until_mapped() {
    if !prerequisites() {
        return;
    }
    // As on a kernel idmapped mount: an owner with no outer id (shown as 65534) blocks
    // every change but a chown that maps it, for everyone including host root.
    let m = Mounted::new(
        MAP,
        |_| {},
        |src| {
            for name in ["f", "g"] {
                fs::write(src.join(name), b"x").unwrap();
                std::os::unix::fs::chown(src.join(name), Some(70000), Some(1000)).unwrap();
            }
        },
    );
    assert_eq!(owner(&m.m("f")), (65534, 101000));
    let chmod = fs::set_permissions(m.m("f"), fs::Permissions::from_mode(0o600));
    assert_eq!(errno(chmod), Some(libc::EOVERFLOW));
    assert_eq!(errno(fs::remove_file(m.m("f"))), Some(libc::EOVERFLOW));
    assert_eq!(errno(fs::rename(m.m("f"), m.m("h"))), Some(libc::EOVERFLOW));
    assert_eq!(errno(fs::rename(m.m("g"), m.m("f"))), Some(libc::EOVERFLOW));
    // The kernel sees no owner at all (INVALID_UID), so even host root's DAC override does
    // not apply: EACCES, exactly as on a kernel idmapped mount.
    assert_eq!(
        errno(
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(m.m("f"))
        ),
        Some(libc::EACCES)
    );
    assert_eq!(
        rustix::fs::setxattr(m.m("f"), "user.k", b"v", rustix::fs::XattrFlags::empty()),
        Err(rustix::io::Errno::PERM)
    );
    assert_eq!(fs::read(m.s("f")).unwrap(), b"x");
    assert_eq!(fs::metadata(m.s("f")).unwrap().mode() & 0o7777, 0o644);
    std::os::unix::fs::chown(m.m("f"), Some(100005), None).unwrap();
    assert_eq!(owner(&m.s("f")), (5, 1000));
    fs::remove_file(m.m("f")).unwrap();
    assert!(!m.s("f").exists());
}

#[test]
fn past_the_fd_budget_inodes_work_through_file_handles() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        "b:0:0:65536",
        |o| o.max_inode_fds = 8,
        |src| {
            for i in 0..50 {
                fs::create_dir(src.join(format!("d{i}"))).unwrap();
                fs::write(src.join(format!("d{i}/f")), format!("{i}")).unwrap();
            }
        },
    );
    for i in 0..50 {
        assert_eq!(
            fs::read_to_string(m.m(&format!("d{i}/f"))).unwrap(),
            format!("{i}")
        );
        std::os::unix::fs::chown(m.m(&format!("d{i}/f")), Some(7), Some(8)).unwrap();
        fs::write(m.m(&format!("d{i}/new")), b"n").unwrap();
        fs::rename(m.m(&format!("d{i}/new")), m.m(&format!("d{i}/renamed"))).unwrap();
    }
    for i in 0..50 {
        assert_eq!(owner(&m.s(&format!("d{i}/f"))), (7, 8));
        assert_eq!(fs::read(m.s(&format!("d{i}/renamed"))).unwrap(), b"n");
    }
    // An unlinked but open file still answers fstat through its open handle.
    let f = fs::File::open(m.m("d49/f")).unwrap();
    fs::remove_file(m.m("d49/f")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 2);
}

#[test]
fn mount_flags_and_zero_timeout() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        MAP,
        |o| {
            o.flags.read_only = true;
            o.flags.exec = false;
            o.attr_timeout = Duration::ZERO;
        },
        |src| fs::write(src.join("f"), b"one").unwrap(),
    );
    let opts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = opts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(m.mnt.to_str().unwrap()))
        .unwrap()
        .to_owned();
    assert!(
        line.contains(" ro,") && line.contains("nosuid") && line.contains("nodev"),
        "{line}"
    );
    assert!(line.contains("noexec"), "{line}");
    assert!(line.contains(" - fuse.shiftfs "), "{line}");
    assert!(
        line.contains(m.src.to_str().unwrap()),
        "fsname is the source: {line}"
    );
    assert_eq!(errno(fs::write(m.m("f"), b"x")), Some(libc::EROFS));
    // With no caching, a change made on the source side shows at once.
    assert_eq!(fs::read(m.m("f")).unwrap(), b"one");
    fs::write(m.s("f"), b"two!").unwrap();
    assert_eq!(fs::read(m.m("f")).unwrap(), b"two!");
    fs::write(m.s("g"), b"").unwrap();
    assert!(m.m("g").exists());
}

#[test]
fn create_never_opens_a_file_that_appeared_behind_a_cached_miss() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        MAP,
        |o| o.attr_timeout = Duration::from_secs(60),
        |src| fs::create_dir(src.join("d")).map(|_| ()).unwrap(),
    );
    fs::set_permissions(m.s("d"), fs::Permissions::from_mode(0o777)).unwrap();
    // The kernel caches the miss for the entry timeout.
    assert!(!m.m("d/x").exists());
    // Another user makes the file behind the mount's back.
    fs::write(m.s("d/x"), b"secret").unwrap();
    std::os::unix::fs::chown(m.s("d/x"), Some(2000), Some(2000)).unwrap();
    fs::set_permissions(m.s("d/x"), fs::Permissions::from_mode(0o600)).unwrap();

    let out = sh_as(101000, &format!("echo pwned >> {}", m.m("d/x").display()));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(m.s("d/x")).unwrap(), b"secret");
    // Its owner may open it by the same path.
    let out = sh_as(102000, &format!("echo more >> {}", m.m("d/x").display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(m.s("d/x")).unwrap(), b"secretmore\n");
}

#[test]
fn unlink_and_rename_never_hit_a_file_swapped_in_since_the_lookup() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        MAP,
        |o| o.attr_timeout = Duration::from_secs(60),
        |src| {
            let d = src.join("sticky");
            fs::create_dir(&d).unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).unwrap();
            for n in ["mine", "other"] {
                fs::write(d.join(n), b"mine").unwrap();
                std::os::unix::fs::chown(d.join(n), Some(1000), Some(1000)).unwrap();
            }
        },
    );
    // The kernel checks the sticky bit against the files it looked up (owned by the caller)...
    assert!(m.m("sticky/mine").exists() && m.m("sticky/other").exists());
    // ...then the names are given to files of another user behind the mount's back.
    for n in ["mine", "other"] {
        fs::remove_file(m.s(&format!("sticky/{n}"))).unwrap();
        fs::write(m.s(&format!("sticky/{n}")), b"theirs").unwrap();
        std::os::unix::fs::chown(m.s(&format!("sticky/{n}")), Some(2000), Some(2000)).unwrap();
    }
    let out = sh_as(
        101000,
        &format!("cd {}/sticky && rm mine; mv other moved", m.mnt.display()),
    );
    assert!(!out.status.success());
    assert_eq!(fs::read(m.s("sticky/mine")).unwrap(), b"theirs");
    assert_eq!(fs::read(m.s("sticky/other")).unwrap(), b"theirs");
    assert!(!m.s("sticky/moved").exists());
}

#[test]
fn truncating_a_running_program_is_refused_and_leaves_it_intact() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new("b:0:0:65536", |_| {}, |_| {});
    fs::copy("/bin/sleep", m.m("prog")).unwrap();
    fs::set_permissions(m.m("prog"), fs::Permissions::from_mode(0o755)).unwrap();
    let size = fs::metadata(m.s("prog")).unwrap().len();
    let mut child = Command::new(m.m("prog")).arg("10").spawn().unwrap();
    let r = rustix::fs::open(
        m.m("prog"),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::TRUNC,
        rustix::fs::Mode::empty(),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.err(), Some(rustix::io::Errno::TXTBSY));
    assert_eq!(
        fs::metadata(m.s("prog")).unwrap().len(),
        size,
        "program emptied on disk"
    );
}

#[test]
fn seek_data_hole_copy_range_fallocate_and_locks() {
    if !prerequisites() {
        return;
    }
    use std::os::fd::AsFd;
    let m = Mounted::new("b:0:0:65536", |_| {}, |_| {});
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.m("sparse"))
        .unwrap();
    rustix::io::pwrite(&f, &[7u8; 4096], 1 << 20).unwrap();
    assert_eq!(
        rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0)).unwrap(),
        1 << 20
    );
    assert_eq!(
        rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(0)).unwrap(),
        0
    );
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::KEEP_SIZE, 0, 8192).unwrap();
    assert_eq!(f.metadata().unwrap().len(), (1 << 20) + 4096);

    let g = fs::File::create(m.m("copy")).unwrap();
    let (mut oi, mut oo) = (1u64 << 20, 0u64);
    let n = rustix::fs::copy_file_range(&f, Some(&mut oi), &g, Some(&mut oo), 4096).unwrap();
    assert_eq!(n, 4096);
    assert_eq!(fs::read(m.s("copy")).unwrap(), vec![7u8; 4096]);

    // flock and POSIX locks conflict between open files of the mount (kernel-local locks).
    let other = fs::File::open(m.m("sparse")).unwrap();
    rustix::fs::flock(f.as_fd(), rustix::fs::FlockOperation::LockExclusive).unwrap();
    assert_eq!(
        rustix::fs::flock(
            other.as_fd(),
            rustix::fs::FlockOperation::NonBlockingLockShared
        ),
        Err(rustix::io::Errno::WOULDBLOCK)
    );
    rustix::fs::flock(f.as_fd(), rustix::fs::FlockOperation::Unlock).unwrap();
    rustix::fs::flock(
        other.as_fd(),
        rustix::fs::FlockOperation::NonBlockingLockShared,
    )
    .unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn cached_listings_follow_source_changes_within_the_timeout() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        "b:0:0:65536",
        |o| o.attr_timeout = Duration::from_millis(300),
        |src| fs::write(src.join("a"), b"").unwrap(),
    );
    assert_eq!(names(&m.mnt), ["a"]);
    // Through the mount: seen at once.
    fs::write(m.m("b"), b"").unwrap();
    assert_eq!(names(&m.mnt), ["a", "b"]);
    // Behind its back: seen once the timeout has passed.
    fs::write(m.s("c"), b"").unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(names(&m.mnt), ["a", "b", "c"]);
}

/// Listings are read without OPENDIR (handle 0), many replies per directory, and cached by
/// the kernel across opens: complete, and changed at once by changes through the mount.
#[test]
fn long_listings_without_opendir_are_complete_and_follow_changes() {
    if !prerequisites() {
        return;
    }
    let long = |i: usize| format!("{i:05}-{}", "n".repeat(120));
    let m = Mounted::new(
        "b:0:0:65536",
        |_| {},
        |src| {
            for i in 0..2000 {
                fs::write(src.join(long(i)), b"").unwrap();
            }
        },
    );
    let mut want: Vec<_> = (0..2000).map(long).collect();
    want.sort();
    assert_eq!(names(&m.mnt), want);
    assert_eq!(names(&m.mnt), want, "second listing (kernel cache)");
    fs::remove_file(m.m(&long(7))).unwrap();
    fs::write(m.m("new"), b"").unwrap();
    want.retain(|n| *n != long(7));
    want.push("new".into());
    want.sort();
    assert_eq!(names(&m.mnt), want);
    assert_eq!(names(&m.src), want);
}

/// Files are read through the page cache or passthrough and written through passthrough,
/// which bypasses the FUSE page cache, also through a shared mapping that outlives its fd:
/// every new open must still read every write.
#[test]
fn reads_see_writes_through_a_mapping_that_outlived_its_fd() {
    if !prerequisites() || !prerequisite(Path::new("/usr/bin/python3").exists(), "python3") {
        return;
    }
    let m = Mounted::new(
        "b:0:0:65536",
        |_| {},
        |src| fs::write(src.join("f"), vec![b'0'; 4096]).unwrap(),
    );
    let script = r#"
import mmap, os, sys
path = sys.argv[1]
def read():
    with open(path, "rb") as f:
        return f.read(1)
fd = os.open(path, os.O_RDWR)
mm = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
os.close(fd)
for c in b"abc":
    mm[0] = c
    mm.flush()
    got = read()
    if got != bytes([c]):
        sys.exit(f"wrote {chr(c)!r} through the mapping, a new open reads {got!r}")
"#;
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(m.m("f"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn writes_by_others_clear_setuid_and_setgid() {
    if !prerequisites() {
        return;
    }
    for passthrough in [true, false] {
        let m = Mounted::new(
            MAP,
            |o| o.passthrough = passthrough,
            |src| {
                for n in ["suid", "sgid"] {
                    fs::write(src.join(n), b"#!/bin/sh\n").unwrap();
                    std::os::unix::fs::chown(src.join(n), Some(0), Some(2000)).unwrap();
                }
                fs::set_permissions(src.join("suid"), fs::Permissions::from_mode(0o4777)).unwrap();
                fs::set_permissions(src.join("sgid"), fs::Permissions::from_mode(0o2777)).unwrap();
            },
        );
        let out = sh_as(
            101000,
            &format!("cd {} && echo x >> suid && echo x >> sgid", m.mnt.display()),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for n in ["suid", "sgid"] {
            let mode = fs::metadata(m.s(n)).unwrap().mode() & 0o7777;
            assert_eq!(mode, 0o777, "{n} passthrough={passthrough}: {mode:o}");
        }
    }
}

#[test]
fn unlinked_open_files_stay_usable_past_the_fd_budget() {
    if !prerequisites() {
        return;
    }
    use std::io::{Read, Seek};
    let m = Mounted::new(
        "b:0:0:65536",
        |o| o.max_inode_fds = 4,
        |src| {
            for i in 0..20 {
                fs::write(src.join(format!("f{i}")), b"data").unwrap();
            }
        },
    );
    let mut files = vec![];
    for i in 0..20 {
        files.push(
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(m.m(&format!("f{i}")))
                .unwrap(),
        );
        fs::remove_file(m.m(&format!("f{i}"))).unwrap();
    }
    for f in &mut files {
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .unwrap();
        assert_eq!(f.metadata().unwrap().mode() & 0o777, 0o600);
        f.seek(io::SeekFrom::End(0)).unwrap();
        f.write_all(b"more").unwrap();
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "datamore");
    }
}

/// Detaches a mount made by a test when dropped, also when the test fails.
struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH) {
            eprintln!("cannot unmount {}: {e}", self.0.display());
        }
    }
}

/// `SRC/ro` becomes a read-only bind mount of `SRC/rw`, which holds `f`.
fn read_only_bind(src: &Path) {
    fs::create_dir(src.join("rw")).unwrap();
    fs::create_dir(src.join("ro")).unwrap();
    fs::write(src.join("rw/f"), b"original").unwrap();
    rustix::mount::mount_bind(src.join("rw"), src.join("ro")).unwrap();
    rustix::mount::mount_remount(
        src.join("ro"),
        rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY,
        "",
    )
    .unwrap();
}

#[test]
fn read_only_submount_stays_read_only_through_the_mount() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new("b:0:0:65536", |o| o.recursive = true, read_only_bind);
    let _ro = Detach(m.s("ro"));
    // Known through the read-write path first, so a shared inode would be the rw one.
    assert_eq!(fs::read(m.m("rw/f")).unwrap(), b"original");
    let rw_ino = fs::metadata(m.m("rw/f")).unwrap().ino();
    assert_eq!(fs::read(m.m("ro/f")).unwrap(), b"original");

    let erofs = Some(libc::EROFS);
    assert_eq!(errno(fs::write(m.m("ro/f"), b"x")), erofs, "write");
    assert_eq!(
        errno(fs::OpenOptions::new().append(true).open(m.m("ro/f"))),
        erofs
    );
    assert_eq!(errno(fs::write(m.m("ro/new"), b"x")), erofs, "create");
    assert_eq!(errno(fs::create_dir(m.m("ro/d"))), erofs, "mkdir");
    assert_eq!(errno(symlink("f", m.m("ro/l"))), erofs, "symlink");
    assert_eq!(
        errno(fs::set_permissions(
            m.m("ro/f"),
            fs::Permissions::from_mode(0o600)
        )),
        erofs,
        "chmod"
    );
    assert_eq!(
        errno(std::os::unix::fs::chown(m.m("ro/f"), Some(5), None)),
        erofs,
        "chown"
    );
    assert_eq!(
        rustix::fs::utimensat(
            rustix::fs::CWD,
            m.m("ro/f"),
            &rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 1,
                    tv_nsec: 0
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: 1,
                    tv_nsec: 0
                },
            },
            rustix::fs::AtFlags::empty()
        ),
        Err(rustix::io::Errno::ROFS),
        "utimens"
    );
    assert_eq!(
        rustix::fs::setxattr(m.m("ro/f"), "user.k", b"v", rustix::fs::XattrFlags::empty()),
        Err(rustix::io::Errno::ROFS),
        "setxattr"
    );
    assert_eq!(errno(fs::remove_file(m.m("ro/f"))), erofs, "unlink");
    assert_eq!(
        errno(fs::hard_link(m.m("ro/f"), m.m("ro/g"))),
        erofs,
        "link"
    );

    assert_ne!(
        fs::metadata(m.m("ro/f")).unwrap().ino(),
        rw_ino,
        "one file through two mounts is two inodes"
    );
    let on_disk = fs::metadata(m.s("rw/f")).unwrap();
    assert_eq!(fs::read(m.s("rw/f")).unwrap(), b"original");
    assert_eq!(on_disk.mode() & 0o7777, 0o644);
    assert_eq!((on_disk.uid(), on_disk.nlink()), (0, 1));
    assert_eq!(fs::read_dir(m.s("rw")).unwrap().count(), 1);

    // The read-write path is still writable. (The read-only path is another inode to the
    // kernel: it shows the change once its cached attributes time out.)
    fs::write(m.m("rw/f"), b"changed").unwrap();
    assert_eq!(fs::read(m.s("rw/f")).unwrap(), b"changed");
}

#[test]
fn submounts_are_not_crossed_unless_recursive() {
    if !prerequisites() {
        return;
    }
    // As the kernel backend without --recursive: the mount point shows the directory
    // underneath, which is empty here.
    let m = Mounted::new("b:0:0:65536", |_| {}, read_only_bind);
    let _ro = Detach(m.s("ro"));
    assert_eq!(fs::read_dir(m.s("ro")).unwrap().count(), 1);
    assert_eq!(fs::read_dir(m.m("ro")).unwrap().count(), 0);
    assert_eq!(fs::read(m.m("rw/f")).unwrap(), b"original");
}

/// Holds open files (closed when dropped, also when a test fails).
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// As host uid/gid `id`, opens `DIR/f0`, `DIR/f1`, .. (up to `n`) until an open fails and
/// keeps them open; returns "COUNT ERRNO" (errno 0 if all opened) and the holder.
fn hold_open_files(id: u32, dir: &Path, n: usize) -> (String, Holder) {
    let script = format!(
        "import os, sys\n\
         fds = []\n\
         err = 0\n\
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
        .unwrap();
    let out = child.stdout.take().unwrap();
    let holder = Holder(child);
    let mut line = String::new();
    {
        use std::io::{BufRead, BufReader};
        BufReader::new(out).read_line(&mut line).unwrap();
    }
    (line.trim().to_owned(), holder)
}

#[test]
fn one_user_holding_files_open_leaves_the_mount_usable() {
    if !prerequisites() || !prerequisite(Path::new("/usr/bin/python3").exists(), "python3") {
        return;
    }
    // A cap of 40 open files: one caller uid gets 30 of them.
    let m = Mounted::new(
        MAP,
        |o| o.max_open = 40,
        |src| {
            for i in 0..100 {
                fs::write(src.join(format!("f{i}")), format!("{i}")).unwrap();
            }
        },
    );
    let (line, holder) = hold_open_files(101000, &m.mnt, 100);
    assert_eq!(
        line.trim(),
        format!("30 {}", libc::ENFILE),
        "the holder gets ENFILE past its share"
    );
    // Meanwhile another user lists, looks up names not seen yet, creates and reads, and so
    // does host root.
    let d = m.mnt.display();
    let out = sh_as(
        102000,
        &format!(
            "ls {d} | wc -l && stat -c %s {d}/f60 {d}/f61 && touch {d}/touched && cat {d}/f95"
        ),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "100\n2\n2\n95",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(owner(&m.s("touched")), (2000, 2000));
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 101);
    for i in 70..100 {
        assert_eq!(fs::metadata(m.m(&format!("f{i}"))).unwrap().len(), 2);
    }
    assert_eq!(fs::read_to_string(m.m("f99")).unwrap(), "99");
    // Once the holder closes its files, it may open again.
    drop(holder);
    let out = sh_as(
        101000,
        &format!("cat {}/f1 {}/f2", m.mnt.display(), m.mnt.display()),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "12");
}

#[test]
fn copy_file_range_load_does_not_stall_lookups() {
    if !prerequisites() {
        return;
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    const BIG: u64 = 512 << 20;
    const COPIERS: usize = 8;
    // On tmpfs (no disk in the measurement): a sparse source, copied over and over into
    // one destination per copier, so memory stays bounded.
    let m = Mounted::new(
        "b:0:0:65536",
        |_| {},
        |src| {
            rustix::mount::mount(
                "shiftfs-test",
                src,
                "tmpfs",
                rustix::mount::MountFlags::empty(),
                c"size=6g,mode=0777",
            )
            .unwrap();
            fs::File::create(src.join("big"))
                .unwrap()
                .set_len(BIG)
                .unwrap();
        },
    );
    let _tmpfs = Detach(m.src.clone());
    let stop = AtomicBool::new(false);
    let (worst, copied) = std::thread::scope(|s| {
        // Stops the copiers however this closure ends, so the scope can join them.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        let copiers: Vec<_> = (0..COPIERS)
            .map(|i| {
                let (input, output) = (m.m("big"), m.m(&format!("out{i}")));
                let stop = &stop;
                s.spawn(move || {
                    let i = fs::File::open(input).unwrap();
                    let o = fs::File::create(output).unwrap();
                    let started = Instant::now();
                    let mut total = 0u64;
                    while !stop.load(Ordering::Relaxed) && started.elapsed().as_secs() < 30 {
                        let (mut off_in, mut off_out) = (0u64, 0u64);
                        while off_in < BIG && !stop.load(Ordering::Relaxed) {
                            let left = usize::try_from(BIG - off_in).unwrap();
                            let n = rustix::fs::copy_file_range(
                                &i,
                                Some(&mut off_in),
                                &o,
                                Some(&mut off_out),
                                left,
                            )
                            .unwrap();
                            total += n as u64;
                        }
                    }
                    total
                })
            })
            .collect();
        // Let the copies get going, then time lookups of names never seen (each one a
        // request to the daemon) for a few seconds.
        std::thread::sleep(Duration::from_millis(300));
        let mut worst = Duration::ZERO;
        let started = Instant::now();
        let mut n = 0;
        while started.elapsed() < Duration::from_secs(3) {
            let t = Instant::now();
            assert!(!m.m(&format!("absent{n}")).exists());
            worst = worst.max(t.elapsed());
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let copied: u64 = copiers.into_iter().map(|c| c.join().unwrap()).sum();
        (worst, copied)
    });
    eprintln!(
        "worst lookup {worst:?} while {} MiB were copied",
        copied >> 20
    );
    assert!(copied > 0);
    assert!(
        worst < Duration::from_secs(1),
        "a lookup waited {worst:?} behind copy_file_range"
    );
}

#[test]
fn noexec_and_nosuid_submounts_keep_their_flags() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        "b:0:0:65536",
        |o| {
            o.recursive = true;
            o.flags.suid = true;
        },
        |src| {
            fs::create_dir(src.join("rw")).unwrap();
            fs::copy("/bin/true", src.join("rw/true")).unwrap();
            fs::set_permissions(src.join("rw/true"), fs::Permissions::from_mode(0o4755)).unwrap();
            for (dir, flag) in [
                ("nx", rustix::mount::MountFlags::NOEXEC),
                ("ns", rustix::mount::MountFlags::NOSUID),
            ] {
                fs::create_dir(src.join(dir)).unwrap();
                rustix::mount::mount_bind(src.join("rw"), src.join(dir)).unwrap();
                rustix::mount::mount_remount(
                    src.join(dir),
                    rustix::mount::MountFlags::BIND | flag,
                    "",
                )
                .unwrap();
            }
        },
    );
    let _nx = Detach(m.s("nx"));
    let _ns = Detach(m.s("ns"));
    assert!(Command::new(m.m("rw/true")).status().unwrap().success());
    let e = Command::new(m.m("nx/true")).status().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "exec on noexec");
    // Readable as data all the same.
    assert_eq!(
        fs::read(m.m("nx/true")).unwrap(),
        fs::read("/bin/true").unwrap()
    );
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&m.m("rw/true")), 0o4755);
    assert_eq!(mode(&m.m("ns/true")), 0o755, "setuid hidden on nosuid");
    // A chmod there neither sets nor clears the hidden bit.
    fs::set_permissions(m.m("ns/true"), fs::Permissions::from_mode(0o750)).unwrap();
    assert_eq!(mode(&m.s("rw/true")), 0o4750);
}

#[test]
fn a_daemon_at_its_fd_limit_keeps_serving_other_users() {
    if !prerequisites()
        || !prerequisite(Path::new("/usr/bin/python3").exists(), "python3")
        || !common::require_tool("prlimit", "util-linux")
        || !common::require_tool("setpriv", "util-linux")
    {
        return;
    }
    // The issue's case at a small scale: the daemon as `shiftfs mount` runs it, with
    // RLIMIT_NOFILE 256 it cannot raise (no CAP_SYS_RESOURCE), all options by default.
    let dir = common::TestDir::new("fdlimit");
    let (src, mnt) = (dir.dir("src"), dir.dir("mnt"));
    fs::set_permissions(&src, fs::Permissions::from_mode(0o777)).unwrap();
    for i in 0..400 {
        fs::write(src.join(format!("f{i}")), format!("{i}")).unwrap();
    }
    let daemon = Command::new("setpriv")
        .args([
            "--bounding-set=-sys_resource",
            "--",
            "prlimit",
            "--nofile=256:256",
            "--",
        ])
        .arg(common::BIN)
        .args(["mount", "--backend", "fuse", "--foreground", "--map", MAP])
        .arg(&src)
        .arg(&mnt)
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Dropped in reverse: unmount first (the daemon then exits), then reap it.
    let _daemon = common::Children(vec![daemon]);
    let _mount = common::ShiftMount::adopt(&mnt);
    assert!(common::wait_mounted(&mnt, true, Duration::from_secs(20)));

    let (line, holder) = hold_open_files(101000, &mnt, 400);
    let d = mnt.display();
    let out = sh_as(
        102000,
        &format!(
            "ls {d} | wc -l && stat -c %s {d}/f300 {d}/f301 && touch {d}/touched && \
             cat {d}/f399"
        ),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "400\n3\n3\n399",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (count, err) = line.split_once(' ').unwrap();
    assert_eq!(
        err.parse::<i32>().unwrap(),
        libc::ENFILE,
        "the holder is refused, with ENFILE, before the daemon runs out ({count} opened)"
    );
    for i in 350..400 {
        assert_eq!(fs::metadata(mnt.join(format!("f{i}"))).unwrap().len(), 3);
    }
    drop(holder);
}
