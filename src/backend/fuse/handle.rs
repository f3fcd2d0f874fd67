//! Open files and directories.
//!
//! A file handle owns a real (non-`O_PATH`) fd of the backing inode, opened with the
//! caller's flags, plus, under kernel passthrough, a strong reference to the inode's
//! `BackingId` so the kernel's backing file lives exactly as long as some handle uses it.
//! A directory handle owns a directory fd whose offset is serialised by a mutex.
//!
//! Each handle holds a `Slot` of the mount's `OpenLimit`: the fds callers can make the
//! daemon hold open are capped, so opens past the cap fail (ENFILE) for the opener while
//! lookups and everyone else's requests keep their fds.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use fuser::BackingId;

use super::inode::Inode;

pub struct FileHandle {
    /// Pins the inode (and its fd) for as long as the file is open.
    inode: Arc<Inode>,
    /// Shared (weakly) with the inode, for calls that need a real fd of it.
    fd: Arc<OwnedFd>,
    /// Held only to keep the kernel's backing file alive while this handle is open.
    backing: Option<Arc<BackingId>>,
    _slot: Slot,
}

impl FileHandle {
    /// A handle without `backing` of a regular file takes over the place the open reserved
    /// in `cached_opens`.
    pub fn new(
        inode: Arc<Inode>,
        fd: OwnedFd,
        backing: Option<Arc<BackingId>>,
        slot: Slot,
    ) -> Self {
        let fd = Arc::new(fd);
        inode.offer_open_fd(&fd);
        Self {
            inode,
            fd,
            backing,
            _slot: slot,
        }
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
    _slot: Slot,
}

impl DirHandle {
    pub fn new(fd: OwnedFd, slot: Slot) -> Self {
        Self {
            fd: Mutex::new(fd),
            _slot: slot,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, OwnedFd> {
        self.fd.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The cap on files and directories held open for callers of one mount.
///
/// All callers together hold at most `max`; one caller uid at most `per_user` (three
/// quarters of `max`), so when one user fills its share the others still find room.
/// A container's root can spread opens over several uids: the share protects fairness
/// between users, while the cap itself is what keeps the daemon clear of EMFILE.
pub struct OpenLimit {
    max: usize,
    per_user: usize,
    state: Mutex<LimitState>,
}

#[derive(Default)]
struct LimitState {
    total: usize,
    by_uid: HashMap<u32, usize>,
    /// Refusals since the last warning, and when that was.
    refused: u64,
    warned: Option<Instant>,
}

/// How often a refusal is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl OpenLimit {
    pub fn new(max: usize) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(Self {
            max,
            per_user: (max - max / 4).max(1),
            state: Mutex::new(LimitState::default()),
        })
    }

    /// A place for one more open file of caller `uid`; `None` (after a rate-limited
    /// warning) when the mount or this caller is at its cap.
    pub fn acquire(self: &Arc<Self>, uid: u32) -> Option<Slot> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = st.by_uid.get(&uid).copied().unwrap_or(0);
        if st.total >= self.max || mine >= self.per_user {
            st.refused += 1;
            let due = st.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY);
            if due {
                tracing::warn!(
                    "open-file cap reached: uid {uid} holds {mine} open (at most {} per \
                     user), {} open in all (cap {}); {} open(s) refused with ENFILE since the \
                     last warning (raise with -o max_open=N)",
                    self.per_user,
                    st.total,
                    self.max,
                    st.refused
                );
                st.refused = 0;
                st.warned = Some(Instant::now());
            }
            return None;
        }
        st.total += 1;
        *st.by_uid.entry(uid).or_insert(0) += 1;
        Some(Slot {
            limit: Arc::clone(self),
            uid,
        })
    }

    fn release(&self, uid: u32) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.by_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                st.by_uid.remove(&uid);
            }
        }
    }

    #[cfg(test)]
    fn total(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// One open file's place under the cap, given back on drop.
pub struct Slot {
    limit: Arc<OpenLimit>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limit.release(self.uid);
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

    #[test]
    fn open_cap_leaves_room_for_other_users() {
        let l = OpenLimit::new(8);
        let mine: Vec<_> = (0..6).map(|_| l.acquire(1000).unwrap()).collect();
        assert!(l.acquire(1000).is_none(), "one user gets three quarters");
        let other: Vec<_> = (0..2).map(|_| l.acquire(0).unwrap()).collect();
        assert!(l.acquire(0).is_none(), "the mount's cap holds for everyone");
        assert!(l.acquire(5).is_none());
        drop(mine);
        assert_eq!(l.total(), 2);
        assert!(l.acquire(1000).is_some());
        drop(other);
        assert_eq!(l.total(), 0);
    }
}
