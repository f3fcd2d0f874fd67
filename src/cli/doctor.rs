//! `shiftfs doctor [SOURCE]`: what this machine supports, and what to do about the rest.

use std::path::PathBuf;

use shiftfs::doctor;

#[derive(clap::Args)]
pub struct Args {
    /// The tree whose filesystem is probed for idmapped mount support.
    #[arg(default_value = "/")]
    source: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.source.is_dir() {
        anyhow::bail!(
            "{} is not a directory; name the tree you want to shift (default /)",
            args.source.display()
        );
    }
    let checks = doctor::checks(&args.source);
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in &checks {
        println!("{:<7}  {:<width$}  {}", c.status, c.name, c.detail);
        if let Some(advice) = &c.advice {
            println!(
                "{:<7}  {:<width$}  -> {advice} (needed for {})",
                "", "", c.needed_for
            );
        }
    }
    println!();
    let summary = doctor::backend_summary(&checks);
    for (backend, usable) in &summary {
        let verdict = if *usable { "usable" } else { "not usable" };
        println!(
            "--backend {backend}: {verdict} for {}",
            args.source.display()
        );
    }
    if !summary.iter().any(|(_, usable)| *usable) {
        anyhow::bail!(
            "no backend can mount {} here; see the MISSING lines above",
            args.source.display()
        );
    }
    Ok(())
}
