//! `shiftfs list`: the shifted mounts on this machine.

use shiftfs::mount::{Backend, Record};

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    let recs = Record::all();
    if recs.is_empty() {
        println!("no shifted mounts");
        return Ok(());
    }
    let rows: Vec<[String; 7]> = recs
        .iter()
        .map(|r| {
            let (pid, state) = match (r.backend, r.pid) {
                (Backend::Fuse, Some(p)) if r.daemon_alive() => (p.to_string(), "active"),
                (Backend::Fuse, p) => (
                    p.map(|p| p.to_string()).unwrap_or_default(),
                    "dead (run shiftfs umount)",
                ),
                _ => ("-".to_string(), "active"),
            };
            [
                r.target.display().to_string(),
                r.source.display().to_string(),
                r.backend.to_string(),
                r.map.clone(),
                r.options.clone(),
                pid,
                state.to_string(),
            ]
        })
        .collect();
    let head = [
        "TARGET", "SOURCE", "BACKEND", "MAP", "OPTIONS", "PID", "STATE",
    ];
    let mut width = head.map(str::len);
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{s}");
    };
    line(head.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    Ok(())
}
