//! Helpers shared by the integration tests that mount for real.
//!
//! Every mount is held by a [`ShiftMount`] guard and every test works in its own [`TestDir`], so
//! tests run in parallel threads and a failing test still unmounts and stops its daemon.
//! Prerequisites that are missing skip a test with a printed reason, except under `CI=true`,
//! where they fail it.
#![allow(dead_code)]

#[path = "../prereq/mod.rs"]
mod prereq;
use prereq::prerequisite;

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{Read, Seek};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_shiftfs");

/// The map most tests use: image ids 0..65535 shown as host ids 100000..165535.
pub const MAP: &str = "b:0:100000:65536";
/// The same map as a user namespace `uid_map`/`gid_map` line.
pub const NS_MAP: &str = "0 100000 65536";
/// A map that covers every host id unchanged (host root writes as image root).
pub const IDENTITY_MAP: &str = "b:0:0:4294967295";
/// What an unmapped id is shown as.
pub const OVERFLOW: u32 = 65534;

/// How long a command may run before the test calls it hung.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Prerequisites

/// Returns false (after printing why) when the test must be skipped; panics under `CI=true`.
#[track_caller]
pub fn skip(reason: &str) -> bool {
    prerequisite(false, reason)
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Root is needed to mount, to chown fixtures and to switch users.
pub fn require_root() -> bool {
    if !is_root() {
        return skip("needs root (mounts, chown, user namespaces)");
    }
    true
}

fn dev_fuse_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok()
}

/// Everything the given backend needs on this machine.
pub fn require(backend: Backend) -> bool {
    if !require_root() {
        return false;
    }
    match backend {
        Backend::Fuse | Backend::Stack if !dev_fuse_usable() => {
            skip("FUSE backend needs a usable /dev/fuse")
        }
        _ => true,
    }
}

/// A program the test shells out to, e.g. `setfacl` (Debian package `acl`).
pub fn require_tool(tool: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            d.join(tool)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        })
    });
    if !found {
        return skip(&format!("needs `{tool}` (apt-get install {package})"));
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Backends

/// The two backends every user-level test runs against, and their stack: a kernel idmapped
/// mount with the test's map on an idmappable (identity) FUSE mount of the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Fuse,
    Kernel,
    Stack,
}

impl Backend {
    /// What `--backend` says; the stack has no such name (see `ShiftMount::try_mount`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Fuse => "fuse",
            Self::Kernel => "kernel",
            Self::Stack => "stack",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Generates `fuse::NAME` and `kernel::NAME` tests calling `NAME(Backend)` for each name.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod fuse {
            $( #[test] fn $name() { super::$name($crate::common::Backend::Fuse) } )*
        }
        mod kernel {
            $( #[test] fn $name() { super::$name($crate::common::Backend::Kernel) } )*
        }
    };
}

/// Generates `stack::NAME` tests calling `NAME(Backend::Stack)` for each name.
#[macro_export]
macro_rules! stack_tests {
    ($($name:ident),* $(,)?) => {
        mod stack {
            $( #[test] fn $name() { super::$name($crate::common::Backend::Stack) } )*
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Running commands

/// What a finished command printed and how it exited.
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(self.ok(), "command failed:\n{self}");
        self
    }

    #[track_caller]
    pub fn assert_fails(&self) -> &Self {
        assert!(!self.ok(), "command unexpectedly succeeded:\n{self}");
        self
    }

    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\n  status: {}\n  stdout: {}\n  stderr: {}",
            self.what,
            self.status,
            self.stdout.trim_end().replace('\n', "\n          "),
            self.stderr.trim_end().replace('\n', "\n          ")
        )
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion (killed after `timeout`). Output goes through unnamed temporary files,
/// not pipes, so a daemon that keeps stdout open cannot hang the test.
#[track_caller]
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Out {
    let what = describe(cmd);
    let mut out_f = tempfile::tempfile().expect("tempfile for stdout");
    let mut err_f = tempfile::tempfile().expect("tempfile for stderr");
    cmd.stdin(Stdio::null())
        .stdout(out_f.try_clone().expect("dup stdout file"))
        .stderr(err_f.try_clone().expect("dup stderr file"));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let status = wait_timeout(&mut child, timeout)
        .unwrap_or_else(|| panic!("{what}: still running after {timeout:?}, killed"));
    let read = |f: &mut fs::File| {
        let mut s = String::new();
        f.rewind().expect("rewind output");
        f.read_to_string(&mut s).expect("read output");
        s
    };
    Out {
        status,
        stdout: read(&mut out_f),
        stderr: read(&mut err_f),
        what,
    }
}

#[track_caller]
pub fn run(cmd: &mut Command) -> Out {
    run_timeout(cmd, CMD_TIMEOUT)
}

/// Waits for `child`; kills and reaps it and returns None after `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `shiftfs ARGS...`, run from `/` so relative paths are never resolved against cargo's cwd.
pub fn shiftfs<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(BIN);
    c.args(args).current_dir("/");
    c
}

/// `sh -c SCRIPT` as the calling user (host root in these tests).
pub fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).current_dir("/");
    c
}

/// `sh -c SCRIPT` as host uid/gid with no supplementary groups.
pub fn sh_as(uid: u32, gid: u32, script: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg("sh")
        .arg("-c")
        .arg(script)
        .current_dir("/");
    c
}

/// Any command as host uid/gid with no supplementary groups.
pub fn cmd_as<I, S>(uid: u32, gid: u32, program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(program)
        .args(args)
        .current_dir("/");
    c
}

/// Single-quotes a path for a shell script.
pub fn q(p: impl AsRef<Path>) -> String {
    let s = p.as_ref().to_string_lossy();
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------------------------
// User namespaces

/// A user namespace with the given uid/gid map, held open by an idle process.
///
/// The map is written from here (we are root in the initial namespace), so neither `newuidmap`
/// nor `/etc/subuid` entries are needed. Commands join it with `nsenter -U -S 0 -G 0` and keep
/// the host's mount namespace, so they see the test's mounts.
pub struct UserNs {
    holder: Child,
}

impl UserNs {
    /// A namespace whose uid and gid maps are both `map` (proc text, e.g. `0 100000 65536`).
    #[track_caller]
    pub fn new(map: &str) -> Self {
        let mut holder = Command::new("unshare")
            .args(["--user", "--", "sleep", "3600"])
            .current_dir("/")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn unshare --user");
        let pid = holder.id();
        let own = fs::read_link("/proc/self/ns/user").expect("own user ns");
        let start = Instant::now();
        // unshare(2) runs after fork: wait until the child is in its own namespace.
        loop {
            if let Ok(ns) = fs::read_link(format!("/proc/{pid}/ns/user"))
                && ns != own
            {
                break;
            }
            if start.elapsed() > Duration::from_secs(10) || matches!(holder.try_wait(), Ok(Some(_)))
            {
                let _ = holder.kill();
                let _ = holder.wait();
                panic!("unshare --user did not create a user namespace");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let ns = Self { holder };
        for file in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{pid}/{file}"), format!("{map}\n"))
                .unwrap_or_else(|e| panic!("write /proc/{pid}/{file} = {map}: {e}"));
        }
        ns
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// `sh -c SCRIPT` as uid/gid 0 of the namespace.
    pub fn sh(&self, script: &str) -> Command {
        self.sh_as(0, 0, script)
    }

    /// `sh -c SCRIPT` as uid/gid (namespace ids) in the namespace.
    pub fn sh_as(&self, uid: u32, gid: u32, script: &str) -> Command {
        let mut c = self.cmd_as(uid, gid, "sh");
        c.arg("-c").arg(script);
        c
    }

    /// PROGRAM as uid/gid (namespace ids) in the namespace; add arguments with `.arg`.
    pub fn cmd_as(&self, uid: u32, gid: u32, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("--user")
            .arg(format!("--target={}", self.pid()))
            .arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={gid}"))
            .arg("--")
            .arg(program)
            .current_dir("/");
        c
    }
}

/// Children killed and reaped on Drop, so a failing test leaves no process working in its
/// directories.
#[derive(Default)]
pub struct Children(pub Vec<Child>);

impl Children {
    pub fn push(&mut self, c: Child) {
        self.0.push(c);
    }

    /// Waits for every child (each up to `timeout`); returns their statuses and output.
    #[track_caller]
    pub fn wait_all(mut self, timeout: Duration) -> Vec<std::process::Output> {
        let mut outs = Vec::new();
        for mut c in std::mem::take(&mut self.0) {
            let status = wait_timeout(&mut c, timeout).expect("child hung, killed");
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            if let Some(mut o) = c.stdout.take() {
                let _ = o.read_to_end(&mut stdout);
            }
            if let Some(mut e) = c.stderr.take() {
                let _ = e.read_to_end(&mut stderr);
            }
            outs.push(std::process::Output {
                status,
                stdout,
                stderr,
            });
        }
        outs
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for UserNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Test directories and fixtures

/// Every test directory lives under here, so CI can check for leftovers after the run.
pub fn test_root() -> PathBuf {
    let root = std::env::temp_dir().join("shiftfs-tests");
    fs::create_dir_all(&root).expect("create test root");
    // Namespace roots and unprivileged uids must be able to reach their fixtures.
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod test root");
    root
}

/// A private directory for one test; Drop unmounts whatever is left under it, stops daemons
/// serving it and removes it.
pub struct TestDir {
    tmp: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    #[track_caller]
    pub fn new(name: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(test_root())
            .expect("create test dir");
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = tmp.path().to_path_buf();
        Self {
            tmp: Some(tmp),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates `name` (root-owned, 0755) inside the test dir.
    #[track_caller]
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        mkdir(&p, 0o755, 0, 0);
        p
    }

    /// Checks nothing is left mounted or running for this test, then removes the dir.
    #[track_caller]
    pub fn finish(self) {
        assert_no_leaks(&self.path);
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        cleanup_under(&self.path);
        if !mounts_under(&self.path).is_empty() {
            // Removing recursively would walk into a mount: keep the directory instead.
            if let Some(t) = self.tmp.take() {
                let kept = t.keep();
                eprintln!("left {} in place: still mounted under it", kept.display());
            }
        }
    }
}

/// SIGKILLs `pids` and waits (up to 5 s) until they are gone or zombies.
pub fn kill_and_wait(pids: &[u32]) {
    for &pid in pids {
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
    wait_gone(pids, Duration::from_secs(5));
}

/// Waits until every pid in `pids` has exited (a zombie counts as exited once its other threads
/// are gone too, and is reaped when it is our own child); false if one still runs after
/// `timeout`.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let me = std::process::id();
    let start = Instant::now();
    // A killed process's leader turns zombie while its other threads still exit and release
    // its files (a FUSE daemon's /dev/fuse among them).
    let threads = |pid: u32| fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    loop {
        let mut running = false;
        for &pid in pids {
            match proc_stat(pid) {
                None => {}
                Some(('Z', _)) if threads(pid) > 1 => running = true,
                Some(('Z', ppid)) if ppid == me => {
                    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                        let _ =
                            rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG);
                    }
                }
                Some(('Z', _)) => {}
                Some(_) => running = true,
            }
        }
        if !running {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// State letter and parent pid from `/proc/PID/stat`; None once the pid is gone.
pub fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// This process's children (of every thread), zombies included: (pid, state, comm).
pub fn children() -> Vec<(u32, char, String)> {
    let mut out = Vec::new();
    for task in fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .flatten()
    {
        let Ok(text) = fs::read_to_string(task.path().join("children")) else {
            continue; // the thread ended meanwhile
        };
        for pid in text
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let Some((state, _)) = proc_stat(pid) else {
                continue;
            };
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            out.push((pid, state, comm.trim_end().to_owned()));
        }
    }
    out
}

/// Makes this process the subreaper of its descendants, so a process that a command leaves
/// behind (a daemon that double-forked, a helper that outlived its parent) becomes our child
/// and [`children`] sees it. Every process the test binary starts afterwards counts: call it
/// only where tests run one at a time.
pub fn become_subreaper() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .expect("PR_SET_CHILD_SUBREAPER");
    });
}

/// Reaps every child that has already exited.
pub fn reap_zombies() {
    while let Ok(Some(_)) = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG) {}
}

/// Lazily unmounts everything under `dir` (deepest first) and kills shiftfs processes naming it.
pub fn cleanup_under(dir: &Path) {
    kill_and_wait(&shiftfs_pids_mentioning(dir));
    let mut mps: Vec<PathBuf> = mounts_under(dir)
        .into_iter()
        .map(|m| m.mount_point)
        .collect();
    mps.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for mp in mps {
        let _ = rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH);
    }
}

/// Panics, listing them, if any mount or shiftfs process is left under `dir`.
#[track_caller]
pub fn assert_no_leaks(dir: &Path) {
    let mounts = mounts_under(dir);
    let pids = shiftfs_pids_mentioning(dir);
    assert!(
        mounts.is_empty() && pids.is_empty(),
        "leaked under {}: mounts {:?}, shiftfs processes {:?}",
        dir.display(),
        mounts,
        pids
    );
}

#[track_caller]
pub fn mkdir(path: &Path, mode: u32, uid: u32, gid: u32) {
    fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown dir");
    // After chown, which clears setgid.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod dir");
}

#[track_caller]
pub fn file(path: &Path, contents: &[u8], mode: u32, uid: u32, gid: u32) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown file");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod file");
}

#[track_caller]
pub fn symlink(target: impl AsRef<Path>, path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::symlink(target, path)
        .unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("lchown symlink");
}

/// (uid, gid) of `path`, following symlinks.
#[track_caller]
pub fn stat_ids(path: impl AsRef<Path>) -> (u32, u32) {
    let p = path.as_ref();
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.uid(), m.gid())
}

/// (uid, gid) of `path` itself (a symlink is not followed).
#[track_caller]
pub fn lstat_ids(path: impl AsRef<Path>) -> (u32, u32) {
    let p = path.as_ref();
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (m.uid(), m.gid())
}

/// Full `st_mode` of `path` itself.
#[track_caller]
pub fn lstat_mode(path: impl AsRef<Path>) -> u32 {
    let p = path.as_ref();
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
        .mode()
}

/// Permission bits (with setuid, setgid and sticky) of `path` itself.
#[track_caller]
pub fn mode_of(path: impl AsRef<Path>) -> u32 {
    lstat_mode(path) & 0o7777
}

/// Names in a directory, sorted.
#[track_caller]
pub fn ls(dir: impl AsRef<Path>) -> Vec<String> {
    let d = dir.as_ref();
    let mut v: Vec<String> = fs::read_dir(d)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", d.display()))
        .map(|e| {
            e.expect("dirent")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// A recursive snapshot (path, type+mode, uid, gid, size, content hash-ish) to prove a tree was
/// not touched.
pub fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(d) else {
            out.push(format!("{}: unreadable", d.display()));
            return;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(base).unwrap_or(&p).display().to_string();
            let content = if m.is_file() {
                fs::read(&p)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            out.push(format!(
                "{rel} mode={:o} uid={} gid={} size={} {content:?}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.len()
            ));
            if m.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Mounts and processes

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount options (ro, nosuid, nodev, noexec, idmapped, ...).
    pub mount_options: Vec<String>,
    pub super_options: Vec<String>,
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn mountinfo() -> Vec<MountEntry> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                mount_point: PathBuf::from(unescape_mountinfo(l.get(4)?)),
                mount_options: l.get(5)?.split(',').map(str::to_owned).collect(),
                fstype: unescape_mountinfo(r.first()?),
                source: unescape_mountinfo(r.get(1)?),
                super_options: r
                    .get(2)
                    .map(|o| o.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Mounts at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<MountEntry> {
    mountinfo()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect()
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mountinfo()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

pub fn is_mountpoint(path: &Path) -> bool {
    mount_at(path).is_some()
}

/// Polls until `path` is (or is no longer) a mount point; false on timeout.
pub fn wait_mounted(path: &Path, mounted: bool, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if is_mountpoint(path) == mounted {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    is_mountpoint(path) == mounted
}

fn is_shiftfs_process(pid: u32, argv0: &str) -> bool {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    comm.trim() == "shiftfs" || Path::new(argv0).file_name().is_some_and(|n| n == "shiftfs")
}

/// Live (non-zombie) shiftfs processes whose command line names a path under `dir`.
pub fn shiftfs_pids_mentioning(dir: &Path) -> Vec<u32> {
    pids_mentioning(dir, true)
}

/// Live (non-zombie) processes, shiftfs only or any, whose command line names a path under
/// `dir`; never this process.
pub fn pids_mentioning(dir: &Path, shiftfs_only: bool) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(argv0) = args.first() else { continue };
        if (!shiftfs_only || is_shiftfs_process(pid, argv0))
            && args.iter().any(|a| a.contains(&needle))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Every live shiftfs process on the machine (for an end-of-suite check).
pub fn all_shiftfs_pids() -> Vec<u32> {
    shiftfs_pids_mentioning(Path::new(""))
}

/// `shiftfs list`.
#[track_caller]
pub fn shiftfs_list() -> Out {
    run(&mut shiftfs(["list"]))
}

/// `SHIFTFS_TEST_URING` (auto, on or off; `scripts/test.sh` runs the FUSE suites once with
/// `off` and once with `on`, `fuse.enable_uring` set): the `uring=` every FUSE mount of the
/// tests gets, so that a second run serves them all over io_uring, and a mount that cannot
/// fails instead of falling back. Unset: the default (auto).
pub fn test_uring() -> Option<String> {
    let v = std::env::var("SHIFTFS_TEST_URING").ok()?;
    assert!(
        matches!(v.as_str(), "auto" | "on" | "off"),
        "SHIFTFS_TEST_URING is auto, on or off, not {v:?}"
    );
    Some(v)
}

/// A mount made with `shiftfs mount`; Drop runs `shiftfs umount` and then a lazy unmount, and
/// kills a daemon that outlived both, so a failing test never leaves anything behind.
pub struct ShiftMount {
    target: PathBuf,
    armed: bool,
    /// For `Backend::Stack`: the idmappable FUSE mount under this one, unmounted after it.
    lower: Option<Box<ShiftMount>>,
}

impl ShiftMount {
    /// `shiftfs mount --backend B --map MAP SRC TGT`; panics with the command's output on failure.
    #[track_caller]
    pub fn new(backend: Backend, map: &str, src: &Path, tgt: &Path) -> Self {
        Self::with_args(backend, &["--map", map], src, tgt)
    }

    /// `shiftfs mount --backend B EXTRA... SRC TGT`; panics on failure.
    #[track_caller]
    pub fn with_args(backend: Backend, extra: &[&str], src: &Path, tgt: &Path) -> Self {
        match Self::try_mount(Some(backend), extra, src, tgt) {
            Ok(m) => m,
            Err(out) => panic!("mount failed:\n{out}"),
        }
    }

    /// `shiftfs mount EXTRA... SRC TGT`, letting shiftfs pick the backend; panics on failure.
    #[track_caller]
    pub fn with_args_auto(extra: &[&str], src: &Path, tgt: &Path) -> Self {
        match Self::try_mount(None, extra, src, tgt) {
            Ok(m) => m,
            Err(out) => panic!("mount failed:\n{out}"),
        }
    }

    /// Mounts, handing back the failed command's output.
    #[track_caller]
    pub fn try_mount(
        backend: Option<Backend>,
        extra: &[&str],
        src: &Path,
        tgt: &Path,
    ) -> Result<Self, Out> {
        if backend == Some(Backend::Stack) {
            return Self::try_stack(extra, src, tgt);
        }
        let (out, guard) = Self::run_mount(backend, extra, src, tgt);
        if !out.ok() {
            return Err(out);
        }
        assert!(
            is_mountpoint(tgt),
            "`shiftfs mount` exited 0 but {} is not a mount point:\n{out}",
            tgt.display()
        );
        Ok(guard)
    }

    /// `shiftfs mount --idmappable -o OPTS SRC idmappable-TGT` (the `-o` options of EXTRA, no
    /// map; beside TGT), then `shiftfs mount --backend kernel EXTRA... idmappable-TGT TGT`.
    #[track_caller]
    fn try_stack(extra: &[&str], src: &Path, tgt: &Path) -> Result<Self, Out> {
        // Not TGT plus a suffix: the daemon's command line would then mention TGT.
        let mut name = std::ffi::OsString::from("idmappable-");
        name.push(tgt.file_name().expect("target has a name"));
        let low = tgt.with_file_name(name);
        fs::create_dir_all(&low).expect("create the idmappable mount's target");
        let mut lower_extra = vec!["--idmappable"];
        let mut args = extra.iter();
        while let Some(&a) = args.next() {
            match a {
                "--map" | "-m" => {
                    args.next();
                }
                "-o" => {
                    lower_extra.push(a);
                    lower_extra.extend(args.next());
                }
                _ => {}
            }
        }
        let lower = Self::try_mount(Some(Backend::Fuse), &lower_extra, src, &low)?;
        let mut upper = Self::try_mount(Some(Backend::Kernel), extra, &low, tgt)?;
        upper.lower = Some(Box::new(lower));
        Ok(upper)
    }

    /// `shiftfs mount [--backend B] EXTRA... SRC TGT`: what it printed, and a guard over `tgt`
    /// whatever it did (for tests that check what a mount says or how it fails).
    #[track_caller]
    pub fn run_mount(
        backend: Option<Backend>,
        extra: &[&str],
        src: &Path,
        tgt: &Path,
    ) -> (Out, Self) {
        let mut c = shiftfs(["mount"]);
        if let Some(b) = backend {
            c.args(["--backend", b.name()]);
        }
        if let (Some(Backend::Fuse), Some(u)) = (backend, test_uring()) {
            // Before `extra`: a test's own uring= wins.
            c.arg("-o").arg(format!("uring={u}"));
        }
        c.args(extra).arg(src).arg(tgt);
        // The guard exists before the command runs: a mount that half-succeeded or hung is
        // still cleaned up.
        let guard = Self::adopt(tgt);
        (run_timeout(&mut c, Duration::from_secs(30)), guard)
    }

    /// Takes charge of whatever gets mounted on `tgt` by other means (e.g. `--foreground`).
    pub fn adopt(tgt: &Path) -> Self {
        Self {
            target: tgt.to_path_buf(),
            armed: true,
            lower: None,
        }
    }

    /// For a mount the test already saw go away by other means.
    pub fn disarm(mut self) {
        self.armed = false;
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// `shiftfs umount`, asserting it succeeds, removes the mount and stops the daemon.
    #[track_caller]
    pub fn unmount(mut self) {
        let out = run_timeout(
            &mut shiftfs([OsStr::new("umount"), self.target.as_os_str()]),
            Duration::from_secs(30),
        );
        out.assert_ok();
        assert!(
            !is_mountpoint(&self.target),
            "{} still mounted after `shiftfs umount`:\n{out}",
            self.target.display()
        );
        let pids = shiftfs_pids_mentioning(&self.target);
        assert!(
            pids.is_empty(),
            "`shiftfs umount` returned but daemon(s) {pids:?} serving {} still run",
            self.target.display()
        );
        self.armed = false;
        if let Some(lower) = self.lower.take() {
            lower.unmount();
        }
    }
}

impl Drop for ShiftMount {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let umount = |target: &Path| {
            let mut c = shiftfs([OsStr::new("umount"), target.as_os_str()]);
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Ok(mut child) = c.spawn() {
                let _ = wait_timeout(&mut child, Duration::from_secs(20));
            }
        };
        umount(&self.target);
        let pids = shiftfs_pids_mentioning(&self.target);
        if !pids.is_empty() || is_mountpoint(&self.target) {
            // A daemon that cannot be stopped the polite way: kill it, then let shiftfs
            // clean up the dead mount and its record, then detach whatever is left.
            kill_and_wait(&pids);
            umount(&self.target);
            cleanup_under(&self.target);
        }
    }
}

/// Compiles a one-file C program into `dir` (world-executable); None (after `skip`) without gcc.
#[track_caller]
pub fn compile_c(dir: &Path, name: &str, source: &str) -> Option<PathBuf> {
    if !require_tool("gcc", "gcc") {
        return None;
    }
    let c = dir.join(format!("{name}.c"));
    let bin = dir.join(name);
    fs::write(&c, source).expect("write C source");
    run(Command::new("gcc")
        .arg("-O")
        .arg("-o")
        .arg(&bin)
        .arg(&c)
        .current_dir(dir))
    .assert_ok();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod");
    Some(bin)
}

// ---------------------------------------------------------------------------------------------
// Mounts the test makes itself: tmpfs, bind mounts, bindfs

/// A mount the test made by other means than shiftfs (tmpfs, bind, loop, ramfs): lazily
/// unmounted on drop.
pub struct Detach(pub PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        if is_mountpoint(&self.0)
            && let Err(e) = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH)
        {
            eprintln!("unmount {}: {e}", self.0.display());
        }
    }
}

/// A fresh tmpfs (mode 0755, 16 MiB) on `dir`.
#[track_caller]
pub fn mount_tmpfs(dir: &Path) -> Detach {
    rustix::mount::mount(
        "shiftfs-test",
        dir,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"mode=0755,size=16m",
    )
    .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", dir.display()));
    Detach(dir.to_path_buf())
}

/// A fresh ramfs (mode 0755) on `dir`: a file system the kernel cannot idmap.
#[track_caller]
pub fn mount_ramfs(dir: &Path) -> Detach {
    rustix::mount::mount(
        "shiftfs-test",
        dir,
        "ramfs",
        rustix::mount::MountFlags::empty(),
        c"mode=0755",
    )
    .unwrap_or_else(|e| panic!("mount ramfs on {}: {e}", dir.display()));
    let guard = Detach(dir.to_path_buf());
    assert_eq!(fstype_of(dir), "ramfs");
    guard
}

/// The type of the file system `path` lives on (the innermost mount above it).
pub fn fstype_of(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    mountinfo()
        .into_iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map(|m| m.fstype)
        .unwrap_or_default()
}

/// The test's directory must be on `fstype` (e.g. ext4, whose behaviour it checks).
#[track_caller]
pub fn require_fstype(dir: &Path, fstype: &str) -> bool {
    let is = fstype_of(dir);
    is == fstype || skip(&format!("{} is on {is}, not {fstype}", dir.display()))
}

pub fn require_bindfs() -> bool {
    require(Backend::Fuse) && require_tool("bindfs", "bindfs")
}

/// A bindfs view (FUSE, no idmapped mounts) of `src` at `at`, served in the foreground by our
/// child, so it is stopped and reaped on drop.
pub struct Bindfs {
    at: PathBuf,
    child: Child,
}

impl Bindfs {
    #[track_caller]
    pub fn start(src: &Path, at: &Path) -> Self {
        fs::create_dir_all(at).expect("mkdir bindfs mount point");
        let child = Command::new("bindfs")
            .arg("-f")
            .arg(src)
            .arg(at)
            .stdin(Stdio::null())
            .spawn()
            .expect("start bindfs");
        let me = Self {
            at: at.to_path_buf(),
            child,
        };
        assert!(
            wait_mounted(at, true, Duration::from_secs(10)),
            "bindfs did not mount {}",
            at.display()
        );
        me
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        if is_mountpoint(&self.at) {
            let unmounted = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.at)
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                let _ = rustix::mount::unmount(&self.at, rustix::mount::UnmountFlags::DETACH);
            }
        }
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            eprintln!("bindfs on {} hung after unmount, killed", self.at.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// mount(8) and fstab

/// mount(8) runs `/sbin/mount.shiftfs` for `-t shiftfs`.
const MOUNT_HELPER: &str = "/sbin/mount.shiftfs";

/// `/sbin/mount.shiftfs -> this build's binary`, replacing only a symlink; false (after
/// `skip`) when something else is installed there.
pub fn install_mount_helper() -> bool {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let link = Path::new(MOUNT_HELPER);
    match fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => {
            if fs::read_link(link).is_ok_and(|t| t == Path::new(BIN)) {
                return true;
            }
            // Atomic replacement: mount(8) in a parallel test never sees it missing.
            let tmp = link.with_file_name(format!(".mount.shiftfs.{}", std::process::id()));
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(BIN, &tmp).expect("symlink helper");
            fs::rename(&tmp, link).expect("replace helper symlink");
            true
        }
        Ok(_) => skip(&format!(
            "{MOUNT_HELPER} exists and is not a symlink; not replacing it"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::os::unix::fs::symlink(BIN, link).expect("symlink helper");
            true
        }
        Err(e) => panic!("stat {MOUNT_HELPER}: {e}"),
    }
}

/// Serialises edits of /etc/fstab across threads and processes (flock on its own file).
fn fstab_edit(edit: impl FnOnce(&str) -> String) {
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/shiftfs-tests-fstab.lock")
        .expect("open fstab lock");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    let text = fs::read_to_string("/etc/fstab").unwrap_or_default();
    let new = edit(&text);
    // Replace atomically, so mount(8) in a parallel test never reads half a file.
    let tmp = PathBuf::from(format!(
        "/etc/.fstab.shiftfs-test.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    fs::write(&tmp, new).expect("write fstab copy");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).expect("chmod fstab copy");
    fs::rename(&tmp, "/etc/fstab").expect("replace /etc/fstab");
}

/// One line added to /etc/fstab, removed again on drop.
pub struct FstabLine(String);

impl FstabLine {
    pub fn add(line: String) -> Self {
        fstab_edit(|text| {
            let mut t = text.to_string();
            if !t.is_empty() && !t.ends_with('\n') {
                t.push('\n');
            }
            t.push_str(&line);
            t.push('\n');
            t
        });
        Self(line)
    }
}

impl Drop for FstabLine {
    fn drop(&mut self) {
        fstab_edit(|text| {
            text.lines()
                .filter(|l| *l != self.0)
                .map(|l| format!("{l}\n"))
                .collect()
        });
    }
}
