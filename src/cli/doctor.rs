//! `shiftfs doctor [SOURCE]`: what this machine supports, and what to do about the rest.

use std::path::PathBuf;

use shiftfs::doctor;

#[derive(clap::Args)]
pub struct Args {
    /// The tree whose filesystem is probed for idmapped mount support (default /); when
    /// named, also whether setuid files planted in it would work for host users.
    source: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let named = args.source.is_some();
    let source = args.source.unwrap_or_else(|| PathBuf::from("/"));
    if !source.is_dir() {
        anyhow::bail!(
            "{} is not a directory; name the tree you want to shift (default /)",
            source.display()
        );
    }
    let mut checks = doctor::checks(&source);
    if named {
        checks.push(doctor::source_exposure(&source));
    }
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
        println!("--backend {backend}: {verdict} for {}", source.display());
    }
    if !summary.iter().any(|(_, usable)| *usable) {
        anyhow::bail!(
            "no backend can mount {} here; see the MISSING lines above",
            source.display()
        );
    }
    Ok(())
}
