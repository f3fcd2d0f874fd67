//! `shiftfs scan`: which ids a tree uses, what a map leaves unmapped, and hazards.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use shiftfs::offline::scan::{self, IdUse, Report};
use shiftfs::offline::shift::Progress;
use shiftfs::offline::walk::WalkOptions;

#[derive(clap::Args)]
pub struct Args {
    /// The tree to scan.
    tree: PathBuf,
    /// Also report which ids this map (`[u:|g:|b:]INNER:OUTER:COUNT,...`) leaves unmapped,
    /// i.e. what `shiftfs shift` from the tree's recorded map (identity if none) to MAP
    /// would stop on.
    #[arg(long)]
    map: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Descend into other file systems mounted below the tree (default: like `du -x`).
    #[arg(long)]
    cross_file_systems: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let map = args
        .map
        .as_deref()
        .map(super::shift::parse_map)
        .transpose()?;
    shiftfs::sys::process::raise_nofile_limit();
    let bar = super::shift::Bar::new();
    bar.phase("scanning", None);
    let report = scan::scan(
        &args.tree,
        map.as_ref(),
        WalkOptions {
            cross_file_systems: args.cross_file_systems,
        },
        &|n| bar.set(n),
    );
    bar.finish();
    let report = report.with_context(|| format!("scan {}", args.tree.display()))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        table(&mut out, &report)?;
    }
    Ok(())
}

fn ids(out: &mut impl Write, title: &str, ids: &[IdUse]) -> std::io::Result<()> {
    writeln!(
        out,
        "{title:>10} {:>10} {:>11} {:>16}",
        "owners", "acl entries", "capability roots"
    )?;
    for u in ids {
        writeln!(
            out,
            "{:>10} {:>10} {:>11} {:>16}",
            u.id, u.owners, u.acl_entries, u.capability_roots
        )?;
    }
    Ok(())
}

fn list(out: &mut impl Write, title: &str, items: &[String]) -> std::io::Result<()> {
    if !items.is_empty() {
        writeln!(out, "{title} ({}):", items.len())?;
        for i in items {
            writeln!(out, "  {i}")?;
        }
    }
    Ok(())
}

fn table(out: &mut impl Write, r: &Report) -> std::io::Result<()> {
    writeln!(out, "tree: {}  ({} inodes)", r.root, r.inodes)?;
    writeln!(
        out,
        "recorded map: {}",
        r.recorded_map.as_deref().unwrap_or("none (unshifted)")
    )?;
    if let Some(s) = &r.interrupted_shift {
        writeln!(
            out,
            "INTERRUPTED SHIFT: {s} (re-run that shift to finish it)"
        )?;
    }
    writeln!(out)?;
    ids(out, "uid", &r.uids)?;
    writeln!(out)?;
    ids(out, "gid", &r.gids)?;
    if let Some(u) = &r.unmapped {
        writeln!(out)?;
        if u.uids.is_empty() && u.gids.is_empty() {
            writeln!(out, "map {} covers every id", u.map)?;
        } else {
            let join = |v: &[IdUse]| {
                v.iter()
                    .map(|i| i.id.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            writeln!(out, "map {} leaves unmapped:", u.map)?;
            writeln!(out, "  uids: {}", join(&u.uids))?;
            writeln!(out, "  gids: {}", join(&u.gids))?;
        }
    }
    let h = &r.hazards;
    writeln!(out)?;
    list(out, "setuid files", &h.setuid)?;
    list(out, "setgid files", &h.setgid)?;
    let caps: Vec<String> = h
        .capabilities
        .iter()
        .map(|c| format!("{} (v{}, root id {})", c.path, c.version, c.root_id))
        .collect();
    list(out, "files with capabilities", &caps)?;
    list(out, "device nodes", &h.devices)?;
    list(
        out,
        "world-writable directories without the sticky bit",
        &h.world_writable_dirs_without_sticky,
    )?;
    let links: Vec<String> = h
        .hard_links_leaving_tree
        .iter()
        .map(|l| {
            format!(
                "{} ({} links, {} in the tree)",
                l.path, l.nlink, l.links_in_tree
            )
        })
        .collect();
    list(out, "hard links leaving the tree", &links)?;
    list(out, "malformed id-bearing xattrs", &h.malformed_xattrs)?;
    list(out, "mount points skipped", &r.mount_points_skipped)?;
    Ok(())
}
