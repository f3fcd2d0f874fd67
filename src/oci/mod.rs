//! OCI runtime integration: `shiftfs-runtime`, a wrapper that an engine (podman, a
//! hand-run bundle, containerd) calls instead of runc or crun. On `create` and `run` it
//! gives a user-namespaced container whose root is a canonical image (owned by 0) a shifted
//! root, and shifts the idmapped bind mounts the runtime cannot idmap itself; it then runs
//! the real runtime on a private copy of the bundle whose config points at those mounts.
//! `delete` unmounts them; `gc` cleans up after containers that died without a `delete`.
//!
//! The mounts are made by running this binary's `shiftfs mount` (one code path for every
//! mount, the FUSE daemon included), with the container id in its environment so the
//! records name the container.

pub mod args;
pub mod spec;
pub mod state;

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use args::Invocation;
pub use spec::Spec;
pub use state::{Container, Lock};

use crate::idmap::{IdMapping, InnerUid};
use crate::registry::{CONTAINER_ENV, Record};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error(
        "the real runtime '{0}' was not found; install runc (apt-get install runc), or name it with --runtime-path, SHIFTFS_RUNTIME or `runtime = \"...\"` in /etc/shiftfs/runtime.toml"
    )]
    NoRuntime(String),
    #[error(
        "the real runtime {0} is shiftfs-runtime itself; point --runtime-path or SHIFTFS_RUNTIME at runc or crun"
    )]
    RuntimeIsSelf(PathBuf),
    #[error("container id '{0}' is not valid (letters, digits, _ + - . only)")]
    BadId(String),
    #[error(
        "container {0} already has shifted mounts from an earlier create; delete it first (shiftfs-runtime delete --force {0}, or shiftfs gc)"
    )]
    Exists(String),
    #[error("container {id}: cannot mount {source_path} shifted on {target}: {message}")]
    Mount {
        id: String,
        source_path: PathBuf,
        target: PathBuf,
        message: String,
    },
    #[error("container {id}: {errors}")]
    Release { id: String, errors: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The wrapper's configuration file; `SHIFTFS_RUNTIME_CONFIG` names another.
const CONFIG_FILE: &str = "/etc/shiftfs/runtime.toml";

/// What the configuration file says (engines do not pass the environment on).
#[derive(Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The real runtime (`runtime = "/usr/bin/crun"`).
    pub runtime: Option<PathBuf>,
    /// `-o` options for the mounts the FUSE backend serves, e.g. `attr_timeout=0` when
    /// containers share one image and must see each other's changes at once.
    pub fuse_options: Option<String>,
    /// Whether the runtime makes idmapped mounts itself; unset, its `features` say. crun
    /// 1.8.1 does but has no `features` command.
    pub runtime_idmaps: Option<bool>,
}

impl Settings {
    /// The configuration file, or the defaults when there is none.
    pub fn load() -> Result<Self, Error> {
        let path = std::env::var_os("SHIFTFS_RUNTIME_CONFIG")
            .map_or_else(|| PathBuf::from(CONFIG_FILE), PathBuf::from);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| Error::BadConfig {
                path,
                reason: e.to_string().trim().replace('\n', " "),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(Error::Io {
                what: "cannot read",
                path,
                source,
            }),
        }
    }
}

/// Searched after PATH for a runtime named without a directory.
const FALLBACK_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The real runtime: `--runtime-path`, else `SHIFTFS_RUNTIME`, else the configuration file,
/// else `runc` from PATH.
pub fn real_runtime(inv: &Invocation, settings: &Settings) -> Result<PathBuf, Error> {
    let name = inv
        .runtime_path
        .clone()
        .or_else(|| std::env::var_os("SHIFTFS_RUNTIME").map(PathBuf::from))
        .or_else(|| settings.runtime.clone())
        .unwrap_or_else(|| PathBuf::from("runc"));
    let found = if name.components().count() > 1 {
        Some(name.clone()).filter(|p| p.is_file())
    } else {
        // Engines do not always pass a PATH with the sbin directories (podman's cleanup
        // does not), where Debian installs runc.
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(FALLBACK_PATH.iter().map(PathBuf::from))
            .map(|d| d.join(&name))
            .find(|p| p.is_file())
    };
    let found = found.ok_or_else(|| Error::NoRuntime(name.display().to_string()))?;
    let found = crate::resolve::absolute(&found);
    let same = |a: &Path, b: &Path| {
        matches!((std::fs::metadata(a), std::fs::metadata(b)),
            (Ok(x), Ok(y)) if (x.dev(), x.ino()) == (y.dev(), y.ino()))
    };
    if let Ok(me) = std::env::current_exe()
        && same(&found, &me)
    {
        return Err(Error::RuntimeIsSelf(found));
    }
    Ok(found)
}

/// Runs the wrapper for one runtime command line; returns the exit code to leave with.
pub fn main(argv: &[OsString]) -> Result<i32, Error> {
    let inv = Invocation::parse(argv)?;
    let settings = Settings::load()?;
    let runtime = real_runtime(&inv, &settings)?;
    match inv.command.as_deref() {
        Some("create" | "run") => create(&inv, &runtime, &settings),
        Some("delete") => delete(&inv, &runtime),
        _ => Err(exec(&runtime, &inv.passthrough())),
    }
}

/// Replaces this process with the runtime; returns only on failure.
fn exec(runtime: &Path, args: &[OsString]) -> Error {
    let source = Command::new(runtime).args(args).exec();
    Error::Io {
        what: "cannot run the runtime",
        path: runtime.to_path_buf(),
        source,
    }
}

fn run_runtime(runtime: &Path, args: &[OsString]) -> Result<i32, Error> {
    let status = Command::new(runtime)
        .args(args)
        .status()
        .map_err(|source| Error::Io {
            what: "cannot run the runtime",
            path: runtime.to_path_buf(),
            source,
        })?;
    // Killed by a signal: the shell's convention.
    Ok(status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
    }))
}

fn globals_text(inv: &Invocation) -> Vec<String> {
    inv.globals
        .iter()
        .map(|g| g.to_string_lossy().into_owned())
        .collect()
}

/// Whether the runtime says (`features`, runtime-spec 1.1) that it makes idmapped mounts.
fn runtime_idmaps(runtime: &Path, globals: &[String]) -> bool {
    let Ok(out) = Command::new(runtime)
        .args(globals)
        .arg("features")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    out.status.success() && v["linux"]["mountExtensions"]["idmap"]["enabled"] == true
}

/// `create` and `run`: shift what needs it, run the runtime on the rewritten bundle.
fn create(inv: &Invocation, runtime: &Path, settings: &Settings) -> Result<i32, Error> {
    let Some(id) = inv.container_id() else {
        return Err(exec(runtime, &inv.passthrough()));
    };
    if !state::valid_id(&id) {
        return Err(Error::BadId(id));
    }
    let cwd = std::env::current_dir().map_err(|source| Error::Io {
        what: "cannot read the working directory",
        path: ".".into(),
        source,
    })?;
    let bundle = inv.bundle().map_or_else(|| cwd.clone(), |b| cwd.join(b));
    let config = inv
        .config_file()
        .map_or_else(|| bundle.join("config.json"), |f| cwd.join(f));
    let mut spec = Spec::load(&config)?;
    let globals = globals_text(inv);

    let user = spec.user_mapping()?;
    let root = spec.root_path(&bundle)?;
    let shift_root = match &user {
        Some(_) => std::fs::metadata(&root).is_ok_and(|m| m.uid() == 0),
        None => false,
    };
    let mut volumes = spec.idmap_mounts(&bundle)?;
    // A runtime that makes idmapped mounts gets them on sources the kernel can idmap, and on
    // an idmappable FUSE mount of each other source; for one that does not, shiftfs shifts
    // every such volume and the runtime binds it as it is.
    let idmappable = !volumes.is_empty()
        && settings
            .runtime_idmaps
            .unwrap_or_else(|| runtime_idmaps(runtime, &globals));
    if idmappable {
        volumes.retain(|v| !crate::backend::kernel::probe(&v.source).supported);
    }
    if !shift_root && volumes.is_empty() {
        tracing::info!("container {id}: nothing to shift; running the runtime unchanged");
        return Err(exec(runtime, &inv.passthrough()));
    }

    // Also this id: a container of the same name that died without a delete is gone now.
    for (kept, why) in gc(None).kept {
        tracing::debug!("gc: kept {kept}: {why}");
    }
    let dir = Container::dir_of(&id);
    make_private_dir(&state::oci_dir(), 0o711, 0)?;
    if Container::load(&id).is_some() {
        return Err(Error::Exists(id));
    }
    // Only the container's root (and host root) may reach the mounts: a setuid file of the
    // image must not serve other host users.
    let owner = user
        .as_ref()
        .and_then(|m| m.uid.to_outer(InnerUid::new(0)))
        .map_or(0, |o| o.get());
    make_private_dir(&dir, 0o700, owner)?;
    let _lock = Lock::take(&id)?;
    // Another create of this id may have won the lock.
    if Container::load(&id).is_some() {
        return Err(Error::Exists(id));
    }
    let mut c = Container {
        id: id.clone(),
        runtime: runtime.to_path_buf(),
        runtime_globals: globals.clone(),
        bundle: bundle.clone(),
        pid: None,
        pid_start: None,
        mounts: Vec::new(),
    };
    c.save()?;

    let prepared = (|| -> Result<PathBuf, Error> {
        if let (true, Some(map)) = (shift_root, &user) {
            let target = dir.join("rootfs");
            // Setuid files in the image are the container's: its namespace bounds them.
            let opts = if spec.root_read_only() {
                "suid,ro"
            } else {
                "suid"
            };
            let opts = with_fuse_options(opts, &root, settings);
            shift_mount(&mut c, &root, &target, Some(map), &opts)?;
            spec.set_root_path(&target);
        }
        for v in &volumes {
            let target = dir.join(format!("vol-{}", v.index));
            let opts = if v.read_only { "ro" } else { "rw" };
            let opts = with_fuse_options(opts, &v.source, settings);
            if idmappable {
                shift_mount(&mut c, &v.source, &target, None, &opts)?;
                spec.set_mount_source(v.index, &target);
            } else {
                shift_mount(&mut c, &v.source, &target, Some(&v.mapping), &opts)?;
                spec.replace_mount_source(v.index, &target);
            }
        }
        spec.absolute_bind_sources(&bundle);
        let new_bundle = dir.join("bundle");
        make_private_dir(&new_bundle, 0o700, 0)?;
        let path = new_bundle.join("config.json");
        std::fs::write(&path, spec.to_json()).map_err(|source| Error::Io {
            what: "cannot write the rewritten config",
            path,
            source,
        })?;
        Ok(new_bundle)
    })();
    let new_bundle = match prepared {
        Ok(b) => b,
        Err(e) => {
            if let Err(r) = release(&c) {
                tracing::warn!("{r}");
            }
            return Err(e);
        }
    };

    let code = match run_runtime(runtime, &inv.with_bundle(&new_bundle)) {
        Ok(code) => code,
        Err(e) => {
            if let Err(r) = release(&c) {
                tracing::warn!("{r}");
            }
            return Err(e);
        }
    };
    match c.runtime_state() {
        Ok(Some(pid)) if pid > 0 => {
            c.set_init(pid);
            c.save()?;
        }
        Ok(Some(_)) => {}
        // Failed, or `run` ended and the runtime deleted the container: nothing uses the mounts.
        Ok(None) => release(&c)?,
        Err(e) => tracing::warn!("container {id}: {e}; `shiftfs gc` will clean up later"),
    }
    Ok(code)
}

/// `opts`, plus the configured FUSE options when the FUSE backend will serve `source` (the
/// kernel backend refuses options it would ignore).
fn with_fuse_options(opts: &str, source: &Path, settings: &Settings) -> String {
    match &settings.fuse_options {
        Some(fuse) if !crate::backend::kernel::probe(source).supported => format!("{opts},{fuse}"),
        _ => opts.to_string(),
    }
}

/// Creates `path` (mode `mode`, owned by `uid`) if missing; never follows a symlink there.
fn make_private_dir(path: &Path, mode: u32, uid: u32) -> Result<(), Error> {
    let err = |source| Error::Io {
        what: "cannot create",
        path: path.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(err)?;
        }
        Err(e) => return Err(err(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    if !meta.is_dir() {
        return Err(err(io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(0)).map_err(err)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).map_err(err)
}

/// Runs `shiftfs mount` for the container (its id in the environment, for the record) and
/// remembers the target before mounting, so a wrapper killed right after still leaves a
/// record `gc` can follow. Without a map, the mount is an idmappable FUSE mount (served
/// unshifted) for the runtime to idmap.
fn shift_mount(
    c: &mut Container,
    source: &Path,
    target: &Path,
    map: Option<&IdMapping>,
    opts: &str,
) -> Result<(), Error> {
    make_private_dir(target, 0o755, 0)?;
    c.mounts.push(target.to_path_buf());
    c.save()?;
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        what: "cannot find the shiftfs binary",
        path: "/proc/self/exe".into(),
        source,
    })?;
    let out = Command::new(exe)
        .arg0("shiftfs")
        .arg("mount")
        .args(match map {
            Some(map) => ["--map".to_string(), map.to_string()],
            None => ["-o".to_string(), "idmappable".to_string()],
        })
        .args(["-o", opts, "--"])
        .arg(source)
        .arg(target)
        .env(CONTAINER_ENV, &c.id)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Io {
            what: "cannot run",
            path: "shiftfs mount".into(),
            source,
        })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Mount {
            id: c.id.clone(),
            source_path: source.to_path_buf(),
            target: target.to_path_buf(),
            message: msg.trim().trim_start_matches("shiftfs: ").to_string(),
        });
    }
    tracing::info!(
        "container {}: {}",
        c.id,
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

/// `delete`: the runtime's delete, then the container's mounts once the runtime no longer
/// knows it and its init is gone.
fn delete(inv: &Invocation, runtime: &Path) -> Result<i32, Error> {
    let code = run_runtime(runtime, &inv.passthrough())?;
    let Some(id) = inv.container_id().filter(|id| state::valid_id(id)) else {
        return Ok(code);
    };
    if Container::load(&id).is_some() {
        let _lock = Lock::take(&id)?;
        if let Some(c) = Container::load(&id) {
            // crun returns from `delete --force` before the init it killed is gone.
            let start = Instant::now();
            while code == 0 && c.init_alive() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            match in_use(&c) {
                Some(why) => tracing::warn!("container {id}: mounts kept: {why}"),
                None => release(&c)?,
            }
        }
    }
    for (id, why) in gc(Some(&id)).kept {
        tracing::debug!("gc: kept {id}: {why}");
    }
    Ok(code)
}

/// Why the container's mounts must stay, if they must.
fn in_use(c: &Container) -> Option<String> {
    if c.init_alive() {
        return Some(format!(
            "its init process {} still runs",
            c.pid.unwrap_or(0)
        ));
    }
    match c.runtime_state() {
        Ok(None) => None,
        Ok(Some(_)) => Some(format!(
            "{} still knows it; run its delete",
            c.runtime.display()
        )),
        Err(e) => Some(format!("cannot ask the runtime whether it is gone: {e}")),
    }
}

/// Unmounts every mount of the container (never lazily: a mount still in use stays, and the
/// error says so) and removes its directory, file by file.
pub fn release(c: &Container) -> Result<(), Error> {
    let dir = c.dir();
    // Only mounts in the container's own directory: a record naming the container elsewhere
    // was not made by the wrapper.
    let records: Vec<Record> = Record::all()
        .into_iter()
        .map(|(r, _)| r)
        .filter(|r| r.container() == Some(c.id.as_str()) && r.target.starts_with(&dir))
        .collect();
    let mut targets: Vec<PathBuf> = records.iter().map(|r| r.target.clone()).collect();
    for t in c.mounts.iter().rev() {
        if !targets.contains(t) {
            targets.push(t.clone());
        }
    }
    let mut errors = Vec::new();
    for t in &targets {
        let fuse = records
            .iter()
            .any(|r| &r.target == t && r.backend == crate::options::Backend::Fuse);
        if let Some(pid) = fuse.then(|| process_inside(t)).flatten() {
            errors.push(format!("{}: process {pid} still works in it", t.display()));
            continue;
        }
        if let Err(e) = unmount_patiently(t) {
            errors.push(format!("{}: {e}", t.display()));
        }
    }
    // Never a recursive removal: a directory that is still a mount point would take the
    // image with it. Only what the wrapper made, one name at a time.
    if errors.is_empty() {
        let dirs = c.mounts.iter().cloned().chain([dir.join("bundle")]);
        let files = ["bundle/config.json", "state.json", "lock"].map(|f| dir.join(f));
        let results = files
            .into_iter()
            .map(|f| (std::fs::remove_file(&f), f))
            .chain(dirs.chain([dir]).map(|d| (std::fs::remove_dir(&d), d)));
        for (r, p) in results {
            if let Err(e) = r
                && e.kind() != io::ErrorKind::NotFound
            {
                errors.push(format!("cannot remove {}: {e}", p.display()));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Release {
            id: c.id.clone(),
            errors: errors.join("; "),
        })
    }
}

/// A process whose root or working directory is on the FUSE mount at `target`, in any mount
/// namespace: a container's processes outliving its init (no pid namespace of its own) still
/// use its root through their own copy of the mount, which our unmount would not notice. The
/// device number identifies a FUSE mount's file system; a kernel idmapped mount shares the
/// source's, which says nothing, so this is for FUSE mounts only.
fn process_inside(target: &Path) -> Option<u32> {
    let dev = rustix::fs::stat(target).ok()?.st_dev;
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .find(|pid| {
            ["root", "cwd"].iter().any(|link| {
                rustix::fs::stat(format!("/proc/{pid}/{link}").as_str())
                    .is_ok_and(|st| st.st_dev == dev)
            })
        })
}

/// A container's mount namespace goes away just after its init is reaped; until then its
/// copy of a shifted mount may keep ours busy for a moment.
fn unmount_patiently(target: &Path) -> Result<(), crate::mount::Error> {
    let start = Instant::now();
    loop {
        match crate::mount::unmount(target, false) {
            Ok(_) | Err(crate::mount::Error::NotMounted { .. }) => return Ok(()),
            Err(crate::mount::Error::Busy { .. }) if start.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// What [`gc`] did.
#[derive(Debug, Default)]
pub struct GcReport {
    /// Containers whose mounts were unmounted.
    pub cleaned: Vec<String>,
    /// Containers (or mounts) left alone, and why.
    pub kept: Vec<(String, String)>,
}

/// Unmounts the mounts of every container that is gone (its init dead, the runtime no
/// longer knowing it, no wrapper call working on it); `skip` is the caller's own.
pub fn gc(skip: Option<&str>) -> GcReport {
    let mut report = GcReport::default();
    for id in Container::ids() {
        if Some(id.as_str()) == skip {
            continue;
        }
        let lock = match Lock::try_take(&id) {
            Ok(Some(l)) => l,
            Ok(None) => {
                report
                    .kept
                    .push((id, "a shiftfs-runtime call is working on it".into()));
                continue;
            }
            Err(e) => {
                report.kept.push((id, e.to_string()));
                continue;
            }
        };
        let Some(c) = Container::load(&id) else {
            // Killed before it mounted anything: only the directory and the lock are there.
            let dir = Container::dir_of(&id);
            let _ = std::fs::remove_file(dir.join("lock"));
            let _ = std::fs::remove_dir(&dir);
            continue;
        };
        if let Some(why) = in_use(&c) {
            report.kept.push((id, why));
            continue;
        }
        match release(&c) {
            Ok(()) => report.cleaned.push(id),
            Err(e) => report.kept.push((id, e.to_string())),
        }
        drop(lock);
    }
    let known = Container::ids();
    for (r, _) in Record::all() {
        if let Some(id) = r.container()
            && !known.iter().any(|k| k == id)
        {
            report.kept.push((
                id.to_string(),
                format!(
                    "{} has no container state; unmount it with shiftfs umount if it is unused",
                    r.target.display()
                ),
            ));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(args: &[&str]) -> Invocation {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        Invocation::parse(&args).unwrap()
    }

    #[test]
    fn the_wrapper_never_runs_itself_as_the_runtime() {
        let me = std::env::current_exe().unwrap();
        let inv = inv(&["--runtime-path", me.to_str().unwrap(), "state", "c"]);
        let e = real_runtime(&inv, &Settings::default());
        assert!(matches!(e, Err(Error::RuntimeIsSelf(_))), "{e:?}");
    }

    #[test]
    fn the_configuration_file_is_read_and_checked() {
        let text = "runtime = \"/usr/bin/crun\"\nfuse_options = \"attr_timeout=0\"\n\
                    runtime_idmaps = true";
        let s: Settings = toml::from_str(text).unwrap();
        assert_eq!(s.runtime_idmaps, Some(true));
        assert_eq!(s.runtime, Some(PathBuf::from("/usr/bin/crun")));
        assert_eq!(s.fuse_options.as_deref(), Some("attr_timeout=0"));
        assert!(
            toml::from_str::<Settings>("runtme = \"x\"").is_err(),
            "a typo is an error"
        );
    }

    #[test]
    fn a_missing_runtime_is_named_with_what_to_do() {
        let e = real_runtime(
            &inv(&["--runtime-path", "/nonexistent/runc", "state", "c"]),
            &Settings::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/nonexistent/runc") && e.contains("apt-get install runc"),
            "{e}"
        );
    }

    #[test]
    fn a_runtime_named_without_a_directory_is_searched_for() {
        let found = real_runtime(
            &inv(&["--runtime-path", "sh", "state", "c"]),
            &Settings::default(),
        )
        .unwrap();
        assert!(found.is_absolute() && found.ends_with("sh"), "{found:?}");
    }
}
