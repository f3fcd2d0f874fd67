//! Idmappable FUSE mounts (`shiftfs mount --idmappable`, Linux 6.12+) with a kernel idmapped
//! mount stacked on them, on sources the kernel cannot idmap itself: ramfs, an overlayfs
//! merged mount and sshfs over 127.0.0.1 (a private sshd on a random port, keys in the test
//! dir). And re-idmapping an idmapped mount (`open_tree_attr`, Linux 6.15+).
//! Needs `sshfs` and `sshd` (`openssh-server`) for the sshfs case.

mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A source directory of some filesystem, with whatever keeps it mounted (dropped in order).
struct Source {
    path: PathBuf,
    /// It can hold FIFOs (sftp cannot make them).
    fifos: bool,
    _mounts: Vec<Detach>,
    _sshd: Option<Sshd>,
}

fn ramfs(dir: &TestDir) -> Source {
    let path = dir.dir("ramfs");
    let guard = mount_ramfs(&path);
    Source {
        path,
        fifos: true,
        _mounts: vec![guard],
        _sshd: None,
    }
}

/// An overlayfs merged mount of two directories of the test dir.
fn overlay(dir: &TestDir) -> Source {
    let (lower, upper, work) = (dir.dir("lower"), dir.dir("upper"), dir.dir("work"));
    file(&lower.join("from-lower"), b"lower\n", 0o644, 1000, 1000);
    let path = dir.dir("merged");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&path))
    .assert_ok();
    let guard = Detach(path.clone());
    assert_eq!(fstype_of(&path), "overlay");
    Source {
        path,
        fifos: true,
        _mounts: vec![guard],
        _sshd: None,
    }
}

/// A private sshd on 127.0.0.1 (its own host key, root's login by a key made here, nothing of
/// the system's ssh configuration used), killed on drop.
struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
}

impl Sshd {
    fn start(dir: &Path) -> Self {
        let keygen = |path: &Path| {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path))
            .assert_ok();
        };
        let (host_key, key) = (dir.join("host_key"), dir.join("root_key"));
        keygen(&host_key);
        keygen(&key);
        fs::copy(key.with_extension("pub"), dir.join("authorized_keys")).expect("authorize");
        // The privilege separation directory sshd insists on (the package makes it at boot).
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a free port")
            .port();
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\n\
                 AuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
                host_key.display(),
                dir.join("sshd.pid").display(),
                dir.join("authorized_keys").display(),
            ),
        )
        .expect("write sshd_config");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start sshd");
        let sshd = Self { child, port, key };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "sshd did not listen on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sshd
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `remote` (a directory of the test dir) through sshfs to the private sshd, as root.
fn sshfs(dir: &TestDir) -> Option<Source> {
    if !require_tool("sshfs", "sshfs") || !require_tool("ssh-keygen", "openssh-client") {
        return None;
    }
    if !Path::new("/usr/sbin/sshd").exists() {
        skip("needs sshd (apt-get install openssh-server)");
        return None;
    }
    let keys = dir.dir("ssh");
    let remote = dir.dir("remote");
    let sshd = Sshd::start(&keys);
    let path = dir.dir("sshfs");
    let opts = format!(
        "port={},IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,\
         BatchMode=yes",
        sshd.port,
        sshd.key.display()
    );
    run(Command::new("sshfs")
        .args(["-o", &opts])
        .arg(format!("root@127.0.0.1:{}", remote.display()))
        .arg(&path))
    .assert_ok();
    let guard = Detach(path.clone());
    assert_eq!(fstype_of(&path), "fuse.sshfs");
    Some(Source {
        path,
        fifos: false,
        _mounts: vec![guard],
        _sshd: Some(sshd),
    })
}

/// Ids and bytes of `path` on the source.
#[track_caller]
fn on_source(path: &Path) -> (u32, u32, Vec<u8>) {
    let (uid, gid) = lstat_ids(path);
    (uid, gid, fs::read(path).unwrap_or_default())
}

/// The stack on `src`: what is shown through it and what creating through it leaves on the
/// source, for host users, a namespace root and a namespace user.
fn creates_land_with_image_ids(dir: TestDir, src: Source) {
    let src_path = src.path.clone();
    mkdir(&src_path.join("shared"), 0o1777, 0, 0);
    file(&src_path.join("image-file"), b"image\n", 0o644, 1000, 1000);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::with_args(Backend::Stack, &["--map", MAP], &src_path, &mnt);

    let top = mount_at(&mnt).expect("mounted");
    assert!(top.mount_options.iter().any(|o| o == "idmapped"), "{top:?}");
    assert_eq!(top.fstype, "fuse.shiftfs", "{top:?}");
    let low = mount_at(&dir.path().join("idmappable-mnt")).expect("idmappable mount");
    assert!(
        !low.mount_options.iter().any(|o| o == "idmapped"),
        "{low:?}"
    );

    assert_eq!(stat_ids(mnt.join("image-file")), (101000, 101000));
    assert_eq!(stat_ids(mnt.join("shared")), (100000, 100000));
    assert_eq!(
        fs::read(mnt.join("image-file")).expect("read through the stack"),
        b"image\n"
    );

    // A host user whose ids the map covers.
    run(&mut sh_as(
        100003,
        100004,
        &format!("echo host > {}", q(mnt.join("shared/h"))),
    ))
    .assert_ok();
    assert_eq!(
        on_source(&src_path.join("shared/h")),
        (3, 4, b"host\n".to_vec())
    );

    // The namespace root and a namespace user: their namespace ids are the image's.
    let ns = UserNs::new(NS_MAP);
    let m_ = q(&mnt);
    run(&mut ns.sh(&format!(
        "set -e; mkdir {m_}/nsdir; echo ns > {m_}/nsfile; ln -s nsfile {m_}/nslink; \
         chown 5:6 {m_}/nsfile"
    )))
    .assert_ok();
    if src.fifos {
        run(&mut ns.sh(&format!("mkfifo {m_}/fifo"))).assert_ok();
        assert_eq!(lstat_ids(src_path.join("fifo")), (0, 0));
    }
    run(&mut ns.sh_as(
        1000,
        1000,
        &format!("set -e; echo user > {m_}/shared/u; mkdir {m_}/shared/ud"),
    ))
    .assert_ok();
    assert_eq!(lstat_ids(src_path.join("nsdir")), (0, 0));
    assert_eq!(
        on_source(&src_path.join("nsfile")),
        (5, 6, b"ns\n".to_vec())
    );
    assert_eq!(lstat_ids(src_path.join("nslink")), (0, 0));
    assert_eq!(
        on_source(&src_path.join("shared/u")),
        (1000, 1000, b"user\n".to_vec())
    );
    assert_eq!(lstat_ids(src_path.join("shared/ud")), (1000, 1000));
    // ... and they see them as theirs.
    let out = run(&mut ns.sh(&format!("stat -c '%u:%g' {m_}/nsfile {m_}/shared/u")));
    out.assert_ok();
    assert_eq!(out.stdout, "5:6\n1000:1000\n");

    // Host root has no image id under this map: refused, nothing made.
    let err = fs::write(mnt.join("by-host-root"), b"x").expect_err("host root is unmapped");
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");
    assert!(!src_path.join("by-host-root").exists());

    drop(ns);
    m.unmount();
    drop(src);
    dir.finish();
}

#[test]
fn ramfs_through_the_stack() {
    if !require(Backend::Stack) {
        return;
    }
    let dir = TestDir::new("idm-ramfs");
    let src = ramfs(&dir);
    creates_land_with_image_ids(dir, src);
}

#[test]
fn overlayfs_through_the_stack() {
    if !require(Backend::Stack) {
        return;
    }
    let dir = TestDir::new("idm-overlay");
    let src = overlay(&dir);
    creates_land_with_image_ids(dir, src);
}

#[test]
fn sshfs_through_the_stack() {
    if !require(Backend::Stack) {
        return;
    }
    let dir = TestDir::new("idm-sshfs");
    let Some(src) = sshfs(&dir) else {
        return;
    };
    creates_land_with_image_ids(dir, src);
}

/// ACL entries and a capability's root id through the stack on overlayfs (ramfs and sshfs
/// have no xattrs; `tests/acl_caps.rs` runs its cases through the stack on the test dir).
#[test]
fn overlayfs_acl_and_capability_through_the_stack() {
    if !require(Backend::Stack)
        || !require_tool("setfacl", "acl")
        || !require_tool("setcap", "libcap2-bin")
    {
        return;
    }
    let dir = TestDir::new("idm-overlay-xattr");
    let src = overlay(&dir);
    let s = src.path.clone();
    mkdir(&s.join("bin"), 0o755, 0, 0);
    let grep = fs::read("/usr/bin/grep").expect("read grep");
    file(&s.join("bin/capgrep"), &grep, 0o755, 0, 0);
    file(&s.join("acl-file"), b"acl\n", 0o640, 0, 0);
    let mnt = dir.dir("mnt");
    // File capabilities need suid on both mounts.
    let m = ShiftMount::with_args(Backend::Stack, &["--map", MAP, "-o", "suid"], &s, &mnt);
    let ns = UserNs::new(NS_MAP);
    run(&mut ns.sh(&format!(
        "set -e; setfacl -m u:3000:r,g:3001:r {f}; setcap cap_net_bind_service+ep {c}",
        f = q(mnt.join("acl-file")),
        c = q(mnt.join("bin/capgrep"))
    )))
    .assert_ok();

    let acl = run(Command::new("getfacl")
        .args(["-n", "-p", "--omit-header"])
        .arg(s.join("acl-file")));
    acl.assert_ok();
    assert!(
        acl.stdout.contains("user:3000:r--") && acl.stdout.contains("group:3001:r--"),
        "on the source the ACL names image ids:\n{acl}"
    );
    let shown = run(Command::new("getfacl")
        .args(["-n", "-p", "--omit-header"])
        .arg(mnt.join("acl-file")));
    assert!(
        shown.stdout.contains("user:103000:r--"),
        "through the stack the host sees host ids:\n{shown}"
    );
    // Set by the namespace's root, stored for the image's root (root id 0).
    let caps = run(Command::new("getcap").arg("-n").arg(s.join("bin/capgrep")));
    assert!(
        caps.stdout.contains("cap_net_bind_service=ep") && !caps.stdout.contains("rootid"),
        "on the source:\n{caps}"
    );
    let caps = run(Command::new("getcap")
        .arg("-n")
        .arg(mnt.join("bin/capgrep")));
    assert!(
        caps.stdout.contains("rootid=100000"),
        "through the stack:\n{caps}"
    );
    // And it works for a namespace user.
    let out = run(&mut ns.sh_as(
        1000,
        1000,
        &format!("{} CapEff /proc/self/status", q(mnt.join("bin/capgrep"))),
    ));
    out.assert_ok();
    assert!(out.stdout.contains("0000000000000400"), "{out}");

    drop(ns);
    m.unmount();
    drop(src);
    dir.finish();
}

/// Without an idmapped mount on top, an idmappable mount is a plain passthrough: callers'
/// own ids go to disk.
#[test]
fn idmappable_alone_is_the_identity() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("idm-alone");
    let src = dir.dir("src");
    mkdir(&src.join("shared"), 0o1777, 0, 0);
    file(&src.join("f"), b"f\n", 0o644, 1234, 5678);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::with_args(Backend::Fuse, &["--idmappable"], &src, &mnt);
    assert_eq!(stat_ids(mnt.join("f")), (1234, 5678));
    run(&mut sh_as(
        1000,
        1001,
        &format!("echo me > {}", q(mnt.join("shared/mine"))),
    ))
    .assert_ok();
    assert_eq!(
        on_source(&src.join("shared/mine")),
        (1000, 1001, b"me\n".to_vec())
    );
    fs::write(mnt.join("by-root"), b"r\n").expect("host root writes");
    assert_eq!(lstat_ids(src.join("by-root")), (0, 0));
    m.unmount();
    dir.finish();
}

#[test]
fn idmappable_refuses_a_map_and_the_kernel_backend() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("idm-refuse");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    let (out, _g) = ShiftMount::run_mount(None, &["--idmappable", "--map", MAP], &src, &mnt);
    out.assert_fails();
    assert!(out.stderr.contains("drop the map here"), "{out}");
    let (out, _g) = ShiftMount::run_mount(Some(Backend::Kernel), &["--idmappable"], &src, &mnt);
    out.assert_fails();
    assert!(out.stderr.contains("only the FUSE backend has it"), "{out}");
    assert!(!is_mountpoint(&mnt));
    dir.finish();
}

/// A tmpfs shown as 100000 by one idmapped mount, re-idmapped to 200000 by shiftfs: the new
/// map goes from the filesystem's ids, replacing the first.
#[test]
fn idmapped_tmpfs_is_reidmapped() {
    if !require(Backend::Kernel) {
        return;
    }
    let dir = TestDir::new("idm-reidmap");
    let src = dir.dir("tmpfs");
    let _tmpfs = mount_tmpfs(&src);
    file(&src.join("f"), b"f\n", 0o644, 1000, 1000);
    mkdir(&src.join("shared"), 0o1777, 0, 0);
    let (mid, top) = (dir.dir("mid"), dir.dir("top"));
    let m1 = ShiftMount::new(Backend::Kernel, MAP, &src, &mid);
    assert_eq!(stat_ids(mid.join("f")), (101000, 101000));
    let m2 = ShiftMount::new(Backend::Kernel, "b:0:200000:65536", &mid, &top);
    let info = mount_at(&top).expect("mounted");
    assert!(
        info.mount_options.iter().any(|o| o == "idmapped"),
        "{info:?}"
    );
    assert_eq!(stat_ids(top.join("f")), (201000, 201000));
    assert_eq!(
        stat_ids(mid.join("f")),
        (101000, 101000),
        "the first is unchanged"
    );
    run(&mut sh_as(
        200005,
        200006,
        &format!("echo x > {}", q(top.join("shared/new"))),
    ))
    .assert_ok();
    assert_eq!(lstat_ids(src.join("shared/new")), (5, 6));
    // A host id of the first map only is not one of the second's.
    let out = run(&mut sh_as(
        100005,
        100005,
        &format!("touch {}", q(top.join("shared/old"))),
    ));
    out.assert_fails();
    m2.unmount();
    m1.unmount();
    drop(_tmpfs);
    dir.finish();
}

/// Whether an access ACL change keeps setgid, for a container's callers through the stack,
/// as the kernel decides on its own idmapped mount of a copy: the daemon, which is told no
/// caller ids, takes the callers' ids as their namespace sees them.
#[test]
fn setgid_after_acl_change_for_container_callers() {
    if !require(Backend::Stack) || !require_tool("setfacl", "acl") {
        return;
    }
    let dir = TestDir::new("idm-acl-sgid");
    let (src, copy) = (dir.dir("src"), dir.dir("copy"));
    let names = ["outsider", "member", "nsroot"];
    for name in names {
        file(&src.join(name), b"x\n", 0o2770, 1000, 2000);
        file(&copy.join(name), b"x\n", 0o2770, 1000, 2000);
    }
    let (mnt, kmnt) = (dir.dir("mnt"), dir.dir("kmnt"));
    let m = ShiftMount::new(Backend::Stack, MAP, &src, &mnt);
    let k = ShiftMount::new(Backend::Kernel, MAP, &copy, &kmnt);
    let ns = UserNs::new(NS_MAP);
    for root in [&mnt, &kmnt] {
        let setfacl = |uid, gid, name: &str| {
            run(&mut ns.sh_as(
                uid,
                gid,
                &format!("setfacl -m u:3000:r {}", q(root.join(name))),
            ))
            .assert_ok();
        };
        setfacl(1000, 1000, "outsider");
        setfacl(1000, 2000, "member");
        setfacl(0, 0, "nsroot");
    }
    for name in names {
        assert_eq!(
            mode_of(src.join(name)),
            mode_of(copy.join(name)),
            "{name}: mode after the ACL change, through the stack vs the kernel's own"
        );
    }
    assert_eq!(
        mode_of(src.join("outsider")) & 0o2000,
        0,
        "not in the group"
    );
    assert_eq!(mode_of(src.join("member")) & 0o2000, 0o2000, "in the group");
    assert_eq!(mode_of(src.join("nsroot")) & 0o2000, 0o2000, "CAP_FSETID");
    drop(ns);
    k.unmount();
    m.unmount();
    dir.finish();
}

/// crun's `idmap` mount option (the OCI runtime spec's idmapped mounts, as Kubernetes user
/// namespaces use them) on an idmappable mount of a ramfs, which crun refuses to idmap by
/// itself (`mount_setattr ... Invalid argument`). crun runs in a private mount namespace with
/// a plain cgroup2 at /sys/fs/cgroup: 1.8 refuses this machine's hybrid cgroup layout.
#[test]
fn crun_idmap_option_on_an_idmappable_mount() {
    if !require(Backend::Fuse) || !require_tool("crun", "crun") {
        return;
    }
    let busybox = Path::new("/usr/bin/busybox");
    let is_static = busybox.exists()
        && Command::new("ldd")
            .arg(busybox)
            .output()
            .is_ok_and(|o| !o.status.success() || o.stdout.is_empty());
    if !is_static {
        skip("needs a static /usr/bin/busybox (apt-get install busybox)");
        return;
    }
    let dir = TestDir::new("idm-crun");
    let src = ramfs(&dir);
    file(&src.path.join("imgfile"), b"img\n", 0o644, 1000, 1000);
    let low = dir.dir("idmappable");
    let m = ShiftMount::with_args(Backend::Fuse, &["--idmappable"], &src.path, &low);

    let bundle = dir.dir("bundle");
    let rootfs = bundle.join("rootfs");
    mkdir(&rootfs, 0o755, 100000, 100000);
    for d in ["bin", "dev", "proc", "sys", "tmp", "vol"] {
        mkdir(&rootfs.join(d), 0o755, 100000, 100000);
    }
    file(
        &rootfs.join("bin/busybox"),
        &fs::read(busybox).expect("read busybox"),
        0o755,
        100000,
        100000,
    );
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("symlink sh");
    run(Command::new("crun").arg("spec").current_dir(&bundle)).assert_ok();
    let path = bundle.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).expect("read config")).expect("config is JSON");
    let map = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    c["process"]["terminal"] = false.into();
    c["process"]["args"] = serde_json::json!([
        "/bin/sh",
        "-c",
        "busybox stat -c %u:%g /vol/imgfile && busybox touch /vol/made && busybox stat -c %u:%g /vol/made"
    ]);
    c["root"]["readonly"] = false.into();
    c["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .push(serde_json::json!({"type": "user"}));
    c["linux"]["uidMappings"] = map.clone();
    c["linux"]["gidMappings"] = map;
    c["mounts"] = serde_json::json!([
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/vol", "type": "bind", "source": low, "options": ["bind", "rw", "idmap"]}
    ]);
    fs::write(&path, serde_json::to_vec_pretty(&c).expect("JSON")).expect("write config");
    let id = format!("shiftfs-test-{}", std::process::id());
    let out = run(Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t cgroup2 none /sys/fs/cgroup && exec crun --cgroup-manager=disabled run {id}"
        ))
        .current_dir(&bundle));
    out.assert_ok();
    // The container sees the image's ids as its own, and what its root makes is image root's.
    assert_eq!(out.stdout, "1000:1000\n0:0\n", "{out}");
    assert_eq!(lstat_ids(src.path.join("made")), (0, 0));
    m.unmount();
    drop(src);
    dir.finish();
}

/// Unmounting the idmappable mount would stop the daemon that also serves the idmapped
/// mounts stacked on it: refused while they are there, naming them.
#[test]
fn idmappable_mount_under_a_stack_is_not_unmounted() {
    if !require(Backend::Stack) {
        return;
    }
    let dir = TestDir::new("idm-umount");
    let src = dir.dir("src");
    file(&src.join("f"), b"still here\n", 0o644, 0, 0);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(Backend::Stack, MAP, &src, &mnt);
    let low = dir.path().join("idmappable-mnt");
    let out = run(shiftfs(["umount"]).arg(&low));
    out.assert_fails();
    assert!(
        out.stderr.contains("idmapped mounts stacked on it")
            && out.stderr.contains(&*mnt.to_string_lossy()),
        "{out}"
    );
    assert!(is_mountpoint(&low), "still mounted");
    assert_eq!(
        fs::read(mnt.join("f")).expect("the stack still works"),
        b"still here\n"
    );
    m.unmount();
    dir.finish();
}

/// A long listing of a FUSE source (sshfs) through a shifting FUSE mount with the default
/// cache: sshfs can only continue a listing on the handle that began it, so the daemon must
/// not resume one on a fresh handle at an offset (sshfs 3.7 aborts on an assertion, and every
/// later access gets ENOTCONN).
#[test]
fn long_listing_of_an_sshfs_source() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("idm-sshfs-list");
    let Some(src) = sshfs(&dir) else {
        return;
    };
    // Made on the remote side: many entries with long names fill several READDIR replies.
    let remote = dir.path().join("remote");
    let names: Vec<String> = (0..1500)
        .map(|i| format!("{i:04}-{}", "x".repeat(100)))
        .collect();
    for n in &names {
        fs::write(remote.join(n), b"").expect("make a remote file");
    }
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(Backend::Fuse, MAP, &src.path, &mnt);
    for round in 0..2 {
        let mut seen: Vec<String> = fs::read_dir(&mnt)
            .expect("list the mount")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        seen.sort();
        assert_eq!(seen, names, "listing {round} through the mount");
    }
    assert!(
        fs::metadata(src.path.join(&names[0])).is_ok(),
        "sshfs still serves"
    );
    m.unmount();
    drop(src);
    dir.finish();
}

/// The kernel's FUSE requests to one connection (the fuse:fuse_request_send tracepoint, in
/// a tracefs instance of its own, filtered on the connection), removed on drop.
struct FuseRequests {
    instance: PathBuf,
}

impl FuseRequests {
    /// Starts counting the requests sent to the FUSE mount at `mnt`; None (after `skip`)
    /// without tracefs or the tracepoint.
    fn start(mnt: &Path) -> Option<Self> {
        let tracing = Path::new("/sys/kernel/tracing");
        if !tracing.join("events/fuse/fuse_request_send").is_dir() {
            skip("needs tracefs on /sys/kernel/tracing with the fuse:fuse_request_send event");
            return None;
        }
        let instance = tracing.join(format!("instances/shiftfs-test-{}", std::process::id()));
        fs::create_dir(&instance).expect("make a tracefs instance");
        let counter = Self { instance };
        // The tracepoint's connection is the mount's dev_t as the kernel encodes it.
        let dev = fs::metadata(mnt).expect("stat the mount").dev();
        let conn = (libc::major(dev) << 20) | libc::minor(dev);
        let event = counter.instance.join("events/fuse/fuse_request_send");
        fs::write(event.join("filter"), format!("connection == {conn}")).expect("set the filter");
        fs::write(event.join("enable"), "1").expect("enable the tracepoint");
        Some(counter)
    }

    /// How many requests of each opcode (`FUSE_OPEN`, ...) were sent; stops counting.
    fn stop(&self) -> std::collections::BTreeMap<String, usize> {
        let event = self.instance.join("events/fuse/fuse_request_send");
        fs::write(event.join("enable"), "0").expect("disable the tracepoint");
        let trace = fs::read_to_string(self.instance.join("trace")).expect("read the trace");
        let mut counts = std::collections::BTreeMap::new();
        for line in trace.lines().filter(|l| !l.starts_with('#')) {
            if let Some(op) = line
                .split(['(', ')'])
                .nth(1)
                .filter(|op| op.starts_with("FUSE_"))
            {
                *counts.entry(op.to_string()).or_default() += 1;
            }
        }
        counts
    }
}

impl Drop for FuseRequests {
    fn drop(&mut self) {
        let _ = fs::write(
            self.instance.join("events/fuse/fuse_request_send/enable"),
            "0",
        );
        let _ = fs::remove_dir(&self.instance);
    }
}

/// Small files through a shifting FUSE mount of an sshfs source: what lands on the server,
/// new objects' owners when the first creator's uid happens to be the server's user, no
/// chown for a new file whose owner is already right, and the delete checks (an owner
/// outside the map still refuses unlink and rename with EOVERFLOW).
#[test]
fn small_files_on_an_sshfs_source() {
    if !require(Backend::Fuse) {
        return;
    }
    let dir = TestDir::new("idm-sshfs-small");
    let Some(src) = sshfs(&dir) else {
        return;
    };
    let remote = dir.path().join("remote");
    mkdir(&remote.join("shared"), 0o1777, 0, 0);
    mkdir(&remote.join("sgid"), 0o2777, 0, 50);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(Backend::Fuse, MAP, &src.path, &mnt);
    let ns = UserNs::new(NS_MAP);
    let m_ = q(&mnt);
    // First the container root: sshfs logs in as root, so the server gives its files the
    // right owner by chance. Another user's files must still get theirs, the setgid
    // directory's group included.
    run(&mut ns.sh(&format!("echo warm > {m_}/warm"))).assert_ok();
    run(&mut ns.sh_as(
        1000,
        1000,
        &format!("set -e; echo u > {m_}/shared/u; mkdir {m_}/shared/ud; echo s > {m_}/sgid/s"),
    ))
    .assert_ok();
    assert_eq!(on_source(&remote.join("warm")), (0, 0, b"warm\n".to_vec()));
    assert_eq!(
        on_source(&remote.join("shared/u")),
        (1000, 1000, b"u\n".to_vec())
    );
    assert_eq!(lstat_ids(remote.join("shared/ud")), (1000, 1000));
    assert_eq!(
        on_source(&remote.join("sgid/s")),
        (1000, 50, b"s\n".to_vec())
    );

    // The source is now known to ignore the creator; the root's new files, made with the
    // right owner, are not chowned (sshfs would send a SETSTAT each).
    let Some(requests) = FuseRequests::start(&src.path) else {
        return;
    };
    const N: usize = 20;
    run(&mut ns.sh(&format!(
        "set -e; for i in $(seq 1 {N}); do printf 'file %s\\n' $i > {m_}/f$i; done"
    )))
    .assert_ok();
    let counts = requests.stop();
    let count = |op: &str| counts.get(op).copied().unwrap_or(0);
    assert_eq!(count("FUSE_CREATE"), N, "one create per file: {counts:?}");
    assert_eq!(count("FUSE_SETATTR"), 0, "no chown: {counts:?}");
    for i in 1..=N {
        assert_eq!(
            on_source(&remote.join(format!("f{i}"))),
            (0, 0, format!("file {i}\n").into_bytes())
        );
    }
    // Appending and reading back through the mount.
    let out = run(&mut ns.sh(&format!("echo more >> {m_}/f1 && cat {m_}/f1")));
    out.assert_ok();
    assert_eq!(out.stdout, "file 1\nmore\n");
    assert_eq!(
        fs::read(remote.join("f1")).expect("read"),
        b"file 1\nmore\n"
    );

    // Deleting: a mapped file goes; one owned by an id outside the map stays, for everyone.
    run(&mut ns.sh(&format!("rm {m_}/f2"))).assert_ok();
    assert!(!remote.join("f2").exists(), "deleted on the server");
    fs::write(remote.join("alien"), b"alien\n").expect("make a remote file");
    std::os::unix::fs::chown(remote.join("alien"), Some(70000), Some(70000)).expect("chown");
    let errno = |r: std::io::Result<()>| r.expect_err("refused").raw_os_error();
    assert_eq!(
        errno(fs::remove_file(mnt.join("alien"))),
        Some(libc::EOVERFLOW)
    );
    assert_eq!(
        errno(fs::rename(mnt.join("alien"), mnt.join("renamed"))),
        Some(libc::EOVERFLOW)
    );
    assert_eq!(
        errno(fs::rename(mnt.join("f3"), mnt.join("alien"))),
        Some(libc::EOVERFLOW)
    );
    let out = run(&mut ns.sh(&format!("rm -f {m_}/alien")));
    out.assert_fails();
    assert!(
        out.stderr.contains("Value too large for defined data type"),
        "{}",
        out.stderr
    );
    assert_eq!(
        on_source(&remote.join("alien")),
        (70000, 70000, b"alien\n".to_vec())
    );
    assert_eq!(fs::read(remote.join("f3")).expect("f3 stays"), b"file 3\n");

    drop(ns);
    m.unmount();
    drop(src);
    dir.finish();
}
