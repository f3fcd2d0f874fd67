//! Coherence between the FUSE sessions one daemon serves for one source (two containers
//! with two maps sharing an image): each session is its own FUSE connection with its own
//! kernel caches, so a change made through one must drop what the others cached about the
//! names and inodes it touched. Otherwise, with the default `attr_timeout`, another mount
//! keeps a replaced name pointing at the old inode, and an append through it lands in an
//! unlinked file.
//!
//! Node ids agree across sessions: they are the backing `st_ino` (and 1 for the root, the
//! same source directory for all), so an invalidation names the same object everywhere.
//! Objects with synthetic ids (other filesystems below a `--recursive` source, numbers
//! taken twice) differ between sessions: changes to them show after `attr_timeout`.
//!
//! Delivery: each session has a thread of its own that writes the notifications to its
//! `/dev/fuse` connection, and the request that made the change waits for them before it
//! replies, so the change is visible through every mount when the caller's system call
//! returns. The wait is bounded ([`DELIVERY_WAIT`]): the kernel takes the directory's lock
//! of the *other* connection to drop an entry, and two requests changing one directory
//! through two mounts at once would otherwise wait on each other for ever (each holds its
//! own mount's lock until its reply). Then the notification arrives just after the reply.
//!
//! A session is told of others' changes only once its kernel has its root's attributes
//! (`Mounted::serve` stats the root before it calls [`Member::root_known`]): until then the
//! root shows the mount's placeholder owner (uid 0, mode from `rootmode=`), and the kernel
//! drops a GETATTR reply that crosses an invalidation of the same inode, so a new mount
//! under a stream of changes from another one refused its first callers (EACCES, seen). Nothing
//! else can be cached before: every access checks permission on the root first
//! (`default_permissions`).

use std::ffi::OsString;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use fuser::{INodeNo, Notifier};

use super::handle::OpenLimit;
use super::inode::FdPool;

/// How long a request waits for other sessions to take its invalidations before it replies.
pub const DELIVERY_WAIT: Duration = Duration::from_millis(50);

/// What a change made stale in the other sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stale {
    /// The name `name` in the directory `parent` (a new object, or one removed or renamed).
    Entry(u64, OsString),
    /// An inode's attributes (and cached ACLs).
    Attr(u64),
    /// An inode's attributes and cached data (or a directory's cached listing).
    Data(u64),
}

struct Job {
    stale: Arc<[Stale]>,
    done: mpsc::SyncSender<()>,
}

struct Peer {
    id: u64,
    tx: mpsc::Sender<Job>,
    /// The session's kernel knows its root's attributes.
    ready: Arc<AtomicBool>,
}

/// The fds of one daemon, which all its sessions draw on (one RLIMIT_NOFILE): planned at
/// the first session, from its options.
#[derive(Clone)]
pub struct Budget {
    /// Fds anchoring inodes, for every session's inode table.
    pub inode_fds: Arc<FdPool>,
    /// Files and directories held open for callers through any of the mounts; one caller
    /// uid at most three quarters of it, across the mounts too.
    pub open: Arc<OpenLimit>,
}

/// The sessions of one daemon that serve one source.
#[derive(Default)]
pub struct Hub {
    peers: RwLock<Vec<Peer>>,
    next: AtomicU64,
    budget: std::sync::OnceLock<Budget>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.peers.read().map_or(0, |p| p.len());
        write!(f, "Hub({n} sessions)")
    }
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A place in the hub for a session about to be built.
    pub fn member(self: &Arc<Self>) -> Member {
        Member {
            hub: Arc::clone(self),
            id: self.next.fetch_add(1, Ordering::Relaxed),
            ready: Arc::default(),
            reserved: None,
        }
    }

    /// The daemon's fd budget, planned by `plan` for the first session; whether this is
    /// that first session.
    pub fn budget(&self, plan: impl FnOnce() -> Budget) -> (Budget, bool) {
        let mut first = false;
        let budget = self.budget.get_or_init(|| {
            first = true;
            plan()
        });
        (budget.clone(), first)
    }

    /// The session of `member` serves: from now on it is told of the others' changes.
    pub fn join(&self, member: &Member, notifier: Notifier) {
        let (tx, rx) = mpsc::channel::<Job>();
        let id = member.id;
        let spawned = std::thread::Builder::new()
            .name(format!("inval-{id}"))
            .spawn(move || deliver(&notifier, &rx));
        if let Err(e) = spawned {
            tracing::warn!("session {id}: cannot start its invalidation thread: {e}");
            return;
        }
        if let Ok(mut peers) = self.peers.write() {
            peers.push(Peer {
                id,
                tx,
                ready: Arc::clone(&member.ready),
            });
        }
    }

    /// The session of `member` ended: its thread stops once it has sent what was queued.
    pub fn leave(&self, member: &Member) {
        if let Ok(mut peers) = self.peers.write() {
            peers.retain(|p| p.id != member.id);
        }
    }

    pub fn sessions(&self) -> usize {
        self.peers.read().map_or(0, |p| p.len())
    }
}

fn deliver(notifier: &Notifier, rx: &mpsc::Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        for s in job.stale.iter() {
            // ENOENT (nothing cached) is taken as success by fuser; anything else only
            // means this connection is going away.
            let r = match s {
                Stale::Entry(parent, name) => notifier.inval_entry(INodeNo(*parent), name),
                Stale::Attr(ino) => notifier.inval_inode(INodeNo(*ino), -1, 0),
                Stale::Data(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
            };
            if let Err(e) = r {
                tracing::debug!("invalidation {s:?}: {e}");
            }
        }
        let _ = job.done.send(());
    }
}

/// One session's handle on its hub.
#[derive(Clone, Debug)]
pub struct Member {
    hub: Arc<Hub>,
    id: u64,
    ready: Arc<AtomicBool>,
    /// The fds set aside for a session that joined, until it ends.
    reserved: Option<Arc<Reserved>>,
}

/// Fds kept away from the daemon's inode anchors while a joined session lives.
#[derive(Debug)]
struct Reserved {
    pool: Arc<FdPool>,
    n: usize,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.pool.release(self.n);
    }
}

impl Member {
    /// A session alone in a hub of its own.
    #[cfg(test)]
    pub fn alone() -> Self {
        Hub::new().member()
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Sets `n` fds of `pool` aside for this session (its connection's and its workers'),
    /// until its last handle is dropped.
    pub fn reserve(&mut self, pool: &Arc<FdPool>, n: usize) {
        pool.reserve(n);
        self.reserved = Some(Arc::new(Reserved {
            pool: Arc::clone(pool),
            n,
        }));
    }

    /// This session's kernel has its root's attributes: from now on it takes the other
    /// sessions' invalidations (see the module doc).
    pub fn root_known(&self) {
        if !self.ready.swap(true, Ordering::Relaxed) {
            tracing::debug!("session {}: root attributes known", self.id);
        }
    }

    /// Tells every other session of the hub what a change just made stale, and waits (at
    /// most [`DELIVERY_WAIT`]) until they have told their kernels.
    /// `stale` is only called when there are other sessions.
    pub fn changed(&self, stale: impl FnOnce() -> Vec<Stale>) {
        let Ok(peers) = self.hub.peers.read() else {
            return;
        };
        let others = |p: &&Peer| p.id != self.id && p.ready.load(Ordering::Relaxed);
        if !peers.iter().any(|p| others(&p)) {
            return;
        }
        let stale: Arc<[Stale]> = stale().into();
        let (done, finished) = mpsc::sync_channel(peers.len());
        let mut sent = 0;
        for p in peers.iter().filter(others) {
            let job = Job {
                stale: Arc::clone(&stale),
                done: done.clone(),
            };
            if p.tx.send(job).is_ok() {
                sent += 1;
            }
        }
        drop(peers);
        let deadline = Instant::now() + DELIVERY_WAIT;
        for _ in 0..sent {
            let left = deadline.saturating_duration_since(Instant::now());
            if finished.recv_timeout(left).is_err() {
                tracing::debug!("invalidations {stale:?} still on their way after the wait");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_session_sends_nothing_and_does_not_wait() {
        let m = Member::alone();
        let t = Instant::now();
        m.changed(|| vec![Stale::Attr(5)]);
        assert!(t.elapsed() < DELIVERY_WAIT);
        assert_eq!(m.hub().sessions(), 0);
    }

    #[test]
    fn members_get_distinct_ids() {
        let hub = Hub::new();
        let (a, b) = (hub.member(), hub.member());
        assert_ne!(a.id, b.id);
        hub.leave(&a);
        assert_eq!(hub.sessions(), 0);
    }
}
