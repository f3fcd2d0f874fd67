//! What the FUSE daemon's supervisor split and sandbox need that rustix lacks or keeps
//! unsafe: fork, a private mount namespace, signal masks and waits, and overwriting the
//! process's command line.

use std::io;

use rustix::process::Pid;

/// Which side of a fork this is.
pub enum Forked {
    Child,
    Parent(Pid),
}

/// The number of threads of this process (`Threads:` in `/proc/self/status`).
fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

fn single_threaded() -> io::Result<()> {
    match thread_count()? {
        1 => Ok(()),
        n => Err(io::Error::other(format!(
            "the process already runs {n} threads; this must happen before any is started"
        ))),
    }
}

/// fork(2), refused unless this process has a single thread.
pub fn fork() -> io::Result<Forked> {
    single_threaded()?;
    // SAFETY: with one thread, the child is a complete copy: no lock can be held by a
    // thread that does not exist in it, so it may go on running ordinary Rust code.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(
            Pid::from_raw(pid).ok_or_else(|| io::Error::other("fork returned pid 0"))?,
        )),
    }
}

/// Moves this process into a new mount namespace, a copy of the current one. The kernel
/// refuses it (EINVAL) to a process whose threads share the filesystem context, so it must
/// come before the first thread is started; checked here to give a clearer error.
pub fn unshare_mount_namespace() -> io::Result<()> {
    single_threaded()?;
    // SAFETY: CLONE_NEWNS changes no memory and no file descriptor of the process.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }?;
    Ok(())
}

/// Moves this process into a new user namespace (with no ids mapped) and a copy of its
/// mount namespace owned by that user namespace. The kernel locks the flags of every mount
/// copied into a namespace so owned (`ro`, `nosuid`, `nodev`, ... can no longer be cleared).
/// Single-threaded only, as [`unshare_mount_namespace`].
pub fn unshare_user_and_mount_namespace() -> io::Result<()> {
    single_threaded()?;
    // SAFETY: CLONE_NEWUSER and CLONE_NEWNS change no memory and no file descriptor.
    unsafe {
        rustix::thread::unshare_unsafe(
            rustix::thread::UnshareFlags::NEWUSER | rustix::thread::UnshareFlags::NEWNS,
        )
    }?;
    Ok(())
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before sigaddset uses it,
    // and both only write to the local set (they fail only for invalid signal numbers,
    // which then stay out of the set).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn sigmask(how: libc::c_int, signals: &[i32]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: `set` is an initialised sigset_t; the old mask is not asked for.
    match unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Blocks `signals` in the calling thread (and in threads it starts later).
pub fn block_signals(signals: &[i32]) -> io::Result<()> {
    sigmask(libc::SIG_BLOCK, signals)
}

/// Unblocks `signals` in the calling thread.
pub fn unblock_signals(signals: &[i32]) -> io::Result<()> {
    sigmask(libc::SIG_UNBLOCK, signals)
}

/// Sets `signals` to be ignored by the whole process.
pub fn ignore_signals(signals: &[i32]) -> io::Result<()> {
    for &s in signals {
        // SAFETY: SIG_IGN installs no handler and touches no memory.
        if unsafe { libc::signal(s, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Waits for one of `signals`, which must be blocked in every thread, and returns it.
pub fn wait_signal(signals: &[i32]) -> io::Result<i32> {
    let set = sigset(signals);
    loop {
        // SAFETY: `set` is an initialised sigset_t; no siginfo is asked for.
        let r = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Overwrites this process's command line (what `/proc/PID/cmdline` and `ps` show) with
/// `args`, in the memory the kernel laid it out in at exec, padding with NUL bytes; what
/// does not fit is cut. Only while single-threaded: std keeps pointers to the original
/// arguments and would read the new ones.
pub fn set_cmdline(args: &[&str]) -> io::Result<()> {
    single_threaded()?;
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields 48 and 49 (arg_start, arg_end); counting starts after the `(comm)` field 2.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> io::Result<usize> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no field {n} in /proc/self/stat")))
    };
    let (start, end) = (field(48)?, field(49)?);
    if start == 0 || end <= start {
        return Err(io::Error::other("no argument area in /proc/self/stat"));
    }
    let len = end - start;
    let mut text: Vec<u8> = args.iter().flat_map(|a| a.bytes().chain([0])).collect();
    text.resize(len, 0);
    // The last byte stays NUL, or the kernel would read on into the environment.
    text[len - 1] = 0;
    // SAFETY: [arg_start, arg_end) is the argument block the kernel copied onto our stack
    // at exec; it stays mapped and writable for the life of the process. The only other
    // users are std's argv pointers, read by `env::args()`, which no other thread can call
    // now (single-threaded, checked above); they then see the new text.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), start as *mut u8, len) };
    Ok(())
}
