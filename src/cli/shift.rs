//! `shiftfs shift`: rewrite a tree's ids on disk from one map to another.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use shiftfs::idmap::IdMapping;
use shiftfs::offline::shift::{self, Change, OnUnmapped, Options, Outcome, Progress};
use shiftfs::offline::walk::WalkOptions;
use shiftfs::xattr::IdKind;

#[derive(clap::Args)]
#[command(after_help = "\
Maps use the [u:|g:|b:]INNER:OUTER:COUNT syntax (kernel uid_map order: INNER is the id as \
stored in a canonical image); `identity` is the unshifted layout. The tree holds ids as FROM's \
outer side and will hold them as TO's: each id x becomes TO.outer(FROM.inner(x)). So \
`--map M` shifts a canonical tree to M's outer ids, `--map M --reverse` undoes it, and \
`--from A --to B` moves a tree shifted for A to B.

The tree's map is recorded in trusted.shiftfs.map on its root: a --from that does not match \
is refused, so a tree is never shifted twice by mistake. A shift that was killed half way is \
finished by running the same command again.")]
pub struct Args {
    /// The tree to shift.
    tree: PathBuf,
    /// Shift a canonical tree to this map (same as --from identity --to MAP).
    #[arg(long, conflicts_with_all = ["from", "to"], required_unless_present_any = ["from", "to"])]
    map: Option<String>,
    /// With --map: undo it (same as --from MAP --to identity).
    #[arg(long, requires = "map")]
    reverse: bool,
    /// The map the tree's ids are laid out for now (default identity).
    #[arg(long)]
    from: Option<String>,
    /// The map to lay the tree's ids out for (default identity).
    #[arg(long)]
    to: Option<String>,
    /// What to do with ids the maps do not cover; without it such ids stop the shift
    /// before anything is written.
    #[arg(long, value_name = "keep|overflow", num_args = 0..=1, default_missing_value = "keep",
          require_equals = true, value_parser = parse_policy)]
    skip_unmapped: Option<OnUnmapped>,
    /// Descend into other file systems mounted below the tree (default: stay on the
    /// tree's own mount, like `du -x`; mount points are listed and skipped).
    #[arg(long)]
    cross_file_systems: bool,
    /// Print what would change and write nothing.
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Also shift inodes that have hard links outside the tree (they change there too);
    /// without it such links stop the shift before anything is written.
    #[arg(long)]
    allow_external_links: bool,
}

fn parse_policy(s: &str) -> Result<OnUnmapped, String> {
    match s {
        "keep" => Ok(OnUnmapped::Keep),
        "overflow" => Ok(OnUnmapped::Overflow),
        _ => Err(format!("'{s}': expected keep or overflow")),
    }
}

/// A map argument: `identity` or `[u:|g:|b:]INNER:OUTER:COUNT,...`.
pub fn parse_map(s: &str) -> anyhow::Result<IdMapping> {
    if s == "identity" {
        return Ok(IdMapping::identity());
    }
    IdMapping::parse(s).with_context(|| format!("map '{s}'"))
}

/// An indicatif bar on a terminal, nothing otherwise.
pub struct Bar {
    tty: bool,
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Bar {
    pub fn new() -> Self {
        Bar {
            tty: std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Option<indicatif::ProgressBar>)) {
        if self.tty {
            f(&mut self.bar.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }
}

impl Default for Bar {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Bar {
    fn phase(&self, name: &'static str, total: Option<u64>) {
        self.with(|b| {
            let bar = match total {
                Some(n) => indicatif::ProgressBar::new(n).with_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:>9} [{bar:40}] {pos}/{len} inodes, {per_sec}, eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                ),
                None => indicatif::ProgressBar::new_spinner().with_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} {msg} {pos} inodes, {per_sec}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                ),
            };
            bar.set_message(name);
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            *b = Some(bar);
        });
    }
    fn set(&self, done: u64) {
        self.with(|b| {
            if let Some(b) = b {
                b.set_position(done);
            }
        });
    }
    fn finish(&self) {
        self.with(|b| {
            if let Some(b) = b.take() {
                b.finish_and_clear();
            }
        });
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Changing owners and trusted.* xattrs needs root; find out before a journal is written.
    if !args.dry_run && !rustix::process::geteuid().is_root() {
        anyhow::bail!(
            "shifting a tree needs root (CAP_CHOWN, CAP_SYS_ADMIN); run it as root, or use --dry-run"
        );
    }
    let opts = options(&args)?;
    shiftfs::sys::process::raise_nofile_limit();
    let out = shift::shift(&args.tree, &opts, &Bar::new())
        .with_context(|| format!("shift {}", args.tree.display()))?;
    report(&args, &opts, &out);
    Ok(())
}

fn options(args: &Args) -> anyhow::Result<Options> {
    let (from, to) = match &args.map {
        Some(m) => {
            let m = parse_map(m)?;
            if args.reverse {
                (m, IdMapping::identity())
            } else {
                (IdMapping::identity(), m)
            }
        }
        None => (
            args.from
                .as_deref()
                .map(parse_map)
                .transpose()?
                .unwrap_or_else(IdMapping::identity),
            args.to
                .as_deref()
                .map(parse_map)
                .transpose()?
                .unwrap_or_else(IdMapping::identity),
        ),
    };
    Ok(Options {
        from,
        to,
        unmapped: args.skip_unmapped.unwrap_or_default(),
        walk: WalkOptions {
            cross_file_systems: args.cross_file_systems,
        },
        dry_run: args.dry_run,
        allow_external_links: args.allow_external_links,
    })
}

fn report(args: &Args, opts: &Options, out: &Outcome) {
    let (f, t) = (shift::map_name(&opts.from), shift::map_name(&opts.to));
    if out.nothing_to_do {
        println!(
            "{}: already laid out for {t}; nothing to do",
            args.tree.display()
        );
        return;
    }
    warn(args.dry_run, opts, out);
    if args.dry_run {
        print_changes(&out.changes);
        if out.resumed {
            println!(
                "dry run: would finish the interrupted shift from {f} to {t} ({} inodes journaled)",
                out.changed
            );
        } else {
            println!(
                "dry run: {} of {} inodes would change from {f} to {t}; nothing written",
                out.changed, out.inodes
            );
        }
        return;
    }
    if out.resumed {
        println!(
            "{}: finished the interrupted shift from {f} to {t} ({} inodes journaled)",
            args.tree.display(),
            out.changed
        );
    } else {
        println!(
            "{}: shifted {} of {} inodes from {f} to {t}",
            args.tree.display(),
            out.changed,
            out.inodes
        );
    }
}

/// What the shift left out or reached beyond the tree: on stderr, so that a dry run's
/// list of changes on stdout stays clean.
fn warn(dry_run: bool, opts: &Options, out: &Outcome) {
    for p in &out.mount_points_skipped {
        eprintln!("shiftfs: skipped mount point {p} (use --cross-file-systems to shift it too)");
    }
    if out.external_links.1 > 0 {
        eprintln!(
            "shiftfs: warning: {} inode(s) also have names outside the tree and {} there too: {}",
            out.external_links.1,
            if dry_run { "would change" } else { "changed" },
            out.external_links.0.join(", ")
        );
    }
    if out.skipped_unmapped > 0 {
        eprintln!(
            "shiftfs: {} use(s) of unmapped ids were {}",
            out.skipped_unmapped,
            match opts.unmapped {
                OnUnmapped::Overflow => "written as 65534",
                _ => "left as they are",
            }
        );
    }
}

fn print_changes(changes: &[Change]) {
    let ids = |v: &Vec<(IdKind, u32)>| {
        v.iter()
            .map(|(k, id)| format!("{k}:{id}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    for c in changes {
        let mut parts = Vec::new();
        if c.uid.0 != c.uid.1 {
            parts.push(format!("uid {} -> {}", c.uid.0, c.uid.1));
        }
        if c.gid.0 != c.gid.1 {
            parts.push(format!("gid {} -> {}", c.gid.0, c.gid.1));
        }
        for (name, before, after) in &c.xattrs {
            parts.push(format!("{name} [{}] -> [{}]", ids(before), ids(after)));
        }
        println!("{}: {}", c.path, parts.join("; "));
    }
}
