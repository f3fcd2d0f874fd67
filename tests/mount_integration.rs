//! Real mounts through the `shiftfs` binary, mount(8) and fstab: which backend `auto` picks
//! and why, `shiftfs list`, `shiftfs umount`, `shiftfs doctor`, mount flags, and that no
//! mount, process or daemon is left behind. Needs root (skipped otherwise, unless CI=true,
//! where a missing prerequisite fails the test).
//!
//! Tests run in parallel, each on its own temporary directories; every mount has a guard
//! whose Drop runs `shiftfs umount` and then a lazy umount2, so a failing test leaves nothing
//! mounted. The test process is a child subreaper, so a process that a shiftfs command
//! leaves behind becomes our child and the leak check sees it.

mod prereq;
use prereq::prerequisite;

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, Once, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rustix::mount::UnmountFlags;
use rustix::process::{Pid, Signal, WaitOptions};
use shiftfs::mountinfo::{self, MountInfo};
use tempfile::TempDir;

const MAP: &str = "b:0:100000:65536";
const BIN: &str = env!("CARGO_BIN_EXE_shiftfs");
const HELPER: &str = "/sbin/mount.shiftfs";
/// How long a FUSE daemon may take to exit once its mount is gone.
const DAEMON_EXIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Prerequisites and process bookkeeping

fn is_root() -> bool {
    prerequisite(rustix::process::geteuid().is_root(), "needs root")
}

fn fuse_ready() -> bool {
    is_root() && prerequisite(Path::new("/dev/fuse").exists(), "needs /dev/fuse")
}

fn bindfs_ready() -> bool {
    let ok = Command::new("bindfs")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    prerequisite(ok, "needs bindfs (apt-get install bindfs)")
}

/// Every test holds this shared; the leak check holds it exclusively, so that while it
/// counts our children no other test has a command or daemon running.
static PROCESSES: RwLock<()> = RwLock::new(());
static SUBREAPER: Once = Once::new();

fn become_subreaper() {
    SUBREAPER.call_once(|| {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .expect("PR_SET_CHILD_SUBREAPER");
    });
}

fn shared() -> RwLockReadGuard<'static, ()> {
    become_subreaper();
    PROCESSES.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    become_subreaper();
    PROCESSES.write().unwrap_or_else(|e| e.into_inner())
}

fn my_pid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// State letter and parent pid from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn cmdline(pid: i32) -> Vec<Vec<u8>> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Live FUSE daemons serving `target` (the daemon's last argument is its target).
fn daemons_for(target: &Path) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            let args = cmdline(pid);
            args.iter().any(|a| a == b"--daemon-child")
                && args
                    .last()
                    .is_some_and(|a| a == target.as_os_str().as_bytes())
        })
        .collect()
}

/// Waits until `pid` has exited, reaping it if it became our zombie. False on timeout.
fn wait_gone(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        match proc_stat(pid) {
            None => return true,
            Some(('Z', ppid)) if ppid == my_pid() => {
                if let Some(p) = Pid::from_raw(pid) {
                    let _ = rustix::process::waitpid(Some(p), WaitOptions::NOHANG);
                }
            }
            Some(('Z', _)) => return true,
            Some(_) if start.elapsed() > limit => return false,
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running commands

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    fn show(&self) -> String {
        format!(
            "exit {:?}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        )
    }

    fn assert_ok(&self, what: &str) -> &Self {
        assert!(self.ok(), "{what} failed:\n{}", self.show());
        self
    }

    /// Exit 1 with exactly one non-empty stderr line that says `shiftfs: ... {needle} ...`.
    fn assert_one_line_error(&self, what: &str, needle: &str) {
        assert_eq!(self.code, Some(1), "{what} should exit 1:\n{}", self.show());
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "{what}: one error line:\n{}", self.show());
        assert!(
            lines[0].starts_with("shiftfs: ") && lines[0].contains(needle),
            "{what}: error should mention '{needle}':\n{}",
            self.show()
        );
    }
}

fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Run {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `sh -c SCRIPT ARG` as uid and gid `id` (ARG is `$0`).
fn sh_as(id: u32, script: &str, arg: &Path) -> Run {
    use std::os::unix::process::CommandExt;
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(arg)
        .uid(id)
        .gid(id)
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn shiftfs<S: AsRef<OsStr>>(args: &[S]) -> Run {
    run(BIN, args)
}

fn os(p: &Path) -> &OsStr {
    p.as_os_str()
}

// ---------------------------------------------------------------------------------------
// Directories, fixtures and mounts

/// A world-traversable base directory on ext4 (under /var/tmp), canonical, with empty
/// `src` and `tgt` below it.
struct Dirs {
    base: TempDir,
    src: PathBuf,
    tgt: PathBuf,
}

impl Dirs {
    fn path(&self) -> PathBuf {
        fs::canonicalize(self.base.path()).expect("canonical base")
    }
}

fn ext4_dirs() -> Option<Dirs> {
    let base = tempfile::Builder::new()
        .prefix("shiftfs-integ-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp");
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).expect("chmod base");
    let fstype = mountinfo::fstype_name(base.path());
    if !prerequisite(fstype == "ext4", &format!("/var/tmp is {fstype}, not ext4")) {
        return None;
    }
    let root = fs::canonicalize(base.path()).expect("canonical base");
    let (src, tgt) = (root.join("src"), root.join("tgt"));
    fs::create_dir(&src).expect("mkdir src");
    fs::create_dir(&tgt).expect("mkdir tgt");
    Some(Dirs { base, src, tgt })
}

/// Lazily unmounts a plain (not shifted) mount on drop.
struct Plain(PathBuf);

impl Drop for Plain {
    fn drop(&mut self) {
        if mount_at(&self.0).is_some()
            && let Err(e) = rustix::mount::unmount(&self.0, UnmountFlags::DETACH)
        {
            eprintln!("unmount {}: {e}", self.0.display());
        }
    }
}

/// Dirs whose `src` is the root of a fresh tmpfs; the guard must outlive every mount of it.
fn tmpfs_dirs() -> Option<(Dirs, Plain)> {
    let mut d = ext4_dirs()?;
    let fs_dir = d.path().join("tmpfs");
    fs::create_dir(&fs_dir).expect("mkdir tmpfs");
    rustix::mount::mount(
        "shiftfs-integ",
        &fs_dir,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"mode=0755,size=16m",
    )
    .expect("mount tmpfs");
    let guard = Plain(fs_dir.clone());
    d.src = fs_dir;
    Some((d, guard))
}

/// On-disk owners 0, 1000 and 70000 (the last outside the map).
fn populate(src: &Path) {
    for (name, id) in [("root", 0), ("user", 1000), ("unmapped", 70000)] {
        fs::write(src.join(name), name).expect("write fixture");
        chown(src.join(name), Some(id), Some(id)).expect("chown fixture");
    }
    fs::create_dir(src.join("home")).expect("mkdir home");
    chown(src.join("home"), Some(1000), Some(1000)).expect("chown home");
}

fn owner(path: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.uid(), m.gid())
}

/// What `populate` wrote, seen through a mount shifted by MAP.
fn assert_shifted(tgt: &Path) {
    assert_eq!(owner(&tgt.join("root")), (100000, 100000), "root shifted");
    assert_eq!(owner(&tgt.join("user")), (101000, 101000), "user shifted");
    assert_eq!(owner(&tgt.join("home")), (101000, 101000), "dir shifted");
    assert_eq!(owner(&tgt.join("unmapped")), (65534, 65534), "overflow id");
    assert_eq!(fs::read(tgt.join("user")).expect("read through"), b"user");
}

fn mount_at(target: &Path) -> Option<MountInfo> {
    let text = fs::read_to_string(mountinfo::SELF_MOUNTINFO).expect("read mountinfo");
    mountinfo::parse(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == target)
}

/// A shifted mount (either backend). Drop runs `shiftfs umount`, then a lazy umount2 in case
/// that failed, then waits for (and reaps) the daemons it knew of.
struct Shifted {
    target: PathBuf,
    daemons: Vec<i32>,
}

impl Shifted {
    /// Guards `target` right after a mount command ran, whatever it returned.
    fn guard(target: &Path) -> Self {
        Self {
            target: target.to_path_buf(),
            daemons: daemons_for(target),
        }
    }

    /// The one FUSE daemon of this mount.
    fn daemon(&self) -> i32 {
        assert_eq!(
            self.daemons.len(),
            1,
            "one daemon for {}",
            self.target.display()
        );
        self.daemons[0]
    }

    /// After an unmount by any means: the daemon exits within DAEMON_EXIT, and nothing
    /// serves the target any more.
    fn assert_daemon_exits(&self) {
        for &pid in &self.daemons {
            assert!(
                wait_gone(pid, DAEMON_EXIT),
                "daemon {pid} of {} still runs {DAEMON_EXIT:?} after unmount",
                self.target.display()
            );
        }
        assert_eq!(daemons_for(&self.target), Vec::<i32>::new());
    }
}

impl Drop for Shifted {
    fn drop(&mut self) {
        if mount_at(&self.target).is_some() {
            let r = shiftfs(&[OsStr::new("umount"), os(&self.target)]);
            if !r.ok() {
                eprintln!("guard: shiftfs umount: {}", r.show());
            }
            if mount_at(&self.target).is_some()
                && let Err(e) = rustix::mount::unmount(&self.target, UnmountFlags::DETACH)
            {
                eprintln!("guard: unmount {}: {e}", self.target.display());
            }
        }
        for &pid in &self.daemons {
            if !wait_gone(pid, DAEMON_EXIT)
                && let Some(p) = Pid::from_raw(pid)
            {
                let _ = rustix::process::kill_process(p, Signal::KILL);
                wait_gone(pid, DAEMON_EXIT);
            }
        }
        // A FUSE daemon's log outlives it; keep it only when it may explain a failure.
        let log = shiftfs::mount::Record::log_path(&self.target);
        if std::thread::panicking() {
            eprintln!("daemon log, if any: {}", log.display());
        } else {
            let _ = fs::remove_file(log);
        }
    }
}

/// `shiftfs mount [extra...] --map MAP SRC TGT`; the guard is made whatever the outcome.
fn shiftfs_mount(src: &Path, tgt: &Path, extra: &[&str]) -> (Run, Shifted) {
    let mut args: Vec<&OsStr> = vec![OsStr::new("mount")];
    args.extend(extra.iter().map(OsStr::new));
    args.extend([OsStr::new("--map"), OsStr::new(MAP), os(src), os(tgt)]);
    let r = shiftfs(&args);
    (r, Shifted::guard(tgt))
}

/// The `shiftfs list` row of `target`, split into columns.
fn list_row(target: &Path) -> Option<Vec<String>> {
    let r = shiftfs(&["list"]);
    r.assert_ok("shiftfs list");
    r.stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cols| cols.first().is_some_and(|c| Path::new(c) == target))
}

/// A bindfs (FUSE, no idmap support) view of `src` at `at`, served in the foreground by our
/// child so it is stopped and reaped on drop.
struct Bindfs {
    at: PathBuf,
    child: Child,
}

impl Bindfs {
    fn start(src: &Path, at: &Path) -> Self {
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
        let start = Instant::now();
        while mount_at(at).is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "bindfs did not mount"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        if mount_at(&self.at).is_some() {
            let r = run("fusermount3", &[OsStr::new("-u"), os(&self.at)]);
            if !r.ok() {
                let _ = rustix::mount::unmount(&self.at, UnmountFlags::DETACH);
            }
        }
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) {
            if start.elapsed() > DAEMON_EXIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `/sbin/mount.shiftfs -> this build's binary`, replacing only a symlink.
fn install_helper() -> bool {
    static LOCK: Mutex<()> = Mutex::new(());
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let link = Path::new(HELPER);
    match fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => {
            if fs::read_link(link).is_ok_and(|t| t == Path::new(BIN)) {
                return true;
            }
            // Atomic replacement: mount(8) in a parallel test never sees it missing.
            let tmp = link.with_file_name(format!(".mount.shiftfs.{}", my_pid()));
            let _ = fs::remove_file(&tmp);
            symlink(BIN, &tmp).expect("symlink helper");
            fs::rename(&tmp, link).expect("replace helper symlink");
            true
        }
        Ok(_) => prerequisite(
            false,
            &format!("{HELPER} exists and is not a symlink; not replacing it"),
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            symlink(BIN, link).expect("symlink helper");
            true
        }
        Err(e) => panic!("stat {HELPER}: {e}"),
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
        my_pid(),
        std::thread::current().id()
    ));
    fs::write(&tmp, new).expect("write fstab copy");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).expect("chmod fstab copy");
    fs::rename(&tmp, "/etc/fstab").expect("replace /etc/fstab");
}

/// One fstab line, removed again on drop.
struct FstabLine(String);

impl FstabLine {
    fn add(line: String) -> Self {
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

// ---------------------------------------------------------------------------------------
// auto on filesystems with idmapped mounts: the kernel, and it says why

fn auto_picks_kernel(d: &Dirs, fstype: &str) {
    populate(&d.src);
    let (r, m) = shiftfs_mount(&d.src, &d.tgt, &[]);
    r.assert_ok("shiftfs mount (auto)");
    assert!(
        r.stdout.contains("kernel:") && r.stdout.contains(fstype),
        "auto should say it picked the kernel and why ({fstype}):\n{}",
        r.show()
    );
    assert!(m.daemons.is_empty(), "no daemon for a kernel mount");
    assert_shifted(&d.tgt);

    let info = mount_at(&d.tgt).expect("mounted");
    assert_eq!(info.fstype, fstype);
    for opt in ["rw", "nosuid", "nodev", "idmapped"] {
        assert!(info.has_option(opt), "{opt} in {:?}", info.mount_options);
    }

    let row = list_row(&d.tgt).expect("shiftfs list shows the mount");
    assert_eq!(row[1], d.src.to_string_lossy(), "source column: {row:?}");
    assert_eq!(row[2], "kernel", "backend column: {row:?}");
    assert_eq!(row[3], MAP, "map column: {row:?}");
    assert_eq!(row.last().map(String::as_str), Some("active"), "{row:?}");

    shiftfs(&[OsStr::new("umount"), os(&d.tgt)]).assert_ok("shiftfs umount");
    assert!(mount_at(&d.tgt).is_none(), "unmounted");
    assert!(list_row(&d.tgt).is_none(), "gone from shiftfs list");
    assert_eq!(owner(&d.src.join("root")), (0, 0), "source untouched");
}

#[test]
fn auto_picks_kernel_on_ext4() {
    let _p = shared();
    if !is_root() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    auto_picks_kernel(&d, "ext4");
}

#[test]
fn auto_picks_kernel_on_tmpfs() {
    let _p = shared();
    if !is_root() {
        return;
    }
    let Some((d, _tmpfs)) = tmpfs_dirs() else {
        return;
    };
    auto_picks_kernel(&d, "tmpfs");
}

// ---------------------------------------------------------------------------------------
// A source on FUSE (bindfs): auto picks FUSE and says why; --backend kernel refuses

#[test]
fn auto_picks_fuse_on_bindfs_and_kernel_refuses() {
    let _p = shared();
    if !fuse_ready() || !bindfs_ready() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    populate(&d.src);
    let view = d.path().join("bindfs");
    let _bindfs = Bindfs::start(&d.src, &view);

    let (r, m) = shiftfs_mount(&view, &d.tgt, &["--backend", "kernel"]);
    r.assert_one_line_error("--backend kernel on bindfs", "--backend fuse");
    assert!(
        r.stderr.contains("does not support idmapped mounts"),
        "{}",
        r.show()
    );
    assert!(r.stdout.is_empty(), "{}", r.show());
    assert!(mount_at(&d.tgt).is_none(), "nothing mounted after refusal");
    drop(m);

    let (r, m) = shiftfs_mount(&view, &d.tgt, &[]);
    r.assert_ok("shiftfs mount (auto) on bindfs");
    assert!(
        r.stdout.contains("(fuse: ") && r.stdout.contains("idmapped mount not possible"),
        "auto should say it picked FUSE and why:\n{}",
        r.show()
    );
    let daemon = m.daemon();
    assert_shifted(&d.tgt);

    let row = list_row(&d.tgt).expect("shiftfs list shows the mount");
    assert_eq!(row[2], "fuse", "{row:?}");
    assert_eq!(row[3], MAP, "{row:?}");
    assert_eq!(row[5], daemon.to_string(), "pid column: {row:?}");
    assert_eq!(row.last().map(String::as_str), Some("active"), "{row:?}");

    shiftfs(&[OsStr::new("umount"), os(&d.tgt)]).assert_ok("shiftfs umount");
    assert!(mount_at(&d.tgt).is_none(), "unmounted");
    m.assert_daemon_exits();
}

// ---------------------------------------------------------------------------------------
// mount(8): `mount -t shiftfs` and fstab, both backends, `umount` (util-linux) removes it

fn via_mount8(backend: &str, fstab: bool) {
    if !install_helper() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    populate(&d.src);
    let options = format!("map={MAP},backend={backend}");
    let _line;
    let r = if fstab {
        _line = FstabLine::add(format!(
            "{} {} shiftfs {options},noauto 0 0",
            d.src.display(),
            d.tgt.display()
        ));
        run("mount", &[os(&d.tgt)])
    } else {
        run(
            "mount",
            &[
                OsStr::new("-t"),
                OsStr::new("shiftfs"),
                OsStr::new("-o"),
                OsStr::new(&options),
                os(&d.src),
                os(&d.tgt),
            ],
        )
    };
    let m = Shifted::guard(&d.tgt);
    r.assert_ok("mount(8)");
    assert_shifted(&d.tgt);
    let info = mount_at(&d.tgt).expect("mounted");
    match backend {
        "kernel" => {
            assert!(info.has_option("idmapped"), "{info:?}");
            assert!(m.daemons.is_empty());
        }
        _ => {
            assert!(info.fstype.starts_with("fuse"), "{info:?}");
            m.daemon();
        }
    }
    let row = list_row(&d.tgt).expect("shiftfs list shows it");
    assert_eq!(row[2], backend, "{row:?}");

    run("umount", &[os(&d.tgt)]).assert_ok("umount(8)");
    assert!(mount_at(&d.tgt).is_none(), "unmounted by umount(8)");
    m.assert_daemon_exits();
    assert!(list_row(&d.tgt).is_none(), "gone from shiftfs list");
}

#[test]
fn mount_t_shiftfs_kernel() {
    let _p = shared();
    if is_root() {
        via_mount8("kernel", false);
    }
}

#[test]
fn mount_t_shiftfs_fuse() {
    let _p = shared();
    if fuse_ready() {
        via_mount8("fuse", false);
    }
}

#[test]
fn fstab_kernel() {
    let _p = shared();
    if is_root() {
        via_mount8("kernel", true);
    }
}

#[test]
fn fstab_fuse() {
    let _p = shared();
    if fuse_ready() {
        via_mount8("fuse", true);
    }
}

// ---------------------------------------------------------------------------------------
// Flags: default nosuid,nodev; -o ro gives EROFS, on both backends

fn flags(backend: &str) {
    let Some(d) = ext4_dirs() else { return };
    populate(&d.src);
    let (r, m) = shiftfs_mount(&d.src, &d.tgt, &["--backend", backend]);
    r.assert_ok("shiftfs mount (default flags)");
    let info = mount_at(&d.tgt).expect("mounted");
    for opt in ["rw", "nosuid", "nodev"] {
        assert!(info.has_option(opt), "{opt} in {:?}", info.mount_options);
    }
    // Host root has no inner id, so the container's root (host 100000) writes.
    let w = sh_as(100000, "echo x > \"$0\"", &d.tgt.join("new"));
    assert!(w.ok(), "rw mount is writable: {}", w.show());
    assert_eq!(owner(&d.src.join("new")), (0, 0), "stored as inner root");
    drop(m);
    assert!(mount_at(&d.tgt).is_none());

    let (r, m) = shiftfs_mount(&d.src, &d.tgt, &["--backend", backend, "-o", "ro"]);
    r.assert_ok("shiftfs mount -o ro");
    let info = mount_at(&d.tgt).expect("mounted");
    for opt in ["ro", "nosuid", "nodev"] {
        assert!(info.has_option(opt), "{opt} in {:?}", info.mount_options);
    }
    assert_shifted(&d.tgt);
    let erofs = |what: &str, e: std::io::Error| {
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(
        "create",
        fs::write(d.tgt.join("another"), b"x").expect_err("create on ro"),
    );
    erofs(
        "overwrite",
        fs::write(d.tgt.join("user"), b"x").expect_err("write on ro"),
    );
    erofs(
        "mkdir",
        fs::create_dir(d.tgt.join("dir")).expect_err("mkdir on ro"),
    );
    let w = sh_as(100000, "echo x > \"$0\"", &d.tgt.join("root"));
    assert!(
        w.stderr.contains("Read-only file system"),
        "shell sees EROFS: {}",
        w.show()
    );
    assert_eq!(fs::read(d.src.join("user")).expect("read src"), b"user");
    assert!(!d.src.join("another").exists());
    drop(m);
}

#[test]
fn flags_kernel() {
    let _p = shared();
    if is_root() {
        flags("kernel");
    }
}

#[test]
fn flags_fuse() {
    let _p = shared();
    if fuse_ready() {
        flags("fuse");
    }
}

// ---------------------------------------------------------------------------------------
// shiftfs umount: dead FUSE mounts, non-mounts, plain bind mounts

#[test]
fn umount_cleans_up_after_killed_daemon() {
    let _p = shared();
    if !fuse_ready() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    populate(&d.src);
    let (r, m) = shiftfs_mount(&d.src, &d.tgt, &["--backend", "fuse"]);
    r.assert_ok("shiftfs mount --backend fuse");
    assert_shifted(&d.tgt);
    let daemon = m.daemon();
    rustix::process::kill_process(Pid::from_raw(daemon).expect("pid"), Signal::KILL)
        .expect("SIGKILL the daemon");
    assert!(wait_gone(daemon, DAEMON_EXIT), "killed daemon gone");
    let e = fs::metadata(d.tgt.join("root")).expect_err("a dead mount cannot be used");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    let row = list_row(&d.tgt).expect("shiftfs list still shows the dead mount");
    assert!(row.join(" ").contains("dead"), "{row:?}");

    let r = shiftfs(&[OsStr::new("umount"), os(&d.tgt)]);
    r.assert_ok("shiftfs umount of a dead mount");
    assert!(r.stderr.contains("daemon had exited"), "{}", r.show());
    assert!(mount_at(&d.tgt).is_none(), "dead mount removed");
    assert!(list_row(&d.tgt).is_none());
    assert_eq!(owner(&d.src.join("root")), (0, 0));
}

/// A busy mount: `shiftfs umount` refuses with advice; `--lazy` detaches it at once, and a
/// FUSE daemon exits when the last open file is closed.
fn umount_busy(backend: &str) {
    let Some(d) = ext4_dirs() else { return };
    populate(&d.src);
    let (r, m) = shiftfs_mount(&d.src, &d.tgt, &["--backend", backend]);
    r.assert_ok("shiftfs mount");
    let open = fs::File::open(d.tgt.join("user")).expect("open through the mount");
    let r = shiftfs(&[OsStr::new("umount"), os(&d.tgt)]);
    r.assert_one_line_error("shiftfs umount of a busy mount", "--lazy");
    assert!(mount_at(&d.tgt).is_some(), "still mounted");

    let start = Instant::now();
    shiftfs(&[OsStr::new("umount"), OsStr::new("--lazy"), os(&d.tgt)]).assert_ok("umount --lazy");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "--lazy returns at once, took {:?}",
        start.elapsed()
    );
    assert!(mount_at(&d.tgt).is_none(), "detached");
    // A FUSE daemon still serves the open file: `list` says so; a kernel mount is gone.
    let row = list_row(&d.tgt);
    match backend {
        "fuse" => assert!(
            row.as_ref()
                .is_some_and(|r| r.iter().any(|c| c == "draining")),
            "listed as draining: {row:?}"
        ),
        _ => assert!(row.is_none(), "gone from shiftfs list: {row:?}"),
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &open, &mut text).expect("open file still readable");
    assert_eq!(text, "user");
    drop(open);
    m.assert_daemon_exits();
}

#[test]
fn umount_busy_kernel() {
    let _p = shared();
    if is_root() {
        umount_busy("kernel");
    }
}

#[test]
fn umount_busy_fuse() {
    let _p = shared();
    if fuse_ready() {
        umount_busy("fuse");
    }
}

#[test]
fn umount_refuses_non_mount_and_plain_bind_mount() {
    let _p = shared();
    if !is_root() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    let r = shiftfs(&[OsStr::new("umount"), os(&d.tgt)]);
    r.assert_one_line_error("shiftfs umount of a plain directory", "is not mounted");

    let missing = d.path().join("missing");
    let r = shiftfs(&[OsStr::new("umount"), os(&missing)]);
    r.assert_one_line_error("shiftfs umount of a missing path", "is not mounted");

    rustix::mount::mount_bind(&d.src, &d.tgt).expect("bind mount");
    let _bind = Plain(d.tgt.clone());
    let r = shiftfs(&[OsStr::new("umount"), os(&d.tgt)]);
    r.assert_one_line_error("shiftfs umount of a bind mount", "not a shifted mount");
    assert!(mount_at(&d.tgt).is_some(), "the bind mount is left alone");
}

#[test]
fn umount_refuses_a_fuse_mount_that_is_not_shiftfs() {
    let _p = shared();
    if !fuse_ready() || !bindfs_ready() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    let view = d.path().join("bindfs");
    let _bindfs = Bindfs::start(&d.src, &view);
    let r = shiftfs(&[OsStr::new("umount"), os(&view)]);
    r.assert_one_line_error("shiftfs umount of bindfs", "not a shifted mount");
    assert!(mount_at(&view).is_some(), "the bindfs mount is left alone");
}

// ---------------------------------------------------------------------------------------
// shiftfs doctor

#[test]
fn doctor_reports_this_machine_ok() {
    let _p = shared();
    if !is_root() {
        return;
    }
    let r = shiftfs(&["doctor"]);
    eprintln!("shiftfs doctor:\n{}", r.stdout);
    r.assert_ok("shiftfs doctor");
    for name in ["kernel", "user namespaces", "/dev/fuse", "idmapped mounts"] {
        assert!(
            r.stdout.lines().any(|l| {
                let mut cols = l.splitn(2, "  ");
                cols.next() == Some("OK")
                    && cols
                        .next()
                        .is_some_and(|rest| rest.trim_start().starts_with(&format!("{name}  ")))
            }),
            "doctor: an OK line for {name}:\n{}",
            r.stdout
        );
    }
    assert!(
        r.stdout.contains("--backend kernel: usable"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("--backend fuse: usable"), "{}", r.stdout);
}

// ---------------------------------------------------------------------------------------
// Nothing left behind by kernel mounts and probes

/// Our children, zombies included (the leak check holds the exclusive lock, so no test's
/// own command is running).
fn children() -> Vec<(i32, char, String)> {
    all_pids()
        .into_iter()
        .filter_map(|pid| {
            let (state, ppid) = proc_stat(pid)?;
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (ppid == my_pid()).then(|| (pid, state, comm.trim_end().to_string()))
        })
        .collect()
}

#[test]
fn kernel_mounts_and_probes_leave_no_process() {
    let _p = exclusive();
    if !is_root() {
        return;
    }
    // Zombies of daemons that earlier tests waited for by polling are reaped first.
    while let Ok(Some(_)) = rustix::process::waitpid(None, WaitOptions::NOHANG) {}
    assert_eq!(children(), vec![], "no children before the test");

    let Some(d) = ext4_dirs() else { return };
    populate(&d.src);
    let probe = shiftfs::kernel::probe(&d.src);
    assert!(probe.supported, "{probe:?}");

    let (r, m) = shiftfs_mount(&d.src, &d.tgt, &["--backend", "kernel"]);
    r.assert_ok("shiftfs mount --backend kernel");
    assert_shifted(&d.tgt);
    list_row(&d.tgt).expect("listed");
    shiftfs(&[OsStr::new("umount"), os(&d.tgt)]).assert_ok("shiftfs umount");
    drop(m);
    shiftfs(&[OsStr::new("doctor"), os(&d.src)]).assert_ok("shiftfs doctor SOURCE");
    if install_helper() {
        let opts = format!("map={MAP},backend=kernel");
        let r = run(
            "mount",
            &[
                OsStr::new("-t"),
                OsStr::new("shiftfs"),
                OsStr::new("-o"),
                OsStr::new(&opts),
                os(&d.src),
                os(&d.tgt),
            ],
        );
        let _m = Shifted::guard(&d.tgt);
        r.assert_ok("mount -t shiftfs");
        run("umount", &[os(&d.tgt)]).assert_ok("umount(8)");
    }

    assert_eq!(
        children(),
        Vec::<(i32, char, String)>::new(),
        "processes left behind"
    );
    let base = d.path();
    let mentions: Vec<i32> = all_pids()
        .into_iter()
        .filter(|&pid| {
            cmdline(pid)
                .iter()
                .any(|a| a.starts_with(base.as_os_str().as_bytes()))
        })
        .collect();
    assert_eq!(
        mentions,
        Vec::<i32>::new(),
        "processes still working on {}",
        base.display()
    );
    assert!(mount_at(&d.tgt).is_none());
}

// ---------------------------------------------------------------------------------------
// A FUSE target inside its source would serve itself

#[test]
fn fuse_refuses_a_target_inside_its_source() {
    let _p = shared();
    if !fuse_ready() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    let inner = d.src.join("mnt");
    fs::create_dir(&inner).expect("mkdir");
    let (r, m) = shiftfs_mount(&d.src, &inner, &["--backend", "fuse"]);
    r.assert_one_line_error("FUSE mount inside its source", "inside the source");
    assert!(mount_at(&inner).is_none(), "nothing mounted");
    assert!(m.daemons.is_empty(), "no daemon started");
}

#[test]
fn fuse_daemon_does_not_hold_the_callers_directory() {
    let _p = shared();
    if !fuse_ready() {
        return;
    }
    let Some((d, tmpfs)) = tmpfs_dirs() else {
        return;
    };
    let src = d.path().join("src");
    let out = Command::new(BIN)
        .args([
            OsStr::new("mount"),
            OsStr::new("--backend"),
            OsStr::new("fuse"),
        ])
        .args([OsStr::new("--map"), OsStr::new(MAP), os(&src), os(&d.tgt)])
        .current_dir(&tmpfs.0)
        .stdin(Stdio::null())
        .output()
        .expect("run shiftfs mount");
    let m = Shifted::guard(&d.tgt);
    assert!(out.status.success(), "{out:?}");
    let cwd = fs::read_link(format!("/proc/{}/cwd", m.daemon())).expect("daemon cwd");
    assert_eq!(cwd, Path::new("/"), "the daemon keeps no directory busy");
    // The file system the caller ran from can still be unmounted.
    rustix::mount::unmount(&tmpfs.0, UnmountFlags::empty()).expect("unmount the caller's fs");
}

#[test]
fn mount_t_shiftfs_without_a_map_says_how_to_give_one() {
    let _p = shared();
    if !is_root() || !install_helper() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    let r = run(
        "mount",
        &[
            OsStr::new("-t"),
            OsStr::new("shiftfs"),
            os(&d.src),
            os(&d.tgt),
        ],
    );
    let _m = Shifted::guard(&d.tgt);
    assert_ne!(r.code, Some(0), "{}", r.show());
    assert!(r.stderr.contains("-o map="), "{}", r.show());
    assert!(mount_at(&d.tgt).is_none());
}

#[test]
fn fuse_daemon_keeps_no_inherited_descriptor() {
    let _p = shared();
    if !fuse_ready() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    let leak = d.path().join("inherited");
    // The shell opens fd 7 without close-on-exec, as `exec 7>file` in a script would.
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 7>"$1"; exec "$2" mount --backend fuse --map "$3" "$4" "$5""#)
        .arg("sh")
        .args([
            os(&leak),
            OsStr::new(BIN),
            OsStr::new(MAP),
            os(&d.src),
            os(&d.tgt),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run shiftfs mount");
    let m = Shifted::guard(&d.tgt);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(m.daemons.len(), 1, "{out:?}");
    let fds: Vec<PathBuf> = fs::read_dir(format!("/proc/{}/fd", m.daemon()))
        .expect("daemon fds")
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .collect();
    assert!(
        !fds.iter().any(|p| p == &leak),
        "the daemon holds the caller's fd 7: {fds:?}"
    );
}

#[test]
fn clean_daemon_exit_removes_its_log() {
    let _p = shared();
    if !fuse_ready() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    let log = shiftfs::mount::Record::log_path(&d.tgt);
    let (out, m) = shiftfs_mount(&d.src, &d.tgt, &["--backend", "fuse"]);
    out.assert_ok("shiftfs mount");
    assert!(log.exists(), "the running daemon logs to {}", log.display());
    shiftfs(&[OsStr::new("umount"), os(&d.tgt)]).assert_ok("shiftfs umount");
    m.assert_daemon_exits();
    assert!(!log.exists(), "{} left behind", log.display());
}

#[test]
fn umount_removes_a_recursive_kernel_mount_with_its_submounts() {
    let _p = shared();
    if !is_root() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    let sub = d.src.join("sub");
    fs::create_dir(&sub).expect("mkdir sub");
    rustix::mount::mount(
        "shiftfs-integ",
        &sub,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"mode=0755,size=1m",
    )
    .expect("mount tmpfs");
    let _sub = Plain(sub.clone());
    fs::write(sub.join("f"), "x").expect("write in sub");
    let (out, _m) = shiftfs_mount(&d.src, &d.tgt, &["--backend", "kernel", "--recursive"]);
    out.assert_ok("shiftfs mount --recursive");
    assert_eq!(owner(&d.tgt.join("sub/f")), (100000, 100000));
    shiftfs(&[OsStr::new("umount"), os(&d.tgt)]).assert_ok("shiftfs umount of a recursive mount");
    assert!(mount_at(&d.tgt).is_none() && mount_at(&d.tgt.join("sub")).is_none());
}

#[test]
fn second_mount_on_a_shifted_target_is_refused() {
    let _p = shared();
    if !fuse_ready() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    // An empty source leaves the target empty, which once let a second mount stack on it.
    for backend in ["fuse", "kernel"] {
        let (out, m) = shiftfs_mount(&d.src, &d.tgt, &["--backend", backend]);
        out.assert_ok("first mount");
        let again = shiftfs(&[
            OsStr::new("mount"),
            OsStr::new("--map"),
            OsStr::new(MAP),
            os(&d.src),
            os(&d.tgt),
        ]);
        again.assert_one_line_error("second mount", "already a shifted mount");
        shiftfs(&[OsStr::new("umount"), os(&d.tgt)]).assert_ok("umount");
        m.assert_daemon_exits();
        assert!(
            mount_at(&d.tgt).is_none(),
            "{backend}: one umount removes it"
        );
    }
}

#[test]
fn fuse_mount_on_a_long_target_path() {
    let _p = shared();
    if !fuse_ready() {
        return;
    }
    let Some(d) = ext4_dirs() else { return };
    let long = d.path().join("pod-".repeat(60));
    fs::create_dir(&long).expect("mkdir long target");
    populate(&d.src);
    let (out, _m) = shiftfs_mount(&d.src, &long, &["--backend", "fuse"]);
    out.assert_ok("mount on a 240-byte target");
    assert_shifted(&long);
    assert!(list_row(&long).is_some(), "shiftfs list shows it");
    shiftfs(&[OsStr::new("umount"), os(&long)]).assert_ok("umount");
}
