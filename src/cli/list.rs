//! `shiftfs list`: the shifted mounts on this machine.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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
                shown(&r.target),
                shown(&r.source),
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

/// A path as one printable cell: control characters, backslashes and bytes that are not
/// UTF-8 become `\xNN`, as findmnt shows them, so a name cannot break the table or drive
/// the terminal.
fn shown(path: &Path) -> String {
    let mut out = String::new();
    for chunk in path.as_os_str().as_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                let mut buf = [0; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn control_bytes_backslashes_and_invalid_utf8_are_escaped() {
        let p = Path::new(OsStr::from_bytes(b"/mnt/a b\n\x1b[2J\\\xffz\xc3\xa9"));
        assert_eq!(shown(p), "/mnt/a b\\x0a\\x1b[2J\\x5c\\xffz\u{e9}");
        assert_eq!(shown(Path::new("/plain/path")), "/plain/path");
    }
}
