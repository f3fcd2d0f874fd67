//! Open files and directories.
//!
//! A file handle owns a real (non-`O_PATH`) fd of the backing inode, opened with the
//! caller's flags, plus, under kernel passthrough, a strong reference to the inode's
//! `BackingId` so the kernel's backing file lives exactly as long as some handle uses it.
//! A directory handle owns a directory fd whose offset is serialised by a mutex.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use fuser::BackingId;

use super::inode::Inode;

pub struct FileHandle {
    /// Pins the inode (and its fd) for as long as the file is open.
    inode: Arc<Inode>,
    fd: OwnedFd,
    /// Held only to keep the kernel's backing file alive while this handle is open.
    backing: Option<Arc<BackingId>>,
}

impl FileHandle {
    /// A handle without `backing` of a regular file takes over the place the open reserved
    /// in `cached_opens`.
    pub fn new(inode: Arc<Inode>, fd: OwnedFd, backing: Option<Arc<BackingId>>) -> Self {
        Self { inode, fd, backing }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for FileHandle {
    fn drop(&mut self) {
        if self.backing.is_none() && self.inode.is_reg() {
            self.inode.cached_opens.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

pub struct DirHandle {
    /// getdents reads from the fd's file position: one reader at a time.
    fd: Mutex<OwnedFd>,
}

impl DirHandle {
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd: Mutex::new(fd) }
    }

    pub fn lock(&self) -> MutexGuard<'_, OwnedFd> {
        self.fd.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handles by number. Numbers are never reused while mounted, so a stale number from the
/// kernel can never reach another file.
pub struct HandleTable<T> {
    map: RwLock<HashMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> Default for HandleTable<T> {
    fn default() -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }
}

impl<T> HandleTable<T> {
    pub fn insert(&self, h: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(fh, Arc::new(h));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<T>> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&fh)
            .cloned()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_removal_is_final() {
        let t: HandleTable<u32> = HandleTable::default();
        let a = t.insert(10);
        let b = t.insert(20);
        assert_ne!(a, b);
        assert_eq!(t.get(a).as_deref(), Some(&10));
        assert_eq!(t.remove(a).as_deref(), Some(&10));
        assert!(t.get(a).is_none());
        assert!(t.remove(a).is_none());
        let c = t.insert(30);
        assert_ne!(c, a);
        assert_eq!(t.get(b).as_deref(), Some(&20));
    }
}
