//! Changing a file's access ACL keeps its mode in step and clears setgid exactly when the
//! kernel would on a plain filesystem: unless the caller is in the file's group or holds
//! CAP_FSETID over it. FUSE cannot learn this from fuser 0.18 (no SETXATTR_EXT), so the daemon
//! decides; each case is compared with the same caller on a plain directory, on both backends.

mod common;

use std::path::Path;

use common::*;

const S_ISGID: u32 = 0o2000;

#[track_caller]
fn setfacl_as(uid: u32, gid: u32, spec: &str, path: &Path) {
    run(&mut cmd_as(
        uid,
        gid,
        "setfacl",
        [std::ffi::OsStr::new("-m"), spec.as_ref(), path.as_os_str()],
    ))
    .assert_ok();
}

fn setgid_after_acl_change(b: Backend) {
    if !require(b) || !require_tool("setfacl", "acl") {
        return;
    }
    let dir = TestDir::new("acl-sgid");
    let src = dir.dir("src");
    let mnt = dir.dir("mnt");
    let plain = dir.dir("plain");
    // Image owner 1000, group 2000: through the mount 101000:102000, as on the plain copies.
    for name in ["outsider", "member", "nsroot"] {
        file(&src.join(name), b"x\n", 0o2770, 1000, 2000);
        file(&plain.join(name), b"x\n", 0o2770, 101000, 102000);
    }
    let m = ShiftMount::new(b, MAP, &src, &mnt);

    // The owner, not in the group, without capabilities: setgid goes.
    setfacl_as(101000, 101000, "u:103000:r", &mnt.join("outsider"));
    setfacl_as(101000, 101000, "u:103000:r", &plain.join("outsider"));
    assert_eq!(
        mode_of(plain.join("outsider")) & S_ISGID,
        0,
        "the kernel's rule"
    );
    assert_eq!(
        mode_of(src.join("outsider")),
        mode_of(plain.join("outsider")),
        "mode after an ACL change by a non-member"
    );

    // The owner in the group: setgid stays; narrowing the mask narrows the group class.
    setfacl_as(101000, 102000, "u:103000:r", &mnt.join("member"));
    setfacl_as(101000, 102000, "u:103000:r", &plain.join("member"));
    setfacl_as(101000, 102000, "m::r", &mnt.join("member"));
    setfacl_as(101000, 102000, "m::r", &plain.join("member"));
    assert_eq!(mode_of(plain.join("member")), 0o2740, "the kernel's rule");
    assert_eq!(mode_of(src.join("member")), mode_of(plain.join("member")));

    // Root of a user namespace that maps the file's owner and group holds CAP_FSETID over it.
    let ns = UserNs::new(NS_MAP);
    run(ns
        .cmd_as(0, 0, "setfacl")
        .args(["-m", "u:3000:r"])
        .arg(mnt.join("nsroot")))
    .assert_ok();
    assert_eq!(
        mode_of(src.join("nsroot")) & S_ISGID,
        S_ISGID,
        "namespace root keeps setgid"
    );

    m.unmount();
    dir.finish();
}

backend_tests!(setgid_after_acl_change);
