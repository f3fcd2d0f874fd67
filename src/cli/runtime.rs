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
    match shiftfs::oci::main(&args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("shiftfs-runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
