//! Real mounts of the FUSE backend, checked the way a user would: owners seen through the
//! mount and on disk, errno of refused operations, what is (not) left behind.
//!
//! Needs root and /dev/fuse; skips without them unless CI=true.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use shiftfs::fuse::{Options, Session};
use shiftfs::idmap::IdMapping;

const MAP: &str = "b:0:100000:65536";

fn prerequisites() -> bool {
    let root = rustix::process::geteuid().is_root();
    let fuse = Path::new("/dev/fuse").exists();
    if root && fuse {
        return true;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "CI=true: these tests need root and /dev/fuse (root={root}, /dev/fuse={fuse})"
    );
    eprintln!("skipping: needs root and /dev/fuse");
    false
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
        tweak(&mut opts);
        let fd = rustix::fs::open(
            &src,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let session = shiftfs::fuse::mount(fd, &mnt, opts).unwrap();
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
    // Host root is unmapped as well.
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
    let m = Mounted::new(
        MAP,
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
        MAP,
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
fn many_lookups_do_not_leak_fds() {
    if !prerequisites() {
        return;
    }
    let m = Mounted::new(
        MAP,
        |_| {},
        |src| {
            for i in 0..2000 {
                fs::write(src.join(format!("f{i}")), b"").unwrap();
            }
        },
    );
    let count_fds = || fs::read_dir("/proc/self/fd").unwrap().count();
    for _ in 0..2 {
        assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 2000);
        for i in (0..2000).step_by(7) {
            fs::metadata(m.m(&format!("f{i}"))).unwrap();
        }
    }
    let held = count_fds();
    // At least the ~286 files stat-ed by name are remembered, each by an O_PATH fd.
    assert!(held > 286, "{held} fds");
    // Make the kernel forget: drop its dentry and inode caches.
    fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = count_fds();
    assert!(
        after + 250 < held,
        "forget should close fds: {held} before, {after} after drop_caches"
    );
}
