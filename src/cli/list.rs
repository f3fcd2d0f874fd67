//! `shiftfs list`: the shifted mounts on this machine.

use shiftfs::pathtext;
use shiftfs::registry::{Record, State};

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let rows = if super::broker::needed() {
        let mut rows = super::broker::list()?;
        for row in &mut rows {
            if let Ok(uid) = row[5].parse() {
                row[5] = user_name(&passwd, uid);
            }
        }
        // The broker does not say what a mount shares.
        rows.into_iter()
            .map(|[t, s, b, m, o, u, p, st]| [t, s, b, m, o, u, p, "-".into(), st])
            .collect()
    } else {
        own_rows(&passwd)
    };
    if rows.is_empty() {
        println!("no shifted mounts");
        return Ok(());
    }
    let head = [
        "TARGET", "SOURCE", "BACKEND", "MAP", "OPTIONS", "OWNER", "PID", "SHARED", "STATE",
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

/// Every mount's row, from the records on this machine.
fn own_rows(passwd: &str) -> Vec<[String; 9]> {
    let recs = Record::all();
    recs.iter()
        .map(|(r, state)| {
            let pid = r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            let shared = sharing(&recs, r);
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
                r.owner
                    .map_or_else(|| "-".into(), |uid| user_name(passwd, uid)),
                pid,
                shared,
                state.to_string(),
            ]
        })
        .collect()
}

/// How many mounts share the daemon of `rec`, when more than this one: the FUSE sessions
/// of one daemon (they show the same pid), or the kernel idmapped mounts stacked on one
/// shared FUSE mount (that mount's row counts them too). "N mounts", else "-".
fn sharing(recs: &[(Record, State)], rec: &Record) -> String {
    let stacked_on = |lower: &std::path::Path| {
        recs.iter()
            .filter(|(r, _)| r.lower().as_deref() == Some(lower))
            .count()
    };
    let n = match (rec.lower(), rec.pid) {
        (Some(lower), _) => stacked_on(&lower),
        (None, Some(pid)) => recs
            .iter()
            .filter(|(r, _)| r.pid == Some(pid) && r.pid_start == rec.pid_start)
            .count()
            .max(stacked_on(&rec.target)),
        (None, None) => 0,
    };
    if n > 1 {
        format!("{n} mounts")
    } else {
        "-".into()
    }
}

/// The name `/etc/passwd` gives `uid`, else the number.
fn user_name(passwd: &str, uid: u32) -> String {
    passwd
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            f.nth(1)?.parse::<u32>().ok().filter(|&u| u == uid)?;
            Some(name.to_string())
        })
        .next()
        .unwrap_or_else(|| uid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_named_from_passwd() {
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:61001:61001::/home/a:/bin/sh\n";
        assert_eq!(user_name(passwd, 0), "root");
        assert_eq!(user_name(passwd, 61001), "alice");
        assert_eq!(user_name(passwd, 42), "42");
    }
}
