//! `shiftfsd`: the privileged broker that lets non-root users ask for shifted mounts.
//! Runs in the foreground; under systemd it takes the listening socket from socket
//! activation (`LISTEN_FDS`), otherwise it binds `--socket` itself.
//!
//! A binary of its own rather than a `shiftfs broker` subcommand: the root daemon carries
//! none of the CLI's surface, and units, audit records and `ps` name it apart.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use shiftfs::broker::{audit, policy, server};

#[derive(Parser)]
#[command(
    name = "shiftfsd",
    version,
    about = "The shiftfs broker: shifted mounts for non-root users under an administrator's policy"
)]
struct Args {
    /// The socket to listen on when not socket-activated.
    #[arg(long, default_value = server::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[arg(long, default_value = policy::DEFAULT_PATH)]
    policy: PathBuf,
    #[arg(long, default_value = "/etc/subuid")]
    subuid: PathBuf,
    #[arg(long, default_value = "/etc/subgid")]
    subgid: PathBuf,
    #[arg(long, default_value = "/etc/passwd")]
    passwd: PathBuf,
    #[arg(long, default_value = "/etc/group")]
    group: PathBuf,
    #[arg(long, default_value = audit::DEFAULT_LOG)]
    audit_log: PathBuf,
    /// The syslog socket; "none" logs decisions to the audit file only.
    #[arg(long, default_value = audit::DEFAULT_SYSLOG)]
    syslog: String,
    /// Connections served at once, in all.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Connections one user may hold at once.
    #[arg(long, default_value_t = 32)]
    max_per_user: usize,
    /// Seconds a client has to send a whole request.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// The `shiftfs` binary to start as the FUSE daemon of FUSE-backend mounts [default:
    /// `shiftfs` next to shiftfsd].
    #[arg(long, value_name = "PATH")]
    shiftfs: Option<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let level = ["warn", "info", "debug", "trace"][usize::from(args.verbose.min(3))];
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shiftfsd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if !(args.timeout > 0.0 && args.timeout <= 3600.0) {
        bail!("--timeout must be between 0 and 3600 seconds");
    }
    let config = server::Config {
        socket: args.socket,
        policy: args.policy,
        subuid: args.subuid,
        subgid: args.subgid,
        passwd: args.passwd,
        group: args.group,
        audit_log: args.audit_log,
        syslog: (args.syslog != "none").then(|| PathBuf::from(args.syslog)),
        max_connections: args.max_connections.max(1),
        max_per_uid: args.max_per_user.max(1),
        timeout: Duration::from_secs_f64(args.timeout),
        shiftfs: args.shiftfs.unwrap_or_else(server::default_shiftfs),
    };
    let listener = match activated()? {
        Some(l) => l,
        None => server::bind(&config.socket)?,
    };
    server::serve(listener, config)?;
    Ok(())
}

/// The socket systemd passed (`LISTEN_PID` is us, `LISTEN_FDS` = 1: fd 3), if any.
fn activated() -> anyhow::Result<Option<UnixListener>> {
    let for_us = std::env::var("LISTEN_PID").ok() == Some(std::process::id().to_string());
    let Some(n) = std::env::var("LISTEN_FDS").ok().filter(|_| for_us) else {
        return Ok(None);
    };
    // SAFETY: nothing is inherited by children (the broker execs none), and the variables
    // are removed before any thread starts.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if n != "1" {
        bail!("socket activation passed {n} fds; shiftfsd takes exactly one listening socket");
    }
    // SAFETY: fd 3 is the socket systemd passed; nothing in this process has taken it yet
    // (this runs first thing in main, once).
    let fd = unsafe { shiftfs::sys::inherit::take(3) }.context("socket activation: fd 3")?;
    Ok(Some(UnixListener::from(fd)))
}
