//! `shiftfs gc`: unmount the shifted mounts of containers that are gone, and the shared
//! idmappable FUSE mounts nothing is stacked on any more.

use shiftfs::mount::Shared;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    let report = shiftfs::oci::gc(None);
    for id in &report.cleaned {
        println!("cleaned up container {id}");
    }
    for (id, why) in &report.kept {
        println!("kept container {id}: {why}");
    }
    let mut shared = 0;
    for (path, what) in shiftfs::mount::gc_shared() {
        let path = path.display();
        match what {
            Ok(Shared::Released) => println!("unmounted unused shared mount {path}"),
            Ok(Shared::Busy) => {
                println!("kept unused shared mount {path}: files are open through it")
            }
            Ok(Shared::InUse | Shared::Gone) => continue,
            Err(e) => println!("kept shared mount {path}: {e}"),
        }
        shared += 1;
    }
    if report.cleaned.is_empty() && report.kept.is_empty() && shared == 0 {
        println!("nothing to clean up");
    }
    Ok(())
}
