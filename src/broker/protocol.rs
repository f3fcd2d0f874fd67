//! The broker's wire protocol, version 1: JSON lines. Each request is one line holding one
//! object, `{"version":1,"op":"...",...}`; each reply is one line, `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`. Unknown fields are errors (a client that thinks it sent
//! an option the broker ignored is worse off than one told so), and so is any line longer
//! than `MAX_LINE`. Nothing here panics on any input.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

pub const VERSION: u32 = 1;
/// The longest request line, newline included.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Auto,
    Kernel,
    Fuse,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub source: String,
    /// The directory to mount on; absent with `detached`.
    #[serde(default)]
    pub target: Option<String>,
    /// Return a detached mount fd over `SCM_RIGHTS` instead of mounting on `target`.
    #[serde(default)]
    pub detached: bool,
    /// `[u:|g:|b:]INNER:OUTER:COUNT` entries, as on the command line.
    pub map: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub suid: bool,
    #[serde(default)]
    pub dev: bool,
    #[serde(default)]
    pub backend: Backend,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Umount {
    pub target: String,
}

/// `make-image`: create an empty image directory (owned by the image range's first id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathArg {
    pub path: String,
}

/// `adopt`: shift a tree the caller owns into the image range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adopt {
    pub path: String,
    /// `[u:|g:|b:]INNER:OUTER:COUNT`: OUTER are the host ids on disk now, INNER the image ids
    /// they become, counted from the image range's first id (0 = the container's root).
    pub map: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Version(Empty),
    List(Empty),
    Mount(Mount),
    Umount(Umount),
    MakeImage(PathArg),
    Adopt(Adopt),
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Request::Version(_) => "version",
            Request::List(_) => "list",
            Request::Mount(_) => "mount",
            Request::Umount(_) => "umount",
            Request::MakeImage(_) => "make-image",
            Request::Adopt(_) => "adopt",
        }
    }

    /// The request as one line (without the newline), for clients and tests.
    pub fn to_line(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("version".into(), VERSION.into());
        }
        v.to_string()
    }
}

/// Parses one request line (without its newline) into a request, or the error message the
/// reply carries.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    if line.len() >= MAX_LINE {
        return Err(format!("request longer than {MAX_LINE} bytes"));
    }
    let text = std::str::from_utf8(line).map_err(|e| format!("request is not UTF-8: {e}"))?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("request is not valid JSON: {e}"))?;
    let Value::Object(mut obj) = value else {
        return Err("request must be a JSON object".into());
    };
    match obj.remove("version") {
        Some(v) if v == json!(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "unsupported protocol version {v}; this broker speaks version {VERSION}"
            ));
        }
        None => {
            return Err(format!(
                "request has no \"version\" (this broker speaks {VERSION})"
            ));
        }
    }
    if !obj.get("op").is_some_and(Value::is_string) {
        return Err(
            "request has no \"op\" string (one of version, list, mount, umount, make-image, adopt)"
                .into(),
        );
    }
    serde_json::from_value(Value::Object(obj)).map_err(|e| format!("bad request: {e}"))
}

/// `{"ok":true, ...fields}` as one line with its newline.
pub fn ok(fields: Value) -> String {
    let mut m = Map::new();
    m.insert("ok".into(), true.into());
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    format!("{}\n", Value::Object(m))
}

/// `{"ok":false,"error":...}` as one line with its newline.
pub fn error(message: &str) -> String {
    format!("{}\n", json!({"ok": false, "error": message}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_op() {
        assert_eq!(
            parse(br#"{"version":1,"op":"version"}"#),
            Ok(Request::Version(Empty {}))
        );
        assert_eq!(
            parse(br#"{"op":"list","version":1}"#),
            Ok(Request::List(Empty {}))
        );
        let m = parse(
            br#"{"version":1,"op":"mount","source":"/s","target":"/t","map":"b:0:1:1","read_only":true,"backend":"fuse"}"#,
        )
        .unwrap();
        let Request::Mount(m) = m else {
            panic!("{m:?}")
        };
        assert_eq!((m.source.as_str(), m.target.as_deref()), ("/s", Some("/t")));
        assert!(m.read_only && !m.suid && !m.detached);
        assert_eq!(m.backend, Backend::Fuse);
        assert_eq!(
            parse(br#"{"version":1,"op":"umount","target":"/t"}"#),
            Ok(Request::Umount(Umount {
                target: "/t".into()
            }))
        );
        assert!(matches!(
            parse(br#"{"version":1,"op":"make-image","path":"/h/i"}"#),
            Ok(Request::MakeImage(_))
        ));
        assert!(matches!(
            parse(br#"{"version":1,"op":"adopt","path":"/h/i","map":"b:0:1000:1"}"#),
            Ok(Request::Adopt(_))
        ));
    }

    #[test]
    fn round_trips_through_to_line() {
        let r = Request::Mount(Mount {
            source: "/s".into(),
            target: None,
            detached: true,
            map: "b:0:1:1".into(),
            read_only: false,
            suid: false,
            dev: true,
            backend: Backend::Kernel,
        });
        assert_eq!(parse(r.to_line().as_bytes()), Ok(r));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (line, want) in [
            (
                &br#"{"version":2,"op":"list"}"#[..],
                "unsupported protocol version 2",
            ),
            (br#"{"op":"list"}"#, "no \"version\""),
            (br#"{"version":1}"#, "no \"op\""),
            (br#"{"version":1,"op":"format-disk"}"#, "format-disk"),
            (
                br#"{"version":1,"op":"list","uid":0}"#,
                "unknown field `uid`",
            ),
            (
                br#"{"version":1,"op":"umount","target":"/t","uid":0}"#,
                "unknown field `uid`",
            ),
            (
                br#"{"version":1,"op":"mount","source":"/s"}"#,
                "missing field `map`",
            ),
            (
                br#"{"version":1,"op":"mount","source":"/s","map":"x","backend":"zfs"}"#,
                "zfs",
            ),
            (br#"[1,2]"#, "must be a JSON object"),
            (br#"{"version":1,"op":"list""#, "not valid JSON"),
            (b"\xff\xfe", "not UTF-8"),
            (b"", "not valid JSON"),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(line));
        }
        let long = vec![b' '; MAX_LINE];
        assert!(parse(&long).unwrap_err().contains("longer than 65536"));
    }

    #[test]
    fn replies_are_single_lines() {
        assert_eq!(ok(json!({"version": 1})), "{\"ok\":true,\"version\":1}\n");
        let e = error("no\nway \"here\"");
        assert_eq!(e.matches('\n').count(), 1);
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["error"], "no\nway \"here\"");
        assert_eq!(v["ok"], false);
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn never_panics_on_near_json(s in r#"\{("(version|op|source|map|target|x)":(1|"mount"|"list"|null|\[|\{|"b:0:1:1"|true),?){0,6}\}?"#) {
            let _ = parse(s.as_bytes());
        }
    }
}
