//! The broker as users meet it: `shiftfsd` runs as root on a socket in a test directory, and
//! real unprivileged processes (uids 61001 "alice" and 61002 "bob", switched to with
//! `setpriv`) talk to it, as raw protocol lines or through the `shiftfs` CLI. The broker
//! knows them only by `SO_PEERCRED`; their names and subordinate ranges come from files in
//! the test directory. The tests that need `newuidmap` also make them real accounts
//! (`shiftfs-alice`, `shiftfs-bob`, with the same ranges in /etc/subuid and /etc/subgid).

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SHIFTFSD: &str = env!("CARGO_BIN_EXE_shiftfsd");
const ALICE: u32 = 61001;
const BOB: u32 = 61002;
const CONTAINERS_GID: u32 = 61500;
const BASE: u32 = 2147352576;
/// How long the broker gives a client to send one request.
const BROKER_TIMEOUT: Duration = Duration::from_secs(2);

/// A broker child process and the files it reads; killed and reaped on drop.
struct Broker {
    child: Child,
    socket: PathBuf,
    audit: PathBuf,
    shared: PathBuf,
}

impl Broker {
    fn start(dir: &TestDir) -> Self {
        let etc = dir.dir("etc");
        let shared = dir.dir("shared");
        std::fs::write(
            etc.join("passwd"),
            format!(
                "root:x:0:0::/root:/bin/sh\nalice:x:{ALICE}:{ALICE}::/:/bin/sh\nbob:x:{BOB}:{BOB}::/:/bin/sh\n"
            ),
        )
        .unwrap();
        std::fs::write(
            etc.join("group"),
            format!("containers:x:{CONTAINERS_GID}:\n"),
        )
        .unwrap();
        // Alice has 10 ids more than the policy lets one map use; one mount at once each.
        let sub = "alice:300000:65536\nalice:365536:10\nbob:400000:65536\n";
        std::fs::write(etc.join("subuid"), sub).unwrap();
        std::fs::write(etc.join("subgid"), sub).unwrap();
        std::fs::write(
            etc.join("policy.toml"),
            format!(
                "[limits]\nmax_map_ids = 65536\nmounts_per_user = 1\n\
                 [[source]]\npath = \"{}\"\nusers = [\"alice\"]\ngroups = [\"containers\"]\naccess = \"rw\"\n",
                shared.display()
            ),
        )
        .unwrap();
        // The administrator's files need not be readable by users: the broker reads them as
        // root, not with the caller's credentials it takes to open the caller's paths.
        for f in ["policy.toml", "subuid", "subgid", "passwd", "group"] {
            std::fs::set_permissions(etc.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let socket = dir.path().join("run/broker.sock");
        let audit = dir.path().join("log/audit.log");
        let mut cmd = Command::new(SHIFTFSD);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--audit-log")
            .arg(&audit)
            .arg("--syslog")
            .arg("none")
            .arg("--timeout")
            .arg(BROKER_TIMEOUT.as_secs_f64().to_string())
            .arg("--max-per-user")
            .arg("32");
        for f in ["policy", "subuid", "subgid", "passwd", "group"] {
            cmd.arg(format!("--{f}"))
                .arg(etc.join(if f == "policy" { "policy.toml" } else { f }));
        }
        // `list` reads (and prunes) mount records: keep other tests' records out of reach.
        cmd.env("SHIFTFS_RUN_DIR", dir.path().join("records"));
        let child = cmd.stdin(Stdio::null()).spawn().expect("start shiftfsd");
        let broker = Self {
            child,
            socket,
            audit,
            shared,
        };
        broker.wait_ready();
        broker
    }

    fn wait_ready(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < end, "shiftfsd did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's child processes (pid, state), from /proc.
    fn children(&self) -> Vec<(u32, char)> {
        let tasks = format!("/proc/{}/task", self.child.id());
        let mut out = Vec::new();
        for t in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            let list = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for pid in list.split_whitespace().filter_map(|p| p.parse().ok()) {
                if let Some((state, _)) = proc_stat(pid) {
                    out.push((pid, state));
                }
            }
        }
        out
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends request lines as uid `uid` (with extra groups) from a separate process: this test
/// binary re-run as `client_helper` under `setpriv`. Returns one reply per line.
fn ask_as(uid: u32, groups: &[u32], socket: &Path, lines: &[String]) -> Vec<serde_json::Value> {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let g: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", g.join(",")));
    }
    cmd.arg("--")
        .arg(exe)
        .args([
            "--exact",
            "client_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SHIFTFSD_TEST_SOCKET", socket)
        .env("SHIFTFSD_TEST_LINES", lines.join("\n"))
        .current_dir("/");
    let out = run_timeout(&mut cmd, Duration::from_secs(30));
    assert!(out.ok(), "client helper failed: {}", out.stderr);
    let replies: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_once("REPLY ").map(|(_, r)| r))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies.len(), lines.len(), "{}", out.stdout);
    replies
}

/// Root's requests, from this process.
fn ask(socket: &Path, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

/// The client side of `ask_as`: a no-op unless run by it.
#[test]
fn client_helper() {
    let (Some(socket), Some(lines)) = (
        std::env::var_os("SHIFTFSD_TEST_SOCKET"),
        std::env::var("SHIFTFSD_TEST_LINES").ok(),
    ) else {
        return;
    };
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for line in lines.split('\n') {
        w.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        print!("REPLY {reply}");
    }
}

fn mount(source: &Path, target: Option<&Path>, map: &str, extra: &str) -> String {
    let target = match target {
        Some(t) => format!("\"target\":\"{}\"", t.display()),
        None => "\"detached\":true".into(),
    };
    format!(
        "{{\"version\":1,\"op\":\"mount\",\"source\":\"{}\",{target},\"map\":\"{map}\"{extra}}}",
        source.display()
    )
}

/// Extra request fields asking for the FUSE backend.
const FUSE: &str = ",\"backend\":\"fuse\"";

fn error_of(v: &serde_json::Value) -> String {
    assert_eq!(v["ok"], false, "{v}");
    v["error"].as_str().unwrap().to_string()
}

#[test]
fn judges_the_peer_not_the_request() {
    if !require_root() || !require_tool("setpriv", "util-linux") {
        return;
    }
    let dir = TestDir::new("broker-rules");
    let broker = Broker::start(&dir);
    let src = broker.shared.join("img");
    mkdir(&src, 0o755, 0, 0);
    let mnt = dir.path().join("mnt-alice");
    mkdir(&mnt, 0o755, ALICE, ALICE);
    let bobs = dir.path().join("mnt-bob");
    mkdir(&bobs, 0o755, BOB, BOB);
    let link = dir.path().join("link");
    symlink(&mnt, &link, ALICE, ALICE);
    let outside = dir.dir("outside");
    // Allowed by the policy, but alice cannot reach it herself, so neither can her request.
    let private = broker.shared.join("private");
    mkdir(&private, 0o700, 0, 0);
    mkdir(&private.join("img"), 0o755, 0, 0);
    let rw = format!("b:{BASE}:300000:65536");
    let bobs_owner = format!("owned by uid {BOB}, not by alice");

    let cases: Vec<(String, Option<&str>)> = vec![
        // A request claiming another identity is not a request the broker reads.
        (
            r#"{"version":1,"op":"list","uid":0}"#.into(),
            Some("unknown field `uid`"),
        ),
        (
            mount(&src, Some(&mnt), &format!("b:{BASE}:400000:10"), ""),
            Some("delegated to bob"),
        ),
        (
            mount(&src, Some(&mnt), "b:0:0:1", ",\"read_only\":true"),
            Some("reaches host uid 0 (root)"),
        ),
        (
            mount(
                &src,
                Some(&mnt),
                "b:0:300000:65536,b:70000:3000000:1",
                ",\"read_only\":true",
            ),
            Some("neither alice's own uid 61001"),
        ),
        (
            mount(&src, Some(&mnt), "b:0:300000:65536", ""),
            Some("inner ids 0-65535 are real host ids"),
        ),
        (
            mount(
                &src,
                Some(&mnt),
                &format!("{rw},b:{}:365536:10", BASE + 65536),
                "",
            ),
            Some("covers 65546 ids; the policy allows at most 65536"),
        ),
        (
            mount(&outside, Some(&mnt), &rw, ""),
            Some("is not allowed by the policy"),
        ),
        (
            mount(&private.join("img"), Some(&mnt), &rw, ""),
            Some("Permission denied"),
        ),
        (
            mount(&private.join("none"), Some(&mnt), &rw, ""),
            Some("Permission denied"),
        ),
        (
            mount(&src, Some(&mnt), &rw, ",\"suid\":true"),
            Some("-o suid and -o dev are for root only"),
        ),
        (
            mount(&src, Some(&mnt), &rw, ",\"dev\":true"),
            Some("-o suid and -o dev are for root only"),
        ),
        (mount(&src, Some(&bobs), &rw, ""), Some(&bobs_owner)),
        (
            mount(&src, Some(&link), &rw, ""),
            Some("is a symbolic link"),
        ),
        (
            format!(
                "{{\"version\":1,\"op\":\"umount\",\"target\":\"{}\"}}",
                mnt.display()
            ),
            Some("only its owner or root may unmount it"),
        ),
        (umount_line(&link), Some("is a symbolic link")),
        (
            mount(&src, None, &rw, FUSE),
            Some("a detached mount fd comes from the kernel backend only"),
        ),
    ];
    let lines: Vec<String> = cases.iter().map(|(l, _)| l.clone()).collect();
    let replies = ask_as(ALICE, &[], &broker.socket, &lines);
    for ((line, want), reply) in cases.iter().zip(&replies) {
        let err = error_of(reply);
        let want = want.expect("every case here is refused");
        assert!(err.contains(want), "{line}: {err}");
    }
    assert!(nothing_mounted_under(dir.path()));
    // Allowed by every rule: a detached read-only tree (handed over, and closed with the
    // helper's connection), and a FUSE mount on her own target.
    let _guards = [Detach(mnt.clone()), Detach(bobs.clone())];
    let alice = ask_as(
        ALICE,
        &[],
        &broker.socket,
        &[
            mount(&src, None, "b:0:300000:65536", ",\"read_only\":true"),
            mount(&src, Some(&mnt), &rw, FUSE),
        ],
    );
    assert_eq!(
        (&alice[0]["ok"], &alice[0]["detached"]),
        (&serde_json::json!(true), &serde_json::json!(true)),
        "{}",
        alice[0]
    );
    assert_eq!(alice[1]["ok"], true, "{}", alice[1]);
    assert_eq!(alice[1]["backend"], "fuse", "{}", alice[1]);
    assert!(mount_at(&mnt).expect("mounted").fstype.starts_with("fuse"));
    // Bob is judged as bob: alice's map is not his, and the policy names alice, not bob,
    // unless he is in the containers group.
    let bob_rw = format!("b:{BASE}:400000:65536");
    let bob = ask_as(
        BOB,
        &[],
        &broker.socket,
        &[
            mount(&src, Some(&bobs), &rw, ""),
            mount(&src, Some(&bobs), &bob_rw, ""),
        ],
    );
    assert!(
        error_of(&bob[0]).contains("delegated to alice"),
        "{}",
        bob[0]
    );
    assert!(
        error_of(&bob[1]).contains("which bob may not shift"),
        "{}",
        bob[1]
    );
    let bob_member = ask_as(
        BOB,
        &[CONTAINERS_GID],
        &broker.socket,
        &[mount(&src, Some(&bobs), &bob_rw, FUSE)],
    );
    assert_eq!(bob_member[0]["ok"], true, "{}", bob_member[0]);

    // Root may ask for anything; a request alice would be refused (her target is taken now,
    // so root's own) is allowed, suid included.
    let roots = dir.dir("mnt-root");
    let _root_guard = Detach(roots.clone());
    let root = ask(
        &broker.socket,
        &mount(
            &src,
            Some(&roots),
            "b:0:0:1",
            ",\"suid\":true,\"backend\":\"fuse\"",
        ),
    );
    assert_eq!(root["ok"], true, "{root}");
    assert!(
        root["options"].as_str().unwrap().contains(",suid"),
        "{root}"
    );
    for t in [&mnt, &bobs, &roots] {
        let v = ask(&broker.socket, &umount_line(t));
        assert_eq!(v["ok"], true, "{v}");
    }

    // One audit line per decision (not for `list`'s parse error), with the real uid, and
    // one more with the result of each allowed operation.
    let audit = broker.audit_lines();
    let refusals = cases.len() - 1 + 2;
    let allowed = 2 + 1 + 1 + 3;
    assert_eq!(audit.len(), refusals + 2 * allowed, "{audit:#?}");
    let first = &audit[0];
    assert_eq!(
        (first["uid"].as_u64(), &first["allowed"]),
        (Some(u64::from(ALICE)), &serde_json::json!(false))
    );
    assert!(first["exe"].as_str().unwrap().contains("broker"), "{first}");
    assert!(
        first["reason"]
            .as_str()
            .unwrap()
            .contains("delegated to bob")
    );
    let fuse = audit
        .iter()
        .position(|a| a["backend"] == "fuse" && a["uid"] == ALICE && a["allowed"] == true)
        .expect("alice's FUSE mount is audited");
    assert_eq!(audit[fuse]["map"], rw);
    assert!(audit[fuse]["result"].is_null(), "decided before mounting");
    assert_eq!(audit[fuse + 1]["result"], "ok");
    assert_eq!(audit.last().unwrap()["uid"], 0);
    assert_eq!(audit.last().unwrap()["op"], "umount");
    // Lock files only for the three users' mount counts and the three mounted targets: the
    // refused requests' paths left none behind.
    let locks = std::fs::read_dir(dir.path().join("records/locks"))
        .unwrap()
        .count();
    assert_eq!(locks, 3 + 3, "{:?}", ls(dir.path().join("records/locks")));
    assert!(nothing_mounted_under(dir.path()));
    drop(broker);
    dir.finish();
}

fn nothing_mounted_under(dir: &Path) -> bool {
    mounts_under(dir).is_empty()
}

fn umount_line(target: &Path) -> String {
    format!(
        "{{\"version\":1,\"op\":\"umount\",\"target\":\"{}\"}}",
        target.display()
    )
}

const LIST: &str = r#"{"version":1,"op":"list"}"#;

/// Alice mounts an allowed source through the broker with a map inside her delegation and
/// the image range on inner side: the target shows the shifted owners, `list` shows the
/// mount to her (and root) but not to bob, bob cannot unmount it, she can.
#[test]
fn mounts_lists_and_unmounts_for_its_owner() {
    if !require(Backend::Kernel) || !require_tool("setpriv", "util-linux") {
        return;
    }
    let dir = TestDir::new("broker-mount");
    let broker = Broker::start(&dir);
    let src = broker.shared.join("img");
    mkdir(&src, 0o755, BASE, BASE);
    let file = src.join("f");
    std::fs::write(&file, "image\n").unwrap();
    std::os::unix::fs::chown(&file, Some(BASE + 5), Some(BASE + 7)).unwrap();
    let mnt = dir.path().join("mnt-alice");
    mkdir(&mnt, 0o755, ALICE, ALICE);
    let rw = format!("b:{BASE}:300000:65536");

    let line = mount(&src, Some(&mnt), &rw, ",\"backend\":\"kernel\"");
    let reply = &ask_as(ALICE, &[], &broker.socket, &[line])[0];
    // Unmounts the target lazily if anything below fails.
    let _guard = Detach(mnt.clone());
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["target"], mnt.display().to_string(), "{reply}");
    let id = reply["mount_id"].as_u64().expect("a mount id");

    let m = mount_at(&mnt).expect("the target is a mount");
    for opt in ["idmapped", "nosuid", "nodev"] {
        assert!(m.mount_options.iter().any(|o| o == opt), "{opt}: {m:?}");
    }
    // Her one mount is the most the policy allows her at once.
    let mnt2 = dir.path().join("mnt-alice-2");
    mkdir(&mnt2, 0o755, ALICE, ALICE);
    let line = mount(&src, Some(&mnt2), &rw, ",\"backend\":\"kernel\"");
    let second = &ask_as(ALICE, &[], &broker.socket, &[line])[0];
    let _guard2 = Detach(mnt2.clone());
    assert!(
        error_of(second).contains("the most the policy allows per user (1)"),
        "{second}"
    );
    assert!(mount_at(&mnt2).is_none(), "a refused mount was made");

    let root = std::fs::metadata(&mnt).unwrap();
    assert_eq!((root.uid(), root.gid()), (300000, 300000));
    let f = std::fs::metadata(mnt.join("f")).unwrap();
    assert_eq!((f.uid(), f.gid()), (300005, 300007));
    assert_eq!(std::fs::read_to_string(mnt.join("f")).unwrap(), "image\n");

    let alice = &ask_as(ALICE, &[], &broker.socket, &[LIST.into()])[0];
    let mounts = alice["mounts"].as_array().expect("mounts");
    assert_eq!(mounts.len(), 1, "{alice}");
    assert_eq!(mounts[0]["target"], mnt.display().to_string());
    assert_eq!(mounts[0]["owner"], ALICE);
    assert_eq!(mounts[0]["mount_id"], id);
    let bob = &ask_as(BOB, &[], &broker.socket, &[LIST.into()])[0];
    assert_eq!(*bob, serde_json::json!({"ok": true, "mounts": []}));
    let root_list = ask(&broker.socket, LIST);
    assert_eq!(root_list["mounts"][0]["owner"], ALICE, "{root_list}");

    let bob = &ask_as(BOB, &[], &broker.socket, &[umount_line(&mnt)])[0];
    let err = error_of(bob);
    assert!(
        err.contains("was not mounted by bob") && err.contains("only its owner or root"),
        "{err}"
    );
    assert!(
        mount_at(&mnt).is_some(),
        "bob's refused umount unmounted it"
    );

    let alice = &ask_as(
        ALICE,
        &[],
        &broker.socket,
        &[umount_line(&mnt), LIST.into()],
    );
    assert_eq!(alice[0]["ok"], true, "{}", alice[0]);
    assert_eq!(alice[1]["mounts"], serde_json::json!([]), "{}", alice[1]);
    assert!(nothing_mounted_under(dir.path()));

    // One audit line per decision, written before acting, and one with the result of each
    // allowed operation: alice's mounts, bob's umount, alice's umount.
    let audit = broker.audit_lines();
    let seen: Vec<(u64, &str, bool, Option<&str>)> = audit
        .iter()
        .map(|a| {
            (
                a["uid"].as_u64().unwrap(),
                a["op"].as_str().unwrap(),
                a["allowed"].as_bool().unwrap(),
                a["result"].as_str(),
            )
        })
        .collect();
    let (a, b) = (u64::from(ALICE), u64::from(BOB));
    assert_eq!(
        seen,
        [
            (a, "mount", true, None),
            (a, "mount", true, Some("ok")),
            (a, "mount", false, None),
            (b, "umount", false, None),
            (a, "umount", true, None),
            (a, "umount", true, Some("ok")),
        ],
        "{audit:#?}"
    );
    assert!(
        audit[2]["reason"]
            .as_str()
            .unwrap()
            .contains("per user (1)")
    );
    assert!(
        audit[3]["reason"]
            .as_str()
            .unwrap()
            .contains("only its owner")
    );
    drop(broker);
    dir.finish();
}

#[test]
fn list_shows_users_nothing_of_others() {
    if !require_root() || !require_tool("setpriv", "util-linux") {
        return;
    }
    let dir = TestDir::new("broker-list");
    let broker = Broker::start(&dir);
    let line = r#"{"version":1,"op":"list"}"#.to_string();
    let alice = ask_as(ALICE, &[], &broker.socket, std::slice::from_ref(&line));
    assert_eq!(alice[0], serde_json::json!({"ok": true, "mounts": []}));
    let root = ask(&broker.socket, &line);
    assert_eq!(root["ok"], true, "{root}");
    assert!(root["mounts"].is_array());
    let v = ask(&broker.socket, r#"{"version":1,"op":"version"}"#);
    assert_eq!(
        (v["ok"].as_bool(), v["version"].as_u64()),
        (Some(true), Some(1))
    );
    drop(broker);
    dir.finish();
}

/// Random bytes, truncated JSON, a 10 MiB line, 200 idle connections and half-written
/// lines: the broker answers each with an error or closes it, stays up, and still answers a
/// good request within a second, while the idle connections are still open.
#[test]
fn survives_a_fuzz_run() {
    if !require_root() || !require_tool("setpriv", "util-linux") {
        return;
    }
    let dir = TestDir::new("broker-fuzz");
    let mut broker = Broker::start(&dir);
    let sock = broker.socket.clone();

    // Random bytes (a fixed xorshift sequence, so a failure replays), newlines included.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..50 {
        let mut bytes = vec![0u8; 1 + (x % 3000) as usize];
        for b in &mut bytes {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        bytes.push(b'\n');
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        for l in reply.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["ok"], false, "{l}");
        }
    }
    // Truncated and malformed JSON, each answered with an error on one connection.
    let good = r#"{"version":1,"op":"mount","source":"/","target":"/","map":"b:0:1:1"}"#;
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for cut in (0..good.len()).step_by(7) {
        s.write_all(format!("{}\n", &good[..cut]).as_bytes())
            .unwrap();
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(v["ok"], false, "{reply}");
    }
    for bad in [
        r#"{"version":1e999,"op":"list"}"#,
        r#"{"version":1,"op":"list","op":"mount"}"#,
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]",
    ] {
        s.write_all(format!("{bad}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        assert!(reply.contains("\"ok\":false"), "{bad}: {reply}");
    }
    drop((s, r));

    // A 10 MiB line: refused once it passes 64 KiB, the connection closed.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let huge = vec![b'{'; 10 << 20];
    let written = s.write_all(&huge);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(
        written.is_err() || reply.contains("longer than 65536"),
        "a 10 MiB line was accepted: {reply:?}"
    );
    drop(s);

    // 20 half-written lines and 200 idle connections, all left open. Root's first 32 get
    // a thread each (the per-user cap), the rest are told the broker is busy.
    let started = Instant::now();
    let mut held = Vec::new();
    for i in 0..220 {
        let mut c = UnixStream::connect(&sock).unwrap();
        if i < 20 {
            c.write_all(br#"{"version":1,"op":"ver"#).unwrap();
        }
        held.push(c);
    }
    let mut extra = UnixStream::connect(&sock).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reply = String::new();
    let _ = BufReader::new(&mut extra).read_line(&mut reply);
    assert!(reply.contains("broker busy"), "{reply}");
    // Another user is served at once.
    let t = Instant::now();
    let v = ask_as(
        ALICE,
        &[],
        &sock,
        &[r#"{"version":1,"op":"version"}"#.into()],
    );
    assert_eq!(v[0]["ok"], true, "{}", v[0]);
    let helper_time = t.elapsed();
    // A slow client is cut off after the broker's timeout, with a reason.
    let mut slow = held.remove(0);
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    let _ = slow.read_to_string(&mut reply);
    assert!(reply.contains("not received in time"), "{reply}");
    assert!(started.elapsed() < BROKER_TIMEOUT + Duration::from_secs(10));
    drop(held);

    // Afterwards root is served again within a second.
    let t = Instant::now();
    let end = t + Duration::from_secs(1);
    let v = loop {
        let v = ask(&sock, r#"{"version":1,"op":"version"}"#);
        if v["ok"] == true || Instant::now() > end {
            break v;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let root_time = t.elapsed();
    assert_eq!(v["ok"], true, "{v}");
    assert!(root_time < Duration::from_secs(1), "{root_time:?}");
    eprintln!(
        "version answered: to another user in {helper_time:?} (incl. setpriv and exec) while 220 connections were open; to root in {root_time:?} after they closed"
    );
    assert!(broker.alive(), "shiftfsd died");
    drop(broker);
    dir.finish();
}

/// systemd hands the broker its socket as fd 3 (`LISTEN_FDS`); `systemd-socket-activate`
/// does the same without systemd as init.
#[test]
fn takes_a_socket_from_socket_activation() {
    if !require_root() || !require_tool("systemd-socket-activate", "systemd") {
        return;
    }
    let dir = TestDir::new("broker-activate");
    let sock = dir.path().join("activated.sock");
    let mut child = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&sock)
        .arg(SHIFTFSD)
        .arg("--socket")
        .arg(dir.path().join("not-used.sock"))
        .arg("--audit-log")
        .arg(dir.path().join("audit.log"))
        .arg("--syslog")
        .arg("none")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let guard = Kill(&mut child);
    let end = Instant::now() + Duration::from_secs(10);
    // The socket file appears at bind(2), a moment before listen(2): wait until it accepts.
    while UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < end,
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = ask(&sock, r#"{"version":1,"op":"version"}"#);
    assert_eq!(v["ok"], true, "{v}");
    assert!(!dir.path().join("not-used.sock").exists());
    drop(guard);
    dir.finish();
}

/// The shipped units pass `systemd-analyze verify` (with ExecStart pointed at the built
/// binary, which verify requires to exist).
#[test]
fn shipped_units_verify() {
    if !require_tool("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    for name in ["shiftfsd.socket", "shiftfsd.service"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        let text = text.replace("/usr/local/bin/shiftfsd", SHIFTFSD);
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("shiftfsd.socket"))
        .arg(dir.path().join("shiftfsd.service")));
    assert!(out.ok() && out.stderr.trim().is_empty(), "{}", out.stderr);
}

// ---------------------------------------------------------------------------------------------
// The project's own client: `shiftfs` run as alice or bob goes through the broker.

/// The test users as real accounts: `newuidmap` (used by `unshare --map-users`) wants a
/// passwd entry for its caller and its range in the real /etc/subuid and /etc/subgid. The
/// ranges are the ones the broker's own files in the test directory give them. Created once,
/// left in place (as scripts/setup.sh's `tests` user).
fn real_users() -> bool {
    static MADE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let made = MADE.get_or_init(|| {
        for (name, uid, first) in [
            ("shiftfs-alice", ALICE, 300000),
            ("shiftfs-bob", BOB, 400000),
        ] {
            let exists = |db: &str, key: &str| run(Command::new("getent").args([db, key])).ok();
            if !exists("group", &uid.to_string()) {
                run(Command::new("groupadd").args(["-g", &uid.to_string(), name])).assert_ok();
            }
            if !exists("passwd", &uid.to_string()) {
                run(Command::new("useradd").args([
                    "-M",
                    "-N",
                    "-u",
                    &uid.to_string(),
                    "-g",
                    &uid.to_string(),
                    "-s",
                    "/usr/sbin/nologin",
                    name,
                ]))
                .assert_ok();
            }
            let range = format!("{first}-{}", first + 65535);
            for (file, flag) in [
                ("/etc/subuid", "--add-subuids"),
                ("/etc/subgid", "--add-subgids"),
            ] {
                let text = std::fs::read_to_string(file).unwrap_or_default();
                if !text
                    .lines()
                    .any(|l| l.starts_with(&format!("{name}:{first}:")))
                {
                    run(Command::new("usermod").args([flag, &range, name])).assert_ok();
                }
            }
        }
        Ok(())
    });
    match made {
        Ok(()) => true,
        Err(e) => skip(e),
    }
}

/// `shiftfs ARGS` as `uid` (its own gid, no other groups), talking to `broker`.
fn shiftfs_as<I, S>(uid: u32, broker: &Broker, args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = cmd_as(uid, uid, BIN, args);
    c.env("SHIFTFS_BROKER", &broker.socket);
    run_timeout(&mut c, Duration::from_secs(60))
}

const VIA_BROKER: &str = "not root here: asking the shiftfs broker";

/// A directory owned by `uid`, as a home directory would be.
fn home(dir: &TestDir, name: &str, uid: u32) -> PathBuf {
    let p = dir.path().join(name);
    mkdir(&p, 0o755, uid, uid);
    p
}

/// Alice makes an image with `shiftfs image make`, asks `shiftfs mount --detached` for it
/// inside her own `unshare -Urm`, and reads and writes through it there: as her namespace's
/// root she is the image's root, and what she writes lands on disk as the image range's
/// first id. Nothing is mounted in the host's namespace; without a namespace of her own the
/// attach is refused with advice.
#[test]
fn detached_mount_is_attached_in_the_callers_namespace() {
    if !require(Backend::Kernel) || !require_tool("unshare", "util-linux") {
        return;
    }
    let dir = TestDir::new("broker-detached");
    let broker = Broker::start(&dir);
    let home = home(&dir, "home-alice", ALICE);
    let img = home.join("img");
    let made = shiftfs_as(
        ALICE,
        &broker,
        [OsStr::new("image"), OsStr::new("make"), img.as_os_str()],
    );
    made.assert_ok();
    assert!(made.stderr.contains(VIA_BROKER), "{made}");
    assert_eq!(stat_ids(&img), (BASE, BASE));
    assert_eq!(mode_of(&img) & 0o7777, 0o755);
    file(&img.join("old"), b"from the image\n", 0o644, BASE, BASE);
    let mnt = home.join("mnt");
    mkdir(&mnt, 0o755, ALICE, ALICE);
    let map = format!("b:{BASE}:{ALICE}:1");

    let script = format!(
        "set -e; id -u; stat -c '%u %g' {m} {m}/old; cat {m}/old; echo new > {m}/new; \
         mkdir {m}/d; stat -c '%u %g' {m}/new; grep ' {m} ' /proc/self/mountinfo | wc -l; \
         grep ' {m} ' /proc/self/mountinfo | cut -d' ' -f6",
        m = q(&mnt)
    );
    let mut c = cmd_as(
        ALICE,
        ALICE,
        "unshare",
        ["-Urm", BIN, "mount", "--detached", "--map", &map],
    );
    c.arg(&img).arg(&mnt).args(["--", "sh", "-c", &script]);
    c.env("SHIFTFS_BROKER", &broker.socket);
    let out = run_timeout(&mut c, Duration::from_secs(60));
    out.assert_ok();
    assert!(out.stderr.contains(VIA_BROKER), "{out}");
    assert_eq!(
        out.stdout.lines().take(6).collect::<Vec<_>>(),
        ["0", "0 0", "0 0", "from the image", "0 0", "1"],
        "{out}"
    );
    let options = out.stdout.lines().nth(6).unwrap_or_default();
    for opt in ["rw", "nosuid", "nodev", "idmapped"] {
        assert!(options.split(',').any(|o| o == opt), "{opt}: {out}");
    }
    // On disk: the image range's root, not alice's uid.
    assert_eq!(stat_ids(img.join("new")), (BASE, BASE));
    assert_eq!(stat_ids(img.join("d")), (BASE, BASE));
    assert_eq!(std::fs::read_to_string(img.join("new")).unwrap(), "new\n");
    assert!(
        nothing_mounted_under(dir.path()),
        "the mount leaked into the host namespace"
    );

    // The flags are locked: her namespace's root cannot remount a read-only tree read-write,
    // nor drop nosuid or nodev.
    let script = format!(
        "mount -o remount,bind,rw,suid,dev {m} || echo refused; \
         mount -o remount,bind,rw {m} || echo refused; \
         grep ' {m} ' /proc/self/mountinfo | cut -d' ' -f6; touch {m}/x || echo read-only",
        m = q(&mnt)
    );
    let mut c = cmd_as(
        ALICE,
        ALICE,
        "unshare",
        [
            "-Urm",
            BIN,
            "mount",
            "--detached",
            "-o",
            "ro",
            "--map",
            &map,
        ],
    );
    c.arg(&img).arg(&mnt).args(["--", "sh", "-c", &script]);
    c.env("SHIFTFS_BROKER", &broker.socket);
    let out = run_timeout(&mut c, Duration::from_secs(60));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        (lines.len(), lines[0], lines[1], lines[3]),
        (4, "refused", "refused", "read-only"),
        "{out}"
    );
    for opt in ["ro", "nosuid", "nodev", "idmapped"] {
        assert!(lines[2].split(',').any(|o| o == opt), "{opt}: {out}");
    }
    assert!(!img.join("x").exists());

    // Without a mount namespace of her own she cannot attach it.
    let mut c = cmd_as(ALICE, ALICE, BIN, ["mount", "--detached", "--map", &map]);
    c.arg(&img).arg(&mnt).env("SHIFTFS_BROKER", &broker.socket);
    let out = run_timeout(&mut c, Duration::from_secs(60));
    out.assert_fails();
    assert!(out.stderr.contains("unshare -Urm"), "{out}");
    assert!(nothing_mounted_under(dir.path()));
    // make-image and both mounts were decided and done, and audited as such.
    let audit = broker.audit_lines();
    let ops: Vec<(&str, Option<&str>)> = audit
        .iter()
        .map(|a| (a["op"].as_str().unwrap(), a["result"].as_str()))
        .collect();
    assert_eq!(
        ops,
        [
            ("make-image", None),
            ("make-image", Some("ok")),
            ("mount", None),
            ("mount", Some("ok")),
            ("mount", None),
            ("mount", Some("ok")),
            ("mount", None),
            ("mount", Some("ok")),
        ],
        "{audit:#?}"
    );
    drop(broker);
    dir.finish();
}

/// Alice's whole day with the CLI, on each backend: `shiftfs image make`, `shiftfs mount`
/// (the transparent CLI says it asks the broker), `shiftfs list` (her mount, owned by her),
/// a process of hers in `unshare --user --map-users` (via newuidmap, her subordinate range)
/// reading and writing the image, with what it writes landing on disk as image-range ids;
/// then her container root writes a setuid-root binary, which on disk belongs to the image
/// range, and which gains bob nothing; `shiftfs umount`.
fn users_container_writes_image_range_ids(backend: Backend) {
    if !require(backend) || !require_tool("newuidmap", "uidmap") || !real_users() {
        return;
    }
    let dir = TestDir::new(&format!("broker-userns-{backend}"));
    let broker = Broker::start(&dir);
    let home = home(&dir, "home-alice", ALICE);
    let img = home.join("img");
    let mnt = home.join("mnt");
    mkdir(&mnt, 0o755, ALICE, ALICE);
    let s = |p: &Path| p.display().to_string();
    shiftfs_as(ALICE, &broker, ["image".into(), "make".into(), s(&img)]).assert_ok();
    file(&img.join("old"), b"image file\n", 0o644, BASE + 5, BASE + 6);
    let map = format!("b:{BASE}:300000:65536");
    let _guard = Detach(mnt.clone());
    let out = shiftfs_as(
        ALICE,
        &broker,
        [
            "mount".into(),
            "--backend".into(),
            backend.name().into(),
            "--map".into(),
            map.clone(),
            s(&img),
            s(&mnt),
        ],
    );
    out.assert_ok();
    assert!(out.stderr.contains(VIA_BROKER), "{out}");
    assert!(
        out.stdout.contains(&format!("on {}", mnt.display())),
        "{out}"
    );
    let m = mount_at(&mnt).expect("mounted");
    match backend {
        Backend::Kernel => assert!(m.mount_options.iter().any(|o| o == "idmapped"), "{m:?}"),
        Backend::Fuse => assert!(m.fstype.starts_with("fuse"), "{m:?}"),
        Backend::Stack => unreachable!("the broker makes no stacks"),
    }
    let list = shiftfs_as(ALICE, &broker, ["list"]);
    list.assert_ok();
    let row = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&s(&mnt)))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        row.contains("shiftfs-alice") && row.contains(backend.name()),
        "{row}"
    );
    // Bob sees none of it.
    let bobs = shiftfs_as(BOB, &broker, ["list"]);
    assert_eq!(bobs.stdout.trim(), "no shifted mounts", "{bobs}");

    let script = format!(
        "set -e; id -u; stat -c '%u %g' {m}/old; cat {m}/old; echo data > {m}/f; \
         mkdir {m}/d; chown 5:6 {m}/d; stat -c '%u %g' {m}/f {m}/d; \
         cp /usr/bin/id {m}/id; chmod 4755 {m}/id; stat -c '%u %a' {m}/id",
        m = q(&mnt)
    );
    let out = run_timeout(
        &mut cmd_as(
            ALICE,
            ALICE,
            "unshare",
            [
                "--user",
                "--map-users=300000,0,65536",
                "--map-groups=300000,0,65536",
                "--setuid=0",
                "--setgid=0",
                "sh",
                "-c",
                &script,
            ],
        ),
        Duration::from_secs(60),
    );
    out.assert_ok();
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["0", "5 6", "image file", "0 0", "5 6", "0 4755"],
        "{out}"
    );
    // On disk, image-range ids only: the container's root is the range's first id.
    assert_eq!(stat_ids(img.join("f")), (BASE, BASE));
    assert_eq!(stat_ids(img.join("d")), (BASE + 5, BASE + 6));
    assert_eq!(std::fs::read(img.join("f")).unwrap(), b"data\n");
    // The setuid-root binary of the container is setuid to the range's root on the host.
    assert_eq!(stat_ids(img.join("id")), (BASE, BASE));
    assert_eq!(mode_of(img.join("id")) & 0o7777, 0o4755);
    // Bob runs it: through the (nosuid) mount it runs as bob; straight from disk it runs as
    // the image range's root, an id that is no one on this host. Root never.
    let via_mount = run(&mut cmd_as(BOB, BOB, &s(&mnt.join("id")), ["-u"]));
    assert_eq!(via_mount.assert_ok().stdout.trim(), BOB.to_string());
    let from_disk = run(&mut cmd_as(BOB, BOB, &s(&img.join("id")), ["-u"]));
    assert_eq!(from_disk.assert_ok().stdout.trim(), BASE.to_string());

    let out = shiftfs_as(ALICE, &broker, ["umount".into(), s(&mnt)]);
    out.assert_ok();
    assert!(out.stderr.contains(VIA_BROKER), "{out}");
    assert!(nothing_mounted_under(dir.path()));
    // The broker waited for its daemon: no zombie left behind.
    let end = Instant::now() + Duration::from_secs(5);
    while !broker.children().is_empty() {
        assert!(
            Instant::now() < end,
            "children left: {:?}",
            broker.children()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(broker);
    dir.finish();
}

backend_tests!(users_container_writes_image_range_ids);

/// `shiftfs image make` only in a directory of one's own and never over an existing name;
/// `shiftfs image adopt` shifts a tree alice owns (her uid and her subordinate ids) into the
/// image range, which she can then mount read-write; a tree with one inode of bob's, a tree
/// of bob's, or a map reaching bob's range are refused, each with a reason, an audit line,
/// and nothing changed.
#[test]
fn make_image_and_adopt() {
    if !require(Backend::Kernel) {
        return;
    }
    let dir = TestDir::new("broker-adopt");
    let broker = Broker::start(&dir);
    let home = home(&dir, "home-alice", ALICE);
    let s = |p: &Path| p.display().to_string();
    let image = |uid, args: &[String]| {
        let mut a = vec!["image".to_string()];
        a.extend_from_slice(args);
        shiftfs_as(uid, &broker, a)
    };

    let out = image(ALICE, &["make".into(), s(&dir.path().join("img"))]);
    out.assert_fails();
    assert!(
        out.stderr.contains("is owned by uid 0, not by alice"),
        "{out}"
    );
    assert!(!dir.path().join("img").exists());
    let taken = home.join("taken");
    mkdir(&taken, 0o755, ALICE, ALICE);
    let out = image(ALICE, &["make".into(), s(&taken)]);
    assert!(
        out.assert_fails().stderr.contains("already exists"),
        "{out}"
    );
    assert_eq!(stat_ids(&taken), (ALICE, ALICE));

    // A rootless-container tree: her uid is the container's root, 300000 + n - 1 its uid n.
    let tree = home.join("tree");
    mkdir(&tree, 0o755, ALICE, ALICE);
    file(&tree.join("a"), b"a\n", 0o644, ALICE, ALICE);
    mkdir(&tree.join("sub"), 0o755, 300004, 300004);
    file(&tree.join("sub/b"), b"b\n", 0o4755, 300009, 300009);
    symlink("a", &tree.join("link"), ALICE, ALICE);
    let map = format!("b:0:{ALICE}:1,b:1:300000:65535");
    let adopt = |uid, path: &Path, map: &str| {
        image(uid, &["adopt".into(), s(path), "--map".into(), map.into()])
    };

    // One inode of bob's: refused by the shift itself, before anything is written.
    let mixed = home.join("mixed");
    mkdir(&mixed, 0o755, ALICE, ALICE);
    file(&mixed.join("mine"), b"", 0o644, ALICE, ALICE);
    file(&mixed.join("bobs"), b"", 0o644, BOB, BOB);
    let before = snapshot(&mixed);
    let out = adopt(ALICE, &mixed, &map);
    assert!(
        out.assert_fails().stderr.contains("have no mapping"),
        "{out}"
    );
    assert!(out.stderr.contains("nothing was changed"), "{out}");
    assert_eq!(snapshot(&mixed), before);
    assert_eq!(stat_ids(&mixed), (ALICE, ALICE));
    // Bob's tree, and a map into bob's range.
    let bobs = home.join("bobs");
    mkdir(&bobs, 0o755, BOB, BOB);
    let out = adopt(ALICE, &bobs, &map);
    assert!(
        out.assert_fails()
            .stderr
            .contains(&format!("owned by uid {BOB}, not by alice")),
        "{out}"
    );
    let before = snapshot(&tree);
    let out = adopt(ALICE, &tree, "b:0:400000:10");
    assert!(
        out.assert_fails().stderr.contains("delegated to bob"),
        "{out}"
    );
    assert_eq!(snapshot(&tree), before);

    let out = adopt(ALICE, &tree, &map);
    out.assert_ok();
    assert!(out.stdout.contains("5 inodes, 5 changed"), "{out}");
    assert_eq!(stat_ids(&tree), (BASE, BASE));
    assert_eq!(stat_ids(tree.join("a")), (BASE, BASE));
    assert_eq!(lstat_ids(tree.join("link")), (BASE, BASE));
    assert_eq!(stat_ids(tree.join("sub")), (BASE + 5, BASE + 5));
    assert_eq!(stat_ids(tree.join("sub/b")), (BASE + 10, BASE + 10));
    assert_eq!(mode_of(tree.join("sub/b")) & 0o7777, 0o4755);

    // Now it is her image: she mounts it read-write, and sees her container's ids.
    let mnt = home.join("mnt");
    mkdir(&mnt, 0o755, ALICE, ALICE);
    let _guard = Detach(mnt.clone());
    let rw = format!("b:{BASE}:300000:65536");
    let args = [
        "mount",
        "--backend",
        "kernel",
        "--map",
        &rw,
        &s(&tree),
        &s(&mnt),
    ];
    shiftfs_as(ALICE, &broker, args).assert_ok();
    assert_eq!(stat_ids(mnt.join("sub/b")), (300010, 300010));
    assert_eq!(std::fs::read(mnt.join("a")).unwrap(), b"a\n");
    shiftfs_as(ALICE, &broker, ["umount".into(), s(&mnt)]).assert_ok();

    let audit = broker.audit_lines();
    let seen: Vec<(&str, bool, Option<&str>)> = audit
        .iter()
        .map(|a| {
            (
                a["op"].as_str().unwrap(),
                a["allowed"].as_bool().unwrap(),
                a["result"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen[..9],
        [
            ("make-image", false, None),
            ("make-image", true, None),
            ("make-image", true, Some("failed")),
            ("adopt", true, None),
            ("adopt", true, Some("failed")),
            ("adopt", false, None),
            ("adopt", false, None),
            ("adopt", true, None),
            ("adopt", true, Some("ok")),
        ],
        "{audit:#?}"
    );
    assert!(audit[4]["error"].as_str().unwrap().contains("no mapping"));
    assert!(
        audit[6]["reason"]
            .as_str()
            .unwrap()
            .contains("delegated to bob")
    );
    assert_eq!(audit[8]["map"], map);
    drop(broker);
    dir.finish();
}

/// The mount limit holds under concurrent requests: alice asks for four mounts at once, on
/// four targets, with a limit of one; the count is taken under her lock, so exactly one is
/// made and three are refused.
#[test]
fn the_limit_holds_under_concurrent_requests() {
    if !require(Backend::Kernel) || !require_tool("setpriv", "util-linux") {
        return;
    }
    let dir = TestDir::new("broker-race");
    let broker = Broker::start(&dir);
    let src = broker.shared.join("img");
    mkdir(&src, 0o755, BASE, BASE);
    let rw = format!("b:{BASE}:300000:65536");
    let targets: Vec<PathBuf> = (0..4)
        .map(|i| {
            let t = dir.path().join(format!("mnt-{i}"));
            mkdir(&t, 0o755, ALICE, ALICE);
            t
        })
        .collect();
    let _guards: Vec<Detach> = targets.iter().cloned().map(Detach).collect();
    let replies: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let asks: Vec<_> = targets
            .iter()
            .map(|t| {
                let line = mount(&src, Some(t), &rw, ",\"backend\":\"kernel\"");
                let socket = &broker.socket;
                scope.spawn(move || ask_as(ALICE, &[], socket, &[line]).remove(0))
            })
            .collect();
        asks.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let made = replies.iter().filter(|r| r["ok"] == true).count();
    assert_eq!(made, 1, "{replies:#?}");
    for r in replies.iter().filter(|r| r["ok"] != true) {
        assert!(error_of(r).contains("per user (1)"), "{r}");
    }
    assert_eq!(mounts_under(dir.path()).len(), 1);
    let mounted = targets.iter().find(|t| mount_at(t).is_some()).unwrap();
    assert_eq!(ask(&broker.socket, &umount_line(mounted))["ok"], true);
    drop(broker);
    dir.finish();
}
