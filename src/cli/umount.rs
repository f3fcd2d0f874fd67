//! `shiftfs umount`: unmount a shifted mount of either backend and stop its daemon.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// Mount points to unmount.
    #[arg(required = true)]
    pub targets: Vec<PathBuf>,
    /// Detach now even if busy; the mount goes away when the last user leaves.
    #[arg(long, short = 'l')]
    pub lazy: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    for target in &args.targets {
        let done = shiftfs::mount::unmount(target, args.lazy)
            .with_context(|| format!("umount {}", target.display()))?;
        if done.was_dead {
            eprintln!(
                "shiftfs: {}: the daemon had exited; removed the dead mount",
                target.display()
            );
        }
    }
    Ok(())
}
