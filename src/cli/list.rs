//! `shiftfs list`: the shifted mounts on this machine.

use shiftfs::pathtext;
use shiftfs::registry::{Record, State};

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
        .map(|(r, state)| {
            let pid = r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            let state = match state {
                State::Active => "active",
                State::Draining => "draining (unmounted; serving files still open)",
                State::Dead => "dead (run shiftfs umount)",
            };
            [
                pathtext::show(&r.target),
                pathtext::show(&r.source),
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
