//! The kernel idmapped-mount backend, mounted for real (needs root; skipped otherwise,
//! unless CI=true, where a missing prerequisite fails the test).

mod common;

use std::fs;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};

use common::*;
use shiftfs::backend::kernel;
use shiftfs::idmap::IdMapping;
use shiftfs::mountinfo;
use shiftfs::options::MountFlags;

/// Tests run one at a time: the leak check counts this process's children and fds.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A test directory with empty `src` and `tgt` below it; None when the test is skipped.
fn dirs(name: &str) -> Option<(TestDir, PathBuf, PathBuf)> {
    if !require(Backend::Kernel) {
        return None;
    }
    let dir = TestDir::new(name);
    let (src, tgt) = (dir.dir("src"), dir.dir("tgt"));
    Some((dir, src, tgt))
}

fn map() -> IdMapping {
    IdMapping::parse("b:0:100000:65536").expect("map")
}

fn shifted_mount(src: &Path, tgt: &Path, flags: MountFlags) -> Detach {
    kernel::mount(src, tgt, &map(), flags, false).expect("kernel::mount");
    Detach(tgt.to_path_buf())
}

/// `PROGRAM ARGS...` as host uid and gid `id`.
fn run_as(id: u32, program: &str, args: &[&Path]) -> Out {
    run(&mut cmd_as(id, id, program, args))
}

/// Every owner-id behaviour a user would check, on one source directory.
fn check_shifting(src: &Path, tgt: &Path) {
    for (name, id) in [("root", 0), ("user", 1000), ("unmapped", 70000)] {
        fs::write(src.join(name), name).expect("write fixture");
        chown(src.join(name), Some(id), Some(id)).expect("chown fixture");
    }
    mkdir(&src.join("home"), 0o755, 0, 0);
    chown(src.join("home"), Some(1000), Some(1000)).expect("chown home");
    mkdir(&src.join("open"), 0o777, 0, 0);

    let _m = shifted_mount(src, tgt, MountFlags::default());

    assert_eq!(lstat_ids(tgt.join("root")), (100000, 100000));
    assert_eq!(lstat_ids(tgt.join("user")), (101000, 101000));
    assert_eq!(lstat_ids(tgt.join("unmapped")), (65534, 65534));
    assert_eq!(fs::read(tgt.join("user")).expect("read"), b"user");

    // A container process (host uid 101000) creates: stored as its inner id 1000.
    run_as(101000, "touch", &[&tgt.join("home/new")]).assert_ok();
    assert_eq!(lstat_ids(tgt.join("home/new")), (101000, 101000));
    assert_eq!(lstat_ids(src.join("home/new")), (1000, 1000));

    // Host ids outside the map cannot create: EOVERFLOW, nothing written.
    let err = fs::File::create(tgt.join("open/by-root")).expect_err("root is unmapped");
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");
    assert!(!src.join("open/by-root").exists());
    let out = run_as(5000, "touch", &[&tgt.join("open/by-5000")]);
    out.assert_fails();
    assert!(out.stderr.contains("Value too large"), "{out}");
    assert!(!src.join("open/by-5000").exists());

    // chown through the mount stores the inner id; an unmapped target id is refused.
    chown(tgt.join("root"), Some(102000), Some(102000)).expect("chown 102000");
    assert_eq!(lstat_ids(src.join("root")), (2000, 2000));
    assert_eq!(lstat_ids(tgt.join("root")), (102000, 102000));
    let err = chown(tgt.join("root"), Some(5000), None).expect_err("5000 is unmapped");
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");
    assert_eq!(lstat_ids(src.join("root")), (2000, 2000));

    // The kernel reports the map back (statmount, Linux >= 6.15); the source has none.
    assert_eq!(
        kernel::mount_idmapping(tgt).expect("statmount"),
        Some(map())
    );
    assert_eq!(kernel::mount_idmapping(src).expect("statmount"), None);

    // Default flags: nosuid,nodev, idmapped, writable.
    let info = mountinfo::mount_of(tgt, Path::new(mountinfo::SELF_MOUNTINFO)).expect("mountinfo");
    assert_eq!(info.mount_point, tgt);
    for opt in ["rw", "nosuid", "nodev", "idmapped"] {
        assert!(
            info.has_option(opt),
            "{opt} missing in {:?}",
            info.mount_options
        );
    }
    assert!(!info.has_option("noexec"), "{:?}", info.mount_options);
}

#[test]
fn shifts_ids_on_ext4() {
    let _s = serial();
    let Some((base, src, tgt)) = dirs("shifts-ids-on-ext4") else {
        return;
    };
    if !require_fstype(base.path(), "ext4") {
        return;
    }
    check_shifting(&src, &tgt);
}

#[test]
fn shifts_ids_on_tmpfs() {
    let _s = serial();
    let Some((_dir, src, tgt)) = dirs("shifts-ids-on-tmpfs") else {
        return;
    };
    let _tmpfs = mount_tmpfs(&src);
    assert_eq!(fstype_of(&src), "tmpfs");
    check_shifting(&src, &tgt);
}

#[test]
fn read_only_mount_refuses_writes() {
    let _s = serial();
    let Some((_dir, src, tgt)) = dirs("read-only-mount-refuses-writes") else {
        return;
    };
    fs::write(src.join("f"), "x").expect("fixture");
    let flags = MountFlags {
        read_only: true,
        exec: false,
        ..MountFlags::default()
    };
    let _m = shifted_mount(&src, &tgt, flags);
    let out = run_as(100000, "touch", &[&tgt.join("new")]);
    out.assert_fails();
    assert!(out.stderr.contains("Read-only file system"), "{out}");
    let err = fs::OpenOptions::new()
        .write(true)
        .open(tgt.join("f"))
        .expect_err("ro");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let info = mountinfo::mount_of(&tgt, Path::new(mountinfo::SELF_MOUNTINFO)).expect("mountinfo");
    for opt in ["ro", "nosuid", "nodev", "noexec", "idmapped"] {
        assert!(
            info.has_option(opt),
            "{opt} missing in {:?}",
            info.mount_options
        );
    }
}

#[test]
fn recursive_carries_submounts() {
    let _s = serial();
    let Some((base, src, tgt)) = dirs("recursive-carries-submounts") else {
        return;
    };
    let tgt2 = base.dir("tgt2");
    mkdir(&src.join("sub"), 0o755, 0, 0);
    let _tmpfs = mount_tmpfs(&src.join("sub"));
    fs::write(src.join("sub/f"), "x").expect("fixture");
    chown(src.join("sub/f"), Some(1000), Some(1000)).expect("chown");

    kernel::mount(&src, &tgt, &map(), MountFlags::default(), true).expect("recursive mount");
    let _m = Detach(tgt.clone());
    assert_eq!(lstat_ids(tgt.join("sub/f")), (101000, 101000));
    let sub = mountinfo::mount_of(&tgt.join("sub"), Path::new(mountinfo::SELF_MOUNTINFO))
        .expect("mountinfo");
    assert_eq!(sub.fstype, "tmpfs");
    assert!(
        sub.has_option("idmapped") && sub.has_option("nosuid"),
        "{sub:?}"
    );

    let _m2 = shifted_mount(&src, &tgt2, MountFlags::default());
    assert!(
        !tgt2.join("sub/f").exists(),
        "non-recursive mount shows the submount"
    );
}

#[test]
fn probe_says_yes_for_ext4_and_tmpfs() {
    let _s = serial();
    if !require(Backend::Kernel) {
        return;
    }
    let base = TestDir::new("probe-says-yes-for-ext4-and-tmpfs");
    if !require_fstype(base.path(), "ext4") {
        return;
    }
    let p = kernel::probe(base.path());
    assert!(p.supported, "{p:?}");
    assert_eq!(p.fstype, "ext4");
    assert!(p.reason.contains("ext4"), "{p:?}");
    assert_eq!(p.advice, None);

    let src = base.path().join("t");
    mkdir(&src, 0o755, 0, 0);
    let _tmpfs = mount_tmpfs(&src);
    let p = kernel::probe(&src);
    assert!(p.supported, "{p:?}");
    assert_eq!(p.fstype, "tmpfs");
    // The probe never attaches anything.
    let mounts = mountinfo::read(Path::new(mountinfo::SELF_MOUNTINFO)).expect("mountinfo");
    assert!(
        !mounts
            .iter()
            .any(|m| m.has_option("idmapped") && m.mount_point.starts_with(base.path()))
    );
}

#[test]
fn fuse_source_is_refused() {
    let _s = serial();
    if !require_bindfs() {
        return;
    }
    let Some((base, src, tgt)) = dirs("fuse-source-is-refused") else {
        return;
    };
    let fuse = base.dir("fuse");
    let _fuse = Bindfs::start(&src, &fuse);
    // bindfs mounting as root shows as plain `fuse` (as `fuse.bindfs` through fusermount).
    let fstype = fstype_of(&fuse);
    assert!(fstype.starts_with("fuse"), "{fstype}");

    let p = kernel::probe(&fuse);
    assert!(!p.supported, "{p:?}");
    assert_eq!(p.fstype, fstype);
    assert!(p.reason.contains(&fstype), "{p:?}");
    assert!(
        p.advice
            .as_deref()
            .is_some_and(|a| a.contains("--backend fuse")),
        "{p:?}"
    );

    let err = kernel::mount(&fuse, &tgt, &map(), MountFlags::default(), false)
        .expect_err("FUSE has no idmapped mounts");
    assert!(matches!(err, kernel::Error::Unsupported { .. }), "{err:?}");
    assert_eq!(err.errno(), rustix::io::Errno::INVAL);
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("filesystem {fstype} on")) && msg.contains("--backend fuse"),
        "{msg}"
    );
    assert_ne!(
        mountinfo::mount_id(&tgt).ok(),
        mountinfo::mount_id(&fuse).ok()
    );
}

#[test]
fn errors_name_the_bad_path() {
    let _s = serial();
    if !require(Backend::Kernel) {
        return;
    }
    let base = TestDir::new("errors-name-the-bad-path");
    let missing = base.path().join("missing");
    let err = kernel::mount(&missing, base.path(), &map(), MountFlags::default(), false)
        .expect_err("missing source");
    assert_eq!(err.errno(), rustix::io::Errno::NOENT);
    assert!(
        err.to_string().contains(&*missing.to_string_lossy()),
        "{err}"
    );

    let src = base.path().join("src");
    mkdir(&src, 0o755, 0, 0);
    let err = kernel::mount(&src, &missing, &map(), MountFlags::default(), false)
        .expect_err("missing target");
    assert!(matches!(err, kernel::Error::Resolve(_)), "{err:?}");
    assert!(
        err.to_string().contains(&*missing.to_string_lossy()),
        "{err}"
    );

    let p = kernel::probe(&missing);
    assert!(!p.supported);
}

/// Kernel mounts and probes, from the library and through the `shiftfs` binary (mount, list,
/// umount, doctor, mount(8)), leave no process and no user namespace fd behind. This process
/// is the subreaper of what the binary starts, so a helper that outlives its parent becomes
/// our child and is seen here.
#[test]
fn leaves_no_process_or_namespace_fd() {
    let _s = serial();
    let Some((base, src, tgt)) = dirs("leaves-no-process") else {
        return;
    };
    become_subreaper();
    // Zombies of processes that earlier tests waited for by polling are reaped first.
    reap_zombies();
    assert_eq!(children(), vec![], "no children before the test");
    fs::write(src.join("f"), "x").expect("fixture");
    for _ in 0..5 {
        let _m = shifted_mount(&src, &tgt, MountFlags::default());
        assert!(kernel::probe(&src).supported);
    }

    let m = ShiftMount::new(Backend::Kernel, MAP, &src, &tgt);
    assert_eq!(lstat_ids(tgt.join("f")), (100000, 100000));
    run(&mut shiftfs(["list"])).assert_ok();
    m.unmount();
    run(&mut shiftfs([
        std::ffi::OsStr::new("doctor"),
        src.as_os_str(),
    ]))
    .assert_ok();
    if install_mount_helper() {
        let guard = ShiftMount::adopt(&tgt);
        run(std::process::Command::new("mount")
            .args(["-t", "shiftfs", "-o", &format!("map={MAP},backend=kernel")])
            .arg(&src)
            .arg(&tgt))
        .assert_ok();
        run(std::process::Command::new("umount").arg(&tgt)).assert_ok();
        guard.disarm();
    }
    // `list` also drops the record that umount(8) could not remove.
    let list = run(&mut shiftfs(["list"]));
    list.assert_ok();
    assert!(!list.stdout.contains(&*tgt.to_string_lossy()), "{list}");

    assert_eq!(children(), vec![], "child processes left behind");
    assert_eq!(
        pids_mentioning(base.path(), false),
        Vec::<u32>::new(),
        "processes still working on {}",
        base.path().display()
    );
    let ns_fds: Vec<String> = fs::read_dir("/proc/self/fd")
        .expect("fds")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("user:["))
        .collect();
    assert_eq!(ns_fds, Vec::<String>::new(), "user namespace fds left open");
    base.finish();
}

/// `sh -c SCRIPT` in `dir`: what it printed on stdout and stderr.
fn sh_in(dir: &Path, script: &str) -> String {
    let out = run(sh(script).current_dir(dir));
    format!("{}{}", out.stdout, out.stderr)
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

/// ACL entry ids and a capability's root id go through the mount's map like owners do.
#[test]
fn acl_and_capability_ids_are_translated() {
    let _s = serial();
    if !require_tool("setfacl", "acl") || !require_tool("setcap", "libcap2-bin") {
        return;
    }
    let Some((base, src, tgt)) = dirs("acl-and-capability-ids-are-translated") else {
        return;
    };
    for f in ["acl_in", "acl_out", "cap_v2", "cap_v3", "cap_host"] {
        fs::write(src.join(f), "x").expect("fixture");
    }
    sh_in(
        base.path(),
        "setfacl -m u:2000:rwx,g:3000:r,u:70000:r src/acl_in",
    );
    sh_in(base.path(), "setcap cap_net_bind_service=ep src/cap_v2");
    sh_in(
        base.path(),
        "setcap -n 1000 cap_net_bind_service=ep src/cap_v3",
    );
    let _m = shifted_mount(&src, &tgt, MountFlags::default());

    // Reading: on-disk ACL ids shift; an unmapped one reads as -1, not the overflow id.
    let out = sh_in(base.path(), "getfacl -n tgt/acl_in");
    for line in ["user:102000:rwx", "group:103000:r--", "user:4294967295:r--"] {
        assert!(has_line(&out, line), "{line} missing in\n{out}");
    }
    // Writing: host ids are stored as inner ids; an unmapped one is refused.
    sh_in(
        base.path(),
        "setfacl -m u:101000:rwx,g:103000:r tgt/acl_out",
    );
    let out = sh_in(base.path(), "getfacl -n src/acl_out");
    for line in ["user:1000:rwx", "group:3000:r--"] {
        assert!(has_line(&out, line), "{line} missing in\n{out}");
    }
    let out = sh_in(base.path(), "setfacl -m u:5000:r tgt/acl_out");
    assert!(out.contains("Invalid argument"), "{out}");
    assert!(!sh_in(base.path(), "getfacl -n src/acl_out").contains("5000"));

    // A capability's root id: on-disk v2 (root 0) reads as root 100000, v3 root 1000 as 101000.
    let out = sh_in(base.path(), "getcap -n tgt/cap_v2 tgt/cap_v3");
    assert!(
        has_line(&out, "tgt/cap_v2 cap_net_bind_service=ep [rootid=100000]"),
        "{out}"
    );
    assert!(
        has_line(&out, "tgt/cap_v3 cap_net_bind_service=ep [rootid=101000]"),
        "{out}"
    );
    // Writing root id 100000 stores on-disk root 0 (a plain v2 capability) ...
    sh_in(
        base.path(),
        "setcap -n 100000 cap_net_bind_service=ep tgt/cap_host",
    );
    let out = sh_in(base.path(), "getcap -n src/cap_host");
    assert!(
        has_line(&out, "src/cap_host cap_net_bind_service=ep"),
        "{out}"
    );
    // ... while host root's own v2 capability (root id 0, unmapped) is refused.
    fs::write(src.join("cap_host"), "x").expect("rewrite drops the capability");
    let out = sh_in(
        base.path(),
        "setcap cap_net_bind_service=ep tgt/cap_host; getcap src/cap_host",
    );
    assert!(out.contains("Invalid file"), "{out}");
    assert!(!out.contains("cap_net_bind_service"), "{out}");
}

#[test]
fn idmapped_source_is_reidmapped() {
    let _s = serial();
    let Some((base, src, tgt)) = dirs("idmapped-source-is-reidmapped") else {
        return;
    };
    let tgt2 = base.dir("tgt2");
    fs::write(src.join("f"), "x").expect("write");
    chown(src.join("f"), Some(1000), Some(1000)).expect("chown");
    let _m = shifted_mount(&src, &tgt, MountFlags::default());
    let p = kernel::probe(&tgt);
    assert!(p.supported, "open_tree_attr re-idmaps (Linux 6.15+): {p:?}");
    let other = IdMapping::parse("b:0:200000:65536").expect("map");
    kernel::mount(&tgt, &tgt2, &other, MountFlags::default(), false)
        .expect("re-idmapping an idmapped mount");
    let _m2 = Detach(tgt2.clone());
    // The new map replaces the first, from the filesystem's own ids.
    assert_eq!(stat_ids(tgt2.join("f")), (201000, 201000));
    assert_eq!(stat_ids(tgt.join("f")), (101000, 101000));
}

#[test]
fn recursive_names_the_unsupported_submount() {
    let _s = serial();
    if !require_bindfs() {
        return;
    }
    let Some((base, src, tgt)) = dirs("recursive-names-the-unsupported-submount") else {
        return;
    };
    let other = base.dir("other");
    mkdir(&src.join("ok"), 0o755, 0, 0);
    mkdir(&src.join("fuse"), 0o755, 0, 0);
    let _tmpfs = mount_tmpfs(&src.join("ok"));
    let _fuse = Bindfs::start(&other, &src.join("fuse"));
    let err = kernel::mount(&src, &tgt, &map(), MountFlags::default(), true)
        .expect_err("a FUSE submount cannot be idmapped");
    match &err {
        kernel::Error::Unsupported { path, fstype, .. } => {
            assert_eq!(path, &src.join("fuse"));
            assert!(fstype.starts_with("fuse"), "{fstype}");
        }
        e => panic!("unexpected {e:?}"),
    }
    let p = kernel::probe_tree(&src, true);
    assert!(!p.supported, "{p:?}");
    assert_eq!(p.fstype, "ext4");
    assert!(
        p.reason.contains(&*src.join("fuse").to_string_lossy()) && p.reason.contains("fuse"),
        "{p:?}"
    );
    assert!(kernel::probe_tree(&src, false).supported);
    // Nothing was attached.
    assert_eq!(
        mountinfo::mount_id(&tgt).ok(),
        mountinfo::mount_id(base.path()).ok()
    );
    // Without --recursive the submounts are not carried along, so the mount works.
    let _m = shifted_mount(&src, &tgt, MountFlags::default());
}

#[test]
fn separate_multi_range_maps() {
    let _s = serial();
    let Some((_dir, src, tgt)) = dirs("separate-multi-range-maps") else {
        return;
    };
    fs::write(src.join("f"), "x").expect("fixture");
    chown(src.join("f"), Some(70001), Some(500)).expect("chown");
    let mapping = IdMapping::parse("u:0:100000:65536 u:70000:300:2 g:0:200000:1000").expect("map");
    kernel::mount(&src, &tgt, &mapping, MountFlags::default(), false).expect("mount");
    let _m = Detach(tgt.clone());
    assert_eq!(lstat_ids(tgt.join("f")), (301, 200500));
    chown(tgt.join("f"), Some(300), Some(200999)).expect("chown through the mount");
    assert_eq!(lstat_ids(src.join("f")), (70000, 999));
    assert_eq!(
        kernel::mount_idmapping(&tgt).expect("statmount"),
        Some(mapping)
    );
}
