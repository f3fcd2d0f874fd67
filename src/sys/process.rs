//! Process-wide housekeeping for the backgrounded daemon.

/// Restores SIGPIPE's default action (Rust's runtime ignores it, which turns a closed pipe
/// into a panic in `println!`).
pub fn default_sigpipe() {
    // SAFETY: setting a standard signal to SIG_DFL installs no handler and touches no memory;
    // called at start-up before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Raises RLIMIT_NOFILE as far as allowed (as root up to `fs.nr_open`, else to the hard
/// limit) and returns the soft limit in force. Process-wide: for the daemon's start (a tree
/// of a million entries walked twice holds an fd per remembered inode) and the offline
/// walks of the CLI.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    let soft = cur.current.unwrap_or(u64::MAX);
    let hard = cur.maximum.unwrap_or(u64::MAX);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    // As root we may raise the hard limit up to fs.nr_open; else up to the hard limit.
    for max in nr_open.into_iter().chain([hard]) {
        if soft >= max {
            return soft;
        }
        let want = rustix::process::Rlimit {
            current: Some(max),
            maximum: Some(max.max(hard)),
        };
        if setrlimit(Resource::Nofile, want).is_ok() {
            tracing::debug!("RLIMIT_NOFILE raised to {max}");
            return max;
        }
    }
    tracing::warn!("cannot raise RLIMIT_NOFILE above {soft}");
    soft
}
