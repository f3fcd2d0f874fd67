//! The `shiftfs` command line: argument handling and output only; the work is in the library.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shiftfs",
    version,
    about = "Shifting bind mounts for user-namespaced containers"
)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount SOURCE at TARGET with every owner id shifted through a map.
    Mount(cli::mount::Args),
    /// Unmount a shifted mount and stop its daemon (also cleans up a dead mount).
    #[command(alias = "unmount")]
    Umount(cli::umount::Args),
    /// List the shifted mounts on this machine.
    #[command(alias = "status")]
    List(cli::list::Args),
    /// Rewrite a tree's ids on disk from one map to another.
    Shift(cli::shift::Args),
    /// Report which ids a tree uses, what a map leaves unmapped, and hazards.
    Scan(cli::scan::Args),
    /// Report what this machine supports and what to do about what is missing.
    Doctor(cli::doctor::Args),
    /// Unmount the shifted mounts of containers that are gone (never one in use), and shared
    /// idmappable FUSE mounts no mount is stacked on any more.
    Gc(cli::gc::Args),
    /// Act as an OCI runtime wrapper (what `shiftfs-runtime`, a link to this binary, does).
    Runtime(cli::runtime::Args),
    /// Make or adopt an image for mounts through the broker (for users who are not root).
    Image(cli::image::Args),
}

fn main() -> ExitCode {
    // Invoked as mount(8)'s helper: `mount.shiftfs SOURCE TARGET [-o OPTS] ...`.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    // The FUSE daemon is this binary started again with --daemon-child, whatever its name.
    let name = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let as_helper =
        name.starts_with("mount.") && !std::env::args_os().any(|a| a == "--daemon-child");
    // Invoked by a container engine as its runtime: `shiftfs-runtime [runc arguments]`.
    if name == "shiftfs-runtime" {
        cli::init_logging(0);
        return cli::runtime::run(std::env::args_os().skip(1).collect());
    }
    // Die quietly on a closed pipe (`shiftfs list | head`), as Unix tools do.
    shiftfs::sys::process::default_sigpipe();
    if as_helper {
        cli::init_logging(0);
        return cli::finish(cli::mount_helper::run(
            std::env::args_os().skip(1).collect(),
        ));
    }
    // The broker's helper that locks a detached mount's flags (see broker::lock).
    if let Some(fd) = std::env::args().nth(1).and_then(|a| {
        a.strip_prefix(shiftfs::broker::lock::HELPER_ARG)?
            .strip_prefix('=')?
            .parse()
            .ok()
    }) {
        cli::init_logging(0);
        return cli::finish(cli::broker::lock_helper(fd, std::env::args_os().nth(2)));
    }
    let args = Cli::parse();
    cli::init_logging(args.verbose);
    let result = match args.command {
        Command::Mount(a) => cli::mount::run(a),
        Command::Umount(a) => cli::umount::run(a),
        Command::List(a) => cli::list::run(a),
        Command::Shift(a) => cli::shift::run(a),
        Command::Scan(a) => cli::scan::run(a),
        Command::Doctor(a) => cli::doctor::run(a),
        Command::Gc(a) => cli::gc::run(a),
        Command::Runtime(a) => return cli::runtime::run(a.args),
        Command::Image(a) => cli::image::run(a),
    };
    cli::finish(result)
}
