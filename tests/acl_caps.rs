//! Ids inside xattr values: POSIX ACL entries and a file capability's root id are shifted like
//! owners, both ways, and still grant what they grant. Each case runs on both backends, and
//! through their stack (a kernel idmapped mount on an idmappable FUSE mount).
//! Needs `getfacl`/`setfacl` (acl), `getfattr` (attr), `setcap`/`getcap` (libcap2-bin).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn require_acl_tools(b: Backend) -> bool {
    require(b)
        && require_tool("setfacl", "acl")
        && require_tool("getfattr", "attr")
        && require_tool("setcap", "libcap2-bin")
}

/// `getfacl -n -p PATH` as host root, without comments, as a sorted list of entries.
#[track_caller]
fn acl_of(path: &Path) -> Vec<String> {
    let out = run(Command::new("getfacl")
        .args(["-n", "-p", "--omit-header"])
        .arg(path));
    out.assert_ok();
    let mut v: Vec<String> = out
        .stdout
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

#[track_caller]
fn setfacl(args: &[&str], path: &Path) {
    run(Command::new("setfacl").args(args).arg(path)).assert_ok();
}

/// An image with an ACL for image user and group 1000 on `acl-file` (mode 0640, root's), a
/// root-only `plain-file`, and a dir `dacl` whose default ACL grants user and group 1000.
fn image(dir: &TestDir) -> PathBuf {
    let src = dir.dir("src");
    file(&src.join("acl-file"), b"granted\n", 0o640, 0, 0);
    setfacl(&["-m", "u:1000:r,g:1000:r"], &src.join("acl-file"));
    file(&src.join("plain-file"), b"not granted\n", 0o640, 0, 0);
    mkdir(&src.join("dacl"), 0o755, 0, 0);
    setfacl(&["-m", "d:u:1000:rwx,d:g:1000:rx"], &src.join("dacl"));
    mkdir(&src.join("bin"), 0o755, 0, 0);
    src
}

fn getfacl_shows_shifted_ids(b: Backend) {
    if !require_acl_tools(b) {
        return;
    }
    let dir = TestDir::new("acl-get");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let before = acl_of(&src.join("acl-file"));
    let m = ShiftMount::new(b, MAP, &src, &mnt);

    let acl = acl_of(&mnt.join("acl-file"));
    assert!(
        acl.contains(&"user:101000:r--".to_owned()) && acl.contains(&"group:101000:r--".to_owned()),
        "ACL through the mount should name 101000 (image 1000): {acl:?}"
    );
    let dacl = acl_of(&mnt.join("dacl"));
    assert!(
        dacl.contains(&"default:user:101000:rwx".to_owned()),
        "{dacl:?}"
    );
    assert!(
        dacl.contains(&"default:group:101000:r-x".to_owned()),
        "{dacl:?}"
    );

    // The namespace sees its own ids.
    let ns = UserNs::new(NS_MAP);
    let out = run(&mut ns.sh(&format!("getfacl -n -p {}", q(mnt.join("acl-file")))));
    out.assert_ok();
    assert!(
        out.stdout.contains("user:1000:r--"),
        "the namespace should see its own id 1000:\n{out}"
    );

    drop(ns);
    m.unmount();
    assert_eq!(
        acl_of(&src.join("acl-file")),
        before,
        "reading changed the ACL on disk"
    );
    dir.finish();
}

fn setfacl_stores_image_ids(b: Backend) {
    if !require_acl_tools(b) {
        return;
    }
    let dir = TestDir::new("acl-set");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);

    // Host root names host ids.
    setfacl(&["-m", "u:102000:rw,g:102001:r"], &mnt.join("acl-file"));
    let disk = acl_of(&src.join("acl-file"));
    assert!(
        disk.contains(&"user:2000:rw-".to_owned()),
        "on-disk ACL should hold image ids: {disk:?}"
    );
    assert!(
        disk.contains(&"group:2001:r--".to_owned()),
        "on-disk ACL should hold image ids: {disk:?}"
    );
    assert!(disk.contains(&"user:1000:r--".to_owned()), "kept: {disk:?}");

    // The namespace root names namespace ids, which are image ids under this map.
    let ns = UserNs::new(NS_MAP);
    run(&mut ns.sh(&format!(
        "setfacl -m u:3000:r,d:g:3001:rx {}",
        q(mnt.join("dacl"))
    )))
    .assert_ok();
    let disk = acl_of(&src.join("dacl"));
    assert!(
        disk.contains(&"user:3000:r--".to_owned()),
        "on-disk ACL should hold image ids: {disk:?}"
    );
    assert!(
        disk.contains(&"default:group:3001:r-x".to_owned()),
        "on-disk ACL should hold image ids: {disk:?}"
    );

    drop(ns);
    m.unmount();
    dir.finish();
}

fn setfacl_unmapped_id_refused(b: Backend) {
    if !require_acl_tools(b) {
        return;
    }
    let dir = TestDir::new("acl-unmapped");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let before = acl_of(&src.join("acl-file"));
    let m = ShiftMount::new(b, MAP, &src, &mnt);

    let out = run(Command::new("setfacl")
        .args(["-m", "u:5:rw"])
        .arg(mnt.join("acl-file")));
    out.assert_fails();
    let out = run(Command::new("setfacl")
        .args(["-m", "g:5:rw"])
        .arg(mnt.join("acl-file")));
    out.assert_fails();

    m.unmount();
    assert_eq!(acl_of(&src.join("acl-file")), before, "on-disk ACL changed");
    dir.finish();
}

fn acl_grants_access(b: Backend) {
    if !require_acl_tools(b) {
        return;
    }
    let dir = TestDir::new("acl-access");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let granted = q(mnt.join("acl-file"));
    let other = q(mnt.join("plain-file"));

    // Host 101000 is image user 1000, named in the ACL.
    let out = run(&mut sh_as(101000, 109999, &format!("cat {granted}")));
    out.assert_ok();
    assert_eq!(out.stdout, "granted\n");
    let out = run(&mut sh_as(101000, 109999, &format!("cat {other}")));
    assert!(
        !out.ok() && out.stderr.contains("Permission denied"),
        "no ACL entry, no access:\n{out}"
    );
    // Host gid 101000 is image group 1000, named in the ACL.
    let out = run(&mut sh_as(109999, 101000, &format!("cat {granted}")));
    out.assert_ok();
    // An unnamed user gets the mode's "other" bits: none.
    let out = run(&mut sh_as(109999, 109999, &format!("cat {granted}")));
    assert!(!out.ok(), "unnamed user read an ACL-only file:\n{out}");

    m.unmount();
    dir.finish();
}

fn default_acl_inherited(b: Backend) {
    if !require_acl_tools(b) {
        return;
    }
    let dir = TestDir::new("acl-default");
    let src = image(&dir);
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let ns = UserNs::new(NS_MAP);
    run(&mut ns.sh(&format!(
        "set -e; touch {d}/f; mkdir {d}/sub",
        d = q(mnt.join("dacl"))
    )))
    .assert_ok();

    let f = acl_of(&src.join("dacl/f"));
    assert!(
        f.iter().any(|e| e.starts_with("user:1000:")),
        "file on disk: {f:?}"
    );
    assert!(
        f.iter().any(|e| e.starts_with("group:1000:")),
        "file on disk: {f:?}"
    );
    let sub = acl_of(&src.join("dacl/sub"));
    assert!(
        sub.contains(&"default:user:1000:rwx".to_owned()),
        "subdir: {sub:?}"
    );
    assert!(sub.contains(&"user:1000:rwx".to_owned()), "subdir: {sub:?}");
    assert_eq!(lstat_ids(src.join("dacl/f")), (0, 0));
    let shown = acl_of(&mnt.join("dacl/f"));
    assert!(
        shown.iter().any(|e| e.starts_with("user:101000:")),
        "{shown:?}"
    );

    drop(ns);
    m.unmount();
    dir.finish();
}

/// `getcap -n PATH` as host root.
#[track_caller]
fn getcap(path: &Path) -> String {
    let out = run(Command::new("getcap").arg("-n").arg(path));
    out.assert_ok();
    out.stdout
}

/// A copy of grep at `bin/NAME` in the image: grep reading `/proc/self/status` reports its
/// own effective capabilities.
fn grep_copy(src: &Path, name: &str) -> PathBuf {
    let grep = fs::read("/usr/bin/grep").expect("read /usr/bin/grep");
    let p = src.join("bin").join(name);
    file(&p, &grep, 0o755, 0, 0);
    p
}

/// `CapEff` of a process running `bin` (a copy of grep reading its own status).
fn cap_eff(ns: &UserNs, uid: u32, bin: &Path) -> String {
    let out = run(&mut ns.sh_as(uid, uid, &format!("{} CapEff /proc/self/status", q(bin))));
    out.assert_ok();
    out.stdout
        .trim()
        .trim_start_matches("CapEff:")
        .trim()
        .to_owned()
}

fn file_capability_root_id(b: Backend) {
    if !require_acl_tools(b) {
        return;
    }
    let dir = TestDir::new("caps");
    let src = image(&dir);
    for name in ["capgrep", "plaingrep"] {
        grep_copy(&src, name);
    }
    let mnt = dir.dir("mnt");
    // File capabilities are ignored on nosuid mounts.
    let m = ShiftMount::with_args(b, &["--map", MAP, "-o", "suid"], &src, &mnt);
    let ns = UserNs::new(NS_MAP);

    run(&mut ns.sh(&format!(
        "setcap cap_net_bind_service+ep {}",
        q(mnt.join("bin/capgrep"))
    )))
    .assert_ok();

    // On disk the root id is image root 0, which the initial namespace reads back as a plain
    // (v2) capability, or as v3 with root id 0.
    let out = run(Command::new("getfattr")
        .args(["-n", "security.capability", "-e", "hex", "--absolute-names"])
        .arg(src.join("bin/capgrep")));
    out.assert_ok();
    let hex = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("security.capability=0x"))
        .unwrap_or_else(|| panic!("no capability on disk:\n{out}"))
        .to_owned();
    let v2 = hex.starts_with("01000002") || hex.starts_with("00000002");
    let v3_root0 = (hex.starts_with("01000003") || hex.starts_with("00000003"))
        && hex.len() == 48
        && hex.ends_with("00000000");
    assert!(v2 || v3_root0, "on-disk capability {hex} is not root id 0");
    let caps = getcap(&src.join("bin/capgrep"));
    assert!(
        caps.contains("cap_net_bind_service=ep") && !caps.contains("rootid"),
        "host view of the source:\n{caps}"
    );
    // Through the mount the host sees it belongs to the namespace whose root is 100000.
    let caps = getcap(&mnt.join("bin/capgrep"));
    assert!(
        caps.contains("cap_net_bind_service=ep") && caps.contains("rootid=100000"),
        "host view through the mount:\n{caps}"
    );

    // It works for a non-root user of that namespace (root would have every capability anyway).
    assert_eq!(
        cap_eff(&ns, 1000, &mnt.join("bin/capgrep")),
        "0000000000000400"
    );
    assert_eq!(
        cap_eff(&ns, 1000, &mnt.join("bin/plaingrep")),
        "0000000000000000"
    );

    drop(ns);
    m.unmount();
    dir.finish();
}

/// A capability the image was built with (stored by real root: v2, root id implied 0) belongs
/// to the image's root, so it works for the container, whose root is the image's root.
fn image_capability_works_in_container(b: Backend) {
    if !require_acl_tools(b) {
        return;
    }
    let dir = TestDir::new("caps-image");
    let src = image(&dir);
    run(Command::new("setcap")
        .arg("cap_net_bind_service+ep")
        .arg(grep_copy(&src, "capgrep")))
    .assert_ok();
    let mnt = dir.dir("mnt");
    let m = ShiftMount::with_args(b, &["--map", MAP, "-o", "suid"], &src, &mnt);
    let ns = UserNs::new(NS_MAP);

    let caps = getcap(&mnt.join("bin/capgrep"));
    assert!(
        caps.contains("cap_net_bind_service=ep") && caps.contains("rootid=100000"),
        "through the mount the capability belongs to the namespace rooted at 100000:\n{caps}"
    );
    assert_eq!(
        cap_eff(&ns, 1000, &mnt.join("bin/capgrep")),
        "0000000000000400"
    );
    // The host's own root gets nothing from it through the mount.
    let out = run(&mut sh_as(
        1000,
        1000,
        &format!("{} CapEff /proc/self/status", q(mnt.join("bin/capgrep"))),
    ));
    out.assert_ok();
    assert!(
        out.stdout.contains("0000000000000000"),
        "host uid 1000:\n{out}"
    );

    drop(ns);
    m.unmount();
    dir.finish();
}

/// The daemon reads a file's capability through a file handle the caller holds open (no
/// walk of /proc): one set on the source from outside while the file is open is still seen
/// through the mount, and a write through the mount still removes it, as on the plain file
/// system.
fn capability_set_outside_while_open(b: Backend) {
    if !require_acl_tools(b) {
        return;
    }
    let dir = TestDir::new("caps-open");
    let src = image(&dir);
    let bin = grep_copy(&src, "opengrep");
    let mnt = dir.dir("mnt");
    let m = ShiftMount::with_args(b, &["--map", MAP, "-o", "suid"], &src, &mnt);
    let through = mnt.join("bin/opengrep");
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "exec 3>>{t}; setcap cap_net_bind_service+ep {s} || exit 9; echo \"open: $(getcap -n {t})\"; \
         printf x >&3; exec 3>&-; echo \"after: $(getcap -n {s})\"",
        t = q(&through),
        s = q(&bin),
    )));
    out.assert_ok();
    let open = out.stdout.lines().find_map(|l| l.strip_prefix("open: "));
    assert!(
        open.is_some_and(|l| l.contains("cap_net_bind_service=ep") && l.contains("rootid=100000")),
        "a capability set outside is not seen through the mount while the file is open:\n{out}"
    );
    let after = out.stdout.lines().find_map(|l| l.strip_prefix("after: "));
    assert_eq!(
        after.map(str::trim),
        Some(""),
        "a write through the mount left the capability on the source:\n{out}"
    );
    assert!(getcap(&src.join("bin/opengrep")).trim().is_empty());

    m.unmount();
    dir.finish();
}

/// With an ACL the mode's group bits are the mask, not the owning group's rights: a member of
/// the owning group whose `group::` entry is empty must not get the mask's rights.
fn acl_mask_does_not_widen_group_access(b: Backend) {
    if !require_acl_tools(b) {
        return;
    }
    let dir = TestDir::new("acl-mask");
    let src = image(&dir);
    file(&src.join("masked"), b"for 1000 only\n", 0o600, 0, 0);
    setfacl(&["-m", "u::rw,g::-,o::-,u:1000:rw"], &src.join("masked"));
    assert_eq!(
        lstat_mode(src.join("masked")) & 0o777,
        0o660,
        "mask shows as group bits"
    );
    let mnt = dir.dir("mnt");
    let m = ShiftMount::new(b, MAP, &src, &mnt);
    let masked = q(mnt.join("masked"));

    // Host gid 100000 is image group 0, the owning group, whose entry grants nothing.
    let out = run(&mut sh_as(109999, 100000, &format!("cat {masked}")));
    assert!(
        !out.ok(),
        "the owning group read a file its ACL entry denies (mode bits taken for the ACL):\n{out}"
    );
    let out = run(&mut sh_as(101000, 109999, &format!("cat {masked}")));
    out.assert_ok();

    m.unmount();
    dir.finish();
}

backend_tests!(
    getfacl_shows_shifted_ids,
    setfacl_stores_image_ids,
    setfacl_unmapped_id_refused,
    acl_grants_access,
    default_acl_inherited,
    file_capability_root_id,
    image_capability_works_in_container,
    capability_set_outside_while_open,
    acl_mask_does_not_widen_group_access,
);

stack_tests!(
    getfacl_shows_shifted_ids,
    setfacl_stores_image_ids,
    setfacl_unmapped_id_refused,
    acl_grants_access,
    default_acl_inherited,
    file_capability_root_id,
    image_capability_works_in_container,
    acl_mask_does_not_widen_group_access,
);
