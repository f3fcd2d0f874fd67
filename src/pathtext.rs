//! Paths as one line of printable text and back: control characters, backslashes and bytes
//! that are not UTF-8 become `\xNN` (as findmnt shows them). `shiftfs list` prints paths
//! this way, so a name cannot break the table or drive the terminal, and records store them
//! this way, since JSON strings must be UTF-8 and paths need not be.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub fn show(path: &Path) -> String {
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

/// The inverse of [`show`]; a `\` not followed by `xNN` stays as it is.
pub fn parse(text: &str) -> PathBuf {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 2..i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], b.get(i + 1), hex) {
            (b'\\', Some(b'x'), Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_bytes_backslashes_and_invalid_utf8_round_trip() {
        let p = Path::new(OsStr::from_bytes(b"/mnt/a b\n\x1b[2J\\\xffz\xc3\xa9"));
        assert_eq!(show(p), "/mnt/a b\\x0a\\x1b[2J\\x5c\\xffz\u{e9}");
        assert_eq!(parse(&show(p)), p);
        assert_eq!(show(Path::new("/plain/path")), "/plain/path");
        assert_eq!(parse("a\\xzz\\"), PathBuf::from("a\\xzz\\"));
    }
}
