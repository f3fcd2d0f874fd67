//! A container's view: root of a user namespace mapped `0 100000 65536` works through a mount
//! `b:0:100000:65536` and everything lands on disk with image ids; callers outside the map are
//! refused with EOVERFLOW; setgid directories and symlinks behave; swapping a directory for a
//! symlink on the source side never lets a write escape the source. Each case runs on both
//! backends.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const EOVERFLOW_TEXT: &str = "Value too large for defined data type";

/// An image as a container runtime would unpack it: root-owned, plus a world-writable
/// directory and a setgid directory of group 1000.
fn image(dir: &TestDir) -> PathBuf {
    let src = dir.dir("src");
    mkdir(&src.join("bin"), 0o755, 0, 0);
    file(
        &src.join("bin/hello.sh"),
        b"#!/bin/sh\necho \"hello from the image as $(id -u)\"\n",
        0o755,
        0,
        0,
    );
    file(&src.join("secret"), b"root only\n", 0o600, 0, 0);
    mkdir(&src.join("pub"), 0o1777, 0, 0);
    file(&src.join("pub/existing"), b"", 0o666, 0, 0);
    mkdir(&src.join("sg"), 0o2775, 0, 1000);
    mkdir(&src.join("work"), 0o755, 0, 0);
    src
}

#[track_caller]
fn assert_ids(path: impl AsRef<Path>, want: (u32, u32)) {
    let p = path.as_ref();
    assert_eq!(lstat_ids(p), want, "owner of {}", p.display());
}

/// A control for the plumbing itself: without any shifting mount, the namespace root writes
/// host ids 100000 on disk. If this fails, the other tests here prove nothing.
#[test]
fn namespace_root_writes_its_host_ids_on_a_plain_dir() {
    if !require_root() {
        return;
    }
    let dir = TestDir::new("ns-control");
    let plain = dir.dir("plain");
    std::os::unix::fs::chown(&plain, Some(100000), Some(100000)).expect("chown");
    let ns = UserNs::new(NS_MAP);
    let out = run(&mut ns.sh(&format!(
        "id -u; id -g; touch {f}; stat -c %u:%g {f}",
        f = q(plain.join("f"))
    )));
    out.assert_ok();
    assert_eq!(out.stdout, "0\n0\n0:0\n", "{out}");
    assert_ids(plain.join("f"), (100000, 100000));
    dir.finish();
}

fn ns_root_creates_with_image_ids(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("ns-create");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);

    let script = format!(
        "set -e; cd {w}
         echo data > f; mkdir d; ln -s f sl; mkfifo p; ln f hl
         touch u; chown 1000:1000 u; mkdir ud; chown 1000:1000 ud
         touch g; chgrp 1000 g
         mv u ud/u2; mv f f2
         echo new > a; echo old > b; mv a b
         mkdir -p deep/er/est; touch deep/er/est/x; mv deep/er deep2; rm -r deep
         stat -c '%n %u:%g' f2 ud/u2 g",
        w = q(mnt.join("work"))
    );
    let out = run(&mut ns.sh(&script));
    out.assert_ok();
    assert_eq!(
        out.stdout, "f2 0:0\nud/u2 1000:1000\ng 0:1000\n",
        "namespace view of its own files:\n{out}"
    );

    let w = src.join("work");
    assert_eq!(
        ls(&w),
        ["b", "d", "deep2", "f2", "g", "hl", "p", "sl", "ud"],
        "on-disk names"
    );
    for name in [
        "f2",
        "d",
        "sl",
        "p",
        "hl",
        "b",
        "deep2",
        "deep2/est",
        "deep2/est/x",
    ] {
        assert_ids(w.join(name), (0, 0));
    }
    assert_ids(w.join("ud"), (1000, 1000));
    assert_ids(w.join("ud/u2"), (1000, 1000));
    assert_ids(w.join("g"), (0, 1000));
    let f2 = fs::symlink_metadata(w.join("f2")).expect("f2");
    let hl = fs::symlink_metadata(w.join("hl")).expect("hl");
    assert_eq!((f2.ino(), f2.nlink()), (hl.ino(), 2), "hard link on disk");
    assert_eq!(fs::read(w.join("f2")).expect("read"), b"data\n");
    assert_eq!(
        fs::read(w.join("b")).expect("read"),
        b"new\n",
        "rename over"
    );
    assert!(fs::symlink_metadata(w.join("sl")).expect("sl").is_symlink());
    assert_eq!(
        fs::read_link(w.join("sl")).expect("readlink"),
        Path::new("f")
    );
    assert!(
        fs::symlink_metadata(w.join("p"))
            .expect("p")
            .file_type()
            .is_fifo()
    );
    assert!(fs::symlink_metadata(w.join("d")).expect("d").is_dir());

    // The host sees the same objects shifted.
    assert_ids(mnt.join("work/f2"), (100000, 100000));
    assert_ids(mnt.join("work/ud/u2"), (101000, 101000));
    assert_ids(mnt.join("work/g"), (100000, 101000));
    let (a, b2) = (
        fs::symlink_metadata(mnt.join("work/f2")).expect("f2"),
        fs::symlink_metadata(mnt.join("work/hl")).expect("hl"),
    );
    assert_eq!(
        (a.ino(), a.nlink()),
        (b2.ino(), 2),
        "two names of one inode are one inode through the mount"
    );

    drop(ns);
    m.unmount();
    dir.finish();
}

fn unmapped_writers_get_eoverflow(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("eoverflow");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let p = mnt.join("pub");

    // Host uid 5 has no image id under this map: every create and chown is refused.
    for (what, script) in [
        ("create", format!("touch {}", q(p.join("x")))),
        ("mkdir", format!("mkdir {}", q(p.join("xd")))),
        ("mkfifo", format!("mkfifo {}", q(p.join("xp")))),
        ("symlink", format!("ln -s target {}", q(p.join("xs")))),
        ("redirect", format!("echo hi > {}", q(p.join("xr")))),
    ] {
        let out = run(&mut sh_as(5, 5, &script));
        assert!(
            !out.ok() && out.stderr.contains(EOVERFLOW_TEXT),
            "{what} as host uid 5 must fail with EOVERFLOW:\n{out}"
        );
    }
    // Writing into an existing file creates no id and is allowed by its mode 0666.
    let out = run(&mut sh_as(
        5,
        5,
        &format!("echo ok >> {}", q(p.join("existing"))),
    ));
    out.assert_ok();

    // Host root is outside this map too.
    let err = fs::write(p.join("by-host-root"), b"x").expect_err("host root create");
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");
    let err = fs::create_dir(p.join("dir-by-host-root")).expect_err("host root mkdir");
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");
    // Giving a file to a host id without an image id is refused, not stored as something else.
    let err = std::os::unix::fs::chown(p.join("existing"), Some(5), None)
        .expect_err("chown to unmapped uid");
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");
    let err = std::os::unix::fs::chown(p.join("existing"), None, Some(5))
        .expect_err("chgrp to unmapped gid");
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");

    assert_eq!(
        ls(src.join("pub")),
        ["existing"],
        "nothing left behind on disk"
    );
    assert_ids(src.join("pub/existing"), (0, 0));
    assert_eq!(fs::read(src.join("pub/existing")).expect("read"), b"ok\n");
    m.unmount();
    dir.finish();
}

fn ns_root_uses_image_root_files(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("ns-rootfiles");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);

    let out = run(&mut ns.sh(&q(mnt.join("bin/hello.sh"))));
    out.assert_ok();
    assert_eq!(out.stdout, "hello from the image as 0\n", "{out}");

    let secret = q(mnt.join("secret"));
    let out = run(&mut ns.sh(&format!("cat {secret} && echo more >> {secret}")));
    out.assert_ok();
    assert_eq!(out.stdout, "root only\n", "{out}");
    assert_eq!(
        fs::read(src.join("secret")).expect("read"),
        b"root only\nmore\n"
    );
    assert_ids(src.join("secret"), (0, 0));
    assert_eq!(lstat_mode(src.join("secret")) & 0o7777, 0o600);

    // Another namespace user gets no more than the mode allows.
    let out = run(&mut ns.sh_as(1000, 1000, &format!("cat {secret}")));
    assert!(
        !out.ok() && out.stderr.contains("Permission denied"),
        "uid 1000 must not read root's 0600 file:\n{out}"
    );
    // Host root is still root on the host: reads work even though it cannot create here.
    assert_eq!(
        fs::read(mnt.join("secret")).expect("host root read"),
        b"root only\nmore\n"
    );

    drop(ns);
    m.unmount();
    dir.finish();
}

fn symlinks_stay_links(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("symlinks");
    let src = image(&dir);
    let w = src.join("work");
    file(&w.join("target"), b"t\n", 0o644, 0, 0);
    file(&w.join("target2"), b"t2\n", 0o644, 0, 0);
    symlink("target", &w.join("link"), 0, 0);
    symlink("target2", &w.join("link2"), 0, 0);
    symlink("/etc/passwd", &w.join("abs"), 1000, 1000);
    symlink("nowhere", &w.join("dangling"), 0, 0);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let mw = mnt.join("work");

    for (name, target, ids) in [
        ("link", "target", (100000, 100000)),
        ("abs", "/etc/passwd", (101000, 101000)),
        ("dangling", "nowhere", (100000, 100000)),
    ] {
        let md = fs::symlink_metadata(mw.join(name)).expect("lstat");
        assert!(md.is_symlink(), "{name} is a symlink through the mount");
        assert_eq!(
            fs::read_link(mw.join(name)).expect("readlink"),
            Path::new(target)
        );
        assert_eq!((md.uid(), md.gid()), ids, "{name} owner");
    }
    assert_eq!(fs::read(mw.join("link")).expect("follow"), b"t\n");

    let ns = UserNs::new(NS_MAP);
    run(&mut ns.sh(&format!("chown -h 1000:1000 {}", q(mw.join("link"))))).assert_ok();
    assert_ids(w.join("link"), (1000, 1000));
    assert_ids(w.join("target"), (0, 0));
    run(&mut ns.sh(&format!("chown 1000:1000 {}", q(mw.join("link2"))))).assert_ok();
    assert_ids(w.join("link2"), (0, 0));
    assert_ids(w.join("target2"), (1000, 1000));
    assert_ids(mw.join("link"), (101000, 101000));

    drop(ns);
    m.unmount();
    dir.finish();
}

#[track_caller]
fn assert_setgid_inherited(sg: &Path, gid: u32) {
    for name in ["f", "sub", "sub/deeper", "sub/deeper/g"] {
        let md = fs::symlink_metadata(sg.join(name)).expect("lstat");
        assert_eq!(md.gid(), gid, "{name} takes the setgid dir's group");
        assert_eq!(md.uid(), 0, "{name} owner");
        if md.is_dir() {
            assert!(
                md.mode() & 0o2000 != 0,
                "{name} keeps the setgid bit: {:o}",
                md.mode()
            );
        }
    }
}

fn setgid_dir_for_ns_root(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("setgid-ns");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let script = format!(
        "set -e; cd {}; touch f; mkdir sub; mkdir sub/deeper; touch sub/deeper/g
         stat -c '%n %g' f sub sub/deeper/g",
        q(mnt.join("sg"))
    );
    let out = run(&mut ns.sh(&script));
    out.assert_ok();
    assert_eq!(out.stdout, "f 1000\nsub 1000\nsub/deeper/g 1000\n", "{out}");
    assert_setgid_inherited(&src.join("sg"), 1000);
    drop(ns);
    m.unmount();
    dir.finish();
}

fn setgid_dir_for_host_root(b: Backend) {
    if !require(b) {
        return;
    }
    // An identity map, then one that maps only host root and the setgid group (shown as 5000).
    for (map, shown_gid) in [(IDENTITY_MAP, 1000), ("b:0:0:1,b:1000:5000:1", 5000)] {
        let dir = TestDir::new("setgid-host");
        let src = image(&dir);
        let mnt = dir.dir("mnt");
        let m = ShiftMount::new(b, map, &src, &mnt);
        let sg = mnt.join("sg");
        assert_eq!(stat_ids(&sg), (0, shown_gid), "map {map}");
        fs::write(sg.join("f"), b"x").expect("create");
        fs::create_dir(sg.join("sub")).expect("mkdir");
        fs::create_dir(sg.join("sub/deeper")).expect("mkdir");
        fs::write(sg.join("sub/deeper/g"), b"x").expect("create");
        assert_eq!(
            stat_ids(sg.join("sub/deeper/g")),
            (0, shown_gid),
            "map {map}"
        );
        assert_setgid_inherited(&src.join("sg"), 1000);
        m.unmount();
        dir.finish();
    }
}

fn symlink_swap_cannot_escape(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("escape");
    let src = image(&dir);
    mkdir(&src.join("d"), 0o755, 0, 0);
    file(&src.join("d/keep"), b"inside\n", 0o644, 0, 0);
    // Outside the source and owned by host root: nobody in the namespace may touch it.
    let outside = dir.dir("outside");
    file(&outside.join("keep"), b"precious\n", 0o644, 0, 0);
    let outside_before = snapshot(&outside);
    let outside_meta = (lstat_mode(&outside), lstat_ids(&outside));

    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let md = mnt.join("d");
    let flag = dir.path().join("swapped");

    // One shell looks `d` up and sits in it (the kernel keeps that inode) while the host swaps
    // `d` for a symlink; then it writes relative to its cwd, and, once the kernel's cached
    // entry has expired (1 s by default), through the path again, so the daemon looks `d` up
    // anew and must not follow the symlink.
    let writes = |base: &str| {
        format!(
            "touch {base}x; echo pwned > {base}keep; chown 1000:1000 {base}keep; \
             chmod 777 {base}keep; mkdir {base}newdir; mkfifo {base}fifo; \
             ln -s /etc {base}sl; ln {base}keep {base}hard; mv {base}keep {base}moved; \
             rm -f {base}moved; "
        )
    };
    let script = format!(
        "ls {md} >/dev/null; cd {md}; \
         while [ ! -e {flag} ]; do sleep 0.02; done; \
         {rel} sleep 1.5; ls {md}/ >/dev/null 2>&1; {abs} true",
        md = q(&md),
        flag = q(&flag),
        rel = writes(""),
        abs = writes(&format!("{}/", q(&md)))
    );
    let mut shell = Children::default();
    shell.push(
        ns.sh(&script)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn namespace shell"),
    );
    // Let the shell reach its wait loop holding `d` as its cwd.
    std::thread::sleep(Duration::from_millis(300));
    fs::rename(src.join("d"), src.join("d.old")).expect("move d away");
    std::os::unix::fs::symlink(&outside, src.join("d")).expect("swap in a symlink");
    fs::write(&flag, b"").expect("flag");
    // Only whether anything escaped matters, not which writes the backend allowed.
    shell.wait_all(Duration::from_secs(30));

    assert_eq!(
        snapshot(&outside),
        outside_before,
        "the outside dir's entries changed"
    );
    assert_eq!(
        (lstat_mode(&outside), lstat_ids(&outside)),
        outside_meta,
        "the outside dir itself changed"
    );
    // Whatever the writes did, they did it inside the source.
    assert!(fs::symlink_metadata(src.join("d")).expect("d").is_symlink());
    for e in ls(src.join("d.old")) {
        let ids = lstat_ids(src.join("d.old").join(&e));
        assert!(
            [(0, 0), (1000, 1000), (0, 1000)].contains(&ids),
            "d.old/{e} written with untranslated ids {ids:?}"
        );
    }

    drop(ns);
    m.unmount();
    dir.finish();
}

const RENAMEAT2_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/fs.h>
/* renameat2 FLAGS OLD NEW: prints "ok" or the errno name. FLAGS: noreplace|exchange */
int main(int argc, char **argv) {
    unsigned flags = strcmp(argv[1], "exchange") == 0 ? RENAME_EXCHANGE : RENAME_NOREPLACE;
    if (syscall(SYS_renameat2, AT_FDCWD, argv[2], AT_FDCWD, argv[3], flags) == 0) {
        puts("ok");
        return 0;
    }
    puts(strerrorname_np(errno));
    return 1;
}
"#;

fn renameat2_flags(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("renameat2");
    let Some(tool) = compile_c(dir.path(), "renameat2", RENAMEAT2_C) else {
        return;
    };
    let src = image(&dir);
    let w = src.join("work");
    file(&w.join("a"), b"A", 0o644, 0, 0);
    file(&w.join("b"), b"B", 0o644, 1000, 1000);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let mw = mnt.join("work");
    let r2 = |flags: &str, from: &str, to: &str| {
        let out = run(ns
            .cmd_as(0, 0, tool.to_str().expect("utf-8"))
            .arg(flags)
            .arg(mw.join(from))
            .arg(mw.join(to)));
        out.stdout.trim().to_owned()
    };

    assert_eq!(
        r2("noreplace", "a", "b"),
        "EEXIST",
        "NOREPLACE onto an existing name"
    );
    assert_eq!(fs::read(w.join("b")).expect("b"), b"B");
    assert_eq!(r2("exchange", "a", "b"), "ok", "EXCHANGE");
    assert_eq!(fs::read(w.join("a")).expect("a"), b"B");
    assert_eq!(fs::read(w.join("b")).expect("b"), b"A");
    assert_eq!(
        lstat_ids(w.join("a")),
        (1000, 1000),
        "owners travel with the files"
    );
    assert_eq!(
        lstat_ids(mw.join("b")),
        (100000, 100000),
        "and through the mount"
    );
    assert_eq!(r2("noreplace", "a", "c"), "ok", "NOREPLACE onto a new name");
    assert_eq!(ls(&w), ["b", "c"]);
    assert_eq!(r2("exchange", "b", "nonexistent"), "ENOENT");

    drop(ns);
    m.unmount();
    dir.finish();
}

/// The kernel's rules on the translated owners: writes by others clear setuid/setgid, a
/// sticky dir protects other users' files, only the owner may chmod.
fn privilege_bits_and_sticky(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("privbits");
    let src = image(&dir);
    let w = src.join("work");
    file(&w.join("suid"), b"#!/bin/sh\n", 0o6777, 0, 0);
    file(&w.join("suid2"), b"#!/bin/sh\n", 0o4755, 0, 0);
    mkdir(&w.join("tmp"), 0o1777, 0, 0);
    file(&w.join("tmp/of-2000"), b"", 0o666, 2000, 2000);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let mw = mnt.join("work");

    run(&mut ns.sh_as(1000, 1000, &format!("echo x >> {}", q(mw.join("suid"))))).assert_ok();
    assert_eq!(
        format!("{:o}", lstat_mode(w.join("suid")) & 0o7777),
        "777",
        "a write by another user clears setuid and setgid on disk"
    );
    run(&mut ns.sh(&format!("chown 1000 {}", q(mw.join("suid2"))))).assert_ok();
    assert_eq!(
        format!("{:o}", lstat_mode(w.join("suid2")) & 0o7777),
        "755",
        "chown clears setuid"
    );
    assert_eq!(lstat_ids(w.join("suid2")), (1000, 0));

    let out = run(&mut ns.sh_as(1000, 1000, &format!("rm -f {}", q(mw.join("tmp/of-2000")))));
    assert!(
        !out.ok(),
        "sticky dir: uid 1000 removed uid 2000's file:\n{out}"
    );
    assert!(w.join("tmp/of-2000").exists());
    let out = run(&mut ns.sh_as(
        1000,
        1000,
        &format!("chmod 777 {}", q(mw.join("tmp/of-2000"))),
    ));
    assert!(!out.ok(), "uid 1000 chmodded uid 2000's file:\n{out}");
    run(&mut ns.sh(&format!("rm {}", q(mw.join("tmp/of-2000"))))).assert_ok();
    assert!(
        !w.join("tmp/of-2000").exists(),
        "namespace root may remove it"
    );

    drop(ns);
    m.unmount();
    dir.finish();
}

/// A setuid-root binary of the image makes a namespace user root only on a `-o suid` mount.
fn setuid_binary_honours_mount_option(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("setuid-exec");
    let src = image(&dir);
    let id = fs::read("/usr/bin/id").expect("read /usr/bin/id");
    file(&src.join("bin/suid-id"), &id, 0o4755, 0, 0);
    let mnt = dir.dir("mnt");
    let ns = UserNs::new(NS_MAP);
    let euid = |ns: &UserNs| {
        let out = run(&mut ns.sh_as(1000, 1000, &format!("{} -u", q(mnt.join("bin/suid-id")))));
        out.assert_ok();
        out.stdout.trim().to_owned()
    };

    let m = ShiftMount::new(b, MAP, &src, &mnt);
    assert_eq!(
        euid(&ns),
        "1000",
        "nosuid (the default) ignores the setuid bit"
    );
    m.unmount();
    let m = ShiftMount::with_args(b, &["--map", MAP, "-o", "suid"], &src, &mnt);
    assert_eq!(
        euid(&ns),
        "0",
        "-o suid: setuid to the image's root, the namespace root"
    );
    m.unmount();
    drop(ns);
    dir.finish();
}

fn data_xattrs_and_big_dirs(b: Backend) {
    if !require(b) || !require_tool("setfattr", "attr") {
        return;
    }
    let dir = TestDir::new("data");
    let src = image(&dir);
    let w = src.join("work");
    mkdir(&w.join("many"), 0o755, 0, 0);
    let mut names: Vec<String> = (0..3000).map(|i| format!("entry-{i:05}")).collect();
    for n in &names {
        fs::write(w.join("many").join(n), b"").expect("create");
    }
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let mw = mnt.join("work");

    names.sort();
    assert_eq!(
        ls(mw.join("many")),
        names,
        "a 3000-entry directory read through the mount"
    );

    let script = format!(
        "set -e; cd {w}
         head -c 5000000 /dev/urandom > big
         fallocate -l 8M alloc
         sha256sum big | cut -d' ' -f1
         setfattr -n user.note -v hello big
         getfattr --only-values -n user.note big; echo
         if setfattr -n trusted.evil -v 1 big 2>/dev/null; then echo trusted-set; fi",
        w = q(&mw)
    );
    let out = run(&mut ns.sh(&script));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let disk = run(&mut sh(&format!(
        "sha256sum {} | cut -d' ' -f1",
        q(w.join("big"))
    )));
    assert_eq!(
        lines[0],
        disk.stdout.trim(),
        "bytes on disk = bytes written"
    );
    assert_eq!(lines[1], "hello", "user xattr through the mount");
    assert_eq!(fs::metadata(w.join("alloc")).expect("alloc").len(), 8 << 20);
    let x = run(&mut sh(&format!(
        "getfattr --only-values -n user.note {}",
        q(w.join("big"))
    )));
    assert_eq!(x.stdout, "hello", "user xattr on disk:\n{x}");
    let t = run(&mut sh(&format!("getfattr -m - -d {}", q(w.join("big")))));
    assert!(
        !t.stdout.contains("trusted.evil"),
        "namespace root set a trusted xattr:\n{t}"
    );

    drop(ns);
    m.unmount();
    dir.finish();
}

/// overlayfs inside a container stores deletions as whiteouts (char device 0:0), which the
/// kernel lets a namespace root create; `nodev` is about opening devices, not making them.
fn ns_root_creates_whiteouts(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("whiteout");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let out = run(&mut ns.sh(&format!("mknod {} c 0 0", q(mnt.join("work/wh")))));
    out.assert_ok();
    let md = fs::symlink_metadata(src.join("work/wh")).expect("whiteout on disk");
    assert!(md.file_type().is_char_device() && md.rdev() == 0, "{md:?}");
    assert_ids(src.join("work/wh"), (0, 0));
    // A real device stays out of reach of the namespace root.
    let out = run(&mut ns.sh(&format!("mknod {} c 1 3", q(mnt.join("work/null")))));
    assert!(!out.ok(), "namespace root made a device node:\n{out}");
    assert!(!src.join("work/null").exists());
    drop(ns);
    m.unmount();
    dir.finish();
}

/// Several namespace processes creating, linking, renaming and removing at once: every
/// operation succeeds, the tree ends as expected and the mount keeps serving.
fn parallel_churn(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("churn");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let children = Children(
        (0..4)
        .map(|n| {
            let script = format!(
                "set -e; cd {w}; i=0
                 while [ $i -lt 100 ]; do
                   mkdir d{n}-$i; echo $i > d{n}-$i/f; mv d{n}-$i/f d{n}-$i/g; ln d{n}-$i/g d{n}-$i/h
                   rm d{n}-$i/g; mv d{n}-$i e{n}-$i; mv e{n}-$i/h shared-{n}-$i
                   rm -r e{n}-$i; i=$((i+1))
                 done
                 ls | grep -c '^shared-{n}-'",
                w = q(mnt.join("work"))
            );
            let mut c = ns.sh(&script);
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().expect("spawn churn")
        })
        .collect(),
    );
    for (n, out) in children
        .wait_all(Duration::from_secs(120))
        .into_iter()
        .enumerate()
    {
        assert!(
            out.status.success(),
            "churn {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "100",
            "churn {n}"
        );
    }
    let names = ls(src.join("work"));
    assert_eq!(names.len(), 400, "400 files left on disk");
    assert!(names.iter().all(|n| n.starts_with("shared-")), "{names:?}");
    assert_eq!(
        fs::read(src.join("work/shared-3-99")).expect("read"),
        b"99\n"
    );
    assert_ids(src.join("work/shared-0-0"), (0, 0));
    assert_eq!(
        fs::symlink_metadata(mnt.join("work/shared-2-7"))
            .expect("lstat")
            .nlink(),
        1,
        "link counts through the mount are current"
    );
    drop(ns);
    m.unmount();
    dir.finish();
}

/// A user outside the setgid dir's group: new files still take the dir's group, but a setgid
/// bit such a user asks for on a file is dropped (the kernel's rule), and a new subdir still
/// inherits the setgid bit.
fn setgid_dir_for_non_member(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("setgid-other");
    let src = image(&dir);
    mkdir(&src.join("sg-open"), 0o2777, 0, 1000);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let script = format!(
        "set -e; umask 022; cd {}; touch f; chmod 2755 f; install -m 2755 /dev/null g; mkdir sub
         stat -c '%n %u:%g %a' f g sub",
        q(mnt.join("sg-open"))
    );
    let out = run(&mut ns.sh_as(2000, 2000, &script));
    out.assert_ok();
    assert_eq!(
        out.stdout, "f 2000:1000 755\ng 2000:1000 755\nsub 2000:1000 2755\n",
        "namespace view:\n{out}"
    );
    let sg = src.join("sg-open");
    for (name, mode) in [("f", 0o755), ("g", 0o755), ("sub", 0o2755)] {
        assert_ids(sg.join(name), (2000, 1000));
        assert_eq!(lstat_mode(sg.join(name)) & 0o7777, mode, "{name} on disk");
    }
    drop(ns);
    m.unmount();
    dir.finish();
}

const TRUNC_BUSY_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
extern char **environ;
/* trunc-busy BIN: runs BIN 10, opens it O_RDONLY|O_TRUNC while it runs, prints
   "<result> <size before> <size after>" where result is "ok" or the errno name. */
int main(int argc, char **argv) {
    struct stat a, b;
    if (stat(argv[1], &a)) { perror("stat"); return 2; }
    pid_t pid; char *av[] = {argv[1], "10", NULL};
    if (posix_spawn(&pid, argv[1], NULL, NULL, av, environ)) { perror("spawn"); return 2; }
    int fd = open(argv[1], O_RDONLY | O_TRUNC);
    int e = errno;
    stat(argv[1], &b);
    printf("%s %ld %ld\n", fd >= 0 ? "ok" : strerrorname_np(e), (long)a.st_size, (long)b.st_size);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return 0;
}
"#;

/// Truncating a running program is refused (ETXTBSY) and leaves it whole, as on a plain
/// directory; the check must not come after the backing file was already truncated.
fn running_binary_not_truncated(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("etxtbsy");
    let Some(tool) = compile_c(dir.path(), "trunc-busy", TRUNC_BUSY_C) else {
        return;
    };
    let src = image(&dir);
    let sleep = fs::read("/usr/bin/sleep").expect("read /usr/bin/sleep");
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    for i in 0..5 {
        let name = format!("work/sleep-{i}");
        file(&src.join(&name), &sleep, 0o755, 0, 0);
        let out = run(ns
            .cmd_as(0, 0, tool.to_str().expect("utf-8"))
            .arg(mnt.join(&name)));
        out.assert_ok();
        let size = sleep.len();
        assert_eq!(
            out.stdout.trim(),
            format!("ETXTBSY {size} {size}"),
            "open(O_RDONLY|O_TRUNC) of a running binary, try {i}:\n{out}"
        );
        assert_eq!(
            fs::read(src.join(&name)).expect("read back").len(),
            size,
            "on disk"
        );
    }
    drop(ns);
    m.unmount();
    dir.finish();
}

/// Truncating on open, like writing, by a user other than the owner clears setuid and setgid.
fn truncating_open_clears_setuid(b: Backend) {
    if !require(b) {
        return;
    }
    let dir = TestDir::new("trunc-suid");
    let src = image(&dir);
    let w = src.join("work");
    file(&w.join("suid"), b"#!/bin/sh\n", 0o6777, 0, 0);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let f = q(mnt.join("work/suid"));
    run(&mut ns.sh_as(1000, 1000, &format!(": > {f}"))).assert_ok();
    assert_eq!(
        fs::metadata(w.join("suid")).expect("stat").len(),
        0,
        "truncated"
    );
    assert_eq!(
        format!("{:o}", lstat_mode(w.join("suid")) & 0o7777),
        "777",
        "open(O_TRUNC) by another user clears setuid and setgid on disk"
    );
    drop(ns);
    m.unmount();
    dir.finish();
}

/// A user namespace is not the initial one because its map is the identity: root of a
/// namespace mapped `0 0 4294967295` (made by host root, so every id is mapped) sees no
/// `trusted.*` through the mount, exactly as on the plain directory, while host root does.
fn identity_namespace_sees_no_trusted(b: Backend) {
    if !require(b)
        || !require_tool("setfattr", "attr")
        || !require_tool("/usr/bin/python3", "python3")
    {
        return;
    }
    let dir = TestDir::new("ns-trusted");
    let src = image(&dir);
    let f = src.join("work/f");
    file(&f, b"x\n", 0o644, 0, 0);
    for (name, value) in [("trusted.shiftfs.secret", "t"), ("user.note", "u")] {
        run(Command::new("setfattr")
            .args(["-n", name, "-v", value])
            .arg(&f))
        .assert_ok();
    }
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new("0 0 4294967295");
    // listxattr itself (getfattr hides names it may not read), then getxattr and setxattr
    // of the trusted name: each as a value or an errno name.
    let script = "import errno,os,sys\n\
                  def show(f, *a):\n\
                  \x20   try: return repr(f(*a))\n\
                  \x20   except OSError as e: return errno.errorcode[e.errno]\n\
                  p=sys.argv[1]\n\
                  print(show(lambda: sorted(os.listxattr(p))))\n\
                  print(show(os.getxattr, p, 'trusted.shiftfs.secret'))\n\
                  print(show(os.setxattr, p, 'trusted.shiftfs.other', b'1'))\n";
    let view = |path: &Path| {
        let out = run(ns
            .cmd_as(0, 0, "/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(path));
        out.assert_ok();
        out.stdout
    };
    let plain = view(&f);
    assert_eq!(
        plain, "['user.note']\nENODATA\nEPERM\n",
        "the plain directory as the namespace sees it"
    );
    assert_eq!(
        view(&mnt.join("work/f")),
        plain,
        "through the mount, the namespace sees what it sees on the plain directory"
    );
    let host = run(Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(mnt.join("work/f")));
    host.assert_ok();
    assert!(
        host.stdout
            .starts_with("['trusted.shiftfs.secret', 'user.note']\nb't'\n"),
        "host root lists and reads trusted.* through the mount:\n{host}"
    );
    drop(ns);
    m.unmount();
    dir.finish();
}

backend_tests!(
    ns_root_creates_with_image_ids,
    unmapped_writers_get_eoverflow,
    ns_root_uses_image_root_files,
    symlinks_stay_links,
    setgid_dir_for_ns_root,
    setgid_dir_for_host_root,
    symlink_swap_cannot_escape,
    renameat2_flags,
    privilege_bits_and_sticky,
    setuid_binary_honours_mount_option,
    data_xattrs_and_big_dirs,
    ns_root_creates_whiteouts,
    parallel_churn,
    setgid_dir_for_non_member,
    running_binary_not_truncated,
    truncating_open_clears_setuid,
    identity_namespace_sees_no_trusted,
);

// The same through a kernel idmapped mount on an idmappable FUSE mount.
stack_tests!(
    ns_root_creates_with_image_ids,
    unmapped_writers_get_eoverflow,
    ns_root_uses_image_root_files,
    symlinks_stay_links,
    setgid_dir_for_ns_root,
    setgid_dir_for_host_root,
    symlink_swap_cannot_escape,
    renameat2_flags,
    privilege_bits_and_sticky,
    setuid_binary_honours_mount_option,
    data_xattrs_and_big_dirs,
    ns_root_creates_whiteouts,
    parallel_churn,
    setgid_dir_for_non_member,
    running_binary_not_truncated,
    truncating_open_clears_setuid,
    identity_namespace_sees_no_trusted,
);
