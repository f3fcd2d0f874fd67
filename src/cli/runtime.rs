//! `shiftfs-runtime` (this binary under that name, or `shiftfs runtime -- ARGS`): an OCI
//! runtime wrapper that shifts a container's root and idmapped volumes, then runs the real
//! runtime (runc by default). See `shiftfs::oci`.

use std::ffi::OsString;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The runtime command line: `[--runtime-path PATH] [GLOBAL OPTIONS] COMMAND [ARGS]`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

/// Runs the wrapper; the exit code is the real runtime's.
pub fn run(args: Vec<OsString>) -> ExitCode {
    // Ctrl-C, Ctrl-\ and a hang-up reach the whole foreground process group: the runtime gets
    // them (and passes them on to the container), while the wrapper, which unmounts once a
    // foreground `run` returns, must outlive them. Blocked, not ignored: the runtime starts
    // with an empty signal mask (std resets it for every child), so it gets them as usual.
    if let Err(e) =
        shiftfs::sys::daemon::block_signals(&[libc::SIGINT, libc::SIGQUIT, libc::SIGHUP])
    {
        tracing::warn!("cannot block terminal signals: {e}");
    }
    match shiftfs::oci::main(&args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("shiftfs-runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
