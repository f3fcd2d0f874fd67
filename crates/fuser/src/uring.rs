//! FUSE over io_uring (Linux 6.14+, `CONFIG_FUSE_IO_URING`, module parameter
//! `fuse.enable_uring`): requests reach the daemon through one io_uring per possible CPU,
//! each served by a thread pinned to that CPU. The kernel queues a request on the ring of
//! the CPU its caller runs on, so the caller's own CPU reads and answers it: no wake-up of
//! another CPU, no scheduler choice, no busy polling.
//!
//! Protocol (`fs/fuse/dev_uring.c`): every ring entry is two user buffers the kernel copies
//! into and out of: a 288-byte header (`fuse_in_header`/`fuse_out_header` in `in_out`, the
//! opcode's fixed argument in `op_in`, sizes in `ring_ent_in_out`) and a payload buffer of
//! at least `max(8192, max_write, max_pages pages)`. An entry is handed to the kernel with a
//! 128-byte `IORING_OP_URING_CMD` SQE: REGISTER the first time, then COMMIT_AND_FETCH, which
//! answers the request the entry holds and waits for the next one. The kernel uses the rings
//! only once every queue has an entry; FORGET, INTERRUPT and notifications stay on
//! `/dev/fuse`, whose reader threads keep running.
//!
//! Ownership of an entry's buffers passes back and forth: from REGISTER/COMMIT until its
//! completion the kernel may write them at any time; from a completion with a request until
//! the reply is written the request's reply (possibly on another thread) owns them; then the
//! queue's thread submits the commit. Only the queue's own thread touches its ring, so the
//! ring can be single-issuer; a reply marks its entry replied, and one from another thread
//! wakes the serving thread through an eventfd read that is always pending on the ring.
//!
//! Teardown: when the connection ends (unmount, abort) the kernel completes every pending
//! entry with an error; a queue's thread ends once none of its entries is with the kernel or
//! with a reply. The buffers are freed only then, and a queue that could not reach that state
//! leaks its buffers rather than free memory the kernel might still write.
//!
//! This module holds all of the transport's `unsafe`.

use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::thread::ThreadId;
use std::time::Duration;

use log::debug;
use log::warn;
use rustix::io_uring as ur;

use crate::channel::ChannelSender;

/// Whether to serve requests over io_uring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UringMode {
    /// `/dev/fuse` only.
    #[default]
    Off,
    /// io_uring when the kernel offers it and the rings can be set up, else `/dev/fuse`.
    Auto,
    /// io_uring or nothing: the session fails at INIT when it cannot be had.
    On,
}

/// How a session's requests are served, decided at INIT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `/dev/fuse` only, and why not io_uring (`None`: it was not asked for).
    DevFuse {
        /// Why io_uring is not used, when it was asked for.
        why: Option<String>,
    },
    /// io_uring, one queue per possible CPU, `depth` entries each; `/dev/fuse` still
    /// carries FORGET, INTERRUPT and requests made before the rings were ready.
    Uring {
        /// Queues (one per possible CPU).
        queues: usize,
        /// Entries per queue.
        depth: usize,
    },
}

/// Requests served over each transport, counted as they are dispatched.
#[derive(Debug, Default)]
pub struct TransportStats {
    pub(crate) dev: AtomicU64,
    pub(crate) ring: AtomicU64,
}

impl TransportStats {
    /// Requests read from `/dev/fuse`.
    pub fn dev_requests(&self) -> u64 {
        self.dev.load(Ordering::Relaxed)
    }
    /// Requests fetched from the io_uring queues.
    pub fn ring_requests(&self) -> u64 {
        self.ring.load(Ordering::Relaxed)
    }
}

/// Entries per queue. One thread serves a queue in order, so more entries only help while
/// replies are pending on other threads; a few spare ones keep the queue fed meanwhile.
pub(crate) const DEPTH: usize = 16;
/// Largest `max_write` asked for when io_uring is used: every entry needs a payload buffer
/// of `max_write` bytes, and the kernel splits writes at `max_pages` (256 pages by default)
/// anyway.
pub(crate) const MAX_WRITE: u32 = 1 << 20;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `fuse_uring_req_header`: `in_out[128]`, `op_in[128]`, `fuse_uring_ent_in_out` (32).
const HEADER_LEN: usize = 288;
const OP_IN: usize = 128;
const OP_IN_MAX: usize = 128;
const ENT_COMMIT_ID: usize = 256 + 8;
const ENT_PAYLOAD_SZ: usize = 256 + 16;
/// Per entry: the header, then its two iovecs, padded to this many bytes.
const HEADER_AREA: usize = 512;
const IOVECS: usize = 384;
/// Room before the payload where the request's `fuse_in_header` and `op_in` are copied, so
/// that header, fixed argument and payload lie contiguous as fuser's parser expects,
/// without copying the payload.
const PREFIX: usize = 256;
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
const SQE_LEN: usize = 128;
const CQE_LEN: usize = 16;
const OP_READ: u8 = 22;
const OP_URING_CMD: u8 = 46;
const WAKE_TAG: u64 = u64::MAX;
// The request's header and fixed argument fit before the payload; the iovecs after the
// header.
const _: () = assert!(IN_HEADER_LEN + OP_IN_MAX <= PREFIX);
const _: () = assert!(HEADER_LEN <= IOVECS && IOVECS + 32 <= HEADER_AREA);

// Entry states.
const IDLE: u8 = 0;
const KERNEL: u8 = 1;
const USER: u8 = 2;
const WRITING: u8 = 3;
const REPLIED: u8 = 4;
const DEAD: u8 = 5;

/// The possible CPUs (`/sys/devices/system/cpu/possible`): the kernel makes one queue per
/// possible CPU and picks a request's queue by its caller's CPU number. Read once and kept,
/// so a process can call this before confining itself away from `/sys`.
pub fn possible_cpus() -> io::Result<Vec<usize>> {
    static CPUS: OnceLock<Result<Vec<usize>, String>> = OnceLock::new();
    CPUS.get_or_init(|| {
        let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .map_err(|e| format!("cannot read /sys/devices/system/cpu/possible: {e}"))?;
        parse_cpu_list(text.trim())
            .ok_or_else(|| format!("cannot parse the possible CPUs {:?}", text.trim()))
    })
    .clone()
    .map_err(io::Error::other)
}

fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Anonymous or ring memory, unmapped on drop.
struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Region is plain memory; who may read or write which part of it at what time is
// governed by the ring protocol and the entry states in `Queue`, not by the Region itself.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn anonymous(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping aliases nothing.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )?
        };
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave NULL"))?,
            len,
        })
    }

    fn ring(fd: &OwnedFd, len: usize, offset: u64) -> io::Result<Self> {
        // SAFETY: maps the ring's shared memory at a fresh address; the kernel defines its
        // layout, which we reach only through the offsets it reported.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::POPULATE,
                fd,
                offset,
            )?
        };
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave NULL"))?,
            len,
        })
    }

    fn at(&self, off: usize) -> *mut u8 {
        assert!(off < self.len);
        // SAFETY: in bounds, checked above.
        unsafe { self.ptr.as_ptr().add(off) }
    }

    /// A u32 the kernel shares with us (ring heads and tails).
    fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        assert!(off % 4 == 0 && off + 4 <= self.len);
        // SAFETY: in bounds and aligned (checked); the kernel accesses these words
        // atomically too, and the mapping lives as long as `self`.
        unsafe { &*self.at(off).cast::<AtomicU32>() }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range, and nothing refers to it any more (the
        // owner of a Region only drops it once neither the kernel nor a reply can use it).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            warn!("munmap of an io_uring region failed: {e}");
        }
    }
}

/// One queue: a ring, its entries' buffers, and the state the serving thread shares with
/// replies sent from other threads.
pub(crate) struct Queue {
    qid: u16,
    cpu: usize,
    /// Closed before the memory below is freed (field order).
    ring: OwnedFd,
    /// Set up disabled: the serving thread enables it and so becomes its only issuer.
    disabled: bool,
    rings: Region,
    sqes: Region,
    sq_head: usize,
    sq_tail: usize,
    sq_mask: u32,
    sq_entries: u32,
    cq_head: usize,
    cq_tail: usize,
    cq_mask: u32,
    cqes: usize,
    /// Entry `i`'s header at `i * stride`, its payload at `i * stride + HEADER_AREA + PREFIX`.
    /// Freed only once no entry is with the kernel (see `Drop`).
    bufs: std::mem::ManuallyDrop<Region>,
    stride: usize,
    payload_len: usize,
    states: Box<[AtomicU8]>,
    commit_ids: Box<[AtomicU64]>,
    /// The request of entry `i` is being handed to the filesystem as a slice that covers the
    /// start of its payload buffer: a reply sent meanwhile is kept in `deferred[i]` and
    /// written into the entry by the serving thread afterwards, never over the slice.
    viewing: Box<[AtomicBool]>,
    deferred: Box<[Mutex<Vec<u8>>]>,
    wake: OwnedFd,
    /// The 8 bytes the pending eventfd read fills; inside `bufs`' lifetime rules too.
    wake_buf: std::mem::ManuallyDrop<Region>,
    owner: OnceLock<ThreadId>,
    /// The connection's `/dev/fuse` fd: the SQEs name it, and passthrough's backing ioctls
    /// go to it.
    dev: ChannelSender,
    /// No entry is with the kernel any more: the buffers may be freed.
    released: AtomicBool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("qid", &self.qid)
            .field("cpu", &self.cpu)
            .finish_non_exhaustive()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        if self.released.load(Ordering::Acquire) {
            // SAFETY: no entry is registered with the kernel nor held by a reply (the
            // serving thread saw every entry's final completion), and this is the last
            // reference to the queue, so nothing uses the buffers any more.
            unsafe {
                std::mem::ManuallyDrop::drop(&mut self.bufs);
                std::mem::ManuallyDrop::drop(&mut self.wake_buf);
            }
        } else {
            warn!(
                "io_uring queue {} ended with entries still registered; keeping their buffers",
                self.qid
            );
        }
    }
}

/// Sets up one queue per possible CPU with `payload_len`-byte payload buffers. Nothing is
/// registered with the connection yet: that is [`Queue::serve`]'s first step, after INIT.
pub(crate) fn setup(dev: &ChannelSender, payload_len: usize) -> io::Result<Vec<Arc<Queue>>> {
    let cpus = possible_cpus()?;
    cpus.iter()
        .enumerate()
        .map(|(qid, &cpu)| {
            let qid = u16::try_from(qid).map_err(|_| io::Error::other("too many CPUs"))?;
            Queue::new(qid, cpu, dev.clone(), payload_len).map(Arc::new)
        })
        .collect()
}

impl Queue {
    fn new(qid: u16, cpu: usize, dev: ChannelSender, payload_len: usize) -> io::Result<Self> {
        let want = (DEPTH + 1).next_power_of_two() as u32;
        let (ring, p, disabled) = create_ring(want)?;
        let sq_ring_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
        let cq_ring_len = p.cq_off.cqes as usize + p.cq_entries as usize * CQE_LEN;
        if !p.features.contains(ur::IoringFeatureFlags::SINGLE_MMAP) {
            return Err(io::Error::other(
                "the kernel's io_uring lacks IORING_FEAT_SINGLE_MMAP",
            ));
        }
        let rings = Region::ring(&ring, sq_ring_len.max(cq_ring_len), ur::IORING_OFF_SQ_RING)?;
        let sqes = Region::ring(&ring, p.sq_entries as usize * SQE_LEN, ur::IORING_OFF_SQES)?;
        // Slot i of the SQ array always names SQE i.
        for i in 0..p.sq_entries as usize {
            rings
                .atomic_u32(p.sq_off.array as usize + i * 4)
                .store(i as u32, Ordering::Relaxed);
        }
        let page = page_size::get();
        let stride = (HEADER_AREA + PREFIX + payload_len).next_multiple_of(page);
        let bufs = Region::anonymous(stride * DEPTH)?;
        for i in 0..DEPTH {
            let base = i * stride;
            let iov = [
                libc::iovec {
                    iov_base: bufs.at(base).cast(),
                    iov_len: HEADER_LEN,
                },
                libc::iovec {
                    iov_base: bufs.at(base + HEADER_AREA + PREFIX).cast(),
                    iov_len: payload_len,
                },
            ];
            // SAFETY: the iovec slot lies inside entry i's header area, 8-aligned (stride and
            // IOVECS are multiples of 8), and no one else uses the buffers yet.
            unsafe { bufs.at(base + IOVECS).cast::<[libc::iovec; 2]>().write(iov) };
        }
        let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        // The masks live in the ring memory.
        let sq_mask = rings
            .atomic_u32(p.sq_off.ring_mask as usize)
            .load(Ordering::Relaxed);
        let cq_mask = rings
            .atomic_u32(p.cq_off.ring_mask as usize)
            .load(Ordering::Relaxed);
        Ok(Self {
            qid,
            cpu,
            ring,
            disabled,
            rings,
            sqes,
            sq_head: p.sq_off.head as usize,
            sq_tail: p.sq_off.tail as usize,
            sq_mask,
            sq_entries: p.sq_entries,
            cq_head: p.cq_off.head as usize,
            cq_tail: p.cq_off.tail as usize,
            cq_mask,
            cqes: p.cq_off.cqes as usize,
            bufs: std::mem::ManuallyDrop::new(bufs),
            stride,
            payload_len,
            states: (0..DEPTH).map(|_| AtomicU8::new(IDLE)).collect(),
            commit_ids: (0..DEPTH).map(|_| AtomicU64::new(0)).collect(),
            viewing: (0..DEPTH).map(|_| AtomicBool::new(false)).collect(),
            deferred: (0..DEPTH).map(|_| Mutex::new(Vec::new())).collect(),
            wake,
            wake_buf: std::mem::ManuallyDrop::new(Region::anonymous(page)?),
            owner: OnceLock::new(),
            dev,
            released: AtomicBool::new(false),
        })
    }

    /// The queue's index, as the kernel numbers its queues.
    pub(crate) fn qid(&self) -> u16 {
        self.qid
    }

    fn header(&self, idx: usize) -> *mut u8 {
        self.bufs.at(idx * self.stride)
    }

    fn payload(&self, idx: usize) -> *mut u8 {
        self.bufs.at(idx * self.stride + HEADER_AREA + PREFIX)
    }

    /// Writes a reply of `total` bytes (`fuse_out_header`, then the arguments, in `parts`)
    /// into entry `idx`: the header into `in_out`, the rest into the payload buffer; a reply
    /// too large for the buffer becomes EIO.
    ///
    /// # Safety
    /// The caller must own the entry's buffers (a request is in them and its reply not yet
    /// committed), and nothing may hold a reference into its payload buffer.
    unsafe fn write_reply<'a>(
        &self,
        idx: usize,
        total: usize,
        parts: impl Iterator<Item = &'a [u8]>,
    ) {
        let hdr = self.header(idx);
        let payload = self.payload(idx);
        let mut head = [0u8; OUT_HEADER_LEN];
        let mut fill = 0;
        let mut at = 0;
        if total >= OUT_HEADER_LEN && total - OUT_HEADER_LEN <= self.payload_len {
            for mut s in parts {
                if fill < OUT_HEADER_LEN {
                    let n = s.len().min(OUT_HEADER_LEN - fill);
                    head[fill..fill + n].copy_from_slice(&s[..n]);
                    fill += n;
                    s = &s[n..];
                }
                // SAFETY: the buffers are ours (the caller's contract) and `at + s.len()`
                // stays within the payload buffer (checked above).
                unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), payload.add(at), s.len()) };
                at += s.len();
            }
        } else {
            warn!(
                "a {total}-byte FUSE reply does not fit the {}-byte io_uring buffer; answering EIO",
                self.payload_len
            );
            head[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
            head[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            let unique = self.commit_ids[idx].load(Ordering::Relaxed);
            head[8..16].copy_from_slice(&unique.to_ne_bytes());
        }
        // SAFETY: as above, for the header area.
        unsafe {
            std::ptr::copy_nonoverlapping(head.as_ptr(), hdr, OUT_HEADER_LEN);
            hdr.add(ENT_PAYLOAD_SZ)
                .cast::<u32>()
                .write_unaligned(at as u32);
        }
    }

    /// Serves the queue on the calling thread until the connection ends: pins the thread to
    /// the queue's CPU, registers every entry, then hands each request to `handle` with the
    /// reply that commits it.
    pub(crate) fn serve(
        self: &Arc<Self>,
        handle: &mut dyn FnMut(&[u8], RingReply),
    ) -> io::Result<()> {
        let mut cpus = rustix::thread::CpuSet::new();
        cpus.set(self.cpu);
        if let Err(e) = rustix::thread::sched_setaffinity(None, &cpus) {
            warn!(
                "cannot pin the io_uring thread of queue {} to CPU {}: {e}; requests made on that CPU will wait for the scheduler",
                self.qid, self.cpu
            );
        }
        let _ = self.owner.set(std::thread::current().id());
        if self.disabled {
            // SAFETY: ENABLE_RINGS takes no argument.
            unsafe {
                ur::io_uring_register(
                    &self.ring,
                    ur::IoringRegisterOp::RegisterEnableRings,
                    std::ptr::null(),
                    0,
                )?;
            }
        }
        let mut w = Worker {
            q: self,
            tail: self.rings.atomic_u32(self.sq_tail).load(Ordering::Relaxed),
            in_flight: 0,
            live: DEPTH,
            wake_armed: false,
            stopping: false,
            register_tries: 0,
        };
        let result = w.run(handle);
        if w.in_flight == 0 {
            self.released.store(true, Ordering::Release);
        }
        result
    }
}

fn create_ring(entries: u32) -> io::Result<(OwnedFd, ur::io_uring_params, bool)> {
    use ur::IoringSetupFlags as F;
    // Single issuer with deferred task work: the kernel's work for a completion runs when
    // the serving thread waits, on its CPU, instead of interrupting it. Needs Linux 6.1;
    // without it, plain SQE128 rings work the same, a little slower.
    for (flags, disabled) in [
        (
            F::SQE128 | F::SINGLE_ISSUER | F::DEFER_TASKRUN | F::R_DISABLED,
            true,
        ),
        (F::SQE128, false),
    ] {
        let mut p = ur::io_uring_params::default();
        p.flags = flags;
        // SAFETY: `p` is a valid, zeroed params struct the kernel fills in.
        match unsafe { ur::io_uring_setup(entries, &mut p) } {
            Ok(fd) => return Ok((fd, p, disabled)),
            Err(rustix::io::Errno::INVAL) if disabled => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other("io_uring_setup refused every flag set"))
}

/// The serving thread's own view of its queue.
struct Worker<'a> {
    q: &'a Arc<Queue>,
    /// Our SQ tail (only this thread submits).
    tail: u32,
    /// SQEs submitted or queued whose completion has not been seen.
    in_flight: usize,
    /// Entries not yet finished for good.
    live: usize,
    wake_armed: bool,
    /// The connection is going away: commits are no longer sent.
    stopping: bool,
    register_tries: u32,
}

impl Worker<'_> {
    fn run(&mut self, handle: &mut dyn FnMut(&[u8], RingReply)) -> io::Result<()> {
        for idx in 0..DEPTH {
            self.push_entry(idx, CMD_REGISTER);
        }
        self.arm_wake();
        let mut batch: Vec<(u64, i32)> = Vec::with_capacity(2 * DEPTH);
        while self.in_flight > 0 {
            self.enter()?;
            self.reap(&mut batch);
            for &(tag, res) in &batch {
                self.in_flight -= 1;
                if tag == WAKE_TAG {
                    self.wake_armed = false;
                } else {
                    self.complete(tag as usize, res, handle);
                }
            }
            self.flush_commits();
            if self.live == 0 {
                if self.wake_armed {
                    // Complete our own pending read so that nothing refers to the buffers.
                    self.wake();
                }
            } else if !self.wake_armed {
                self.arm_wake();
            }
        }
        Ok(())
    }

    fn complete(&mut self, idx: usize, res: i32, handle: &mut dyn FnMut(&[u8], RingReply)) {
        let q = self.q;
        if res == 0 {
            let hdr = q.header(idx);
            // SAFETY: the completion hands entry idx's buffers to us until we commit it; the
            // header area holds the kernel's 288 bytes, read unaligned-safe below.
            let (len, commit_id, payload_sz) = unsafe {
                (
                    hdr.cast::<u32>().read_unaligned() as usize,
                    hdr.add(ENT_COMMIT_ID).cast::<u64>().read_unaligned(),
                    hdr.add(ENT_PAYLOAD_SZ).cast::<u32>().read_unaligned() as usize,
                )
            };
            q.commit_ids[idx].store(commit_id, Ordering::Relaxed);
            q.states[idx].store(USER, Ordering::Release);
            let reply = RingReply(Arc::new(Slot {
                queue: Arc::clone(q),
                idx: idx as u16,
                answered: AtomicBool::new(false),
            }));
            let op_len = len.checked_sub(IN_HEADER_LEN + payload_sz);
            match op_len {
                Some(op_len) if op_len <= OP_IN_MAX && payload_sz <= q.payload_len => {
                    let start = q.payload(idx).wrapping_sub(IN_HEADER_LEN + op_len);
                    // A request with payload is handed over as a slice covering the start of
                    // the payload buffer, where its reply goes: replies wait meanwhile.
                    let viewing = payload_sz > 0;
                    q.viewing[idx].store(viewing, Ordering::Release);
                    // SAFETY: the PREFIX bytes before the payload belong to entry idx and are
                    // ours now (see above); IN_HEADER_LEN + op_len <= PREFIX. The request is
                    // then `len` contiguous bytes from `start`, inside the entry. Nothing
                    // writes there while the slice lives: the kernel waits for our commit,
                    // and a reply is written into the entry directly only while `viewing`
                    // is false, i.e. when the slice ends before the payload buffer (no
                    // payload) or after the filesystem has returned.
                    let data = unsafe {
                        std::ptr::copy_nonoverlapping(hdr, start, IN_HEADER_LEN);
                        std::ptr::copy_nonoverlapping(
                            hdr.add(OP_IN),
                            start.add(IN_HEADER_LEN),
                            op_len,
                        );
                        std::slice::from_raw_parts(start.cast_const(), len)
                    };
                    handle(data, reply);
                    if viewing {
                        q.viewing[idx].store(false, Ordering::Release);
                    }
                }
                _ => {
                    warn!(
                        "io_uring queue {}: malformed request (len {len}, payload {payload_sz}); answering EIO",
                        q.qid
                    );
                    reply.send_error(libc::EIO);
                }
            }
            return;
        }
        let err = io::Error::from_raw_os_error(-res);
        if res == -libc::EAGAIN && self.register_tries < 100 && !self.stopping {
            // REGISTER before the kernel has processed our INIT reply: try again shortly.
            self.register_tries += 1;
            std::thread::sleep(Duration::from_millis(10));
            self.push_entry(idx, CMD_REGISTER);
            return;
        }
        q.states[idx].store(DEAD, Ordering::Release);
        self.live -= 1;
        match -res {
            libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV | libc::ECANCELED => {
                debug!("io_uring queue {} entry {idx}: {err}", q.qid);
                self.stopping = true;
            }
            _ => warn!("io_uring queue {} entry {idx} failed: {err}", q.qid),
        }
    }

    /// Commits every entry whose reply is written (state REPLIED). A scan of the DEPTH
    /// states, not a list the replies fill: a reply sent on this thread, the common case,
    /// then takes no lock, and only this thread moves an entry out of REPLIED.
    fn flush_commits(&mut self) {
        for idx in 0..DEPTH {
            if self.q.states[idx].load(Ordering::Acquire) != REPLIED {
                continue;
            }
            let mut kept = self.q.deferred[idx]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !kept.is_empty() {
                // SAFETY: the entry holds an answered request not yet committed, and the
                // filesystem has returned, so no slice of the request is alive.
                unsafe {
                    self.q
                        .write_reply(idx, kept.len(), std::iter::once(kept.as_slice()))
                };
                kept.clear();
            }
            drop(kept);
            if self.stopping {
                self.q.states[idx].store(DEAD, Ordering::Release);
                self.live -= 1;
            } else {
                self.push_entry(idx, CMD_COMMIT_AND_FETCH);
            }
        }
    }

    fn push_sqe(&mut self, fill: impl FnOnce(*mut u8)) {
        let q = self.q;
        let head = q.rings.atomic_u32(q.sq_head).load(Ordering::Acquire);
        // At most DEPTH entries and the wake read are ever in flight, and the SQ has room
        // for more than that.
        assert!(
            self.tail.wrapping_sub(head) < q.sq_entries,
            "io_uring SQ full"
        );
        let slot = (self.tail & q.sq_mask) as usize;
        let sqe = q.sqes.at(slot * SQE_LEN);
        // SAFETY: SQE `slot` is past the kernel's head, so the kernel is not reading it; it
        // is 128 bytes (SQE128) inside the SQE mapping.
        unsafe { std::ptr::write_bytes(sqe, 0, SQE_LEN) };
        fill(sqe);
        self.tail = self.tail.wrapping_add(1);
        q.rings
            .atomic_u32(q.sq_tail)
            .store(self.tail, Ordering::Release);
        self.in_flight += 1;
    }

    fn push_entry(&mut self, idx: usize, cmd: u32) {
        let q = self.q;
        let fd = q.dev.as_fd().as_raw_fd();
        let iov = q.header(idx).wrapping_add(IOVECS) as u64;
        let commit_id = q.commit_ids[idx].load(Ordering::Relaxed);
        q.states[idx].store(KERNEL, Ordering::Release);
        let qid = q.qid;
        self.push_sqe(|sqe| {
            // SAFETY: `sqe` is a zeroed 128-byte SQE we own (push_sqe); the offsets are those
            // of `struct io_uring_sqe`, and bytes 48.. are the command area holding
            // `struct fuse_uring_cmd_req { flags, commit_id, qid }`.
            unsafe {
                sqe.write(OP_URING_CMD);
                sqe.add(4).cast::<i32>().write_unaligned(fd);
                sqe.add(8).cast::<u32>().write_unaligned(cmd);
                sqe.add(16).cast::<u64>().write_unaligned(iov);
                sqe.add(24).cast::<u32>().write_unaligned(2);
                sqe.add(32).cast::<u64>().write_unaligned(idx as u64);
                sqe.add(56).cast::<u64>().write_unaligned(commit_id);
                sqe.add(64).cast::<u16>().write_unaligned(qid);
            }
        });
    }

    fn arm_wake(&mut self) {
        let fd = self.q.wake.as_raw_fd();
        let buf = self.q.wake_buf.at(0) as u64;
        self.wake_armed = true;
        self.push_sqe(|sqe| {
            // SAFETY: as in push_entry; an IORING_OP_READ of 8 bytes into `wake_buf`, which
            // lives as long as the queue's buffers.
            unsafe {
                sqe.write(OP_READ);
                sqe.add(4).cast::<i32>().write_unaligned(fd);
                sqe.add(16).cast::<u64>().write_unaligned(buf);
                sqe.add(24).cast::<u32>().write_unaligned(8);
                sqe.add(32).cast::<u64>().write_unaligned(WAKE_TAG);
            }
        });
    }

    fn wake(&self) {
        if let Err(e) = rustix::io::write(&self.q.wake, &1u64.to_ne_bytes()) {
            if e != rustix::io::Errno::AGAIN {
                warn!("io_uring queue {}: cannot wake its thread: {e}", self.q.qid);
            }
        }
    }

    /// Submits what is queued and waits for at least one completion.
    fn enter(&mut self) -> io::Result<()> {
        let q = self.q;
        loop {
            let head = q.rings.atomic_u32(q.sq_head).load(Ordering::Acquire);
            let to_submit = self.tail.wrapping_sub(head);
            // SAFETY: no pointer arguments; the SQEs up to our tail are complete.
            match unsafe {
                ur::io_uring_enter(&q.ring, to_submit, 1, ur::IoringEnterFlags::GETEVENTS)
            } {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {
                    if self.has_completions() {
                        return Ok(());
                    }
                }
                Err(rustix::io::Errno::BUSY | rustix::io::Errno::AGAIN) => {
                    // Completions must be reaped before more can be submitted.
                    if self.has_completions() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn has_completions(&self) -> bool {
        let q = self.q;
        q.rings.atomic_u32(q.cq_head).load(Ordering::Relaxed)
            != q.rings.atomic_u32(q.cq_tail).load(Ordering::Acquire)
    }

    fn reap(&mut self, batch: &mut Vec<(u64, i32)>) {
        let q = self.q;
        batch.clear();
        let mut head = q.rings.atomic_u32(q.cq_head).load(Ordering::Relaxed);
        let tail = q.rings.atomic_u32(q.cq_tail).load(Ordering::Acquire);
        while head != tail {
            let cqe = q.rings.at(q.cqes + (head & q.cq_mask) as usize * CQE_LEN);
            // SAFETY: CQEs between head and tail are written by the kernel and ours to read
            // until we move the head past them.
            let (tag, res) = unsafe {
                (
                    cqe.cast::<u64>().read_unaligned(),
                    cqe.add(8).cast::<i32>().read_unaligned(),
                )
            };
            batch.push((tag, res));
            head = head.wrapping_add(1);
        }
        q.rings.atomic_u32(q.cq_head).store(head, Ordering::Release);
    }
}

/// The right, and duty, to answer the request an entry holds: writes the reply into the
/// entry and has the queue's thread commit it. May be cloned and sent to any thread; when
/// the last clone goes without an answer, the request gets EIO, so that no entry is lost to
/// the queue (its thread waits for every entry before it ends).
#[derive(Debug, Clone)]
pub(crate) struct RingReply(Arc<Slot>);

#[derive(Debug)]
pub(crate) struct Slot {
    queue: Arc<Queue>,
    idx: u16,
    /// This request was answered. Per request, not per entry: the entry may already hold
    /// the next request when the last clone of this one goes.
    answered: AtomicBool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.answered.load(Ordering::Acquire) {
            warn!("a FUSE request on io_uring got no reply; answering EIO");
            self.send_error(libc::EIO);
        }
    }
}

impl std::ops::Deref for RingReply {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        &self.0
    }
}

impl Slot {
    /// The `unique` of the request the entry holds.
    pub(crate) fn commit_id(&self) -> u64 {
        self.queue.commit_ids[usize::from(self.idx)].load(Ordering::Relaxed)
    }

    /// The connection's `/dev/fuse` fd, for what does not travel over the ring.
    pub(crate) fn dev(&self) -> &ChannelSender {
        &self.queue.dev
    }

    /// Writes `reply` (a `fuse_out_header` and its arguments) into the entry and queues the
    /// commit. Fails when the entry was already answered.
    pub(crate) fn send(&self, reply: &[io::IoSlice<'_>]) -> io::Result<()> {
        let q = &self.queue;
        let idx = usize::from(self.idx);
        if self.answered.swap(true, Ordering::AcqRel) {
            return Err(io::Error::other("this request was already answered"));
        }
        q.states[idx]
            .compare_exchange(USER, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .map_err(|s| {
                io::Error::other(format!(
                    "io_uring entry {idx} in state {s}, not awaiting a reply"
                ))
            })?;
        let total: usize = reply.iter().map(|s| s.len()).sum();
        if q.viewing[idx].load(Ordering::Acquire) {
            // The request's slice is still in use: the serving thread writes this later.
            let mut kept = q.deferred[idx].lock().unwrap_or_else(|e| e.into_inner());
            kept.clear();
            for s in reply {
                kept.extend_from_slice(s);
            }
        } else {
            // SAFETY: entry idx is ours (state WRITING, won by the exchange above), and no
            // slice of its request is alive (`viewing` is cleared only after the filesystem
            // returned).
            unsafe { q.write_reply(idx, total, reply.iter().map(|s| &**s)) };
        }
        // The serving thread commits it at its next scan (`flush_commits`); from another
        // thread, wake it for that.
        q.states[idx].store(REPLIED, Ordering::Release);
        if q.owner.get() != Some(&std::thread::current().id()) {
            if let Err(e) = rustix::io::write(&q.wake, &1u64.to_ne_bytes()) {
                if e != rustix::io::Errno::AGAIN {
                    warn!("io_uring queue {}: cannot wake its thread: {e}", q.qid);
                }
            }
        }
        Ok(())
    }

    fn send_error(&self, errno: i32) {
        let unique = self.queue.commit_ids[usize::from(self.idx)].load(Ordering::Relaxed);
        let mut head = [0u8; OUT_HEADER_LEN];
        head[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
        head[4..8].copy_from_slice(&(-errno).to_ne_bytes());
        head[8..16].copy_from_slice(&unique.to_ne_bytes());
        if let Err(e) = self.send(&[io::IoSlice::new(&head)]) {
            warn!("cannot answer a malformed request: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-3"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0-1,4,6-7"), Some(vec![0, 1, 4, 6, 7]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn the_header_layout_matches_the_kernel() {
        // fuse_uring_req_header: in_out[128], op_in[128], ent_in_out{flags, commit_id,
        // payload_sz, padding, reserved}.
        assert_eq!(HEADER_LEN, 128 + 128 + 8 + 8 + 4 + 4 + 8);
        assert_eq!(ENT_COMMIT_ID, 264);
        assert_eq!(ENT_PAYLOAD_SZ, 272);
    }
}
