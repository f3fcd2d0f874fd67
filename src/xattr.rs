//! Translation of the extended attributes whose values carry ids: POSIX ACLs
//! (`system.posix_acl_access`, `system.posix_acl_default`) and file capabilities
//! (`security.capability`, whose v3 form carries the root id of the user namespace it is for).
//!
//! Pure: values in, values out. Used in three directions:
//! - the FUSE backend's getxattr, on-disk (inner) ids to host (outer) ids: [`ToOuter`] with
//!   [`Unmapped::Omit`];
//! - the FUSE backend's setxattr, host ids to on-disk ids: [`ToInner`] with [`Unmapped::Fail`];
//! - the offline shift, ids laid out for one map to ids laid out for another: [`Reshift`].
//!
//! Formats follow `linux/posix_acl_xattr.h` and `linux/capability.h`; all fields little endian.
//! A malformed value is an error (EINVAL), never a panic.

use crate::idmap::{IdMapping, InnerGid, InnerUid, OVERFLOW_ID, OuterGid, OuterUid};
use std::fmt;

pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
pub const CAPABILITY: &[u8] = b"security.capability";

pub const ACL_XATTR_VERSION: u32 = 0x0002;
pub const ACL_USER_OBJ: u16 = 0x01;
pub const ACL_USER: u16 = 0x02;
pub const ACL_GROUP_OBJ: u16 = 0x04;
pub const ACL_GROUP: u16 = 0x08;
pub const ACL_MASK: u16 = 0x10;
pub const ACL_OTHER: u16 = 0x20;
/// The id field of entries that carry none.
pub const ACL_UNDEFINED_ID: u32 = u32::MAX;
const ACL_HEADER_LEN: usize = 4;
const ACL_ENTRY_LEN: usize = 8;

pub const VFS_CAP_REVISION_MASK: u32 = 0xFF00_0000;
pub const VFS_CAP_REVISION_1: u32 = 0x0100_0000;
pub const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
pub const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
pub const VFS_CAP_FLAGS_EFFECTIVE: u32 = 0x0000_0001;
/// magic_etc + one (permitted, inheritable) pair.
pub const XATTR_CAPS_SZ_1: usize = 12;
/// magic_etc + two pairs.
pub const XATTR_CAPS_SZ_2: usize = 20;
/// magic_etc + two pairs + rootid.
pub const XATTR_CAPS_SZ_3: usize = 24;

/// Which id space an id belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdKind {
    Uid,
    Gid,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::Uid => "uid",
            IdKind::Gid => "gid",
        })
    }
}

/// A translation of raw ids; `None` = the id has no image.
pub trait IdTranslate {
    fn uid(&self, id: u32) -> Option<u32>;
    fn gid(&self, id: u32) -> Option<u32>;

    fn id(&self, kind: IdKind, id: u32) -> Option<u32> {
        match kind {
            IdKind::Uid => self.uid(id),
            IdKind::Gid => self.gid(id),
        }
    }
}

/// On-disk (inner) ids to host (outer) ids.
#[derive(Clone, Copy, Debug)]
pub struct ToOuter<'a>(pub &'a IdMapping);

impl IdTranslate for ToOuter<'_> {
    fn uid(&self, id: u32) -> Option<u32> {
        self.0.uid.to_outer(InnerUid::new(id)).map(|o| o.get())
    }
    fn gid(&self, id: u32) -> Option<u32> {
        self.0.gid.to_outer(InnerGid::new(id)).map(|o| o.get())
    }
}

/// Host (outer) ids to on-disk (inner) ids.
#[derive(Clone, Copy, Debug)]
pub struct ToInner<'a>(pub &'a IdMapping);

impl IdTranslate for ToInner<'_> {
    fn uid(&self, id: u32) -> Option<u32> {
        self.0.uid.to_inner(OuterUid::new(id)).map(|i| i.get())
    }
    fn gid(&self, id: u32) -> Option<u32> {
        self.0.gid.to_inner(OuterGid::new(id)).map(|i| i.get())
    }
}

/// The offline shift: a tree holds ids as `from`'s outer side and is rewritten to hold them as
/// `to`'s outer side: `x -> to.to_outer(from.to_inner(x))`.
#[derive(Clone, Copy, Debug)]
pub struct Reshift<'a> {
    pub from: &'a IdMapping,
    pub to: &'a IdMapping,
}

impl IdTranslate for Reshift<'_> {
    fn uid(&self, id: u32) -> Option<u32> {
        let inner = self.from.uid.to_inner(OuterUid::new(id))?;
        self.to.uid.to_outer(inner).map(|o| o.get())
    }
    fn gid(&self, id: u32) -> Option<u32> {
        let inner = self.from.gid.to_inner(OuterGid::new(id))?;
        self.to.gid.to_outer(inner).map(|o| o.get())
    }
}

/// What to do with an id that has no image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmapped {
    /// Write the overflow id 65534 (offline shift's `--skip-unmapped=overflow`). A
    /// capability's root id is the exception: such a value is refused with EOVERFLOW (a
    /// capability for an unknown namespace must not look like one for 65534).
    Overflow,
    /// Leave such ACL entries out: a named entry whose id the viewer cannot see names nobody
    /// it could grant to (shown as 65534, the kernel would give it to host `nobody`). A
    /// capability's unmapped root id is refused as with `Overflow`.
    Omit,
    /// Refuse the whole value with EOVERFLOW.
    Fail,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("malformed {name} value ({len} bytes): {reason}")]
    Malformed {
        name: &'static str,
        len: usize,
        reason: String,
    },
    #[error("{name}: {kind} {id} has no mapping; extend the map to cover it")]
    Unmapped {
        name: &'static str,
        kind: IdKind,
        id: u32,
    },
}

impl Error {
    /// EINVAL for a malformed value, EOVERFLOW for an id without a mapping.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Malformed { .. } => libc::EINVAL,
            Error::Unmapped { .. } => libc::EOVERFLOW,
        }
    }
}

/// Which id-bearing attribute a name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    AclAccess,
    AclDefault,
    Capability,
}

impl Kind {
    pub fn of(name: &[u8]) -> Option<Kind> {
        match name {
            ACL_ACCESS => Some(Kind::AclAccess),
            ACL_DEFAULT => Some(Kind::AclDefault),
            CAPABILITY => Some(Kind::Capability),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::AclAccess => "system.posix_acl_access",
            Kind::AclDefault => "system.posix_acl_default",
            Kind::Capability => "security.capability",
        }
    }
}

/// Whether values of this attribute carry ids.
pub fn is_id_bearing(name: &[u8]) -> bool {
    Kind::of(name).is_some()
}

/// Translates the ids in `value`. `Ok(None)` means: use the value as it is (the name carries
/// no ids, the value holds none, or the translation changes no byte).
pub fn translate(
    name: &[u8],
    value: &[u8],
    t: &impl IdTranslate,
    unmapped: Unmapped,
) -> Result<Option<Vec<u8>>, Error> {
    let new = match Kind::of(name) {
        None => return Ok(None),
        Some(k @ (Kind::AclAccess | Kind::AclDefault)) => {
            translate_acl(k.name(), value, t, unmapped)?
        }
        Some(Kind::Capability) => translate_capability(value, t)?,
    };
    Ok((new != value).then_some(new))
}

/// The ids a value carries, in order (ACL_USER/ACL_GROUP entries; a capability's root id,
/// which is 0 for v1 and v2). Empty for names that carry none.
pub fn ids(name: &[u8], value: &[u8]) -> Result<Vec<(IdKind, u32)>, Error> {
    match Kind::of(name) {
        None => Ok(Vec::new()),
        Some(k @ (Kind::AclAccess | Kind::AclDefault)) => Ok(parse_acl(k.name(), value)?
            .iter()
            .filter_map(AclEntry::id)
            .collect()),
        Some(Kind::Capability) => Ok(vec![(IdKind::Uid, parse_capability(value)?.root_id())]),
    }
}

/// One entry of a POSIX ACL xattr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclEntry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

impl AclEntry {
    /// The id this entry names, if its tag carries one.
    pub fn id(&self) -> Option<(IdKind, u32)> {
        match self.tag {
            ACL_USER => Some((IdKind::Uid, self.id)),
            ACL_GROUP => Some((IdKind::Gid, self.id)),
            _ => None,
        }
    }
}

fn malformed(name: &'static str, len: usize, reason: impl Into<String>) -> Error {
    Error::Malformed {
        name,
        len,
        reason: reason.into(),
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn le16(b: &[u8], at: usize) -> u16 {
    let mut w = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        w.copy_from_slice(s);
    }
    u16::from_le_bytes(w)
}

/// Parses a POSIX ACL xattr value: version 2 header then 8-byte entries with known tags.
pub fn parse_acl(name: &'static str, value: &[u8]) -> Result<Vec<AclEntry>, Error> {
    let len = value.len();
    if len < ACL_HEADER_LEN || (len - ACL_HEADER_LEN) % ACL_ENTRY_LEN != 0 {
        return Err(malformed(
            name,
            len,
            "length must be a 4-byte header plus 8 bytes per entry",
        ));
    }
    let version = le32(value, 0);
    if version != ACL_XATTR_VERSION {
        return Err(malformed(
            name,
            len,
            format!("version {version}, expected {ACL_XATTR_VERSION}"),
        ));
    }
    value[ACL_HEADER_LEN..]
        .chunks_exact(ACL_ENTRY_LEN)
        .map(|c| {
            let e = AclEntry {
                tag: le16(c, 0),
                perm: le16(c, 2),
                id: le32(c, 4),
            };
            match e.tag {
                ACL_USER_OBJ | ACL_USER | ACL_GROUP_OBJ | ACL_GROUP | ACL_MASK | ACL_OTHER => Ok(e),
                t => Err(malformed(name, len, format!("unknown entry tag {t:#x}"))),
            }
        })
        .collect()
}

/// The xattr value of an ACL.
pub fn encode_acl(entries: &[AclEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ACL_HEADER_LEN + ACL_ENTRY_LEN * entries.len());
    out.extend_from_slice(&ACL_XATTR_VERSION.to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        out.extend_from_slice(&e.id.to_le_bytes());
    }
    out
}

fn translate_acl(
    name: &'static str,
    value: &[u8],
    t: &impl IdTranslate,
    unmapped: Unmapped,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    for mut e in parse_acl(name, value)? {
        if let Some((kind, id)) = e.id() {
            e.id = match (t.id(kind, id), unmapped) {
                (Some(new), _) => new,
                (None, Unmapped::Overflow) => OVERFLOW_ID,
                (None, Unmapped::Omit) => continue,
                (None, Unmapped::Fail) => return Err(Error::Unmapped { name, kind, id }),
            };
        }
        out.push(e);
    }
    Ok(encode_acl(&out))
}

/// A parsed `security.capability` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// 1, 2 or 3.
    pub version: u8,
    /// magic_etc without the revision byte (VFS_CAP_FLAGS_EFFECTIVE and any unknown bits,
    /// kept so a value round-trips byte for byte).
    pub flags: u32,
    /// Low then high 32 bits; v1 has only the low words.
    pub permitted: [u32; 2],
    pub inheritable: [u32; 2],
    /// The v3 root id; v1 and v2 are for the file system's own namespace (root id 0).
    pub rootid: Option<u32>,
}

const CAP: &str = "security.capability";

/// Parses a capability value; the size must match its revision exactly, as the kernel requires.
pub fn parse_capability(value: &[u8]) -> Result<Capability, Error> {
    let len = value.len();
    if len < 4 {
        return Err(malformed(CAP, len, "shorter than its 4-byte header"));
    }
    let magic = le32(value, 0);
    let (version, size) = match magic & VFS_CAP_REVISION_MASK {
        VFS_CAP_REVISION_1 => (1, XATTR_CAPS_SZ_1),
        VFS_CAP_REVISION_2 => (2, XATTR_CAPS_SZ_2),
        VFS_CAP_REVISION_3 => (3, XATTR_CAPS_SZ_3),
        r => {
            return Err(malformed(
                CAP,
                len,
                format!("unknown revision {:#x}", r >> 24),
            ));
        }
    };
    if len != size {
        return Err(malformed(
            CAP,
            len,
            format!("revision {version} must be {size} bytes"),
        ));
    }
    let high = |at: usize| if version == 1 { 0 } else { le32(value, at) };
    Ok(Capability {
        version,
        flags: magic & !VFS_CAP_REVISION_MASK,
        permitted: [le32(value, 4), high(12)],
        inheritable: [le32(value, 8), high(16)],
        rootid: (version == 3).then(|| le32(value, 20)),
    })
}

impl Capability {
    /// The uid of the root of the namespace the capability is for, as stored.
    pub fn root_id(&self) -> u32 {
        self.rootid.unwrap_or(0)
    }

    pub fn effective(&self) -> bool {
        self.flags & VFS_CAP_FLAGS_EFFECTIVE != 0
    }

    /// The same capability for root id `rootid`: v3, or v2 when `rootid` is 0 (the form the
    /// kernel itself shows and stores for the file system's own root). A v1 value whose root
    /// stays 0 is kept as v1.
    pub fn with_root(&self, rootid: u32) -> Capability {
        match (rootid, self.version) {
            (0, 1) => *self,
            (0, _) => Capability {
                version: 2,
                rootid: None,
                ..*self
            },
            (r, _) => Capability {
                version: 3,
                rootid: Some(r),
                ..*self
            },
        }
    }

    /// The xattr value.
    pub fn encode(&self) -> Vec<u8> {
        let rev = match self.version {
            1 => VFS_CAP_REVISION_1,
            2 => VFS_CAP_REVISION_2,
            _ => VFS_CAP_REVISION_3,
        };
        let mut out = Vec::with_capacity(XATTR_CAPS_SZ_3);
        out.extend_from_slice(&(rev | (self.flags & !VFS_CAP_REVISION_MASK)).to_le_bytes());
        out.extend_from_slice(&self.permitted[0].to_le_bytes());
        out.extend_from_slice(&self.inheritable[0].to_le_bytes());
        if self.version != 1 {
            out.extend_from_slice(&self.permitted[1].to_le_bytes());
            out.extend_from_slice(&self.inheritable[1].to_le_bytes());
        }
        if self.version == 3 {
            out.extend_from_slice(&self.rootid.unwrap_or(0).to_le_bytes());
        }
        out
    }
}

/// (revision, root id) of a capability value; the root id of v1/v2 is 0.
pub fn capability_root(value: &[u8]) -> Result<(u8, u32), Error> {
    let c = parse_capability(value)?;
    Ok((c.version, c.root_id()))
}

/// Rewrites a v1/v2/v3 capability as v3 with the given root id (what `fuidshift` does to
/// a v2 capability when the target root is not 0). Keeps every capability bit and flag.
pub fn capability_to_v3(value: &[u8], rootid: u32) -> Result<Vec<u8>, Error> {
    let c = parse_capability(value)?;
    Ok(Capability {
        version: 3,
        rootid: Some(rootid),
        ..c
    }
    .encode())
}

fn translate_capability(value: &[u8], t: &impl IdTranslate) -> Result<Vec<u8>, Error> {
    let c = parse_capability(value)?;
    let root = c.root_id();
    let new = t.uid(root).ok_or(Error::Unmapped {
        name: CAP,
        kind: IdKind::Uid,
        id: root,
    })?;
    if new == root {
        // Same id: keep the stored form, whatever revision it is.
        return Ok(value.to_vec());
    }
    Ok(c.with_root(new).encode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(s: &str) -> IdMapping {
        IdMapping::parse(s).unwrap()
    }

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        encode_acl(
            &entries
                .iter()
                .map(|&(tag, perm, id)| AclEntry { tag, perm, id })
                .collect::<Vec<_>>(),
        )
    }

    const U: u32 = ACL_UNDEFINED_ID;

    fn sample_acl(user: u32, group: u32) -> Vec<u8> {
        acl(&[
            (ACL_USER_OBJ, 7, U),
            (ACL_USER, 6, user),
            (ACL_GROUP_OBJ, 5, U),
            (ACL_GROUP, 4, group),
            (ACL_MASK, 7, U),
            (ACL_OTHER, 0, U),
        ])
    }

    fn v2(flags: u32, p: [u32; 2], i: [u32; 2]) -> Vec<u8> {
        [VFS_CAP_REVISION_2 | flags, p[0], i[0], p[1], i[1]]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    fn v3(flags: u32, p: [u32; 2], i: [u32; 2], root: u32) -> Vec<u8> {
        [VFS_CAP_REVISION_3 | flags, p[0], i[0], p[1], i[1], root]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    #[test]
    fn acl_bytes_match_the_kernel_layout() {
        // `setfacl -m u:1000:rw-` on a 0644 file, as getfattr --only-values shows it.
        let v = sample_acl(1000, 1000);
        assert_eq!(&v[..4], &[2, 0, 0, 0]);
        assert_eq!(&v[4..12], &[1, 0, 7, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&v[12..20], &[2, 0, 6, 0, 0xe8, 0x03, 0, 0]);
        assert_eq!(v.len(), 4 + 6 * 8);
    }

    #[test]
    fn acl_to_outer_and_back() {
        let m = map("b:0:100000:65536");
        let inner = sample_acl(1000, 1001);
        let outer = translate(ACL_ACCESS, &inner, &ToOuter(&m), Unmapped::Overflow)
            .unwrap()
            .unwrap();
        assert_eq!(outer, sample_acl(101000, 101001));
        let back = translate(ACL_DEFAULT, &outer, &ToInner(&m), Unmapped::Fail)
            .unwrap()
            .unwrap();
        assert_eq!(back, inner);
    }

    #[test]
    fn uid_and_gid_maps_are_used_for_their_own_tags() {
        let m = map("u:0:100000:65536,g:0:200000:65536");
        let out = translate(ACL_ACCESS, &sample_acl(5, 5), &ToOuter(&m), Unmapped::Fail)
            .unwrap()
            .unwrap();
        assert_eq!(out, sample_acl(100005, 200005));
    }

    #[test]
    fn unmapped_acl_ids_overflow_or_fail() {
        let m = map("b:0:100000:1000");
        let v = sample_acl(1000, 5);
        let shown = translate(ACL_ACCESS, &v, &ToOuter(&m), Unmapped::Overflow)
            .unwrap()
            .unwrap();
        assert_eq!(shown, sample_acl(OVERFLOW_ID, 100005));
        let omitted = translate(ACL_ACCESS, &v, &ToOuter(&m), Unmapped::Omit)
            .unwrap()
            .unwrap();
        assert_eq!(
            omitted,
            acl(&[
                (ACL_USER_OBJ, 7, U),
                (ACL_GROUP_OBJ, 5, U),
                (ACL_GROUP, 4, 100005),
                (ACL_MASK, 7, U),
                (ACL_OTHER, 0, U),
            ])
        );
        let e = translate(ACL_ACCESS, &v, &ToOuter(&m), Unmapped::Fail).unwrap_err();
        assert_eq!(
            e,
            Error::Unmapped {
                name: "system.posix_acl_access",
                kind: IdKind::Uid,
                id: 1000
            }
        );
        assert_eq!(e.errno(), libc::EOVERFLOW);
        assert!(e.to_string().contains("uid 1000"), "{e}");
        // Host uid 5 has no on-disk id under this map.
        let e = translate(
            ACL_DEFAULT,
            &sample_acl(100001, 5),
            &ToInner(&m),
            Unmapped::Fail,
        )
        .unwrap_err();
        assert_eq!(e.errno(), libc::EOVERFLOW);
        assert!(matches!(
            e,
            Error::Unmapped {
                kind: IdKind::Gid,
                id: 5,
                ..
            }
        ));
    }

    #[test]
    fn values_without_ids_are_left_alone() {
        let m = map("b:0:100000:65536");
        let base = acl(&[
            (ACL_USER_OBJ, 6, U),
            (ACL_GROUP_OBJ, 4, U),
            (ACL_OTHER, 4, U),
        ]);
        assert_eq!(
            translate(ACL_ACCESS, &base, &ToOuter(&m), Unmapped::Fail),
            Ok(None)
        );
        assert_eq!(
            translate(ACL_ACCESS, &acl(&[]), &ToOuter(&m), Unmapped::Fail),
            Ok(None)
        );
        assert_eq!(
            translate(
                b"user.foo",
                b"\x02\x00\x00\x00junk",
                &ToOuter(&m),
                Unmapped::Fail
            ),
            Ok(None)
        );
        assert!(!is_id_bearing(b"user.foo"));
        assert!(!is_id_bearing(b"system.posix_acl_access\0"));
        assert!(is_id_bearing(b"security.capability"));
        assert!(is_id_bearing(ACL_DEFAULT));
    }

    #[test]
    fn malformed_acls_are_einval() {
        let m = map("b:0:100000:65536");
        let good = sample_acl(1, 1);
        let mut bad_version = good.clone();
        bad_version[0] = 1;
        let mut bad_tag = good.clone();
        bad_tag[12] = 0x40;
        for v in [
            &good[..3],
            &good[..good.len() - 1],
            &good[..5],
            &bad_version[..],
            &bad_tag[..],
            &[][..],
        ] {
            let e = translate(ACL_ACCESS, v, &ToOuter(&m), Unmapped::Overflow).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{v:?}");
            assert!(e.to_string().contains("system.posix_acl_access"), "{e}");
        }
        let e = parse_acl("system.posix_acl_access", &bad_version).unwrap_err();
        assert!(e.to_string().contains("version 1"), "{e}");
    }

    #[test]
    fn capability_sizes_and_revisions() {
        let c = parse_capability(&v2(VFS_CAP_FLAGS_EFFECTIVE, [0x2000, 0], [0, 0])).unwrap();
        assert_eq!((c.version, c.root_id(), c.effective()), (2, 0, true));
        assert_eq!(c.permitted, [0x2000, 0]);
        let c = parse_capability(&v3(0, [1, 2], [3, 4], 100000)).unwrap();
        assert_eq!(
            (c.version, c.rootid, c.effective()),
            (3, Some(100000), false)
        );
        assert_eq!((c.permitted, c.inheritable), ([1, 2], [3, 4]));
        let v1: Vec<u8> = [VFS_CAP_REVISION_1 | 1, 0x400, 0]
            .iter()
            .flat_map(|w: &u32| w.to_le_bytes())
            .collect();
        let c = parse_capability(&v1).unwrap();
        assert_eq!((c.version, c.root_id(), c.permitted), (1, 0, [0x400, 0]));
        assert_eq!(c.encode(), v1);
        assert_eq!(capability_root(&v3(0, [1, 0], [0, 0], 7)), Ok((3, 7)));

        for bad in [
            v2(0, [1, 0], [0, 0])[..19].to_vec(),
            {
                let mut v = v2(0, [1, 0], [0, 0]);
                v.extend([0; 4]);
                v
            },
            v3(0, [1, 0], [0, 0], 5)[..20].to_vec(),
            {
                let mut v = v2(0, [1, 0], [0, 0]);
                v[3] = 4;
                v
            },
            vec![0, 0, 0],
            vec![],
        ] {
            let e = parse_capability(&bad).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{bad:?}");
        }
    }

    #[test]
    fn capability_root_ids_are_translated() {
        let m = map("b:0:100000:65536");
        let effective = VFS_CAP_FLAGS_EFFECTIVE;
        // v2 (root 0) seen from the host: v3 for root 100000, bits and flags kept.
        let stored = v2(effective, [0x400, 1], [0, 0]);
        let shown = translate(CAPABILITY, &stored, &ToOuter(&m), Unmapped::Overflow)
            .unwrap()
            .unwrap();
        assert_eq!(shown, v3(effective, [0x400, 1], [0, 0], 100000));
        // ... and written back from the host: v2 again.
        let back = translate(CAPABILITY, &shown, &ToInner(&m), Unmapped::Fail)
            .unwrap()
            .unwrap();
        assert_eq!(back, stored);
        // v3 for inner 1000.
        let v = v3(0, [0x2000, 0], [0, 0], 1000);
        assert_eq!(
            translate(CAPABILITY, &v, &ToOuter(&m), Unmapped::Overflow),
            Ok(Some(v3(0, [0x2000, 0], [0, 0], 101000)))
        );
        // Identity: untouched bytes, even a v3 with root 0.
        let id = IdMapping::identity();
        let v = v3(0, [1, 0], [0, 0], 0);
        assert_eq!(
            translate(CAPABILITY, &v, &ToOuter(&id), Unmapped::Fail),
            Ok(None)
        );
    }

    #[test]
    fn unmapped_capability_root_is_eoverflow_under_both_policies() {
        let m = map("b:0:100000:1000");
        let v = v3(0, [1, 0], [0, 0], 5000);
        for policy in [Unmapped::Overflow, Unmapped::Omit, Unmapped::Fail] {
            let e = translate(CAPABILITY, &v, &ToOuter(&m), policy).unwrap_err();
            assert_eq!(e.errno(), libc::EOVERFLOW);
            assert!(e.to_string().contains("uid 5000"), "{e}");
        }
        // Host root writing a v2 capability: host uid 0 has no on-disk id.
        let e = translate(
            CAPABILITY,
            &v2(0, [1, 0], [0, 0]),
            &ToInner(&m),
            Unmapped::Fail,
        )
        .unwrap_err();
        assert_eq!(e.errno(), libc::EOVERFLOW);
    }

    #[test]
    fn v2_to_v3_conversion() {
        let v = v2(VFS_CAP_FLAGS_EFFECTIVE, [5, 6], [7, 8]);
        assert_eq!(
            capability_to_v3(&v, 100000),
            Ok(v3(VFS_CAP_FLAGS_EFFECTIVE, [5, 6], [7, 8], 100000))
        );
        assert!(capability_to_v3(&v[..10], 1).is_err());
    }

    #[test]
    fn reshift_goes_through_the_inner_ids() {
        let from = map("b:0:100000:65536");
        let to = map("b:0:200000:65536");
        let r = Reshift {
            from: &from,
            to: &to,
        };
        assert_eq!(r.uid(101000), Some(201000));
        assert_eq!(r.gid(99999), None);
        let id = IdMapping::identity();
        let canon = Reshift {
            from: &id,
            to: &from,
        };
        assert_eq!(canon.uid(0), Some(100000));
        assert_eq!(canon.uid(65536), None);
        let v = translate(ACL_ACCESS, &sample_acl(101000, 100000), &r, Unmapped::Fail)
            .unwrap()
            .unwrap();
        assert_eq!(v, sample_acl(201000, 200000));
        assert_eq!(
            ids(ACL_ACCESS, &v),
            Ok(vec![(IdKind::Uid, 201000), (IdKind::Gid, 200000)])
        );
        assert_eq!(
            ids(CAPABILITY, &v2(0, [1, 0], [0, 0])),
            Ok(vec![(IdKind::Uid, 0)])
        );
        assert_eq!(ids(b"user.x", b"whatever"), Ok(vec![]));
    }

    fn arb_acl() -> impl Strategy<Value = Vec<AclEntry>> {
        let tag = prop::sample::select(vec![
            ACL_USER_OBJ,
            ACL_USER,
            ACL_GROUP_OBJ,
            ACL_GROUP,
            ACL_MASK,
            ACL_OTHER,
        ]);
        prop::collection::vec(
            (tag, 0u16..8, 0u32..65_536).prop_map(|(tag, perm, id)| AclEntry {
                tag,
                perm,
                id: if matches!(tag, ACL_USER | ACL_GROUP) {
                    id
                } else {
                    U
                },
            }),
            0..12,
        )
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let m = map("b:0:100000:65536");
            for name in [ACL_ACCESS, ACL_DEFAULT, CAPABILITY] {
                for p in [Unmapped::Overflow, Unmapped::Fail] {
                    let _ = translate(name, &bytes, &ToOuter(&m), p);
                    let _ = translate(name, &bytes, &ToInner(&m), p);
                }
                let _ = ids(name, &bytes);
            }
            let _ = capability_to_v3(&bytes, 1);
        }

        #[test]
        fn near_valid_values_never_panic(
            mut bytes in prop::collection::vec(any::<u8>(), 0..40),
            rev in 1u8..4,
        ) {
            // Steer the fuzzing onto the interesting headers.
            if bytes.len() >= 4 {
                bytes[3] = rev;
                bytes[0] = 2;
                bytes[1] = 0;
                bytes[2] = 0;
            }
            let m = map("b:0:100000:65536");
            for name in [ACL_ACCESS, CAPABILITY] {
                let _ = translate(name, &bytes, &ToOuter(&m), Unmapped::Overflow);
            }
        }

        #[test]
        fn acl_round_trips(entries in arb_acl()) {
            let m = map("b:0:100000:65536");
            let v = encode_acl(&entries);
            prop_assert_eq!(parse_acl("a", &v).unwrap(), entries);
            let out = translate(ACL_ACCESS, &v, &ToOuter(&m), Unmapped::Fail)
                .unwrap()
                .unwrap_or_else(|| v.clone());
            let back = translate(ACL_ACCESS, &out, &ToInner(&m), Unmapped::Fail)
                .unwrap()
                .unwrap_or_else(|| out.clone());
            prop_assert_eq!(back, v);
        }

        #[test]
        fn capability_round_trips(
            flags in any::<u32>(), p in any::<[u32; 2]>(), i in any::<[u32; 2]>(),
            root in 0u32..65536, three in any::<bool>(),
        ) {
            let m = map("b:0:100000:65536");
            let flags = flags & !VFS_CAP_REVISION_MASK;
            // The stored form for root 0 is v2.
            let v = if three && root != 0 { v3(flags, p, i, root) } else { v2(flags, p, i) };
            let out = translate(CAPABILITY, &v, &ToOuter(&m), Unmapped::Fail).unwrap().unwrap();
            prop_assert_eq!(capability_root(&out).unwrap(), (3, m.uid.to_outer(InnerUid::new(capability_root(&v).unwrap().1)).unwrap().get()));
            let back = translate(CAPABILITY, &out, &ToInner(&m), Unmapped::Fail).unwrap().unwrap();
            prop_assert_eq!(back, v);
        }
    }
}
