//! `/proc/PID/mountinfo`: which mount a path is on, its filesystem type and options.
//!
//! The parser is pure; the readers take the mountinfo path so tests can use a fixture.

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of `mountinfo` (see proc(5)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount id, as `statx(STATX_MNT_ID)` reports it.
    pub id: u64,
    pub parent_id: u64,
    /// The filesystem's device, `major:minor` as in `st_dev`: the same for every mount of one
    /// superblock (a FUSE connection has a device of its own).
    pub dev: String,
    /// The path inside the filesystem that is mounted (`/` unless a bind mount of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options: `rw`/`ro`, `nosuid`, `nodev`, `noexec`, `idmapped`, ...
    pub mount_options: Vec<String>,
    /// `ext4`, `tmpfs`, `fuse.bindfs`, `nfs4`, ...
    pub fstype: String,
    pub source: String,
    pub super_options: Vec<String>,
}

impl MountInfo {
    pub fn has_option(&self, opt: &str) -> bool {
        self.mount_options.iter().any(|o| o == opt)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is on mount {id}, which {mountinfo} does not list")]
    NotListed {
        path: PathBuf,
        id: u64,
        mountinfo: PathBuf,
    },
}

/// This process's mount table.
pub const SELF_MOUNTINFO: &str = "/proc/self/mountinfo";

/// This process's mount table; `None` when it cannot be read (so callers never mistake an
/// unreadable table for an empty one).
pub fn own_table() -> Option<Vec<MountInfo>> {
    std::fs::read(SELF_MOUNTINFO).ok().map(parse)
}

/// Parses a whole `mountinfo` text; malformed lines are skipped. Bytes, not `str`: a
/// mount point anywhere on the machine may be any bytes, and one such line must not hide the
/// others.
pub fn parse(text: impl AsRef<[u8]>) -> Vec<MountInfo> {
    text.as_ref()
        .split(|&b| b == b'\n')
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &[u8]) -> Option<MountInfo> {
    let sep = line.windows(3).position(|w| w == b" - ")?;
    let (head, tail) = (&line[..sep], &line[sep + 3..]);
    let mut h = head.split(|&b| b == b' ');
    let id = text(h.next()?).parse().ok()?;
    let parent_id = text(h.next()?).parse().ok()?;
    let dev = text(h.next()?);
    let root = path(h.next()?);
    let mount_point = path(h.next()?);
    let mount_options = options(h.next()?);
    let mut t = tail.split(|&b| b == b' ');
    let fstype = lossy(t.next()?);
    let source = lossy(t.next()?);
    let super_options = options(t.next().unwrap_or(b""));
    Some(MountInfo {
        id,
        parent_id,
        dev,
        root,
        mount_point,
        mount_options,
        fstype,
        source,
        super_options,
    })
}

fn text(field: &[u8]) -> String {
    String::from_utf8_lossy(field).into_owned()
}

fn options(field: &[u8]) -> Vec<String> {
    field
        .split(|&b| b == b',')
        .filter(|o| !o.is_empty())
        .map(text)
        .collect()
}

/// Paths may be any bytes, not only UTF-8.
fn path(field: &[u8]) -> PathBuf {
    PathBuf::from(std::ffi::OsString::from_vec(unescape(field)))
}

fn lossy(field: &[u8]) -> String {
    String::from_utf8_lossy(&unescape(field)).into_owned()
}

/// Undoes the kernel's `\ooo` octal escapes of space, tab, newline and backslash.
pub fn unescape(s: impl AsRef<[u8]>) -> Vec<u8> {
    let b = s.as_ref();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(oct) = b.get(i + 1..i + 4)
            && oct.iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = oct
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Reads and parses a `mountinfo` file.
pub fn read(mountinfo: &Path) -> Result<Vec<MountInfo>, Error> {
    let text = std::fs::read(mountinfo).map_err(|source| Error::Read {
        path: mountinfo.to_path_buf(),
        source,
    })?;
    Ok(parse(text))
}

/// The id (as in mountinfo) of the mount `fd` is on.
pub fn mount_id_of(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    rustix::fs::statx(
        fd,
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::MNT_ID,
    )
    .ok()
    .map(|st| st.stx_mnt_id)
}

/// The mount id of the mount `path` is on (symlinks followed).
pub fn mount_id(path: &Path) -> Result<u64, Error> {
    let st = rustix::fs::statx(
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::empty(),
        rustix::fs::StatxFlags::MNT_ID,
    )
    .map_err(|e| Error::Stat {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(st.stx_mnt_id)
}

/// The `mountinfo` entry of the mount `path` is on.
pub fn mount_of(path: &Path, mountinfo: &Path) -> Result<MountInfo, Error> {
    let id = mount_id(path)?;
    read(mountinfo)?
        .into_iter()
        .find(|m| m.id == id)
        .ok_or_else(|| Error::NotListed {
            path: path.to_path_buf(),
            id,
            mountinfo: mountinfo.to_path_buf(),
        })
}

/// The filesystem type `path` is on, as mount(8) names it (`ext4`, `fuse.bindfs`, ...);
/// from this process's mountinfo, else from `statfs`'s magic number, else `unknown`.
pub fn fstype_name(path: &Path) -> String {
    match mount_of(path, Path::new(SELF_MOUNTINFO)) {
        Ok(m) => m.fstype,
        Err(e) => {
            tracing::debug!(error = ?e, "no mountinfo line; falling back to statfs");
            rustix::fs::statfs(path)
                .map(|s| statfs_name(&s).to_string())
                .unwrap_or_else(|_| "unknown".to_string())
        }
    }
}

/// The filesystem type name of a `statfs` result, by its magic number.
// `f_type` is i64 here but i32 or u32 on other architectures.
#[allow(clippy::useless_conversion)]
pub fn statfs_name(st: &rustix::fs::StatFs) -> &'static str {
    magic_name(i64::from(st.f_type))
}

/// Names of the filesystem magic numbers (linux/magic.h) a shifted mount is likely to meet.
pub fn magic_name(magic: i64) -> &'static str {
    match magic {
        0xEF53 => "ext4",
        0x0102_1994 => "tmpfs",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x794C_7630 => "overlay",
        0x6573_5546 => "fuse",
        0x6969 => "nfs",
        0xFF53_4D42 => "cifs",
        0x2FC1_2FC1 => "zfs",
        0xF2F5_2010 => "f2fs",
        0x9fa0 => "proc",
        0x6265_6572 => "sysfs",
        0x4d44 => "vfat",
        0x0187 => "autofs",
        0x6165_6556 => "9p",
        0x0100_2f35 => "ceph",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_non_utf8_mount_point_hides_nothing() {
        let text = b"40 27 0:5 / /mnt/bad\xffname rw - tmpfs none rw\n\
                     41 27 0:6 / /t rw,idmapped - ext4 /dev/vda rw\n";
        let m = parse(&text[..]);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].mount_point.as_os_str().as_encoded_bytes(),
            b"/mnt/bad\xffname"
        );
        assert_eq!(m[1].mount_point, PathBuf::from("/t"));
        assert!(m[1].has_option("idmapped"));
    }

    use super::*;

    const SAMPLE: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
45 22 0:40 / /mnt/with\\040space rw,nosuid,nodev,relatime,idmapped - tmpfs tmpfs rw,size=1024k
46 22 0:41 /sub /srv/b rw,nosuid,nodev,relatime shared:5 master:2 - fuse.bindfs bindfs rw,user_id=0,group_id=0
bad line
";

    #[test]
    fn parses_fields_escapes_and_optional_fields() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].fstype, "ext4");
        assert_eq!(m[0].mount_point, PathBuf::from("/"));
        assert_eq!(m[1].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[1].dev, "0:40");
        assert!(m[1].has_option("idmapped"));
        assert!(m[1].has_option("nosuid") && m[1].has_option("nodev"));
        assert!(!m[0].has_option("nosuid"));
        assert_eq!(m[2].fstype, "fuse.bindfs");
        assert_eq!(m[2].root, PathBuf::from("/sub"));
        assert_eq!(m[2].parent_id, 22);
        assert_eq!(m[2].super_options, vec!["rw", "user_id=0", "group_id=0"]);
    }

    #[test]
    fn unescape_keeps_non_octal_backslashes() {
        assert_eq!(unescape("a\\134b"), b"a\\b");
        assert_eq!(unescape("a\\xb"), b"a\\xb");
        assert_eq!(unescape("tab\\011x"), b"tab\tx");
        assert_eq!(unescape("end\\04"), b"end\\04");
        // A non-UTF-8 byte in a mount point survives.
        assert_eq!(
            path(b"/mnt/\\377x").as_os_str().as_encoded_bytes(),
            b"/mnt/\xffx"
        );
    }

    #[test]
    fn fstype_of_proc_is_proc() {
        assert_eq!(fstype_name(Path::new("/proc/self")), "proc");
    }
}
