//! Threads of their own for requests that may take long (fsync, fallocate,
//! copy_file_range). Run on the session's workers, a few of them held every worker for
//! seconds and a `stat` waited behind them; handed over here, the workers go back to
//! reading requests at once and the reply is sent from the pool (the kernel matches
//! replies to requests by id, in any order).
//!
//! The threads start with the first job, not with the filesystem: a process may set up its
//! sandbox (`unshare(CLONE_NEWNS)` needs a single thread) between building the filesystem
//! and serving it, and the threads then inherit that sandbox.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Pool {
    threads: usize,
    /// Set by the first job; `None` when no thread could be started (jobs then run on the
    /// caller's thread).
    tx: OnceLock<Option<Mutex<Sender<Job>>>>,
}

impl Pool {
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            tx: OnceLock::new(),
        }
    }

    /// Runs `job` on a pool thread, or here when the pool has none. The job must reply to
    /// its request itself; a job that panics leaves its reply to fuser's drop (EIO) and its
    /// thread keeps serving.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let tx = self.tx.get_or_init(|| self.start());
        let job: Job = Box::new(job);
        let rejected = match tx {
            Some(tx) => tx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send(job)
                .err()
                .map(|e| e.0),
            None => Some(job),
        };
        if let Some(job) = rejected {
            run_caught(job);
        }
    }

    fn start(&self) -> Option<Mutex<Sender<Job>>> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..self.threads {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("shiftfs-data-{i}"))
                .spawn(move || serve(&rx));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!("cannot start a data thread: {e}"),
            }
        }
        (started > 0).then(|| Mutex::new(tx))
    }
}

/// Takes jobs until the pool (and with it the filesystem) is dropped.
fn serve(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(job) => run_caught(job),
            Err(_) => return,
        }
    }
}

fn run_caught(job: Job) {
    if std::panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
        tracing::error!("a data request panicked; its caller gets EIO");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn jobs_run_off_the_callers_thread_and_survive_panics() {
        let pool = Pool::new(2);
        let (tx, rx) = channel();
        let here = std::thread::current().id();
        pool.run(|| panic!("boom"));
        for i in 0..4 {
            let tx = tx.clone();
            pool.run(move || tx.send((i, std::thread::current().id())).unwrap());
        }
        let mut got: Vec<_> = (0..4)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort_by_key(|g| g.0);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert!(got.iter().all(|g| g.1 != here));
    }
}
