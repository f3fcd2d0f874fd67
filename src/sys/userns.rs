//! A short-lived child process in a new user namespace, whose only job is to exist while
//! its parent writes the namespace's `uid_map`/`gid_map` and opens `/proc/PID/ns/user`.

use std::io;

use rustix::process::{Pid, Signal, WaitOptions};

/// A child in its own user namespace, parked in `pause()`. Drop kills and reaps it, so no
/// process outlives this value; an open namespace fd keeps the namespace alive without it.
#[derive(Debug)]
pub struct UsernsChild {
    pid: Pid,
}

impl UsernsChild {
    /// Clones a child with `CLONE_NEWUSER`. Its user namespace starts with empty maps
    /// (every id unmapped) until the parent writes them.
    pub fn spawn() -> io::Result<Self> {
        let parent = rustix::process::getpid().as_raw_nonzero().get();
        let flags = libc::CLONE_NEWUSER as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
        // SAFETY: a raw clone without CLONE_VM is a fork: the child gets a copy of the
        // address space and runs on its copy of this stack. The parent may be
        // multi-threaded, so the child only makes async-signal-safe raw syscalls
        // (`park_child` never returns and never allocates or takes a lock).
        let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
        match ret {
            r if r < 0 => Err(io::Error::last_os_error()),
            0 => park_child(parent),
            r => {
                let pid = i32::try_from(r)
                    .ok()
                    .and_then(Pid::from_raw)
                    .ok_or_else(|| io::Error::other(format!("clone returned bad pid {r}")))?;
                Ok(Self { pid })
            }
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }
}

impl Drop for UsernsChild {
    fn drop(&mut self) {
        // The pid cannot be reused before we reap it, so the signal reaches our child.
        if let Err(e) = rustix::process::kill_process(self.pid, Signal::KILL) {
            tracing::debug!(
                pid = self.pid.as_raw_nonzero().get(),
                "kill userns child: {e}"
            );
        }
        loop {
            match rustix::process::waitpid(Some(self.pid), WaitOptions::empty()) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::debug!(
                        pid = self.pid.as_raw_nonzero().get(),
                        "reap userns child: {e}"
                    );
                    break;
                }
                Ok(_) => break,
            }
        }
    }
}

/// The child's whole life: die with the parent thread, otherwise wait for SIGKILL.
fn park_child(parent: i32) -> ! {
    // SAFETY: prctl, getppid, pause and _exit are async-signal-safe syscalls that touch no
    // memory of ours; nothing here allocates, locks or unwinds.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        // The parent may have died before PDEATHSIG was armed.
        if libc::getppid() != parent {
            libc::_exit(1);
        }
        loop {
            libc::pause();
        }
    }
}
