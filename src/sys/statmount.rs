//! `statmount(2)` (Linux >= 6.8; id maps of idmapped mounts since 6.15), which neither
//! rustix nor libc wraps yet.

use std::io;

/// `__NR_statmount`: the same number on every architecture (unified syscall table).
const SYS_STATMOUNT: libc::c_long = 457;
/// `MNT_ID_REQ_SIZE_VER0`.
const MNT_ID_REQ_SIZE_VER0: u32 = 24;
/// `STATX_MNT_ID_UNIQUE`: the 64-bit mount id that `statmount` takes (Linux >= 6.8).
pub const STATX_MNT_ID_UNIQUE: u32 = 0x4000;
pub const STATMOUNT_MNT_UIDMAP: u64 = 0x2000;
pub const STATMOUNT_MNT_GIDMAP: u64 = 0x4000;

/// `struct mnt_id_req`, version 0.
#[repr(C)]
struct MntIdReq {
    size: u32,
    spare: u32,
    mnt_id: u64,
    param: u64,
}

/// The fixed part of `struct statmount` (uapi/linux/mount.h), 512 bytes; the strings follow.
#[repr(C)]
#[derive(Clone, Copy)]
struct Header {
    size: u32,
    mnt_opts: u32,
    mask: u64,
    sb_dev_major: u32,
    sb_dev_minor: u32,
    sb_magic: u64,
    sb_flags: u32,
    fs_type: u32,
    mnt_id: u64,
    mnt_parent_id: u64,
    mnt_id_old: u32,
    mnt_parent_id_old: u32,
    mnt_attr: u64,
    mnt_propagation: u64,
    mnt_peer_group: u64,
    mnt_master: u64,
    propagate_from: u64,
    mnt_root: u32,
    mnt_point: u32,
    mnt_ns_id: u64,
    fs_subtype: u32,
    sb_source: u32,
    opt_num: u32,
    opt_array: u32,
    opt_sec_num: u32,
    opt_sec_array: u32,
    supported_mask: u64,
    mnt_uidmap_num: u32,
    mnt_uidmap: u32,
    mnt_gidmap_num: u32,
    mnt_gidmap: u32,
    spare2: [u64; 43],
}

const HEADER_SIZE: usize = size_of::<Header>();
const _: () = assert!(HEADER_SIZE == 512);

/// What `statmount` returned for the id maps of one mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountIdmaps {
    /// False for a mount that is not idmapped (then the lists are empty).
    pub idmapped: bool,
    /// `uid_map`-style lines `INNER OUTER COUNT`, outer ids as the caller sees them.
    pub uid: Vec<String>,
    pub gid: Vec<String>,
}

/// `statmount(mnt_id, STATMOUNT_MNT_UIDMAP | STATMOUNT_MNT_GIDMAP)` for a unique mount id.
pub fn statmount_idmaps(mnt_id: u64) -> io::Result<MountIdmaps> {
    let req = MntIdReq {
        size: MNT_ID_REQ_SIZE_VER0,
        spare: 0,
        mnt_id,
        param: STATMOUNT_MNT_UIDMAP | STATMOUNT_MNT_GIDMAP,
    };
    // u64 elements keep the buffer aligned for the header.
    let mut buf: Vec<u64> = vec![0; 512];
    loop {
        let bytes = buf.len() * size_of::<u64>();
        // SAFETY: `req` is a valid `mnt_id_req` of the size it declares; `buf` is writable
        // for `bytes` bytes and outlives the call; the kernel writes at most `bytes`.
        let ret = unsafe {
            libc::syscall(
                SYS_STATMOUNT,
                &raw const req,
                buf.as_mut_ptr(),
                bytes,
                0 as libc::c_uint,
            )
        };
        if ret == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        // EOVERFLOW: the strings did not fit.
        if err.raw_os_error() == Some(libc::EOVERFLOW) && bytes < (1 << 24) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(err);
    }
    // SAFETY: `buf` is 8-byte aligned and at least HEADER_SIZE bytes long, and every field
    // of `Header` is a plain integer, so any bytes the kernel wrote form a valid value.
    let header = unsafe { buf.as_ptr().cast::<Header>().read() };
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let size = usize::try_from(header.size).unwrap_or(0).min(bytes.len());
    let strings = bytes.get(HEADER_SIZE..size).unwrap_or_default();
    let uid_set = header.mask & STATMOUNT_MNT_UIDMAP != 0;
    let gid_set = header.mask & STATMOUNT_MNT_GIDMAP != 0;
    Ok(MountIdmaps {
        idmapped: uid_set || gid_set,
        uid: if uid_set {
            nul_strings(strings, header.mnt_uidmap, header.mnt_uidmap_num)
        } else {
            Vec::new()
        },
        gid: if gid_set {
            nul_strings(strings, header.mnt_gidmap, header.mnt_gidmap_num)
        } else {
            Vec::new()
        },
    })
}

/// `count` NUL-terminated strings starting at `offset` in the string area.
fn nul_strings(area: &[u8], offset: u32, count: u32) -> Vec<String> {
    let Some(rest) = usize::try_from(offset).ok().and_then(|o| area.get(o..)) else {
        return Vec::new();
    };
    rest.split(|b| *b == 0)
        .take(usize::try_from(count).unwrap_or(0))
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_split_at_nul() {
        let area = b"opts\0" as &[u8];
        let mut v = area.to_vec();
        v.extend_from_slice(b"0 100000 65536\0" as &[u8]);
        v.extend_from_slice(b"70000 300 2\0" as &[u8]);
        assert_eq!(
            nul_strings(&v, 5, 2),
            vec!["0 100000 65536".to_string(), "70000 300 2".to_string()]
        );
        assert_eq!(nul_strings(&v, 500, 2), Vec::<String>::new());
        assert_eq!(nul_strings(&v, 5, 0), Vec::<String>::new());
    }
}
