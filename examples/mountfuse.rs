//! Experiment helper: `mountfuse SOURCE TARGET MAP [--no-passthrough] [--ttl SECS] [--threads N]`
//! mounts SOURCE shifted at TARGET and serves until TARGET is unmounted.

use std::time::Duration;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [source, target, map, rest @ ..] = args.as_slice() else {
        anyhow::bail!(
            "usage: mountfuse SOURCE TARGET MAP [--no-passthrough] [--ttl SECS] [--threads N]"
        );
    };
    let mut opts = shiftfs::backend::fuse::Options::new(shiftfs::idmap::IdMapping::parse(map)?);
    opts.fsname = source.clone();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--no-passthrough" => opts.passthrough = false,
            "--ttl" => {
                opts.attr_timeout =
                    Duration::from_secs_f64(it.next().map_or(Ok(1.0), |s| s.parse())?)
            }
            "--threads" => opts.threads = it.next().map_or(Ok(0), |s| s.parse())?,
            "--max-fds" => opts.max_inode_fds = it.next().map_or(Ok(0), |s| s.parse())?,
            "--dev" => opts.flags.dev = true,
            "--suid" => opts.flags.suid = true,
            "--ro" => opts.flags.read_only = true,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    let fd = rustix::fs::open(
        source.as_str(),
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let session = shiftfs::backend::fuse::mount(fd, std::path::Path::new(target), opts)?;
    eprintln!("mounted {source} at {target}; unmount it to stop");
    session.wait()?;
    eprintln!("unmounted");
    Ok(())
}
