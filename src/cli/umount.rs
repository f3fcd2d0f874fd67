//! `shiftfs umount`: unmount a shifted mount of either backend and stop its daemon.

use std::path::PathBuf;

use anyhow::bail;

#[derive(clap::Args)]
pub struct Args {
    /// Mount points to unmount.
    #[arg(required = true)]
    pub targets: Vec<PathBuf>,
    /// Detach now even if busy; the mount goes away when the last user leaves.
    #[arg(long, short = 'l')]
    pub lazy: bool,
}

/// Tries every target, as umount(8) does, and fails at the end if any failed.
pub fn run(args: Args) -> anyhow::Result<()> {
    if super::broker::needed() {
        return super::broker::umount(&args.targets, args.lazy);
    }
    let mut failed = 0;
    for target in &args.targets {
        match shiftfs::mount::unmount(target, args.lazy) {
            Ok(done) if done.was_dead => eprintln!(
                "shiftfs: {}: the daemon had exited; removed the dead mount",
                target.display()
            ),
            Ok(_) => {}
            Err(e) => {
                failed += 1;
                let e = anyhow::Error::from(e).context(format!("umount {}", target.display()));
                if args.targets.len() == 1 {
                    return Err(e);
                }
                eprintln!("shiftfs: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} targets could not be unmounted",
            args.targets.len()
        );
    }
    Ok(())
}
