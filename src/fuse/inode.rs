//! The inode table: one `O_PATH` fd per backing inode, keyed by (dev, ino), with the
//! kernel's lookup count.
//!
//! fuser sends the attribute `ino` as the FUSE node id, so the node id is what users see
//! as `st_ino`. We use the backing `st_ino` itself for objects on the source's filesystem:
//! hard links show as one inode and inode numbers are stable for the whole mount (and equal
//! to the kernel backend's). Objects whose number is taken (other filesystems below the
//! source, or the number 1 reserved for the root) get a synthetic id from the top half of
//! the range. Holding the `O_PATH` fd pins the backing inode, so its (dev, ino) cannot be
//! reused by another file while the kernel knows the node.
//!
//! Lock order: `InodeTable::inner` is a leaf lock; nothing else is taken while holding it.
//! `Inode::backing` is taken without the table lock.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use fuser::BackingId;

/// Identity of a backing inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub dev: u64,
    pub ino: u64,
}

pub struct Inode {
    pub nodeid: u64,
    pub key: Key,
    /// `S_IFMT` bits of the backing inode (type never changes for an inode).
    pub kind: u32,
    /// `O_PATH | O_NOFOLLOW` fd of the backing object.
    fd: OwnedFd,
    /// The kernel allows one backing file per inode at a time: shared by all open handles
    /// of this inode (each handle holds a strong reference).
    pub backing: Mutex<Weak<BackingId>>,
}

impl Inode {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    pub fn is_symlink(&self) -> bool {
        self.kind == libc::S_IFLNK
    }

    pub fn is_reg(&self) -> bool {
        self.kind == libc::S_IFREG
    }
}

struct Entry {
    inode: Arc<Inode>,
    lookups: u64,
}

struct Inner {
    by_id: HashMap<u64, Entry>,
    by_key: HashMap<Key, u64>,
    root_dev: u64,
    next_synthetic: u64,
}

const FIRST_SYNTHETIC: u64 = 1 << 63;

impl Inner {
    fn pick_id(&mut self, key: Key) -> u64 {
        if key.dev == self.root_dev && key.ino != ROOT_ID && !self.by_id.contains_key(&key.ino) {
            return key.ino;
        }
        loop {
            let id = self.next_synthetic;
            self.next_synthetic = self.next_synthetic.wrapping_add(1).max(FIRST_SYNTHETIC);
            if !self.by_id.contains_key(&id) {
                return id;
            }
        }
    }
}

pub struct InodeTable {
    inner: RwLock<Inner>,
}

pub const ROOT_ID: u64 = 1;

impl InodeTable {
    /// A table holding the root, which the kernel never forgets.
    pub fn new(root: OwnedFd, key: Key) -> Self {
        let root = Arc::new(Inode {
            nodeid: ROOT_ID,
            key,
            kind: libc::S_IFDIR,
            fd: root,
            backing: Mutex::new(Weak::new()),
        });
        let mut by_id = HashMap::new();
        by_id.insert(
            ROOT_ID,
            Entry {
                inode: root,
                // Never reaches zero: the root is pinned for the life of the mount.
                lookups: u64::MAX / 2,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(key, ROOT_ID);
        Self {
            inner: RwLock::new(Inner {
                by_id,
                by_key,
                root_dev: key.dev,
                next_synthetic: FIRST_SYNTHETIC,
            }),
        }
    }

    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner.by_id.get(&nodeid).map(|e| Arc::clone(&e.inode))
    }

    /// Records one kernel lookup of the object behind `fd`. When the object is already in
    /// the table, `fd` is dropped (after the lock is released) and the existing inode is
    /// returned, so hard links and repeated lookups share one node id.
    pub fn insert_lookup(&self, fd: OwnedFd, key: Key, kind: u32) -> Arc<Inode> {
        let (inode, spare) = {
            let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
            let inner = &mut *inner;
            match inner
                .by_key
                .get(&key)
                .and_then(|id| inner.by_id.get_mut(id))
            {
                Some(e) => {
                    e.lookups += 1;
                    (Arc::clone(&e.inode), Some(fd))
                }
                None => {
                    let nodeid = inner.pick_id(key);
                    let inode = Arc::new(Inode {
                        nodeid,
                        key,
                        kind,
                        fd,
                        backing: Mutex::new(Weak::new()),
                    });
                    inner.by_id.insert(
                        nodeid,
                        Entry {
                            inode: Arc::clone(&inode),
                            lookups: 1,
                        },
                    );
                    inner.by_key.insert(key, nodeid);
                    (inode, None)
                }
            }
        };
        drop(spare);
        inode
    }

    /// Counts one more lookup of a node already in the table (e.g. `link` returning the
    /// existing inode). False when the node is gone.
    pub fn add_lookup(&self, nodeid: u64) -> bool {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        match inner.by_id.get_mut(&nodeid) {
            Some(e) => {
                e.lookups += 1;
                true
            }
            None => false,
        }
    }

    /// Drops `n` lookups; at zero the node leaves the table and its fd is closed once no
    /// request in flight still uses it.
    pub fn forget(&self, nodeid: u64, n: u64) {
        let removed = {
            let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
            let Some(e) = inner.by_id.get_mut(&nodeid) else {
                return;
            };
            e.lookups = e.lookups.saturating_sub(n);
            if e.lookups > 0 || nodeid == ROOT_ID {
                return;
            }
            let removed = inner.by_id.remove(&nodeid);
            if let Some(e) = &removed {
                if inner.by_key.get(&e.inode.key) == Some(&nodeid) {
                    inner.by_key.remove(&e.inode.key);
                }
            }
            removed
        };
        drop(removed);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        rustix::fs::open(
            "/",
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap()
    }

    const ROOT_KEY: Key = Key { dev: 1, ino: 2 };

    #[test]
    fn lookups_share_one_node_and_forget_counts() {
        let t = InodeTable::new(fd(), ROOT_KEY);
        let k = Key { dev: 1, ino: 77 };
        let a = t.insert_lookup(fd(), k, libc::S_IFREG);
        let b = t.insert_lookup(fd(), k, libc::S_IFREG);
        assert_eq!(a.nodeid, b.nodeid);
        assert_eq!(a.nodeid, 77, "same filesystem: node id is the inode number");
        assert_eq!(t.len(), 2);
        t.forget(a.nodeid, 1);
        assert!(t.get(a.nodeid).is_some());
        t.forget(a.nodeid, 1);
        assert!(t.get(a.nodeid).is_none());
        assert_eq!(t.len(), 1);
        // Stable across forget and lookup again.
        let c = t.insert_lookup(fd(), k, libc::S_IFREG);
        assert_eq!(c.nodeid, a.nodeid);
    }

    #[test]
    fn colliding_numbers_get_synthetic_ids() {
        let t = InodeTable::new(fd(), ROOT_KEY);
        let a = t.insert_lookup(fd(), Key { dev: 1, ino: 50 }, libc::S_IFREG);
        let other_fs = t.insert_lookup(fd(), Key { dev: 2, ino: 50 }, libc::S_IFREG);
        let one = t.insert_lookup(fd(), Key { dev: 1, ino: 1 }, libc::S_IFREG);
        assert_eq!(a.nodeid, 50);
        assert!(other_fs.nodeid >= FIRST_SYNTHETIC);
        assert!(one.nodeid >= FIRST_SYNTHETIC);
        assert_ne!(one.nodeid, other_fs.nodeid);
        // The root's own key maps to the root node.
        assert_eq!(
            t.insert_lookup(fd(), ROOT_KEY, libc::S_IFDIR).nodeid,
            ROOT_ID
        );
    }

    #[test]
    fn batch_forget_and_root_is_pinned() {
        let t = InodeTable::new(fd(), ROOT_KEY);
        let k = Key { dev: 1, ino: 9 };
        for _ in 0..5 {
            t.insert_lookup(fd(), k, libc::S_IFDIR);
        }
        let id = t.insert_lookup(fd(), k, libc::S_IFDIR).nodeid;
        t.forget(id, 6);
        assert!(t.get(id).is_none());
        t.forget(ROOT_ID, u64::MAX);
        assert!(t.get(ROOT_ID).is_some());
        // Forgetting an unknown node is harmless.
        t.forget(12345, 1);
        assert!(!t.add_lookup(12345));
    }
}
