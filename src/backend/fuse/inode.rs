//! The inode table: one anchor per backing inode as reached through one mount, keyed by
//! (mount id, dev, ino), with the kernel's lookup count.
//!
//! An inode is anchored by an `O_PATH` fd, or, once more fds are held than the budget
//! allows (a walk over millions of files), by a file handle that is reopened per request
//! relative to a directory of the inode's own mount. Holding the fd pins the backing inode;
//! a handle does not, so a handle-anchored inode deleted on disk answers ESTALE.
//!
//! The mount is part of the identity: one file reached through a read-write path and
//! through a read-only bind mount of it is two nodes, each acting through an fd of its own
//! mount, so the kernel applies each mount's `ro` to what is done through it (as
//! virtiofsd's inode store does). `Mount` remembers each mount's flags.
//!
//! fuser sends the attribute `ino` as the FUSE node id, so the node id is what users see
//! as `st_ino`. We use the backing `st_ino` itself for objects on the source's filesystem:
//! hard links show as one inode and inode numbers are stable for the whole mount (and equal
//! to the kernel backend's). Objects whose number is taken (other filesystems below the
//! source, the same inode seen through a second mount, or the number 1 reserved for the
//! root) get a synthetic id from the top half of the range. Holding the `O_PATH` fd pins
//! the backing inode, so its key cannot be reused by another file while the kernel knows
//! the node.
//!
//! Lock order: `InodeTable::inner` and `InodeTable::mounts` are leaf locks; nothing else is
//! taken while holding either. `Inode::backing` is taken without the table locks.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};

use fuser::BackingId;
use rustix::fs::{OFlags, StatVfsMountFlags};

use crate::sys::fhandle::{self, Handle};

/// Identity of a backing inode reached through one mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// `statx` mount id (the unique 64-bit one where the kernel has it).
    pub mnt: u64,
    pub dev: u64,
    pub ino: u64,
}

/// A mount objects are reached through: the source's own, or one below it.
pub struct Mount {
    /// `statvfs` `ST_*` bits, read when the mount is first seen.
    flags: AtomicU64,
    /// A directory of this mount opened for reading (`open_by_handle_at` refuses `O_PATH`
    /// mount fds, and the fd it returns is on the mount fd's mount) and the mount id the
    /// kernel puts in this mount's handles. Unset while no directory of the mount was seen
    /// (a bind-mounted file): its inodes are then always anchored by fds.
    handle_root: OnceLock<(OwnedFd, i32)>,
    /// The file system is a tmpfs (`statfs` type, read when the mount is first seen).
    tmpfs: bool,
}

impl Mount {
    fn new(fd: BorrowedFd<'_>) -> Self {
        let m = Self {
            flags: AtomicU64::new(0),
            handle_root: OnceLock::new(),
            tmpfs: rustix::fs::fstatfs(fd)
                .is_ok_and(|s| s.f_type as u64 == libc::TMPFS_MAGIC as u64),
        };
        m.refresh(fd);
        m
    }

    /// Reads the mount's flags again through `fd`, an object on it (they change with
    /// `mount -o remount,bind,ro`). Unreadable flags count as read-only.
    pub fn refresh(&self, fd: BorrowedFd<'_>) {
        let bits =
            rustix::fs::fstatvfs(fd).map_or(StatVfsMountFlags::RDONLY.bits(), |s| s.f_flag.bits());
        self.flags.store(bits, Ordering::Relaxed);
    }

    fn has(&self, flag: StatVfsMountFlags) -> bool {
        self.flags.load(Ordering::Relaxed) & flag.bits() != 0
    }

    pub fn read_only(&self) -> bool {
        self.has(StatVfsMountFlags::RDONLY)
    }

    pub fn nosuid(&self) -> bool {
        self.has(StatVfsMountFlags::NOSUID)
    }

    pub fn nodev(&self) -> bool {
        self.has(StatVfsMountFlags::NODEV)
    }

    pub fn noexec(&self) -> bool {
        self.has(StatVfsMountFlags::NOEXEC)
    }

    /// Whether what a write, chmod or passthrough registration may take (blocks, xattr
    /// space) depends on the acting fsuid/fsgid: ext4 hands the blocks it reserves to a
    /// `resuid`/`resgid` match, so there the daemon acts with the caller's host ids. A tmpfs
    /// has no such reserve: it charges the inode owner's quota, and a writer only through
    /// CAP_SYS_RESOURCE (the hard limit), which the daemon's own credentials give up the
    /// same way; acting with its own ids there saves the switch (10 syscalls there and back).
    pub fn space_by_writer_ids(&self) -> bool {
        !self.tmpfs
    }

    /// Remembers the directory `dir` (on this mount) as where handles are reopened.
    fn learn_handle_root(&self, dir: BorrowedFd<'_>) {
        if self.handle_root.get().is_some() {
            return;
        }
        let fd = rustix::fs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        );
        if let (Ok(fd), Ok((_, id))) = (fd, fhandle::name_to_handle(dir)) {
            // A concurrent lookup may have set it first: either fd will do.
            let _ = self.handle_root.set((fd, id));
        }
    }
}

pub struct Inode {
    pub nodeid: u64,
    pub key: Key,
    /// `S_IFMT` bits of the backing inode (type never changes for an inode).
    pub kind: u32,
    /// The mount this inode is reached through.
    pub mount: Arc<Mount>,
    anchor: Anchor,
    /// The kernel allows one backing file per inode at a time: shared by all open handles
    /// of this inode (each handle holds a strong reference).
    pub backing: Mutex<Weak<BackingId>>,
    /// Open handles served without passthrough (the kernel's "cached" io mode).
    pub cached_opens: AtomicUsize,
    /// Opened for writing through passthrough at some time: such writes (also through a
    /// mapping that outlives its fd) bypass the kernel's page cache of this inode, so from
    /// then on reads go through passthrough too, or at least never keep cached pages.
    pub passthrough_written: AtomicBool,
    /// A real (not `O_PATH`) fd of this inode that some open file handle holds: the calls
    /// that take only such an fd (`fgetxattr`) use it instead of a walk of
    /// `/proc/self/fd/N`. The kernel reads `security.capability` through us at the first
    /// write into a file and at a chown, both while the writer holds the file open.
    open_fd: Mutex<Weak<OwnedFd>>,
}

pub enum Anchor {
    /// `O_PATH | O_NOFOLLOW` fd of the backing object.
    Fd(OwnedFd),
    /// File handle, reopened relative to the inode's mount's `handle_root`.
    Handle(Handle),
}

/// An `O_PATH` fd of an inode for the duration of one request.
pub enum InodeFd<'a> {
    Held(BorrowedFd<'a>),
    Opened(OwnedFd),
}

impl AsFd for InodeFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Held(fd) => fd.as_fd(),
            Self::Opened(fd) => fd.as_fd(),
        }
    }
}

impl Inode {
    pub fn fd(&self) -> io::Result<InodeFd<'_>> {
        match &self.anchor {
            Anchor::Fd(fd) => Ok(InodeFd::Held(fd.as_fd())),
            Anchor::Handle(handle) => {
                // Set before any handle of this mount was taken (see `InodeTable::anchor`).
                let (mount, _) = self
                    .mount
                    .handle_root
                    .get()
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?;
                Ok(InodeFd::Opened(fhandle::open_by_handle(
                    mount.as_fd(),
                    handle,
                    OFlags::PATH | OFlags::NOFOLLOW,
                )?))
            }
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    pub fn is_symlink(&self) -> bool {
        self.kind == libc::S_IFLNK
    }

    /// Offers `fd`, a real fd of this inode held by an open file handle, for `open_fd`.
    pub fn offer_open_fd(&self, fd: &Arc<OwnedFd>) {
        let mut slot = self.open_fd.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.strong_count() == 0 {
            *slot = Arc::downgrade(fd);
        }
    }

    /// A real fd of this inode that an open file handle holds, kept open while in use.
    pub fn open_fd(&self) -> Option<Arc<OwnedFd>> {
        self.open_fd
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade()
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
    fd_anchors: usize,
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

/// The fds that may anchor inodes, for every inode table of one daemon: the sessions of a
/// shared daemon all draw on its one RLIMIT_NOFILE, so one budget for all of them, else
/// lookups through many mounts at once would pass the limit.
#[derive(Debug)]
pub struct FdPool {
    /// Fd anchors held by all the tables.
    used: AtomicUsize,
    /// The fds planned for anchors at the first session.
    planned: usize,
    /// Set aside for the fds of the sessions that joined later (their workers' and
    /// connections').
    reserved: AtomicUsize,
}

impl FdPool {
    pub fn new(planned: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            planned,
            reserved: AtomicUsize::new(0),
        })
    }

    /// Fd anchors allowed now.
    pub fn cap(&self) -> usize {
        self.planned
            .saturating_sub(self.reserved.load(Ordering::Relaxed))
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Keeps `n` fds away from anchors (for a session that joined), until
    /// [`FdPool::release`]. Anchors past the new cap stay until forgotten; new inodes are then
    /// anchored by handles.
    pub fn reserve(&self, n: usize) {
        self.reserved.fetch_add(n, Ordering::Relaxed);
    }

    pub fn release(&self, n: usize) {
        let _ = self
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(n))
            });
    }

    fn has_room(&self) -> bool {
        self.used() < self.cap()
    }

    fn take(&self) {
        self.used.fetch_add(1, Ordering::Relaxed);
    }

    fn give(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

pub struct InodeTable {
    inner: RwLock<Inner>,
    /// Shared with the daemon's other sessions.
    pool: Arc<FdPool>,
    /// Every mount seen, by id. Never shrinks: the mounts below one source are few.
    mounts: RwLock<HashMap<u64, Arc<Mount>>>,
}

pub const ROOT_ID: u64 = 1;

impl InodeTable {
    /// A table holding the root, which the kernel never forgets. Past the cap of `pool`
    /// (all the daemon's tables together), new inodes are anchored by file handles where
    /// their mount allows.
    pub fn new(root: OwnedFd, key: Key, pool: Arc<FdPool>) -> Self {
        let mount = Arc::new(Mount::new(root.as_fd()));
        mount.learn_handle_root(root.as_fd());
        let root = Arc::new(Inode {
            nodeid: ROOT_ID,
            key,
            kind: libc::S_IFDIR,
            mount: Arc::clone(&mount),
            anchor: Anchor::Fd(root),
            backing: Mutex::new(Weak::new()),
            cached_opens: AtomicUsize::new(0),
            passthrough_written: AtomicBool::new(false),
            open_fd: Mutex::new(Weak::new()),
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
        pool.take();
        Self {
            inner: RwLock::new(Inner {
                by_id,
                by_key,
                root_dev: key.dev,
                next_synthetic: FIRST_SYNTHETIC,
                fd_anchors: 1,
            }),
            pool,
            mounts: RwLock::new(HashMap::from([(key.mnt, mount)])),
        }
    }

    /// The mount with id `id`, which the object `fd` (of type `kind`) is on; first seen
    /// now if unknown (its flags are read through `fd`).
    pub fn mount(&self, id: u64, fd: BorrowedFd<'_>, kind: u32) -> Arc<Mount> {
        let known = {
            let mounts = self.mounts.read().unwrap_or_else(PoisonError::into_inner);
            mounts.get(&id).cloned()
        };
        let mount = known.unwrap_or_else(|| {
            let new = Arc::new(Mount::new(fd));
            let mut mounts = self.mounts.write().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(mounts.entry(id).or_insert(new))
        });
        if kind == libc::S_IFDIR {
            mount.learn_handle_root(fd);
        }
        mount
    }

    /// How to remember the object `fd` refers to: the fd itself while under budget, else
    /// a file handle when the filesystem gives one and its mount has a handle root.
    fn anchor(&self, fd: OwnedFd, mount: &Mount) -> Anchor {
        if self.pool.has_room() {
            return Anchor::Fd(fd);
        }
        let Some((_, mount_id)) = mount.handle_root.get() else {
            return Anchor::Fd(fd);
        };
        match fhandle::name_to_handle(fd.as_fd()) {
            Ok((handle, id)) if id == *mount_id => Anchor::Handle(handle),
            _ => Anchor::Fd(fd),
        }
    }

    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner.by_id.get(&nodeid).map(|e| Arc::clone(&e.inode))
    }

    /// Records one kernel lookup of the object `fd` refers to. When the object is already
    /// in the table, `fd` is dropped (after the lock is released) and the existing inode is
    /// returned, so hard links and repeated lookups share one node id.
    pub fn insert_lookup(&self, fd: OwnedFd, key: Key, kind: u32) -> Arc<Inode> {
        // A handle does not pin its inode: an entry anchored by one may be a deleted inode
        // whose number the filesystem gave to a new object (the handles then differ).
        let old_handle = {
            let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
            let entry = inner.by_key.get(&key).and_then(|id| inner.by_id.get(id));
            match entry.map(|e| &e.inode.anchor) {
                Some(Anchor::Handle(handle)) => Some(handle.clone()),
                _ => None,
            }
        };
        let reused = old_handle.is_some_and(|old| {
            fhandle::name_to_handle(fd.as_fd()).is_ok_and(|(new, _)| new != old)
        });
        let mount = self.mount(key.mnt, fd.as_fd(), kind);
        let anchor = self.anchor(fd, &mount);
        let (inode, spare) = {
            let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
            let inner = &mut *inner;
            if reused {
                // The old node stays until the kernel forgets it; the key names the new one.
                inner.by_key.remove(&key);
            }
            match inner
                .by_key
                .get(&key)
                .and_then(|id| inner.by_id.get_mut(id))
            {
                Some(e) => {
                    e.lookups += 1;
                    (Arc::clone(&e.inode), Some(anchor))
                }
                None => {
                    let nodeid = inner.pick_id(key);
                    if matches!(anchor, Anchor::Fd(_)) {
                        inner.fd_anchors += 1;
                        self.pool.take();
                    }
                    let inode = Arc::new(Inode {
                        nodeid,
                        key,
                        kind,
                        mount,
                        anchor,
                        backing: Mutex::new(Weak::new()),
                        cached_opens: AtomicUsize::new(0),
                        passthrough_written: AtomicBool::new(false),
                        open_fd: Mutex::new(Weak::new()),
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

    /// Whether the kernel knows the object `fd` (with identity `key`) refers to: it looked
    /// it up and has not forgotten it. A handle-anchored entry must also have the same
    /// handle, else its inode number was reused by this new object; `fd` is only opened to
    /// compare that handle (None: the object cannot be opened, so it is not known).
    pub fn knows(&self, key: Key, fd: impl FnOnce() -> Option<OwnedFd>) -> bool {
        let handle = {
            let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
            let entry = inner.by_key.get(&key).and_then(|id| inner.by_id.get(id));
            match entry.map(|e| &e.inode.anchor) {
                None => return false,
                Some(Anchor::Fd(_)) => return true,
                Some(Anchor::Handle(handle)) => handle.clone(),
            }
        };
        fd().is_some_and(|fd| fhandle::name_to_handle(fd.as_fd()).is_ok_and(|(h, _)| h == handle))
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
                if matches!(e.inode.anchor, Anchor::Fd(_)) {
                    inner.fd_anchors -= 1;
                    self.pool.give(1);
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

impl Drop for InodeTable {
    /// A session that ends gives its fd anchors back to the daemon's other sessions.
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        self.pool.give(inner.fd_anchors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> OwnedFd {
        rustix::fs::open(
            "/",
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap()
    }

    fn fd() -> OwnedFd {
        raw()
    }

    const ROOT_KEY: Key = Key {
        mnt: 1,
        dev: 1,
        ino: 2,
    };

    #[test]
    fn lookups_share_one_node_and_forget_counts() {
        let t = InodeTable::new(raw(), ROOT_KEY, FdPool::new(usize::MAX));
        let k = Key {
            mnt: 1,
            dev: 1,
            ino: 77,
        };
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
        let t = InodeTable::new(raw(), ROOT_KEY, FdPool::new(usize::MAX));
        let a = t.insert_lookup(
            fd(),
            Key {
                mnt: 1,
                dev: 1,
                ino: 50,
            },
            libc::S_IFREG,
        );
        let other_fs = t.insert_lookup(
            fd(),
            Key {
                mnt: 1,
                dev: 2,
                ino: 50,
            },
            libc::S_IFREG,
        );
        let one = t.insert_lookup(
            fd(),
            Key {
                mnt: 1,
                dev: 1,
                ino: 1,
            },
            libc::S_IFREG,
        );
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
    fn one_inode_through_two_mounts_is_two_nodes() {
        let t = InodeTable::new(raw(), ROOT_KEY, FdPool::new(usize::MAX));
        let rw = t.insert_lookup(
            fd(),
            Key {
                mnt: 1,
                dev: 1,
                ino: 60,
            },
            libc::S_IFREG,
        );
        let ro = t.insert_lookup(
            fd(),
            Key {
                mnt: 2,
                dev: 1,
                ino: 60,
            },
            libc::S_IFREG,
        );
        assert_eq!(rw.nodeid, 60);
        assert!(ro.nodeid >= FIRST_SYNTHETIC);
        assert!(!Arc::ptr_eq(&rw.mount, &ro.mount));
        let again = t.insert_lookup(
            fd(),
            Key {
                mnt: 2,
                dev: 1,
                ino: 60,
            },
            libc::S_IFREG,
        );
        assert_eq!(again.nodeid, ro.nodeid);
    }

    #[test]
    fn batch_forget_and_root_is_pinned() {
        let t = InodeTable::new(raw(), ROOT_KEY, FdPool::new(usize::MAX));
        let k = Key {
            mnt: 1,
            dev: 1,
            ino: 9,
        };
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

#[cfg(test)]
mod handle_tests {
    use super::*;
    use rustix::fs::Mode;

    #[test]
    fn past_the_budget_inodes_are_anchored_by_handles() {
        if !rustix::process::geteuid().is_root() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for n in ["a", "b"] {
            std::fs::write(dir.path().join(n), n).unwrap();
        }
        let open = |p: &std::path::Path| {
            rustix::fs::open(p, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).unwrap()
        };
        let root = open(dir.path());
        let st = rustix::fs::fstat(&root).unwrap();
        let t = InodeTable::new(
            root,
            Key {
                mnt: 1,
                dev: st.st_dev,
                ino: st.st_ino,
            },
            FdPool::new(2),
        );
        let mut ids = vec![];
        for n in ["a", "b"] {
            let fd = open(&dir.path().join(n));
            let st = rustix::fs::fstat(&fd).unwrap();
            let key = Key {
                mnt: 1,
                dev: st.st_dev,
                ino: st.st_ino,
            };
            ids.push((t.insert_lookup(fd, key, libc::S_IFREG), st.st_ino));
        }
        assert!(matches!(ids[0].0.anchor, Anchor::Fd(_)));
        assert!(matches!(ids[1].0.anchor, Anchor::Handle(_)));
        for (inode, ino) in &ids {
            let fd = inode.fd().unwrap();
            assert_eq!(rustix::fs::fstat(&fd).unwrap().st_ino, *ino);
        }
        // The same key from a different object (an inode number the filesystem reused
        // after a delete): a new node, and the key now names it.
        let b = &ids[1].0;
        let other = open(&dir.path().join("a"));
        let newer = t.insert_lookup(other, b.key, libc::S_IFREG);
        assert_ne!(newer.nodeid, b.nodeid);
        assert!(
            t.get(b.nodeid).is_some(),
            "the old node lives until forgotten"
        );
        t.forget(b.nodeid, 1);
        let a_fd = open(&dir.path().join("a"));
        assert!(
            t.knows(b.key, || Some(a_fd)),
            "forgetting the old node keeps the new key"
        );
        // Forgetting the fd-anchored one frees budget for the next.
        t.forget(ids[0].0.nodeid, 1);
        let fd = open(&dir.path().join("a"));
        let root_mount = t.get(ROOT_ID).unwrap().mount.clone();
        assert!(matches!(t.anchor(fd, &root_mount), Anchor::Fd(_)));
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;
    use rustix::fs::Mode;

    #[test]
    fn the_tables_of_one_daemon_share_one_fd_budget() {
        if !rustix::process::geteuid().is_root() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "a").unwrap();
        let open = |p: &std::path::Path| {
            rustix::fs::open(p, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).unwrap()
        };
        let key_of = |fd: &OwnedFd| {
            let st = rustix::fs::fstat(fd).unwrap();
            Key {
                mnt: 1,
                dev: st.st_dev,
                ino: st.st_ino,
            }
        };
        // Two roots and one file: the third fd anchor passes the pool of 3 only if the
        // second table counted on its own.
        let pool = FdPool::new(3);
        let r1 = open(dir.path());
        let k = key_of(&r1);
        let t1 = InodeTable::new(r1, k, Arc::clone(&pool));
        let t2 = InodeTable::new(open(dir.path()), k, Arc::clone(&pool));
        assert_eq!(pool.used(), 2);
        let fd = open(&dir.path().join("a"));
        let ka = key_of(&fd);
        let a1 = t1.insert_lookup(fd, ka, libc::S_IFREG);
        assert!(matches!(a1.anchor, Anchor::Fd(_)));
        let fd = open(&dir.path().join("a"));
        let a2 = t2.insert_lookup(fd, ka, libc::S_IFREG);
        assert!(
            matches!(a2.anchor, Anchor::Handle(_)),
            "the pool is full across tables"
        );
        // A joined session's reserve lowers the cap; its end gives it back.
        pool.reserve(1);
        assert_eq!(pool.cap(), 2);
        pool.release(1);
        assert_eq!(pool.cap(), 3);
        drop(t1);
        assert_eq!(pool.used(), 1, "an ended session gives its anchors back");
        drop(t2);
        assert_eq!(pool.used(), 0);
    }
}
