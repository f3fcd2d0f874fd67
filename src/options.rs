//! What a mount request says: the backend, the mount flags, FUSE tuning, `-o` option text
//! (mount(8) and fstab style) and the request itself. The bottom of the module graph: the
//! backends, the daemon and the CLI depend on it, and it depends on the map model only.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::idmap::{self, IdMapping};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "unknown mount option '{0}' (known: ro, rw, suid, nosuid, dev, nodev, exec, noexec, map=, uidmap=, gidmap=, backend=, recursive, threads=, passthrough, nopassthrough, attr_timeout=, max_open=, sandbox=, share=, idmappable, uring=)"
    )]
    UnknownOption(String),
    #[error("mount option '{option}': {reason}")]
    BadOption { option: String, reason: String },
    #[error("bad map")]
    Map(#[from] idmap::Error),
    #[error(
        "no map given: pass --map (e.g. --map b:0:100000:65536), --uid-map and --gid-map, or --map-from-pid PID"
    )]
    NoMap,
}

/// Which implementation serves a shifted mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// The kernel when the probe says it can serve the source, else FUSE.
    #[default]
    Auto,
    /// Kernel idmapped mount (`open_tree` + `mount_setattr(MOUNT_ATTR_IDMAP)`).
    Kernel,
    /// shiftfs' own FUSE daemon.
    Fuse,
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "fuse" => Ok(Self::Fuse),
            _ => Err(format!("unknown backend '{s}' (use auto, kernel or fuse)")),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::Fuse => "fuse",
        })
    }
}

/// The generic VFS flags of a shifted mount. Defaults are the safe ones: `nosuid,nodev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MountFlags {
    pub read_only: bool,
    pub suid: bool,
    pub dev: bool,
    pub exec: bool,
}

impl MountFlags {
    /// The restrictions as mount attributes (both backends apply them with these).
    pub fn mount_attrs(self) -> rustix::mount::MountAttrFlags {
        use rustix::mount::MountAttrFlags as A;
        let mut set = A::empty();
        for (on, attr) in [
            (self.read_only, A::MOUNT_ATTR_RDONLY),
            (!self.suid, A::MOUNT_ATTR_NOSUID),
            (!self.dev, A::MOUNT_ATTR_NODEV),
            (!self.exec, A::MOUNT_ATTR_NOEXEC),
        ] {
            if on {
                set |= attr;
            }
        }
        set
    }
}

impl Default for MountFlags {
    fn default() -> Self {
        Self {
            read_only: false,
            suid: false,
            dev: false,
            exec: true,
        }
    }
}

impl fmt::Display for MountFlags {
    /// mount(8) style, always explicit: `rw,nosuid,nodev,exec`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pick = |on: bool, yes: &'static str, no: &'static str| if on { yes } else { no };
        write!(
            f,
            "{},{},{},{}",
            pick(self.read_only, "ro", "rw"),
            pick(self.suid, "suid", "nosuid"),
            pick(self.dev, "dev", "nodev"),
            pick(self.exec, "exec", "noexec"),
        )
    }
}

/// How long the kernel trusts entries, attributes and listings by default: a day, as
/// virtiofsd's `cache=always`. Right for the normal case, a source changed only through the
/// mount (the kernel then drops what each change makes stale); `attr_timeout=0` serves a
/// source changed underneath.
pub const DEFAULT_ATTR_TIMEOUT: Duration = Duration::from_secs(86_400);

/// More FUSE workers than this only cost file descriptors and memory.
const MAX_THREADS: usize = 256;

/// The file system type of shiftfs' FUSE mounts in the mount table.
pub const FUSE_TYPE: &str = "fuse.shiftfs";

/// How FUSE mounts of one source share one daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Share {
    /// `Idmap` where the kernel can idmap FUSE mounts (Linux 6.12+) and the backend was left
    /// to choose, else `Sessions`.
    #[default]
    Auto,
    /// One idmappable (identity) FUSE mount of the source, shared, with a kernel idmapped
    /// mount of it per target: one daemon, one set of caches for every map.
    Idmap,
    /// One daemon serves every mount of a source, one FUSE session each, and keeps them
    /// coherent (a change through one drops what the others cached).
    Sessions,
    /// A daemon of its own, as with no other mount around: its caches go stale against other
    /// mounts of the source for up to `attr_timeout`.
    Off,
}

impl std::str::FromStr for Share {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "idmap" => Ok(Self::Idmap),
            "sessions" => Ok(Self::Sessions),
            "off" | "none" => Ok(Self::Off),
            _ => Err(format!(
                "unknown sharing '{s}' (use auto, idmap, sessions or off)"
            )),
        }
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Idmap => "idmap",
            Self::Sessions => "sessions",
            Self::Off => "off",
        })
    }
}

/// Whether the FUSE daemon serves requests over io_uring (`-o uring=`): one ring per possible
/// CPU, so each caller's CPU answers its own requests (Linux 6.14+, `fuse.enable_uring=1`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UringMode {
    /// io_uring when the kernel offers it, else `/dev/fuse` (one log line says why).
    #[default]
    Auto,
    /// io_uring, or the mount fails saying why.
    On,
    /// `/dev/fuse` only.
    Off,
}

impl fmt::Display for UringMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

impl std::str::FromStr for UringMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err("uring is auto, on or off".into()),
        }
    }
}

/// Tuning knobs of the FUSE backend; asking for one on a kernel mount is an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuseTuning {
    /// 0 = the backend's default.
    pub threads: usize,
    pub passthrough: bool,
    pub attr_timeout: Duration,
    /// Files and directories callers may hold open at once; 0 = the backend's default.
    pub max_open: usize,
    pub sandbox: crate::sandbox::Mode,
    pub share: Share,
    /// Serve SOURCE unshifted (the identity map) and let the kernel idmap the FUSE mount
    /// (`FUSE_ALLOW_IDMAP`, Linux 6.12+): a filesystem the kernel cannot idmap itself (ramfs,
    /// overlayfs, sshfs, other FUSE servers) made idmappable, for `--backend kernel`, crun's
    /// or runc's `idmap` mount option stacked on top.
    pub idmappable: bool,
    pub uring: UringMode,
    /// The FUSE-only options given explicitly, as written (for the error on a kernel mount).
    pub given: Vec<String>,
}

impl Default for FuseTuning {
    fn default() -> Self {
        Self {
            threads: 0,
            passthrough: true,
            attr_timeout: DEFAULT_ATTR_TIMEOUT,
            max_open: 0,
            sandbox: crate::sandbox::Mode::default(),
            share: Share::default(),
            idmappable: false,
            uring: UringMode::default(),
            given: Vec::new(),
        }
    }
}

/// What `-o` says; maps are kept as text until every source of a map is known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionSet {
    pub flags: MountFlags,
    pub map: Option<String>,
    pub uid_map: Option<String>,
    pub gid_map: Option<String>,
    pub backend: Option<Backend>,
    pub recursive: bool,
    pub fuse: FuseTuning,
}

/// Splits `-o` text on commas, except inside double quotes; an entry that looks like a map
/// range (`u:..`, `g:..`, `b:..`, `N:N:N`) continues the `map=`/`uidmap=`/`gidmap=` before it,
/// so `map=b:0:100000:65536,u:70000:5:1` works as well as the quoted form.
fn split_options(text: &str) -> Vec<String> {
    let mut raw = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => raw.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    raw.push(cur);
    let mut out: Vec<String> = Vec::new();
    for opt in raw.into_iter().filter(|o| !o.is_empty()) {
        let continues_map = looks_like_range(&opt)
            && out.last().is_some_and(|prev| {
                ["map=", "uidmap=", "gidmap="]
                    .iter()
                    .any(|k| prev.starts_with(k))
            });
        match out.last_mut() {
            Some(prev) if continues_map => {
                prev.push(',');
                prev.push_str(&opt);
            }
            _ => out.push(opt),
        }
    }
    out
}

fn looks_like_range(s: &str) -> bool {
    let body = s
        .strip_prefix("u:")
        .or_else(|| s.strip_prefix("g:"))
        .or_else(|| s.strip_prefix("b:"))
        .unwrap_or(s);
    let parts: Vec<&str> = body.split(':').collect();
    parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok())
}

impl OptionSet {
    /// Applies mount(8)-style options on top of `self`. Options mount(8) and fstab use for
    /// themselves (`defaults`, `noauto`, `nofail`, `_netdev`, `x-*`, ...) are accepted and ignored.
    pub fn apply(&mut self, text: &str) -> Result<(), Error> {
        for opt in split_options(text) {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt.as_str(), None),
            };
            let need = |v: Option<&'_ str>| -> Result<String, Error> {
                v.filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| Error::BadOption {
                        option: opt.clone(),
                        reason: "needs a value".into(),
                    })
            };
            match key {
                "ro" => self.flags.read_only = true,
                "rw" => self.flags.read_only = false,
                "suid" => self.flags.suid = true,
                "nosuid" => self.flags.suid = false,
                "dev" => self.flags.dev = true,
                "nodev" => self.flags.dev = false,
                "exec" => self.flags.exec = true,
                "noexec" => self.flags.exec = false,
                "map" | "idmap" => self.map = Some(need(value)?),
                "uidmap" => self.uid_map = Some(need(value)?),
                "gidmap" => self.gid_map = Some(need(value)?),
                "backend" => {
                    self.backend =
                        Some(need(value)?.parse().map_err(|reason| Error::BadOption {
                            option: opt.clone(),
                            reason,
                        })?)
                }
                "recursive" | "rbind" => self.recursive = true,
                "threads" => {
                    self.fuse.threads = need(value)?
                        .parse()
                        .ok()
                        .filter(|&n| (1..=MAX_THREADS).contains(&n))
                        .ok_or_else(|| Error::BadOption {
                            option: opt.clone(),
                            reason: format!(
                                "threads must be a whole number from 1 to {MAX_THREADS}"
                            ),
                        })?
                }
                "max_open" => {
                    self.fuse.max_open =
                        need(value)?
                            .parse()
                            .ok()
                            .filter(|&n| n >= 1)
                            .ok_or_else(|| Error::BadOption {
                                option: opt.clone(),
                                reason: "max_open is a whole number of open files, at least 1"
                                    .into(),
                            })?
                }
                "idmappable" => {
                    self.fuse.idmappable = true;
                    // An idmappable mount is a FUSE mount; an explicit backend= still wins
                    // (and a kernel one is then refused with the reason).
                    self.backend.get_or_insert(Backend::Fuse);
                }
                "passthrough" => self.fuse.passthrough = true,
                "nopassthrough" => self.fuse.passthrough = false,
                "attr_timeout" => {
                    let secs: f64 = need(value)?
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s < 1e6)
                        .ok_or_else(|| Error::BadOption {
                            option: opt.clone(),
                            reason: "attr_timeout is seconds, e.g. 1 or 0.5 or 0".into(),
                        })?;
                    self.fuse.attr_timeout = Duration::from_secs_f64(secs);
                }
                "sandbox" => {
                    self.fuse.sandbox = need(value)?.parse().map_err(|reason| Error::BadOption {
                        option: opt.clone(),
                        reason,
                    })?
                }
                "share" => {
                    self.fuse.share = need(value)?.parse().map_err(|reason| Error::BadOption {
                        option: opt.clone(),
                        reason,
                    })?
                }
                "uring" => {
                    self.fuse.uring = need(value)?.parse().map_err(|reason| Error::BadOption {
                        option: opt.clone(),
                        reason,
                    })?
                }
                "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "nouser"
                | "users" | "owner" | "group" | "comment" | "bind" => {}
                k if k.starts_with("x-") || k.starts_with("X-") => {}
                _ => return Err(Error::UnknownOption(opt.clone())),
            }
            if matches!(
                key,
                "threads"
                    | "passthrough"
                    | "nopassthrough"
                    | "attr_timeout"
                    | "max_open"
                    | "sandbox"
                    | "idmappable"
                    | "uring"
            ) && !self.fuse.given.contains(&opt)
            {
                self.fuse.given.push(opt.clone());
            }
        }
        Ok(())
    }

    /// The map the options (and the command line's own map arguments, already folded in)
    /// describe.
    pub fn mapping(&self) -> Result<IdMapping, Error> {
        let mapping = self.given_mapping();
        if !self.fuse.idmappable {
            return mapping;
        }
        // Idmappable mounts shift nothing themselves: the map belongs on the kernel mount
        // stacked on top.
        match mapping {
            Err(Error::NoMap) => Ok(IdMapping::identity()),
            Ok(m) if m == IdMapping::identity() => Ok(m),
            Ok(_) => Err(Error::BadOption {
                option: "idmappable".into(),
                reason: "an idmappable mount serves SOURCE unshifted; drop the map here and \
                         give it to the mount stacked on top (shiftfs mount --backend kernel \
                         --map MAP IDMAPPABLE-MOUNT TARGET)"
                    .into(),
            }),
            Err(e) => Err(e),
        }
    }

    fn given_mapping(&self) -> Result<IdMapping, Error> {
        match (&self.map, &self.uid_map, &self.gid_map) {
            (Some(m), None, None) => Ok(IdMapping::parse(m)?),
            (None, Some(u), Some(g)) => Ok(IdMapping::parse_separate(u, g)?),
            (None, None, None) => Err(Error::NoMap),
            (Some(_), _, _) => Err(Error::BadOption {
                option: "map".into(),
                reason: "give either map or uidmap+gidmap, not both".into(),
            }),
            _ => Err(Error::BadOption {
                option: "uidmap/gidmap".into(),
                reason: "give both uidmap and gidmap (or map for both)".into(),
            }),
        }
    }
}

/// Everything needed to make one shifted mount.
#[derive(Clone, Debug)]
pub struct Request {
    pub source: PathBuf,
    pub target: PathBuf,
    /// Resolve `target` inside this directory as if it were `/` (a runtime mounting into a
    /// container's rootfs): symlinks in the rootfs can never lead out of it.
    pub target_root: Option<PathBuf>,
    pub mapping: IdMapping,
    pub flags: MountFlags,
    pub backend: Backend,
    pub recursive: bool,
    pub fuse: FuseTuning,
}

impl Request {
    /// `-o` text that, with `map=`, reproduces this request (used to hand it to the daemon).
    pub fn options_text(&self) -> String {
        let mut o = format!(
            "{},{},attr_timeout={}",
            self.flags,
            if self.fuse.passthrough {
                "passthrough"
            } else {
                "nopassthrough"
            },
            self.fuse.attr_timeout.as_secs_f64()
        );
        if self.fuse.threads != 0 {
            o.push_str(&format!(",threads={}", self.fuse.threads));
        }
        if self.fuse.max_open != 0 {
            o.push_str(&format!(",max_open={}", self.fuse.max_open));
        }
        if self.fuse.sandbox != crate::sandbox::Mode::default() {
            o.push_str(&format!(",sandbox={}", self.fuse.sandbox));
        }
        if self.fuse.share != Share::default() {
            o.push_str(&format!(",share={}", self.fuse.share));
        }
        if self.recursive {
            o.push_str(",recursive");
        }
        if self.fuse.idmappable {
            o.push_str(",idmappable");
        }
        if self.fuse.uring != UringMode::default() {
            o.push_str(&format!(",uring={}", self.fuse.uring));
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_round_trip() {
        let mut o = OptionSet::default();
        o.apply("ro,suid,noexec,map=b:0:100000:65536,u:70000:5:1,backend=fuse,share=off,threads=4,nopassthrough,attr_timeout=0.5,sandbox=log,defaults,nofail,x-systemd.automount").unwrap();
        assert!(o.flags.read_only && o.flags.suid && !o.flags.exec && !o.flags.dev);
        assert_eq!(o.map.as_deref(), Some("b:0:100000:65536,u:70000:5:1"));
        assert_eq!(o.backend, Some(Backend::Fuse));
        assert_eq!(o.fuse.threads, 4);
        assert!(!o.fuse.passthrough);
        assert_eq!(o.fuse.attr_timeout, Duration::from_millis(500));
        assert_eq!(o.fuse.sandbox, crate::sandbox::Mode::Log);
        let m = o.mapping().unwrap();
        assert_eq!(m.uid.ranges().len(), 2);
        assert_eq!(m.gid.ranges().len(), 1);

        let mut q = OptionSet::default();
        q.apply("map=\"u:0:1:1,g:0:2:1\"").unwrap();
        assert_eq!(q.map.as_deref(), Some("u:0:1:1,g:0:2:1"));

        let req = Request {
            source: "/s".into(),
            target: "/t".into(),
            target_root: None,
            mapping: m,
            flags: o.flags,
            backend: Backend::Fuse,
            recursive: true,
            fuse: o.fuse.clone(),
        };
        let mut back = OptionSet::default();
        back.apply(&req.options_text()).unwrap();
        assert_eq!(back.flags, req.flags);
        let tuning =
            |f: &FuseTuning| (f.threads, f.passthrough, f.attr_timeout, f.sandbox, f.share);
        assert_eq!(tuning(&back.fuse), tuning(&req.fuse));
        assert!(back.recursive);
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        let err = |s: &str| OptionSet::default().apply(s).unwrap_err().to_string();
        assert!(err("bogus").contains("unknown mount option 'bogus'"));
        assert!(err("backend=zfs").contains("unknown backend 'zfs'"));
        assert!(err("threads=x").contains("whole number"));
        assert!(err("map=").contains("needs a value"));
        assert!(err("sandbox=strict").contains("unknown sandbox mode 'strict'"));
        assert!(matches!(OptionSet::default().mapping(), Err(Error::NoMap)));
        let mut o = OptionSet::default();
        o.apply("idmappable,map=b:0:100000:65536").unwrap();
        let e = o.mapping().unwrap_err().to_string();
        assert!(e.contains("drop the map here"), "{e}");
    }

    #[test]
    fn idmappable_is_an_identity_fuse_mount() {
        let mut o = OptionSet::default();
        o.apply("idmappable").unwrap();
        assert_eq!(o.mapping().unwrap(), IdMapping::identity());
        assert_eq!(o.backend, Some(Backend::Fuse));
        assert_eq!(o.fuse.given, vec!["idmappable".to_string()]);
        // The daemon is handed the identity map and the option back.
        let mut back = OptionSet::default();
        back.apply(&format!("map={}", IdMapping::identity()))
            .unwrap();
        let req = Request {
            source: "/s".into(),
            target: "/t".into(),
            target_root: None,
            mapping: o.mapping().unwrap(),
            flags: o.flags,
            backend: Backend::Fuse,
            recursive: false,
            fuse: o.fuse.clone(),
        };
        back.apply(&req.options_text()).unwrap();
        assert!(back.fuse.idmappable);
        assert_eq!(back.mapping().unwrap(), IdMapping::identity());
        // An explicit backend wins; choosing the kernel is then refused by the mount.
        let mut k = OptionSet::default();
        k.apply("backend=kernel,idmappable").unwrap();
        assert_eq!(k.backend, Some(Backend::Kernel));
    }

    #[test]
    fn uring_option_parses_round_trips_and_is_fuse_only() {
        let mut o = OptionSet::default();
        assert_eq!(o.fuse.uring, UringMode::Auto);
        for (text, mode) in [
            ("uring=on", UringMode::On),
            ("uring=off", UringMode::Off),
            ("uring=auto", UringMode::Auto),
        ] {
            o.apply(text).unwrap();
            assert_eq!(o.fuse.uring, mode);
        }
        assert!(o.fuse.given.iter().any(|g| g.starts_with("uring=")));
        let e = OptionSet::default()
            .apply("uring=yes")
            .unwrap_err()
            .to_string();
        assert!(e.contains("auto, on or off"), "{e}");
        let mut on = OptionSet::default();
        on.apply("map=b:0:100000:65536,uring=on").unwrap();
        let req = Request {
            source: "/s".into(),
            target: "/t".into(),
            target_root: None,
            mapping: on.mapping().unwrap(),
            flags: on.flags,
            backend: Backend::Fuse,
            recursive: false,
            fuse: on.fuse.clone(),
        };
        let mut back = OptionSet::default();
        back.apply(&req.options_text()).unwrap();
        assert_eq!(back.fuse.uring, UringMode::On);
    }
}
