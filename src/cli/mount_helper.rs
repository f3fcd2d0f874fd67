//! `mount.shiftfs`: mount(8)'s helper, so `mount -t shiftfs -o map=... SOURCE TARGET` and
//! fstab lines work. mount(8) calls it as `mount.shiftfs SOURCE TARGET [-sfnv] [-N NS]
//! [-o OPTIONS] [-t TYPE]`; it goes through the same code path as `shiftfs mount`.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};
use std::path::Path;

use shiftfs::mount;
use shiftfs::options::{OptionSet, Request};

pub fn run(args: Vec<OsString>) -> anyhow::Result<()> {
    let mut positional = Vec::new();
    let mut opts = OptionSet::default();
    let mut fake = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                let o = it.next().context("-o needs options")?;
                opts.apply(&o.to_string_lossy())?;
            }
            Some("-t" | "-N") => {
                it.next();
            }
            Some(flags) if flags.starts_with('-') && flags.len() > 1 => {
                for c in flags.chars().skip(1) {
                    match c {
                        'f' => fake = true,
                        's' | 'n' | 'v' => {}
                        _ => bail!("unknown flag -{c} (mount.shiftfs takes -s -f -n -v -o -t -N)"),
                    }
                }
            }
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [source, target] = <[PathBuf; 2]>::try_from(positional)
        .map_err(|_| anyhow::anyhow!("usage: mount.shiftfs SOURCE TARGET [-o map=MAP,...]"))?;
    let req = Request {
        source,
        target,
        target_root: None,
        mapping: match opts.mapping() {
            // The library's advice names the `shiftfs mount` flags, which mount(8) has not.
            Err(shiftfs::options::Error::NoMap) => {
                bail!(
                    "no map given: add -o map=MAP (e.g. map=b:0:100000:65536), or uidmap= and gidmap="
                )
            }
            m => m?,
        },
        flags: opts.flags,
        backend: opts.backend.unwrap_or_default(),
        recursive: opts.recursive,
        fuse: opts.fuse,
    };
    if fake {
        return Ok(());
    }
    let source = std::fs::canonicalize(&req.source).unwrap_or_else(|_| req.source.clone());
    match super::mount::mount_request(req, false) {
        // `mount -a` asks again for fstab lines that are mounted: libmount cannot tell an
        // idmapped bind of SOURCE from another mount. Mounted with the same source is done.
        Err(e)
            if e.downcast_ref::<mount::Error>().is_some_and(
                |e| matches!(e, mount::Error::AlreadyMounted { of, .. } if Path::new(of) == source),
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}
