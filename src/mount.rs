//! Backend choice, mount options, the daemon life cycle and unmounting.

use std::fmt;
use std::str::FromStr;

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
