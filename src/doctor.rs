//! What this machine supports for each backend, and what to do about what is missing.
//! `shiftfs doctor` prints these checks; each one is cheap and leaves nothing behind.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::backend::kernel::{self, MIN_KERNEL, Probe};
use crate::sys::userns::UsernsChild;

/// The first kernel with FUSE passthrough (`FUSE_PASSTHROUGH`, `FUSE_DEV_IOC_BACKING_OPEN`).
pub const MIN_KERNEL_PASSTHROUGH: (u32, u32) = (6, 9);
/// The first kernel with FUSE over io_uring (`FUSE_OVER_IO_URING`, `fuse.enable_uring`).
pub const MIN_KERNEL_URING: (u32, u32) = (6, 14);
/// The module parameter that lets FUSE servers use io_uring (default off).
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Missing,
    /// Works, but exposes something; the advice says what to change.
    Warning,
    /// Could not be determined; the detail says why.
    Unknown,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Ok => "OK",
            Self::Missing => "MISSING",
            Self::Warning => "WARNING",
            Self::Unknown => "UNKNOWN",
        })
    }
}

/// Which feature a check matters for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needed {
    /// Both backends.
    Mounting,
    KernelBackend,
    FuseBackend,
    /// Faster FUSE reads and writes; FUSE works without it.
    FusePerformance,
    /// The kernel unmounting a FUSE mount whose daemon died; root mounts work without it.
    FuseAutoUnmount,
    /// Maps taken from /etc/subuid and namespaces set up by unprivileged users.
    Rootless,
    /// Keeping what a container writes from giving host users privileges.
    HostSafety,
}

impl fmt::Display for Needed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mounting => "any mount",
            Self::KernelBackend => "--backend kernel",
            Self::FuseBackend => "--backend fuse",
            Self::FusePerformance => "fast FUSE I/O",
            Self::FuseAutoUnmount => "auto-unmount when a FUSE daemon dies",
            Self::Rootless => "subuid maps / rootless setups",
            Self::HostSafety => "host safety",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub needed_for: Needed,
    pub status: Status,
    /// What was seen.
    pub detail: String,
    /// What to do, when not OK.
    pub advice: Option<String>,
}

impl Check {
    fn new(name: &'static str, needed_for: Needed, status: Status, detail: String) -> Self {
        Self {
            name,
            needed_for,
            status,
            detail,
            advice: None,
        }
    }

    fn advice(mut self, advice: impl Into<String>) -> Self {
        if self.status != Status::Ok {
            self.advice = Some(advice.into());
        }
        self
    }
}

/// Every check, in the order a reader wants them; `source` is the tree to probe for
/// idmapped mount support.
pub fn checks(source: &Path) -> Vec<Check> {
    let release = kernel::kernel_release();
    let version = kernel::parse_kernel_version(&release);
    let config = KernelConfig::read(&release);
    vec![
        kernel_check(&release, version),
        privileges(),
        user_namespaces(),
        idmapped_mounts(source, &kernel::probe(source)),
        dev_fuse(Path::new("/dev/fuse")),
        fuse_passthrough(version, &config),
        fuse_uring(
            version,
            std::fs::read_to_string(ENABLE_URING).ok().as_deref(),
        ),
        program(
            "fusermount3",
            Needed::FuseAutoUnmount,
            "apt-get install fuse3",
        ),
        program("newuidmap", Needed::Rootless, "apt-get install uidmap"),
        subid(Path::new("/etc/subuid")),
        subid(Path::new("/etc/subgid")),
    ]
}

/// Whether setuid files and file capabilities a container writes into `source` work for
/// host users: they do when the filesystem holding it is mounted without `nosuid` and an
/// unprivileged host user can reach it. A shifted mount is `nosuid` by default, but the
/// source itself is not; a container's root owns its image's root-owned files, so it can
/// plant a setuid-root shell there. For a SOURCE the user names (`/`, the default, says
/// nothing about a tree).
pub fn source_exposure(source: &Path) -> Check {
    let name = "setuid in SOURCE";
    let needed = Needed::HostSafety;
    let unknown = |what: String| {
        Check::new(name, needed, Status::Unknown, what)
            .advice("check by hand that SOURCE's filesystem is mounted nosuid or that a parent directory is mode 0700")
    };
    let path = match std::fs::canonicalize(source) {
        Ok(p) => p,
        Err(e) => return unknown(format!("{}: {e}", source.display())),
    };
    let suid = match rustix::fs::statvfs(&path) {
        Ok(st) => !st.f_flag.contains(rustix::fs::StatVfsMountFlags::NOSUID),
        Err(e) => return unknown(format!("statvfs {}: {e}", path.display())),
    };
    let mount_point = crate::mountinfo::mount_of(&path, Path::new("/proc/self/mountinfo"))
        .map_or_else(
            |_| "its mount point".to_string(),
            |m| m.mount_point.display().to_string(),
        );
    if !suid {
        return Check::new(
            name,
            needed,
            Status::Ok,
            format!("{}: on a nosuid mount ({mount_point})", path.display()),
        );
    }
    match closed_ancestor(&path) {
        Ok(Some(dir)) => Check::new(
            name,
            needed,
            Status::Ok,
            format!(
                "{}: on a suid mount, but only root may enter {}",
                path.display(),
                dir.display()
            ),
        ),
        Ok(None) => Check::new(
            name,
            needed,
            Status::Warning,
            format!(
                "{}: on a suid mount ({mount_point}) that host users can reach: setuid-root files and file capabilities a container plants there work for them",
                path.display()
            ),
        )
        .advice(format!(
            "mount the filesystem holding SOURCE nosuid (mount -o remount,nosuid {mount_point}), or chmod 0700 a root-owned directory above SOURCE"
        )),
        Err(e) => unknown(format!("{}: {e}", path.display())),
    }
}

/// The first directory on the way from `/` to `path` (itself included) that only root may
/// search: owned by root, with no execute bit for group or others. A group bit counts even
/// for group root (its members need not be root, and an ACL shows through it).
fn closed_ancestor(path: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    for dir in path.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let md = std::fs::metadata(dir)?;
        if md.uid() == 0 && md.mode() & 0o011 == 0 {
            return Ok(Some(dir.to_path_buf()));
        }
    }
    Ok(None)
}

/// One line per backend: usable or not, from the checks it depends on.
pub fn backend_summary(checks: &[Check]) -> Vec<(&'static str, bool)> {
    let ok = |needed: &[Needed]| {
        checks
            .iter()
            .filter(|c| needed.contains(&c.needed_for))
            .all(|c| c.status == Status::Ok)
    };
    vec![
        ("kernel", ok(&[Needed::Mounting, Needed::KernelBackend])),
        ("fuse", ok(&[Needed::Mounting, Needed::FuseBackend])),
    ]
}

fn kernel_check(release: &str, version: Option<(u32, u32)>) -> Check {
    let name = "kernel";
    match version {
        Some(v) if v >= MIN_KERNEL => Check::new(
            name,
            Needed::KernelBackend,
            Status::Ok,
            format!("Linux {release} (idmapped mounts need >= 5.12)"),
        ),
        Some(_) => Check::new(
            name,
            Needed::KernelBackend,
            Status::Missing,
            format!("Linux {release} is older than 5.12: no idmapped mounts"),
        )
        .advice("use --backend fuse, or upgrade the kernel"),
        None => Check::new(
            name,
            Needed::KernelBackend,
            Status::Unknown,
            format!("cannot parse the kernel release {release:?}"),
        )
        .advice("the idmapped-mount probe below decides"),
    }
}

fn privileges() -> Check {
    let euid = rustix::process::geteuid().as_raw();
    if kernel::has_cap_sys_admin() {
        Check::new(
            "privileges",
            Needed::Mounting,
            Status::Ok,
            format!("euid {euid} with CAP_SYS_ADMIN"),
        )
    } else {
        Check::new(
            "privileges",
            Needed::Mounting,
            Status::Missing,
            format!("euid {euid} without CAP_SYS_ADMIN: cannot mount"),
        )
        .advice("run shiftfs as root (sudo)")
    }
}

fn user_namespaces() -> Check {
    let path = "/proc/sys/user/max_user_namespaces";
    let max = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let created = UsernsChild::spawn().map(drop);
    let name = "user namespaces";
    match (max, created) {
        (_, Ok(())) => Check::new(
            name,
            Needed::KernelBackend,
            Status::Ok,
            format!(
                "max_user_namespaces={}; created one",
                max.map_or("?".to_string(), |m| m.to_string())
            ),
        ),
        (Some(0), Err(e)) => Check::new(
            name,
            Needed::KernelBackend,
            Status::Missing,
            format!("max_user_namespaces=0: cannot create one ({e})"),
        )
        .advice(format!("sysctl -w user.max_user_namespaces=15000 (or write to {path})")),
        (_, Err(e)) => Check::new(
            name,
            Needed::KernelBackend,
            Status::Missing,
            format!("cannot create a user namespace: {e}"),
        )
        .advice("enable CONFIG_USER_NS, raise user.max_user_namespaces, or lift the seccomp/LSM policy that blocks clone(CLONE_NEWUSER)"),
    }
}

fn idmapped_mounts(source: &Path, probe: &Probe) -> Check {
    let status = if probe.supported {
        Status::Ok
    } else {
        Status::Missing
    };
    let check = Check::new(
        "idmapped mounts",
        Needed::KernelBackend,
        status,
        format!("{}: {}", source.display(), probe.reason),
    );
    match &probe.advice {
        Some(a) => check.advice(a.clone()),
        None => check,
    }
}

fn dev_fuse(path: &Path) -> Check {
    let name = "/dev/fuse";
    // Opening and closing without mounting is harmless: the kernel frees the connection.
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Check::new(
            name,
            Needed::FuseBackend,
            Status::Ok,
            "present, opens read-write".into(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::new(
            name,
            Needed::FuseBackend,
            Status::Missing,
            format!("{} does not exist", path.display()),
        )
        .advice("modprobe fuse; in a container, pass the device in (--device /dev/fuse)"),
        Err(e) => Check::new(
            name,
            Needed::FuseBackend,
            Status::Missing,
            format!("cannot open {}: {e}", path.display()),
        )
        .advice("run as root; in a container, allow the device (cgroup devices c 10:229)"),
    }
}

/// The kernel's build configuration, when the machine exposes it.
#[derive(Clone, Debug, Default)]
pub struct KernelConfig {
    /// Where it came from, or `None` if nowhere.
    pub source: Option<PathBuf>,
    text: String,
}

impl KernelConfig {
    /// `/boot/config-RELEASE`, else `/proc/config.gz` (through `gzip -dc`).
    pub fn read(release: &str) -> Self {
        let boot = PathBuf::from(format!("/boot/config-{release}"));
        if let Ok(text) = std::fs::read_to_string(&boot) {
            return Self::from_text(Some(boot), text);
        }
        let proc = PathBuf::from("/proc/config.gz");
        if proc.exists()
            && let Some(text) = gunzip(&proc)
        {
            return Self::from_text(Some(proc), text);
        }
        Self::default()
    }

    pub fn from_text(source: Option<PathBuf>, text: String) -> Self {
        Self { source, text }
    }

    /// `Some("y")`, `Some("m")`, ... for a set option, `Some("n")` for `# CONFIG_X is not set`,
    /// `None` if the option is absent (or there is no config).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.text.lines().find_map(|l| {
            if let Some(v) = l.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
                Some(v.trim())
            } else if l
                .strip_prefix("# ")
                .and_then(|r| r.strip_prefix(key))
                .is_some_and(|r| r == " is not set")
            {
                Some("n")
            } else {
                None
            }
        })
    }
}

fn gunzip(path: &Path) -> Option<String> {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut text = String::new();
    let read = child.stdout.take()?.read_to_string(&mut text);
    let status = child.wait().ok()?;
    (read.is_ok() && status.success()).then_some(text)
}

/// FUSE passthrough: kernel >= 6.9 built with CONFIG_FUSE_PASSTHROUGH.
pub fn fuse_passthrough(version: Option<(u32, u32)>, config: &KernelConfig) -> Check {
    let name = "FUSE passthrough";
    let needed = Needed::FusePerformance;
    if version.is_some_and(|v| v < MIN_KERNEL_PASSTHROUGH) {
        return Check::new(name, needed, Status::Missing, "kernel older than 6.9".into())
            .advice("FUSE still works, with every read and write going through the daemon; upgrade to >= 6.9 for native speed");
    }
    let from = config
        .source
        .as_deref()
        .map_or(String::new(), |p| format!(" ({})", p.display()));
    match config.get("CONFIG_FUSE_PASSTHROUGH") {
        Some("y") => Check::new(
            name,
            needed,
            Status::Ok,
            format!("CONFIG_FUSE_PASSTHROUGH=y{from}"),
        ),
        Some(v) => Check::new(
            name,
            needed,
            Status::Missing,
            format!("CONFIG_FUSE_PASSTHROUGH={v}{from}"),
        )
        .advice("FUSE still works without it, slower; use a kernel built with CONFIG_FUSE_PASSTHROUGH=y"),
        None if config.source.is_some() => Check::new(
            name,
            needed,
            Status::Missing,
            format!("CONFIG_FUSE_PASSTHROUGH absent{from}"),
        )
        .advice("FUSE still works without it, slower; use a kernel built with CONFIG_FUSE_PASSTHROUGH=y"),
        None => Check::new(
            name,
            needed,
            Status::Unknown,
            "kernel >= 6.9, but neither /boot/config-$(uname -r) nor /proc/config.gz tells whether CONFIG_FUSE_PASSTHROUGH is set".into(),
        )
        .advice("the FUSE backend falls back to plain FUSE if the kernel refuses passthrough"),
    }
}

/// FUSE over io_uring: kernel >= 6.14 built with CONFIG_FUSE_IO_URING (the module parameter
/// exists) and `fuse.enable_uring` on; `enable_uring` is the parameter's text, if readable.
pub fn fuse_uring(version: Option<(u32, u32)>, enable_uring: Option<&str>) -> Check {
    let name = "FUSE over io_uring";
    let needed = Needed::FusePerformance;
    let enable = "FUSE works without it, each request crossing CPUs; to let shiftfs serve \
                  every caller on its own CPU: echo 1 > /sys/module/fuse/parameters/enable_uring \
                  (until reboot), or boot with fuse.enable_uring=1 on the kernel command line; \
                  mounts then use it (-o uring=auto, the default)";
    if version.is_some_and(|v| v < MIN_KERNEL_URING) {
        return Check::new(name, needed, Status::Missing, "kernel older than 6.14".into())
            .advice("FUSE works without it, each request crossing CPUs; upgrade to >= 6.14 built with CONFIG_FUSE_IO_URING=y");
    }
    match enable_uring.map(str::trim) {
        Some("Y" | "y" | "1") => Check::new(
            name,
            needed,
            Status::Ok,
            "fuse.enable_uring=Y: FUSE mounts serve over io_uring (-o uring=auto)".into(),
        ),
        Some(v) => {
            Check::new(name, needed, Status::Missing, format!("fuse.enable_uring={v}")).advice(enable)
        }
        None => Check::new(
            name,
            needed,
            Status::Missing,
            format!("{ENABLE_URING} is absent: the kernel was built without CONFIG_FUSE_IO_URING"),
        )
        .advice("FUSE works without it, each request crossing CPUs; use a kernel built with CONFIG_FUSE_IO_URING=y"),
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn program(name: &'static str, needed: Needed, install: &str) -> Check {
    match find_in_path(name) {
        Some(p) => Check::new(name, needed, Status::Ok, p.display().to_string()),
        None => {
            Check::new(name, needed, Status::Missing, "not found in PATH".into()).advice(install)
        }
    }
}

/// The user whose subordinate ids matter: the one behind sudo, else the effective user.
fn invoking_user() -> (String, u32) {
    if let (Ok(name), Some(uid)) = (
        std::env::var("SUDO_USER"),
        std::env::var("SUDO_UID").ok().and_then(|u| u.parse().ok()),
    ) {
        return (name, uid);
    }
    let uid = rustix::process::geteuid().as_raw();
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let id = f.nth(1)?.parse::<u32>().ok()?;
                (id == uid).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| uid.to_string());
    (name, uid)
}

fn subid(path: &Path) -> Check {
    let name = if path.ends_with("subgid") {
        "/etc/subgid"
    } else {
        "/etc/subuid"
    };
    let (user, uid) = invoking_user();
    let tool = if name == "/etc/subgid" {
        "--add-subgids"
    } else {
        "--add-subuids"
    };
    let advice = format!("usermod {tool} 100000-165535 {user}");
    match crate::idmap::subid::read(path) {
        Ok(entries) => {
            let mine = crate::idmap::subid::owned_by(&entries, &user, uid);
            if mine.is_empty() {
                Check::new(
                    name,
                    Needed::Rootless,
                    Status::Missing,
                    format!("no range for {user}"),
                )
                .advice(advice)
            } else {
                let ranges: Vec<String> = mine
                    .iter()
                    .map(|e| format!("{}+{}", e.start, e.count))
                    .collect();
                Check::new(
                    name,
                    Needed::Rootless,
                    Status::Ok,
                    format!("{user}: {}", ranges.join(", ")),
                )
            }
        }
        Err(e) => Check::new(name, Needed::Rootless, Status::Missing, e.to_string()).advice(advice),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
CONFIG_FUSE_FS=m
# CONFIG_FUSE_PASSTHROUGH is not set
CONFIG_FUSE_PASSTHROUGHX=y
CONFIG_USER_NS=y
";

    #[test]
    fn config_lookup() {
        let c = KernelConfig::from_text(Some("/x".into()), CONFIG.into());
        assert_eq!(c.get("CONFIG_FUSE_FS"), Some("m"));
        assert_eq!(c.get("CONFIG_FUSE_PASSTHROUGH"), Some("n"));
        assert_eq!(c.get("CONFIG_USER_NS"), Some("y"));
        assert_eq!(c.get("CONFIG_NOPE"), None);
    }

    #[test]
    fn passthrough_status() {
        let yes = KernelConfig::from_text(Some("/x".into()), "CONFIG_FUSE_PASSTHROUGH=y\n".into());
        let no = KernelConfig::from_text(Some("/x".into()), CONFIG.into());
        let none = KernelConfig::default();
        assert_eq!(fuse_passthrough(Some((6, 9)), &yes).status, Status::Ok);
        assert_eq!(fuse_passthrough(Some((6, 8)), &yes).status, Status::Missing);
        assert_eq!(fuse_passthrough(Some((6, 18)), &no).status, Status::Missing);
        let unknown = fuse_passthrough(Some((6, 18)), &none);
        assert_eq!(unknown.status, Status::Unknown);
        assert!(unknown.advice.is_some());
    }

    #[test]
    fn uring_status_says_how_to_enable_it() {
        assert_eq!(fuse_uring(Some((6, 18)), Some("Y\n")).status, Status::Ok);
        let off = fuse_uring(Some((6, 18)), Some("N\n"));
        assert_eq!(off.status, Status::Missing);
        assert_eq!(off.detail, "fuse.enable_uring=N");
        let advice = off.advice.unwrap();
        assert!(advice.contains("echo 1 > /sys/module/fuse/parameters/enable_uring"));
        assert!(advice.contains("fuse.enable_uring=1"));
        let old = fuse_uring(Some((6, 13)), Some("Y"));
        assert_eq!(old.status, Status::Missing);
        let unbuilt = fuse_uring(Some((6, 18)), None);
        assert!(
            unbuilt.detail.contains("CONFIG_FUSE_IO_URING"),
            "{}",
            unbuilt.detail
        );
    }

    #[test]
    fn summary_follows_needed_checks() {
        let c = |needed_for, status| Check {
            name: "x",
            needed_for,
            status,
            detail: String::new(),
            advice: None,
        };
        let checks = vec![
            c(Needed::Mounting, Status::Ok),
            c(Needed::KernelBackend, Status::Missing),
            c(Needed::FuseBackend, Status::Ok),
            c(Needed::Rootless, Status::Missing),
        ];
        assert_eq!(
            backend_summary(&checks),
            vec![("kernel", false), ("fuse", true)]
        );
    }
}
