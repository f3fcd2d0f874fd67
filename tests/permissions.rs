//! A shifted mount gives nobody more than the kernel would: unmapped owners match no caller,
//! `trusted.*` names stay hidden from the unprivileged, an unrepresentable capability is no
//! capability, and a name that appears behind a cached miss is opened with the caller's own
//! rights. Found by review of the FUSE backend; each case runs on both backends.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

#[track_caller]
fn denied(out: &Out, what: &str) {
    assert!(
        !out.ok() && out.stderr.contains("Permission denied"),
        "{what} must be refused with EACCES:\n{out}"
    );
}

fn unmapped_owners_match_no_caller(b: Backend) {
    if !require(b) || !require_tool("setfacl", "acl") {
        return;
    }
    let dir = TestDir::new("perm-unmapped");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    file(&src.join("owned"), b"secret-owner\n", 0o600, 70000, 70000);
    file(&src.join("grouped"), b"secret-group\n", 0o640, 0, 70000);
    file(&src.join("acl"), b"secret-acl\n", 0o600, 0, 0);
    run(Command::new("setfacl")
        .args(["-m", "u:70000:rw"])
        .arg(src.join("acl")))
    .assert_ok();
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    assert_eq!(stat_ids(mnt.join("owned")), (OVERFLOW, OVERFLOW));
    let owned = q(mnt.join("owned"));
    // Host nobody/nogroup is not the owner or group of what shows as 65534.
    denied(
        &run(&mut sh_as(65534, 65533, &format!("cat {owned}"))),
        "read as nobody",
    );
    denied(
        &run(&mut sh_as(65534, 65533, &format!("echo x >> {owned}"))),
        "append as nobody",
    );
    denied(
        &run(&mut sh_as(
            65534,
            65533,
            &format!("cat {}", q(mnt.join("acl"))),
        )),
        "read through an unmapped ACL entry",
    );
    denied(
        &run(&mut sh_as(
            12345,
            65534,
            &format!("cat {}", q(mnt.join("grouped"))),
        )),
        "read as nogroup",
    );
    assert_eq!(fs::read(src.join("owned")).unwrap(), b"secret-owner\n");
    m.unmount();
    dir.finish();
}

fn trusted_names_hidden_from_users(b: Backend) {
    if !require(b)
        || !require_tool("getfattr", "attr")
        || !require_tool("/usr/bin/python3", "python3")
    {
        return;
    }
    let dir = TestDir::new("perm-trusted");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    file(&src.join("f"), b"x\n", 0o644, 1000, 1000);
    run(Command::new("setfattr")
        .args(["-n", "trusted.overlay.opaque", "-v", "y"])
        .arg(src.join("f")))
    .assert_ok();
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let f = q(mnt.join("f"));
    // listxattr itself, not getfattr (which hides names it may not read).
    let list = "import os,sys; print(os.listxattr(sys.argv[1]))";
    let user = run(&mut sh_as(
        101000,
        101000,
        &format!("/usr/bin/python3 -c '{list}' {f}"),
    ));
    assert!(user.ok(), "{user}");
    assert!(
        !user.stdout.contains("trusted."),
        "a user lists trusted.*:\n{user}"
    );
    let root = run(Command::new("getfattr")
        .args(["-d", "-m", "-"])
        .arg(mnt.join("f")));
    assert!(root.stdout.contains("trusted.overlay.opaque"), "{root}");
    m.unmount();
    dir.finish();
}

fn unmapped_capability_root_is_no_capability(b: Backend) {
    if !require(b) || !require_tool("setfattr", "attr") {
        return;
    }
    let dir = TestDir::new("perm-cap");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    fs::copy("/bin/true", src.join("t")).unwrap();
    // v3, effective, CAP_NET_BIND_SERVICE permitted, root id 1000000 (outside the map).
    run(Command::new("setfattr")
        .args(["-n", "security.capability", "-v"])
        .arg("0x010000030004000000000000000000000000000040420f00")
        .arg(src.join("t")))
    .assert_ok();
    let m = ShiftMount::with_args(b, &["--map", MAP, "-o", "suid"], &src, &mnt);
    run(&mut Command::new(mnt.join("t"))).assert_ok();
    m.unmount();
    dir.finish();
}

fn name_behind_a_cached_miss_opens_with_callers_rights(b: Backend) {
    if !require(b) || !require_tool("/usr/bin/python3", "python3") {
        return;
    }
    let dir = TestDir::new("perm-race");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    mkdir(&src.join("d"), 0o777, 0, 0);
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let x = mnt.join("d/x");
    // Host uid 100000 (image root, but without any capability) looks the name up, the file
    // appears on the source side (another image user's 0600 file), then it opens with O_CREAT.
    let child = Command::new("setpriv")
        .args(["--reuid=100000", "--regid=100000", "--clear-groups", "--", "/usr/bin/python3", "-c"])
        .arg(
            "import os,sys,time\n\
             p=sys.argv[1]\n\
             try: os.stat(p)\n\
             except FileNotFoundError: pass\n\
             time.sleep(0.6)\n\
             try:\n  fd=os.open(p, os.O_RDWR|os.O_CREAT|os.O_TRUNC, 0o644); print('OPENED', os.read(fd,100))\n\
             except PermissionError: print('EACCES')\n",
        )
        .arg(&x)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(250));
    file(&src.join("d/x"), b"SECRET\n", 0o600, 1000, 1000);
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("EACCES"),
        "opened another user's 0600 file: {said}"
    );
    assert_eq!(fs::read(src.join("d/x")).unwrap(), b"SECRET\n");
    m.unmount();
    dir.finish();
}

fn rename_whiteout_belongs_to_the_caller(b: Backend) {
    if !require(b) || !require_tool("/usr/bin/python3", "python3") {
        return;
    }
    let dir = TestDir::new("perm-whiteout");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    mkdir(&src.join("tmp"), 0o1777, 0, 0);
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let script = "import ctypes,os,sys\n\
                  libc=ctypes.CDLL(None,use_errno=True)\n\
                  d=sys.argv[1]; open(d+'/a','w').close()\n\
                  r=libc.syscall(316,-100,(d+'/a').encode(),-100,(d+'/b').encode(),4)\n\
                  sys.exit(0 if r==0 else ctypes.get_errno())\n";
    run(ns
        .cmd_as(1000, 1000, "/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(mnt.join("tmp")))
    .assert_ok();
    // The whiteout at the old name is the container user's, so it can remove it again.
    assert_eq!(lstat_ids(src.join("tmp/a")), (1000, 1000));
    run(ns.cmd_as(1000, 1000, "rm").arg("-f").arg(mnt.join("tmp/a"))).assert_ok();
    assert!(fs::symlink_metadata(src.join("tmp/a")).is_err());
    m.unmount();
    dir.finish();
}

fn container_writes_leave_roots_reserve(b: Backend) {
    if !require(b) || !require_tool("mkfs.ext4", "e2fsprogs") {
        return;
    }
    let dir = TestDir::new("perm-reserve");
    let img = dir.path().join("img");
    let fsdir = dir.dir("fs");
    let mnt = dir.dir("mnt");
    // 64 MiB ext4 with half of it reserved for root (s_resuid 0).
    fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-m", "50"]).arg(&img)).assert_ok();
    let mounted = run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&fsdir));
    if !mounted.ok() && skip(&format!("no loop device: {mounted}")) {
        return;
    }
    let _scratch = Detach(fsdir.clone());
    let src = fsdir.join("src");
    mkdir(&src, 0o777, 0, 0);
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    // A container user fills the file system; only the unreserved half is its to fill.
    let _ = run(ns
        .cmd_as(1000, 1000, "dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", mnt.join("fill").display()))
        .args(["bs=1M", "count=60", "status=none"]));
    let written = fs::metadata(src.join("fill")).map(|m| m.len()).unwrap_or(0) >> 20;
    assert!(
        written <= 34,
        "a container user wrote {written} MiB into a 64 MiB file system with 32 MiB reserved for root"
    );
    m.unmount();
    drop(_scratch);
    dir.finish();
}

/// Blocks free and blocks free for users on the file system holding `p`.
fn free_blocks(p: &Path) -> (u64, u64) {
    let s = rustix::fs::statvfs(p).unwrap();
    (s.f_bfree, s.f_bavail)
}

/// Makes a 32 MiB ext4 of 4 KiB blocks with 5 % (410 blocks) kept for root, shifts it with
/// `MAP`, has a container user fill it with data, then the container
/// root mkdir until that fails. Hands `check` the file system, the mount, the namespace, the directories made,
/// the blocks users had left after the fill and the blocks kept back before it.
fn mkdirs_after_fill(b: Backend, check: impl FnOnce(&Path, &Path, &UserNs, u64, u64, u64)) {
    if !require(b)
        || !require_tool("mkfs.ext4", "e2fsprogs")
        || !require_tool("/usr/bin/python3", "python3")
    {
        return;
    }
    let dir = TestDir::new("perm-reserve-mkdir");
    let img = dir.path().join("img");
    let fsdir = dir.dir("fs");
    let mnt = dir.dir("mnt");
    fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-b", "4096", "-m", "5"])
        .arg(&img))
    .assert_ok();
    let mounted = run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&fsdir));
    if !mounted.ok() && skip(&format!("no loop device: {mounted}")) {
        return;
    }
    let scratch = Detach(fsdir.clone());
    let src = fsdir.join("src");
    mkdir(&src, 0o755, 0, 0);
    let (bfree, bavail) = free_blocks(&fsdir);
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    // The fill is a container user's, who may never use the reserve.
    mkdir(&src.join("u"), 0o755, 1000, 1000);
    let fill = run(&mut ns.sh_as(
        1000,
        1000,
        &format!(
            "dd if=/dev/zero of={} bs=64K status=none; sync",
            q(mnt.join("u/fill"))
        ),
    ));
    assert!(
        fill.stderr.contains("No space left"),
        "the fill should end with ENOSPC: {fill}"
    );
    let left = free_blocks(&fsdir).1;
    let script = "import os,sys\n\
                  d=sys.argv[1]; n=0\n\
                  while n < 5000:\n\
                  \x20   try: os.mkdir('%s/d%d' % (d, n))\n\
                  \x20   except OSError as e: print(n, e.errno); break\n\
                  \x20   n += 1\n\
                  else: print(n, 0)\n";
    let out = run(ns
        .cmd_as(0, 0, "/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(&mnt));
    let (made, errno) = out
        .stdout
        .trim()
        .split_once(' ')
        .map(|(a, b)| (a.parse::<u64>().unwrap(), b.parse::<i32>().unwrap()))
        .unwrap_or_else(|| panic!("mkdir loop: {out}"));
    assert_eq!(errno, libc::ENOSPC, "mkdir loop ended after {made}: {out}");
    eprintln!("{b}: {made} directories with {left} blocks left for users");
    check(&fsdir, &mnt, &ns, made, left, bfree - bavail);
    m.unmount();
    drop(scratch);
    dir.finish();
}

/// Once a container's data fills the disk, its directories, symlinks, nodes and files must
/// not take the blocks kept for root either. The container root's on-disk id is 0, ext4's
/// default `resuid`: the daemon creating as that id used to get the reserve (413 mkdirs
/// where users had 6 blocks left; the kernel backend made 6).
fn container_root_creates_leave_roots_reserve(b: Backend) {
    mkdirs_after_fill(b, |fsdir, mnt, ns, made, left, reserve| {
        // Each directory takes one block: at most what users still have, plus slack for the
        // parent directory's own growth.
        assert!(
            made <= left + 8,
            "the container root made {made} directories with {left} blocks left for users"
        );
        // Nor through the other creates, each of which may take a block for its name.
        let others = run(&mut ns.sh(&format!(
            "cd {} && for i in $(seq 0 400); do ln -s x s$i 2>&1 || exit 0; done; exit 1",
            q(mnt)
        )));
        assert!(
            others.ok() && others.stdout.contains("No space left"),
            "400 symlinks fit in the directory's blocks or took root's reserve: {others}"
        );
        let (bfree_after, _) = free_blocks(fsdir);
        assert!(
            bfree_after + 2 >= reserve,
            "{bfree_after} blocks free of the {reserve} kept for root"
        );
        // Root still has its reserve: a 1 MiB file fits.
        fs::write(fsdir.join("root-file"), vec![1u8; 1 << 20]).unwrap();
    });
}

/// Clears the immutable and append-only flags of `0` on drop, so a failed test leaves a
/// directory that can be removed.
struct ClearFlags(std::path::PathBuf);

impl Drop for ClearFlags {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-ia").arg(&self.0).status();
    }
}

/// `struct fsxattr` of `p` (FS_IOC_FSGETXATTR), as bytes.
fn fsxattr(p: &Path) -> [u32; 5] {
    let f = fs::File::open(p).unwrap();
    let x = shiftfs::sys::fileattr::fsgetxattr(&f).unwrap();
    [x.xflags, x.extsize, x.nextents, x.projid, x.cowextsize]
}

/// `lsattr` and `chattr` work through the mount with the kernel's rules: anyone reads the
/// flags, immutable and append-only need CAP_LINUX_IMMUTABLE on the host, project ids change
/// only from the host's namespace.
fn inode_flags_follow_the_kernels_rules(b: Backend) {
    if !require(b)
        || !require_tool("chattr", "e2fsprogs")
        || !require_tool("/usr/bin/python3", "python3")
    {
        return;
    }
    let dir = TestDir::new("perm-iflags");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    file(&src.join("f"), b"x\n", 0o644, 0, 0);
    mkdir(&src.join("d"), 0o755, 0, 0);
    let _clear = [ClearFlags(src.join("f")), ClearFlags(src.join("d"))];
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    let lsattr = |p: &Path| {
        let out = run(Command::new("lsattr").arg("-d").arg(p));
        out.assert_ok();
        out.stdout.split_whitespace().next().unwrap().to_string()
    };
    // The container root owns both and may set what needs no capability.
    run(&mut ns.sh(&format!("chattr +d {}", q(mnt.join("f"))))).assert_ok();
    assert!(
        lsattr(&src.join("f")).contains('d'),
        "+d did not reach the disk"
    );
    assert_eq!(lsattr(&mnt.join("f")), lsattr(&src.join("f")));
    let ls = run(ns.cmd_as(1000, 1000, "lsattr").arg("-d").arg(mnt.join("d")));
    ls.assert_ok();
    for flag in ["+i", "+a"] {
        for p in [mnt.join("f"), mnt.join("d")] {
            let out = run(&mut ns.sh(&format!("chattr {flag} {}", q(&p))));
            assert!(
                !out.ok() && out.stderr.contains("Operation not permitted"),
                "a namespace root set {flag} on {}: {out}",
                p.display()
            );
        }
    }
    assert!(!lsattr(&src.join("f")).contains('i') && !lsattr(&src.join("f")).contains('a'));
    // Host root may, and the flag holds on disk and through the mount.
    run(Command::new("chattr").arg("+i").arg(mnt.join("f"))).assert_ok();
    assert!(
        lsattr(&src.join("f")).contains('i'),
        "+i did not reach the disk"
    );
    let write = fs::OpenOptions::new().append(true).open(mnt.join("f"));
    assert_eq!(
        write.err().and_then(|e| e.raw_os_error()),
        Some(libc::EPERM),
        "opened an immutable file for writing"
    );
    let out = run(&mut ns.sh(&format!("chattr -i {}", q(mnt.join("f")))));
    assert!(!out.ok(), "a namespace root cleared +i: {out}");
    run(Command::new("chattr").arg("-i").arg(mnt.join("f"))).assert_ok();
    run(Command::new("chattr").arg("+a").arg(mnt.join("f"))).assert_ok();
    let out = run(&mut ns.sh(&format!("echo y > {}", q(mnt.join("f")))));
    assert!(!out.ok(), "overwrote an append-only file: {out}");
    run(&mut ns.sh(&format!("echo y >> {}", q(mnt.join("f"))))).assert_ok();
    assert_eq!(fs::read(src.join("f")).unwrap(), b"x\ny\n");
    run(Command::new("chattr").arg("-a").arg(mnt.join("f"))).assert_ok();
    assert_eq!(fsxattr(&mnt.join("f")), fsxattr(&src.join("f")));
    assert_eq!(fsxattr(&mnt.join("d")), fsxattr(&src.join("d")));
    // Project ids: not from a user namespace (EINVAL, as the VFS says), from the host yes
    // where the file system has them.
    let setproj = "import fcntl,struct,sys\n\
                   f=open(sys.argv[1])\n\
                   b=bytearray(fcntl.ioctl(f, 0x801c581f, bytes(28)))\n\
                   struct.pack_into('I', b, 12, 42)\n\
                   try: fcntl.ioctl(f, 0x401c5820, bytes(b)); print(0)\n\
                   except OSError as e: print(e.errno)\n";
    let out = run(ns
        .cmd_as(0, 0, "/usr/bin/python3")
        .arg("-c")
        .arg(setproj)
        .arg(mnt.join("f")));
    assert_eq!(out.stdout.trim(), libc::EINVAL.to_string(), "{out}");
    assert_eq!(fsxattr(&src.join("f"))[3], 0);
    m.unmount();
    drop(_clear);
    dir.finish();
}

/// FUSE only: the kernel cannot idmap a file system without xattrs or ACLs (ramfs).
#[test]
fn fuse_source_without_xattrs() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("perm-ramfs");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    let _ramfs = mount_ramfs(&src);
    file(&src.join("pub"), b"hello\n", 0o644, 0, 0);
    fs::copy("/bin/true", src.join("t")).unwrap();
    let m = ShiftMount::with_args(Backend::Fuse, &["--map", MAP, "-o", "suid"], &src, &mnt);
    let read = run(&mut sh_as(
        101000,
        101000,
        &format!("cat {}", q(mnt.join("pub"))),
    ));
    assert!(read.ok() && read.stdout == "hello\n", "{read}");
    run(&mut Command::new(mnt.join("t"))).assert_ok();
    m.unmount();
    drop(_ramfs);
    dir.finish();
}

/// FUSE only (the kernel backend has no create path of its own): a FIFO that appears behind
/// a cached miss is never opened by the daemon when a caller's open(O_CREAT) finds it. An
/// open would have released a writer waiting for a reader; the caller gets EEXIST at once.
#[test]
fn fifo_behind_a_cached_miss_is_not_opened() {
    if !require(Backend::Fuse) || !require_tool("/usr/bin/python3", "python3") {
        return;
    }
    let dir = TestDir::new("perm-fifo");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    mkdir(&src.join("d"), 0o777, 0, 0);
    let m = ShiftMount::new(Backend::Fuse, MAP, &src, &mnt);
    // Image root (host 100000) owns the FIFO, so its own open would be allowed.
    let child = Command::new("setpriv")
        .args([
            "--reuid=100000",
            "--regid=100000",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
        ])
        .arg(
            "import errno,os,sys,time\n\
             p=sys.argv[1]\n\
             try: os.stat(p)\n\
             except FileNotFoundError: pass\n\
             time.sleep(0.6)\n\
             t=time.monotonic()\n\
             try: os.open(p, os.O_RDONLY|os.O_CREAT|os.O_NONBLOCK, 0o644); print('OPENED')\n\
             except OSError as e: print(errno.errorcode[e.errno])\n\
             print('%.1f' % (time.monotonic()-t))\n",
        )
        .arg(mnt.join("d/p"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(250));
    let fifo = src.join("d/p");
    run(Command::new("mkfifo").arg(&fifo)).assert_ok();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || {
            // Blocks until someone opens the FIFO for reading.
            let opened = fs::OpenOptions::new().write(true).open(&fifo).is_ok();
            let _ = tx.send(opened);
        }
    });
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let still_waiting = rx.recv_timeout(Duration::from_millis(300)).is_err();
    // Let the writer go: a reader of our own.
    let reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    writer.join().unwrap();
    drop(reader);
    assert_eq!(
        said, "EEXIST\n0.0\n",
        "the caller's open(O_CREAT) of the FIFO"
    );
    assert!(
        still_waiting,
        "the daemon opened the FIFO, releasing its writer"
    );
    m.unmount();
    dir.finish();
}

/// `shiftfs doctor SOURCE` warns when setuid files a container plants in SOURCE would work
/// for host users: SOURCE on a suid mount and every directory on the way searchable. A
/// nosuid mount or a root-only directory above SOURCE ends the warning.
#[test]
fn doctor_warns_of_a_suid_source_users_can_reach() {
    use std::os::unix::fs::PermissionsExt;
    if !require_root() {
        return;
    }
    let dir = TestDir::new("doctor-suid");
    let top = dir.dir("fs");
    let _tmpfs = mount_tmpfs(&top);
    let src = top.join("src");
    mkdir(&src, 0o755, 0, 0);
    let doctor = || {
        let out = run(&mut shiftfs([OsStr::new("doctor"), src.as_os_str()]));
        out.assert_ok();
        let line = out
            .stdout
            .lines()
            .find(|l| l.contains("setuid in SOURCE"))
            .unwrap_or_else(|| panic!("no setuid line:\n{out}"))
            .to_string();
        (line, out.stdout)
    };
    let (line, all) = doctor();
    assert!(line.starts_with("WARNING"), "suid and reachable:\n{all}");
    assert!(all.contains("nosuid"), "the advice names nosuid:\n{all}");

    fs::set_permissions(&top, fs::Permissions::from_mode(0o700)).unwrap();
    let (line, all) = doctor();
    assert!(line.starts_with("OK"), "a 0700 directory above:\n{all}");
    fs::set_permissions(&top, fs::Permissions::from_mode(0o755)).unwrap();

    rustix::mount::mount_remount(&top, rustix::mount::MountFlags::NOSUID, c"")
        .expect("remount nosuid");
    let (line, all) = doctor();
    assert!(line.starts_with("OK"), "nosuid:\n{all}");
    drop(_tmpfs);
    dir.finish();
}

/// Writing or truncating a setuid/setgid file clears the bits for a caller without
/// CAP_FSETID and keeps them for host root, as on the backing filesystem; the mount shows
/// the result at once (the FUSE backend clears them itself, `FUSE_HANDLE_KILLPRIV_V2`).
fn writes_clear_setuid_like_the_kernel(b: Backend) {
    if !require(b) || !require_tool("setcap", "libcap2-bin") {
        return;
    }
    let dir = TestDir::new("perm-killpriv");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    for f in ["append", "trunc", "overwrite", "root-trunc", "chown"] {
        file(&src.join(f), b"#!/bin/sh\n", 0o6775, 1000, 1000);
    }
    // setgid without group execute marks mandatory locking: a write keeps it.
    file(&src.join("sgid-nox"), b"x\n", 0o2765, 1000, 1000);
    file(&src.join("cap"), b"x\n", 0o775, 1000, 1000);
    run(Command::new("setcap")
        .args(["cap_net_raw+ep"])
        .arg(src.join("cap")))
    .assert_ok();
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    for f in [
        "append",
        "trunc",
        "overwrite",
        "root-trunc",
        "chown",
        "sgid-nox",
    ] {
        mode_of(mnt.join(f)); // cached by the kernel before the change
    }
    let p = |f: &str| q(mnt.join(f));
    run(&mut sh_as(
        101000,
        101000,
        &format!(
            "echo a >> {} && truncate -s 1 {} && echo o > {} && echo s >> {} && echo c >> {}",
            p("append"),
            p("trunc"),
            p("overwrite"),
            p("sgid-nox"),
            p("cap")
        ),
    ))
    .assert_ok();
    run(Command::new("truncate")
        .args(["-s", "1"])
        .arg(mnt.join("root-trunc")))
    .assert_ok();
    run(Command::new("chown").arg("100000").arg(mnt.join("chown"))).assert_ok();
    for (f, want) in [
        ("append", 0o775),
        ("trunc", 0o775),
        ("overwrite", 0o775),
        ("sgid-nox", 0o2765),
        ("root-trunc", 0o6775),
        ("chown", 0o775),
    ] {
        assert_eq!(mode_of(mnt.join(f)), want, "{f} through the mount");
        assert_eq!(mode_of(src.join(f)), want, "{f} on disk");
    }
    let caps = run(Command::new("getcap").arg(src.join("cap")));
    assert!(
        caps.ok() && caps.stdout.trim().is_empty(),
        "capability kept after a write: {caps}"
    );
    m.unmount();
    dir.finish();
}

backend_tests!(
    writes_clear_setuid_like_the_kernel,
    unmapped_owners_match_no_caller,
    trusted_names_hidden_from_users,
    unmapped_capability_root_is_no_capability,
    name_behind_a_cached_miss_opens_with_callers_rights,
    rename_whiteout_belongs_to_the_caller,
    container_writes_leave_roots_reserve,
    container_root_creates_leave_roots_reserve,
    inode_flags_follow_the_kernels_rules,
);

// The same through a kernel idmapped mount on an idmappable FUSE mount.
stack_tests!(
    writes_clear_setuid_like_the_kernel,
    unmapped_owners_match_no_caller,
    trusted_names_hidden_from_users,
    unmapped_capability_root_is_no_capability,
    name_behind_a_cached_miss_opens_with_callers_rights,
    rename_whiteout_belongs_to_the_caller,
    container_writes_leave_roots_reserve,
    container_root_creates_leave_roots_reserve,
    inode_flags_follow_the_kernels_rules,
);
