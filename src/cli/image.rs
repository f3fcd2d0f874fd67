//! `shiftfs image`: the two steps that give a user a read-write image the broker will mount
//! (one owned by the image range, so nothing written through a mount is a host identity).
//! Both are done by the broker, for root too: it knows the image range from its policy.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Make an empty image directory DIR (in a directory you own), owned by the image
    /// range's root.
    Make { dir: PathBuf },
    /// Shift the tree DIR you own into the image range: every inode must be owned by an
    /// id the map names (your uid or your subordinate ids), or nothing is changed.
    Adopt {
        dir: PathBuf,
        /// `[u:|g:|b:]INNER:OUTER:COUNT`: OUTER are the ids on disk now, INNER the image ids
        /// they become (0 = the container's root), e.g. for a rootless podman tree of a
        /// user with uid 1000 and subuids 100000-165535: b:0:1000:1,b:1:100000:65536.
        #[arg(long, short = 'm')]
        map: String,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Make { dir } => super::broker::make_image(&dir),
        Command::Adopt { dir, map } => super::broker::adopt(&dir, &map),
    }
}
