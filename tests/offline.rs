//! Offline shift and scan on real trees (issue 6). Needs root, and `setfacl`, `setcap`,
//! `getfattr` (Debian: acl, libcap2-bin, attr); the minbase tests use the Debian minbase tree
//! of `scripts/minbase.sh` (built with debootstrap if missing). Without those a
//! test skips, except under `CI=true`, where it fails.

mod prereq;
use prereq::prerequisite;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use shiftfs::xattr;

const BIN: &str = env!("CARGO_BIN_EXE_shiftfs");
const MAP: &str = "b:0:100000:65536";

/// Whether the test can run; under CI a missing prerequisite is a failure.
fn prerequisites(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            missing.push(t.to_string());
        }
    }
    prerequisite(missing.is_empty(), &format!("missing {missing:?}"))
}

fn sh(cwd: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .args(["-ec", script])
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn shiftfs(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = shiftfs(args);
    assert!(
        out.status.success(),
        "shiftfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn xattr_raw(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("{}: {name}: {e}", path.display()),
    }
}

fn xattr_names(path: &Path) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut buf[..]).unwrap();
    let mut names: Vec<Vec<u8>> = buf[..n]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    names.sort();
    names
}

/// The external view the issue asks for: every xattr (getfattr), stat fields but ctime and
/// atime (find -printf), and content hashes.
fn external_dump(tree: &Path) -> String {
    sh(
        tree,
        "getfattr -R -d -m - -e hex -P . 2>/dev/null | awk 'BEGIN{RS=\"\"} {print}' | sort; \
         find . -printf '%p %y %m %U %G %n %i %s %T@ %l\\n' | sort; \
         find . -type f -exec sha256sum {} + | sort",
    )
}

/// An independent dump for comparing two trees: path -> (type+mode, uid, gid, nlink, size,
/// every xattr, link target, content), hard links by first name.
fn dump(tree: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = tree.join(&rel);
        let md = std::fs::symlink_metadata(&p).unwrap();
        let mut line = format!(
            "{:o} {} {} {} {}",
            md.mode(),
            md.uid(),
            md.gid(),
            md.nlink(),
            if md.is_dir() { 0 } else { md.size() }
        );
        for name in xattr_names(&p) {
            let v = xattr_raw(&p, OsStr::from_bytes(&name).to_str().unwrap()).unwrap();
            line += &format!(" {}={:02x?}", String::from_utf8_lossy(&name), v);
        }
        if md.file_type().is_symlink() {
            line += &format!(" -> {}", std::fs::read_link(&p).unwrap().display());
        } else if md.is_file() {
            if md.nlink() > 1 {
                let first = inodes.entry(md.ino()).or_insert_with(|| rel.clone());
                line += &format!(" link-of {}", first.display());
            }
            line += &format!(" {:?}", std::fs::read(&p).unwrap());
        } else if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
        out.insert(rel, line);
    }
    out
}

fn owner(p: &Path) -> (u32, u32) {
    let md = std::fs::symlink_metadata(p).unwrap();
    (md.uid(), md.gid())
}

fn acl_ids(p: &Path, name: &str) -> Vec<(xattr::IdKind, u32)> {
    xattr::ids(name.as_bytes(), &xattr_raw(p, name).unwrap()).unwrap()
}

/// The tree of the issue's first CI case.
fn issue_tree(t: &Path) {
    sh(
        t,
        "mkdir bin sgdir acldir
         printf 'root\\n' > rootfile
         printf 'user\\n' > userfile && chown 1000:1000 userfile
         printf 'nobody\\n' > nobody && chown 65534:65534 nobody
         printf '#!/bin/sh\\n' > bin/suidroot && chmod 4755 bin/suidroot
         printf 'g\\n' > bin/sgidfile && chgrp 1000 bin/sgidfile && chmod 2755 bin/sgidfile
         chmod 2775 sgdir && chgrp 1000 sgdir
         printf 'acl\\n' > aclfile && setfacl -m u:1000:rw,g:1000:r aclfile
         setfacl -d -m u:1000:rwx,g:1000:rx acldir
         printf 'cap\\n' > bin/capv3 && chmod 755 bin/capv3 && setcap -n 1000 cap_net_raw+ep bin/capv3
         printf 'cap2\\n' > bin/capv2 && chmod 755 bin/capv2 && setcap cap_net_bind_service+ep bin/capv2
         printf 'linked\\n' > link1 && ln link1 bin/link2 && chown 1000:0 link1
         ln -s /etc/passwd passwd-link && chown -h 1000:1000 passwd-link
         mkfifo fifo && chown 1000:1000 fifo
         setfacl -m u:1000:r fifo",
    );
}

#[test]
fn shift_and_reverse_the_issue_tree() {
    if !prerequisites(&["setfacl", "setcap", "getfattr"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("tree");
    std::fs::create_dir(&t).unwrap();
    issue_tree(&t);
    // The tree root itself carries ACLs too (read through its fd, not a path).
    sh(&t, "setfacl -m u:1000:rx -m d:g:1000:rx .");
    let ts = t.to_str().unwrap();
    let before = external_dump(&t);
    let passwd_before = sh(&t, "stat -c '%i %u %g %a %Z %Y' /etc/passwd");
    let v2_before = xattr_raw(&t.join("bin/capv2"), "security.capability").unwrap();
    assert_eq!(xattr::capability_root(&v2_before).unwrap(), (2, 0));

    let out = ok(&["shift", "--map", MAP, ts]);
    assert!(out.contains("shifted"), "{out}");

    // Every owner id +100000, the tree root included.
    assert_eq!(owner(&t), (100000, 100000));
    assert_eq!(owner(&t.join("rootfile")), (100000, 100000));
    assert_eq!(owner(&t.join("userfile")), (101000, 101000));
    assert_eq!(owner(&t.join("nobody")), (165534, 165534));
    assert_eq!(owner(&t.join("fifo")), (101000, 101000));
    assert_eq!(owner(&t.join("sgdir")), (100000, 101000));
    // The symlink itself is shifted; its target is untouched.
    assert_eq!(owner(&t.join("passwd-link")), (101000, 101000));
    assert_eq!(
        sh(&t, "stat -c '%i %u %g %a %Z %Y' /etc/passwd"),
        passwd_before
    );
    // Modes survive chown: setuid, setgid file, setgid directory.
    let mode = |p: &str| {
        std::fs::symlink_metadata(t.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bin/suidroot"), 0o4755);
    assert_eq!(mode("bin/sgidfile"), 0o2755);
    assert_eq!(mode("sgdir"), 0o2775);
    // ACL entries, access and default, on a file, a directory and a fifo.
    use xattr::IdKind::{Gid, Uid};
    assert_eq!(
        acl_ids(&t.join("aclfile"), "system.posix_acl_access"),
        vec![(Uid, 101000), (Gid, 101000)]
    );
    assert_eq!(
        acl_ids(&t.join("acldir"), "system.posix_acl_default"),
        vec![(Uid, 101000), (Gid, 101000)]
    );
    assert_eq!(
        acl_ids(&t.join("fifo"), "system.posix_acl_access"),
        vec![(Uid, 101000)]
    );
    assert_eq!(acl_ids(&t, "system.posix_acl_access"), vec![(Uid, 101000)]);
    assert_eq!(acl_ids(&t, "system.posix_acl_default"), vec![(Gid, 101000)]);
    let getfacl = sh(&t, "getfacl -n aclfile");
    assert!(
        getfacl.contains("user:101000:rw-") && getfacl.contains("group:101000:r--"),
        "{getfacl}"
    );
    // Capabilities kept, root ids shifted: v3 1000 -> 101000, v2 (root 0) -> v3 100000.
    let cap = |p: &str| {
        xattr::capability_root(&xattr_raw(&t.join(p), "security.capability").unwrap()).unwrap()
    };
    assert_eq!(cap("bin/capv3"), (3, 101000));
    assert_eq!(cap("bin/capv2"), (3, 100000));
    let getcap = sh(&t, "getcap -n bin/capv3 bin/capv2");
    assert!(
        getcap.contains("cap_net_raw=ep [rootid=101000]"),
        "{getcap}"
    );
    assert!(
        getcap.contains("cap_net_bind_service=ep [rootid=100000]"),
        "{getcap}"
    );
    // Hard links are still one inode, shifted once (1000:0 -> 101000:100000).
    let (a, b) = (
        std::fs::symlink_metadata(t.join("link1")).unwrap(),
        std::fs::symlink_metadata(t.join("bin/link2")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!((a.uid(), a.gid()), (101000, 100000));
    // The map is recorded; no journal or marker is left behind.
    assert_eq!(
        xattr_raw(&t, "trusted.shiftfs.map").as_deref(),
        Some(MAP.as_bytes())
    );
    assert_eq!(xattr_raw(&t, "trusted.shiftfs.shift"), None);
    assert!(!t.join(".shiftfs-journal").exists());

    // The same shift again (a recovery script re-running blindly) succeeds and changes
    // nothing (issue 12); another map is refused, naming the tree's map.
    let shifted = external_dump(&t);
    let again = shiftfs(&["shift", "--map", MAP, ts]);
    assert!(again.status.success(), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
    assert_eq!(external_dump(&t), shifted);
    let other = shiftfs(&["shift", "--map", "b:0:300000:65536", ts]);
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains(&format!("holds ids for map {MAP}")), "{err}");
    assert!(err.contains("--reverse"), "{err}");
    assert_eq!(external_dump(&t), shifted);

    // --reverse gives back the tree byte for byte (xattrs, stat, contents, root mtime).
    ok(&["shift", "--map", MAP, "--reverse", ts]);
    assert_eq!(
        xattr_raw(&t.join("bin/capv2"), "security.capability").unwrap(),
        v2_before
    );
    let after = external_dump(&t);
    assert_eq!(before, after);
}

#[test]
fn from_to_moves_a_shifted_tree_and_wrong_from_is_refused() {
    if !prerequisites(&["setfacl", "setcap", "getfattr"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("tree");
    std::fs::create_dir(&t).unwrap();
    issue_tree(&t);
    let ts = t.to_str().unwrap();
    let original = dump(&t);
    ok(&["shift", "--map", MAP, ts]);
    // A --from that is not the tree's map is refused with the tree's map in the message.
    let wrong = shiftfs(&[
        "shift",
        "--from",
        "b:0:300000:65536",
        "--to",
        "b:0:200000:65536",
        ts,
    ]);
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success() && err.contains(MAP), "{err}");
    // scan --map judges from the recorded map: MAP -> 200000 covers everything, while
    // identity -> 200000 would not cover the on-disk 165534.
    let scan: serde_json::Value =
        serde_json::from_str(&ok(&["scan", "--json", "--map", "b:0:200000:65536", ts])).unwrap();
    assert_eq!(scan["recorded_map"], MAP);
    assert_eq!(
        scan["unmapped"]["uids"].as_array().unwrap().len(),
        0,
        "{scan}"
    );
    ok(&["shift", "--from", MAP, "--to", "b:0:200000:65536", ts]);
    assert_eq!(owner(&t.join("userfile")), (201000, 201000));
    assert_eq!(
        acl_ids(&t.join("aclfile"), "system.posix_acl_access"),
        vec![(xattr::IdKind::Uid, 201000), (xattr::IdKind::Gid, 201000)]
    );
    ok(&[
        "shift",
        "--from",
        "b:0:200000:65536",
        "--to",
        "identity",
        ts,
    ]);
    assert_eq!(dump(&t), original);
}

#[test]
fn unmapped_ids_stop_the_shift_before_any_write() {
    if !prerequisites(&["setfacl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("tree");
    std::fs::create_dir(&t).unwrap();
    sh(
        &t,
        "printf a > a; printf b > b && chown 70000:5 b; printf c > c && setfacl -m g:80000:r c",
    );
    let ts = t.to_str().unwrap();
    let before = dump(&t);
    let out = shiftfs(&["shift", "--map", MAP, ts]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uid 70000") && err.contains("gid 80000"),
        "{err}"
    );
    assert!(
        err.contains("nothing was changed") && err.contains("--skip-unmapped"),
        "{err}"
    );
    assert_eq!(dump(&t), before);
    assert_eq!(xattr_raw(&t, "trusted.shiftfs.map"), None);

    // The dry run lists changes and writes nothing.
    let dry = ok(&["shift", "--map", MAP, "--skip-unmapped", "--dry-run", ts]);
    assert!(dry.contains("a: uid 0 -> 100000; gid 0 -> 100000"), "{dry}");
    assert_eq!(dump(&t), before);

    let copy = dir.path().join("copy");
    sh(dir.path(), "cp -a tree copy");
    ok(&["shift", "--map", MAP, "--skip-unmapped=keep", ts]);
    assert_eq!(owner(&t.join("b")), (70000, 100005));
    assert_eq!(
        acl_ids(&t.join("c"), "system.posix_acl_access"),
        vec![(xattr::IdKind::Gid, 80000)]
    );
    ok(&[
        "shift",
        "--map",
        MAP,
        "--skip-unmapped=overflow",
        copy.to_str().unwrap(),
    ]);
    assert_eq!(owner(&copy.join("b")), (65534, 100005));
    assert_eq!(
        acl_ids(&copy.join("c"), "system.posix_acl_access"),
        vec![(xattr::IdKind::Gid, 65534)]
    );
}

/// A tree of `dirs * files` files with owners, modes, ACLs and capabilities spread over it.
fn big_tree(t: &Path, dirs: u32, files: u32) {
    let acl = xattr::encode_acl(&[
        xattr::AclEntry {
            tag: xattr::ACL_USER_OBJ,
            perm: 6,
            id: xattr::ACL_UNDEFINED_ID,
        },
        xattr::AclEntry {
            tag: xattr::ACL_USER,
            perm: 4,
            id: 1000,
        },
        xattr::AclEntry {
            tag: xattr::ACL_GROUP_OBJ,
            perm: 4,
            id: xattr::ACL_UNDEFINED_ID,
        },
        xattr::AclEntry {
            tag: xattr::ACL_GROUP,
            perm: 4,
            id: 2000,
        },
        xattr::AclEntry {
            tag: xattr::ACL_MASK,
            perm: 4,
            id: xattr::ACL_UNDEFINED_ID,
        },
        xattr::AclEntry {
            tag: xattr::ACL_OTHER,
            perm: 4,
            id: xattr::ACL_UNDEFINED_ID,
        },
    ]);
    let cap = xattr::Capability {
        version: 2,
        flags: xattr::VFS_CAP_FLAGS_EFFECTIVE,
        permitted: [1 << 13, 0],
        inheritable: [0, 0],
        rootid: None,
    }
    .encode();
    for d in 0..dirs {
        let dp = t.join(format!("d{d}"));
        std::fs::create_dir(&dp).unwrap();
        std::os::unix::fs::chown(&dp, Some(d % 3), Some(d % 5)).unwrap();
        for f in 0..files {
            let p = dp.join(format!("f{f}"));
            std::fs::write(&p, format!("{d}/{f}")).unwrap();
            let n = d * files + f;
            std::os::unix::fs::chown(&p, Some(n % 2000), Some(n % 1000)).unwrap();
            match n % 10 {
                0 => std::fs::set_permissions(&p, PermissionsExt::from_mode(0o4755)).unwrap(),
                1 => rustix::fs::setxattr(
                    &p,
                    "system.posix_acl_access",
                    &acl,
                    rustix::fs::XattrFlags::empty(),
                )
                .unwrap(),
                2 => rustix::fs::setxattr(
                    &p,
                    "security.capability",
                    &cap,
                    rustix::fs::XattrFlags::empty(),
                )
                .unwrap(),
                3 => std::os::unix::fs::symlink("../d0/f0", dp.join(format!("l{f}"))).unwrap(),
                _ => {}
            }
        }
    }
}

fn marker_present(t: &Path) -> bool {
    xattr_raw(t, "trusted.shiftfs.shift").is_some()
}

#[test]
fn sigkill_then_rerun_equals_an_uninterrupted_shift() {
    if prerequisites(&[]) {
        kill_and_resume(MAP);
    }
}

/// Old and new ids overlap (on-disk 1000 becomes 2000 while 0 becomes 1000): whether an
/// inode is done cannot be told from its ids alone.
#[test]
fn sigkill_then_rerun_with_overlapping_ranges() {
    if prerequisites(&[]) {
        kill_and_resume("b:0:1000:65536");
    }
}

fn kill_and_resume(map: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for t in [&a, &b] {
        std::fs::create_dir(t).unwrap();
        big_tree(t, 40, 250);
    }
    assert_eq!(dump(&a).len(), dump(&b).len());
    ok(&["shift", "--map", map, a.to_str().unwrap()]);
    let want = dump(&a);
    let f0 = |t: &Path, d: u32| owner(&t.join(format!("d{d}/f0")));
    let before: Vec<_> = (0..40).map(|d| f0(&b, d)).collect();

    // First a kill as soon as the journal appears (most likely before the marker is set:
    // nothing changed yet). Then kills at growing delays after the marker is set, until two
    // have landed half way through (marker set, some inodes shifted, some not).
    let bs = b.to_str().unwrap();
    let spawn = || {
        Command::new(BIN)
            .args(["shift", "--map", map, bs])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_for = |child: &mut std::process::Child, cond: &dyn Fn() -> bool| {
        let t0 = std::time::Instant::now();
        while !cond() && t0.elapsed() < Duration::from_secs(120) {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    };
    let mut child = spawn();
    wait_for(&mut child, &|| b.join(".shiftfs-journal").exists());
    let _ = child.kill(); // SIGKILL
    child.wait().unwrap();

    let mut partial_kills = 0;
    let mut delay_us = 500u64;
    for _ in 0..100 {
        if partial_kills >= 2 {
            break;
        }
        let mut child = spawn();
        wait_for(&mut child, &|| marker_present(&b));
        std::thread::sleep(Duration::from_micros(delay_us));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let shifted = (0..40u32)
            .filter(|&d| f0(&b, d) != before[d as usize])
            .count();
        if status.code().is_none() && marker_present(&b) && shifted > 0 && shifted < 40 {
            partial_kills += 1;
        }
        if !marker_present(&b) && xattr_raw(&b, "trusted.shiftfs.map").is_some() {
            break; // finished before the kill
        }
        // Geometric steps: the window is the apply phase, wherever it starts.
        delay_us = delay_us * 23 / 20;
    }
    eprintln!("partial kills: {partial_kills}");
    assert!(partial_kills >= 1, "never caught the shift half way");
    if marker_present(&b) {
        let out = ok(&["shift", "--map", map, bs]);
        assert!(out.contains("finished the interrupted shift"), "{out}");
    }
    assert!(!marker_present(&b));
    assert!(!b.join(".shiftfs-journal").exists());
    let got = dump(&b);
    assert_eq!(got.len(), want.len());
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "{}", k.display());
    }
    // And the same shift once more has nothing to do.
    let again = shiftfs(&["shift", "--map", map, bs]);
    assert!(again.status.success(), "{again:?}");
    assert_eq!(dump(&b), got);
}

#[test]
fn interrupted_shift_blocks_other_shifts() {
    if !prerequisites(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    std::fs::create_dir(&t).unwrap();
    big_tree(&t, 2, 5);
    // What a kill right after the marker was set leaves behind: marker and journal.
    let ts = t.to_str().unwrap();
    let dry = ok(&["shift", "--map", MAP, "--dry-run", ts]);
    assert!(dry.contains("would change"), "{dry}");
    rustix::fs::setxattr(
        &t,
        "trusted.shiftfs.shift",
        format!("from=b:0:0:4294967295 to={MAP}").as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let other = shiftfs(&["shift", "--map", "b:0:200000:65536", ts]);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{err}");
    assert!(
        err.contains(&format!("interrupted shift from identity to {MAP}")),
        "{err}"
    );
    // Marker but no journal and no recorded map: inconsistent, refused rather than guessed.
    let same = shiftfs(&["shift", "--map", MAP, ts]);
    assert!(!same.status.success());
    assert!(String::from_utf8_lossy(&same.stderr).contains("journal"));
}

#[test]
fn scan_reports_ids_and_hazards() {
    if !prerequisites(&["setfacl", "setcap"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("tree");
    std::fs::create_dir(&t).unwrap();
    issue_tree(&t);
    sh(
        &t,
        "mknod null c 1 3; mkdir open && chmod 777 open; mkdir tmp && chmod 1777 tmp
         printf x > ../outside && ln ../outside leaks && chown 70000 leaks",
    );
    let json = ok(&[
        "scan",
        "--json",
        "--map",
        "b:0:100000:65536",
        t.to_str().unwrap(),
    ]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    let strs = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let h = &r["hazards"];
    assert_eq!(strs(&h["setuid"]), vec!["bin/suidroot"]);
    assert_eq!(strs(&h["setgid"]), vec!["bin/sgidfile"]);
    assert_eq!(strs(&h["devices"]), vec!["null"]);
    assert_eq!(strs(&h["world_writable_dirs_without_sticky"]), vec!["open"]);
    assert_eq!(h["hard_links_leaving_tree"][0]["path"], "leaks");
    let caps: Vec<(String, u64)> = h["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["root_id"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        caps,
        vec![("bin/capv2".into(), 0), ("bin/capv3".into(), 1000)]
    );
    let uid = |id: u64| {
        r["uids"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["id"] == id)
            .cloned()
            .unwrap()
    };
    // uid 1000 owns userfile, link1 (one inode, two names), passwd-link, fifo; named in
    // the ACLs of aclfile, acldir (default) and fifo; root of capv3.
    let u1000 = uid(1000);
    assert_eq!(
        (
            u1000["owners"].as_u64(),
            u1000["acl_entries"].as_u64(),
            u1000["capability_roots"].as_u64()
        ),
        (Some(4), Some(3), Some(1))
    );
    assert_eq!(uid(65534)["owners"], 1);
    assert_eq!(r["unmapped"]["uids"][0]["id"], 70000);
    assert_eq!(r["unmapped"]["gids"].as_array().unwrap().len(), 0);
    // A shift changes such an inode outside the tree too: it says so.
    let dry = shiftfs(&[
        "shift",
        "--map",
        MAP,
        "--skip-unmapped",
        "--dry-run",
        t.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&dry.stderr);
    assert!(
        dry.status.success() && err.contains("1 inode(s) also have names outside the tree"),
        "{err}"
    );
    assert!(err.contains("leaks"), "{err}");
    // For real it stops before writing anything, unless told to go ahead.
    let outside = dir.path().join("outside");
    let refused = shiftfs(&[
        "shift",
        "--map",
        MAP,
        "--skip-unmapped",
        t.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("--allow-external-links"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&outside).unwrap().uid(), 70000);
    assert_eq!(std::fs::metadata(t.join("bin/suidroot")).unwrap().uid(), 0);
    let table = ok(&["scan", t.to_str().unwrap()]);
    assert!(
        table.contains("setuid files (1):\n  bin/suidroot"),
        "{table}"
    );
}

/// The Debian minbase tree, built once and cached by `scripts/minbase.sh` (debootstrap).
fn minbase() -> Option<PathBuf> {
    if !prerequisites(&["debootstrap"]) {
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/minbase.sh");
    let out = Command::new(script).output().unwrap();
    assert!(
        out.status.success(),
        "scripts/minbase.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(p.join("etc/debian_version").exists(), "{}", p.display());
    Some(p)
}

#[test]
fn scan_of_debian_minbase_matches_find() {
    if !prerequisites(&[]) {
        return;
    }
    let Some(mb) = minbase() else { return };
    let json = ok(&["scan", "--json", mb.to_str().unwrap()]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    let list = |v: &serde_json::Value| -> Vec<String> {
        let mut l: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        l.sort();
        l
    };
    let find = |args: &str| -> Vec<String> {
        let mut l: Vec<String> = sh(&mb, &format!("find . -xdev {args} -printf '%P\\n'"))
            .lines()
            .map(str::to_string)
            .collect();
        l.sort();
        l
    };
    let setuid = find("-perm -4000 ! -type d");
    assert!(setuid.contains(&"usr/bin/su".to_string()), "{setuid:?}");
    assert_eq!(list(&r["hazards"]["setuid"]), setuid);
    assert_eq!(list(&r["hazards"]["setgid"]), find("-perm -2000 ! -type d"));
    assert_eq!(
        list(&r["hazards"]["devices"]),
        find("\\( -type c -o -type b \\)")
    );
    // Owner counts per inode, as find sees them.
    for (field, key) in [("%U", "uids"), ("%G", "gids")] {
        let mut want: BTreeMap<u64, u64> = BTreeMap::new();
        for l in sh(
            &mb,
            &format!("find . -xdev -printf '%i {field}\\n' | sort -u"),
        )
        .lines()
        {
            let id: u64 = l.split(' ').nth(1).unwrap().parse().unwrap();
            *want.entry(id).or_default() += 1;
        }
        let got: BTreeMap<u64, u64> = r[key]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["owners"].as_u64() != Some(0))
            .map(|u| (u["id"].as_u64().unwrap(), u["owners"].as_u64().unwrap()))
            .collect();
        assert_eq!(got, want, "{key}");
    }
    assert_eq!(
        r["inodes"].as_u64().unwrap(),
        sh(&mb, "find . -xdev -printf '%i\\n' | sort -u | wc -l")
            .trim()
            .parse::<u64>()
            .unwrap()
    );
}

#[test]
fn minbase_copy_shifts_and_reverses_exactly() {
    if !prerequisites(&["getfattr"]) {
        return;
    }
    let Some(mb) = minbase() else { return };
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("rootfs");
    sh(dir.path(), &format!("cp -a {} rootfs", mb.display()));
    let before = external_dump(&t);
    let ts = t.to_str().unwrap();
    ok(&["shift", "--map", MAP, ts]);
    assert_eq!(owner(&t.join("usr/bin/su")), (100000, 100000));
    assert_eq!(
        std::fs::metadata(t.join("usr/bin/su"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o4755
    );
    let unshifted = sh(&t, "find . -xdev -uid -100000 -printf '%P\\n' | head");
    assert_eq!(unshifted, "");
    ok(&["shift", "--map", MAP, "--reverse", ts]);
    assert_eq!(external_dump(&t), before);
}

#[test]
fn a_stale_journal_is_dropped_and_a_foreign_one_never_touched() {
    if !prerequisites(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    std::fs::create_dir(&t).unwrap();
    big_tree(&t, 2, 5);
    let ts = t.to_str().unwrap();
    // A file of the journal's name that links to something outside: refused, untouched.
    let outside = dir.path().join("precious");
    std::fs::write(&outside, b"keep me").unwrap();
    std::fs::hard_link(&outside, t.join(".shiftfs-journal")).unwrap();
    let out = shiftfs(&["shift", "--map", MAP, ts]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a shiftfs journal"),
        "{err}"
    );
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
    assert_eq!(owner(&t.join("d0/f1")).0, 1);
    std::fs::remove_file(t.join(".shiftfs-journal")).unwrap();

    // What a crash between writing the journal and setting the marker leaves: a journal
    // and an untouched tree. Make one with a shift to elsewhere, then put the tree back.
    let before = dump(&t);
    ok(&["shift", "--map", "b:0:300000:65536", ts]);
    let journal = std::fs::read(dir.path().join("t/.shiftfs-journal")).ok();
    assert_eq!(journal, None, "journal left after a completed shift");
    ok(&["shift", "--map", "b:0:300000:65536", "--reverse", ts]);
    assert_eq!(dump(&t), before);
    let header = format!(
        "{{\"shiftfs_journal\":1,\"from\":\"b:0:0:4294967295\",\"to\":\"{MAP}\",\"unmapped\":\"fail\",\
         \"cross_file_systems\":false,\"root_atime\":[0,0],\"root_mtime\":[0,0],\"records\":0}}\n"
    );
    let j = t.join(".shiftfs-journal");
    std::fs::write(&j, header).unwrap();
    std::fs::set_permissions(&j, PermissionsExt::from_mode(0o600)).unwrap();
    ok(&["shift", "--map", MAP, ts]);
    assert!(!j.exists());
    assert_eq!(owner(&t.join("d0/f1")), (100001, 100001));
    assert!(!dump(&t).contains_key(Path::new(".shiftfs-journal")));
}

/// Lazily unmounts on drop, so a failing test leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

#[test]
fn mount_points_are_skipped_unless_asked() {
    if !prerequisites(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    std::fs::create_dir_all(t.join("mnt")).unwrap();
    std::fs::write(t.join("file"), b"x").unwrap();
    rustix::mount::mount(
        "tmpfs",
        t.join("mnt"),
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap();
    let _guard = Mounted(t.join("mnt"));
    std::fs::write(t.join("mnt/inner"), b"y").unwrap();
    let ts = t.to_str().unwrap();

    let scan = ok(&["scan", ts]);
    assert!(scan.contains("mount points skipped (1):\n  mnt"), "{scan}");
    let out = shiftfs(&["shift", "--map", MAP, ts]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped mount point mnt"));
    assert_eq!(owner(&t.join("file")), (100000, 100000));
    assert_eq!(owner(&t.join("mnt/inner")), (0, 0));
    assert_eq!(owner(&t.join("mnt")), (0, 0));

    ok(&["shift", "--map", MAP, "--reverse", ts]);
    ok(&["shift", "--map", MAP, "--cross-file-systems", ts]);
    assert_eq!(owner(&t.join("mnt/inner")), (100000, 100000));
    assert_eq!(owner(&t.join("mnt")), (100000, 100000));
}

#[test]
fn a_failed_shift_resumes_through_every_crash_window() {
    if !prerequisites(&["setcap", "chattr"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (t, want_tree) = (dir.path().join("t"), dir.path().join("want"));
    for p in [&t, &want_tree] {
        std::fs::create_dir(p).unwrap();
        sh(
            p,
            "printf a > stuck; printf b > capsuid && chmod 4755 capsuid && setcap cap_net_raw+ep capsuid
             printf c > other && chown 7:7 other; printf d > plain",
        );
    }
    ok(&["shift", "--map", MAP, want_tree.to_str().unwrap()]);
    let want = dump(&want_tree);
    let ts = t.to_str().unwrap();

    // An immutable file makes the shift fail half way: journal and marker stay.
    sh(&t, "chattr +i stuck");
    let out = shiftfs(&["shift", "--map", MAP, ts]);
    sh(&t, "chattr -i stuck");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("stuck: chown"),
        "{err}"
    );
    assert!(err.contains("re-run the same command"), "{err}");
    assert!(marker_present(&t) && t.join(".shiftfs-journal").exists());
    assert_eq!(owner(&t.join("plain")), (100000, 100000));
    // Put capsuid where a kill right after its chown leaves it: owner shifted, setuid and
    // capability cleared by chown, not yet restored.
    sh(
        &t,
        "setfattr -x security.capability capsuid && chmod 0755 capsuid",
    );
    // Someone changing a shifted file meanwhile is refused, not overwritten.
    std::os::unix::fs::chown(t.join("other"), Some(4242), None).unwrap();
    let out = shiftfs(&["shift", "--map", MAP, ts]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("other: the owner changed"),
        "{err}"
    );
    std::os::unix::fs::chown(t.join("other"), Some(100007), None).unwrap();

    let out = ok(&["shift", "--map", MAP, ts]);
    assert!(out.contains("finished the interrupted shift"), "{out}");
    assert_eq!(dump(&t), want);
    assert_eq!(
        xattr::capability_root(&xattr_raw(&t.join("capsuid"), "security.capability").unwrap())
            .unwrap(),
        (3, 100000)
    );
}

#[test]
fn shift_as_non_root_is_refused_before_writing_anything() {
    if !prerequisites(&["setpriv"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("tree");
    std::fs::create_dir(&t).unwrap();
    std::fs::write(t.join("f"), b"x").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "shift",
            "--map",
            MAP,
        ])
        .arg(&t)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs root"), "{err}");
    let names: Vec<_> = std::fs::read_dir(&t)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("f")],
        "nothing but the tree's own file"
    );
    // Root can then shift it: no journal was left in the way.
    ok(&["shift", "--map", MAP, t.to_str().unwrap()]);
}

/// Removes a tree too deep for path-based removal (`rm` walks it by fd).
struct RmRf(PathBuf);

impl Drop for RmRf {
    fn drop(&mut self) {
        let _ = Command::new("rm").arg("-rf").arg(&self.0).status();
    }
}

const DEEP: usize = 3000;
/// How many of the innermost directories are owned by 1000:1000 (the rest by root).
const DEEP_OWNED: usize = 10;

/// Opens `name` below `dir` as a directory, never following a symlink.
fn open_dir_at(dir: impl std::os::fd::AsFd, name: &str) -> std::os::fd::OwnedFd {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap()
}

/// `t/level/level/.../level` (DEEP levels, far past PATH_MAX), built by fd: the innermost
/// DEEP_OWNED directories owned by 1000:1000, and in the deepest one a setuid file `deep`
/// (1000:2000, ACL u:1000, v3 capability with root id 1000) and a symlink `up` -> `..`
/// (1000:1000). Returns the deepest directory's fd.
fn deep_tree(t: &Path) -> std::os::fd::OwnedFd {
    use rustix::fs::{AtFlags, Gid, Mode, OFlags, Uid, XattrFlags};
    let mut dir = open_dir_at(rustix::fs::CWD, t.to_str().unwrap());
    for level in 0..DEEP {
        rustix::fs::mkdirat(&dir, "level", Mode::from_raw_mode(0o755)).unwrap();
        dir = open_dir_at(&dir, "level");
        if level >= DEEP - DEEP_OWNED {
            rustix::fs::fchown(&dir, Some(Uid::from_raw(1000)), Some(Gid::from_raw(1000))).unwrap();
        }
    }
    let f = rustix::fs::openat(
        &dir,
        "deep",
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o755),
    )
    .unwrap();
    rustix::fs::fchown(&f, Some(Uid::from_raw(1000)), Some(Gid::from_raw(2000))).unwrap();
    rustix::fs::fchmod(&f, Mode::from_raw_mode(0o4755)).unwrap();
    let acl = xattr::encode_acl(&[
        xattr::AclEntry {
            tag: xattr::ACL_USER_OBJ,
            perm: 7,
            id: xattr::ACL_UNDEFINED_ID,
        },
        xattr::AclEntry {
            tag: xattr::ACL_USER,
            perm: 5,
            id: 1000,
        },
        xattr::AclEntry {
            tag: xattr::ACL_GROUP_OBJ,
            perm: 5,
            id: xattr::ACL_UNDEFINED_ID,
        },
        xattr::AclEntry {
            tag: xattr::ACL_MASK,
            perm: 5,
            id: xattr::ACL_UNDEFINED_ID,
        },
        xattr::AclEntry {
            tag: xattr::ACL_OTHER,
            perm: 5,
            id: xattr::ACL_UNDEFINED_ID,
        },
    ]);
    rustix::fs::fsetxattr(&f, "system.posix_acl_access", &acl, XattrFlags::empty()).unwrap();
    let cap = xattr::Capability {
        version: 3,
        flags: xattr::VFS_CAP_FLAGS_EFFECTIVE,
        permitted: [1 << 13, 0],
        inheritable: [0, 0],
        rootid: Some(1000),
    }
    .encode();
    rustix::fs::fsetxattr(&f, "security.capability", &cap, XattrFlags::empty()).unwrap();
    rustix::fs::symlinkat("..", &dir, "up").unwrap();
    rustix::fs::chownat(
        &dir,
        "up",
        Some(Uid::from_raw(1000)),
        Some(Gid::from_raw(1000)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
    dir
}

/// Checks every level's owner (`base` for the outer levels, `base + 1000` for the innermost
/// ones), then the deepest file and symlink, walking down by fd.
fn check_deep_tree(t: &Path, base: u32) {
    use rustix::fs::AtFlags;
    let mut dir = open_dir_at(rustix::fs::CWD, t.to_str().unwrap());
    let st = rustix::fs::fstat(&dir).unwrap();
    assert_eq!((st.st_uid, st.st_gid), (base, base), "the tree root");
    for level in 0..DEEP {
        dir = open_dir_at(&dir, "level");
        let st = rustix::fs::fstat(&dir).unwrap();
        let want = if level >= DEEP - DEEP_OWNED {
            base + 1000
        } else {
            base
        };
        assert_eq!((st.st_uid, st.st_gid), (want, want), "level {}", level + 1);
        assert_eq!(st.st_mode & 0o7777, 0o755, "level {}", level + 1);
    }
    let st = rustix::fs::statat(&dir, "deep", AtFlags::SYMLINK_NOFOLLOW).unwrap();
    assert_eq!((st.st_uid, st.st_gid), (base + 1000, base + 2000));
    assert_eq!(st.st_mode & 0o7777, 0o4755, "setuid kept");
    let st = rustix::fs::statat(&dir, "up", AtFlags::SYMLINK_NOFOLLOW).unwrap();
    assert_eq!((st.st_uid, st.st_gid), (base + 1000, base + 1000));
    let f = rustix::fs::openat(
        &dir,
        "deep",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let get = |name: &str| {
        let mut buf = vec![0u8; 4096];
        let n = rustix::fs::fgetxattr(&f, name, &mut buf[..]).unwrap();
        buf[..n].to_vec()
    };
    assert_eq!(
        xattr::ids(b"system.posix_acl_access", &get("system.posix_acl_access")).unwrap(),
        vec![(xattr::IdKind::Uid, base + 1000)]
    );
    assert_eq!(
        xattr::capability_root(&get("security.capability")).unwrap(),
        (3, base + 1000)
    );
}

/// A tree far deeper than PATH_MAX (and than the default 1024 open files): scan and shift
/// walk it by fd, level by level.
#[test]
fn a_deep_tree_scans_and_shifts_at_every_level() {
    if !prerequisites(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("tree");
    std::fs::create_dir(&t).unwrap();
    let _rm = RmRf(t.clone());
    let deepest = deep_tree(&t);
    let ts = t.to_str().unwrap();

    let json = ok(&["scan", "--json", "--map", MAP, ts]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        r["inodes"].as_u64(),
        Some(DEEP as u64 + 3),
        "root, levels, file, link"
    );
    let find = |key: &str, id: u64| {
        r[key]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{key} {id} missing"))
    };
    let u1000 = find("uids", 1000);
    assert_eq!(u1000["owners"].as_u64(), Some(DEEP_OWNED as u64 + 2));
    assert_eq!(u1000["acl_entries"].as_u64(), Some(1));
    assert_eq!(u1000["capability_roots"].as_u64(), Some(1));
    assert_eq!(
        find("uids", 0)["owners"].as_u64(),
        Some((DEEP - DEEP_OWNED) as u64 + 1)
    );
    assert_eq!(find("gids", 2000)["owners"].as_u64(), Some(1));
    let deep_path = format!("{}deep", "level/".repeat(DEEP));
    assert_eq!(r["hazards"]["setuid"][0].as_str(), Some(deep_path.as_str()));
    assert_eq!(
        r["hazards"]["capabilities"][0]["path"].as_str(),
        Some(deep_path.as_str())
    );
    assert_eq!(r["unmapped"]["uids"].as_array().map(Vec::len), Some(0));

    // The deepest file immutable: the shift stops half way, and the re-run resolves the
    // journaled paths again (by fd, level by level) to finish it.
    let deep_file = rustix::fs::openat(
        &deepest,
        "deep",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let set_immutable = |on: bool| {
        let mut flags = rustix::fs::ioctl_getflags(&deep_file).unwrap();
        flags.set(rustix::fs::IFlags::IMMUTABLE, on);
        rustix::fs::ioctl_setflags(&deep_file, flags).unwrap();
    };
    set_immutable(true);
    let out = shiftfs(&["shift", "--map", MAP, ts]);
    set_immutable(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/deep: set xattr: Operation not permitted"),
        "{}",
        &err[err.len().saturating_sub(500)..]
    );
    assert!(marker_present(&t) && t.join(".shiftfs-journal").exists());
    let out = ok(&["shift", "--map", MAP, ts]);
    assert!(
        out.contains(&format!(
            "finished the interrupted shift from identity to {MAP} ({} inodes journaled)",
            DEEP + 3
        )),
        "{out}"
    );
    check_deep_tree(&t, 100000);
    assert!(!marker_present(&t) && !t.join(".shiftfs-journal").exists());

    // Back, with an open-file limit (hard, so not raised) far below the depth.
    let out = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\""])
        .args([BIN, "shift", "--map", MAP, "--reverse", ts])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_deep_tree(&t, 0);
}
