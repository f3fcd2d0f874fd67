//! `shiftfs gc`: unmount the shifted mounts of containers that are gone.

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
    if report.cleaned.is_empty() && report.kept.is_empty() {
        println!("no containers to clean up");
    }
    Ok(())
}
