//! One audit record per broker decision, written before anything is done: a JSON line
//! appended to the audit log (for machines), and the same facts to syslog through
//! `/dev/log` (for journald or rsyslog, when one listens; without a listener the syslog
//! copy is skipped silently). An allowed operation gets a second line once performed, with
//! its result (`"result": "ok"` or `"failed"` and the error), so a broker that dies half-way
//! still leaves the decision on record.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub const DEFAULT_LOG: &str = "/var/log/shiftfs/audit.log";
pub const DEFAULT_SYSLOG: &str = "/dev/log";

#[derive(Debug, thiserror::Error)]
#[error("cannot append to the audit log {path}: {source}")]
pub struct Error {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// What was asked, by whom, and what the broker said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Record {
    pub uid: u32,
    pub pid: u32,
    /// The caller's executable, from `/proc/PID/exe`, when readable.
    pub exe: Option<String>,
    pub op: String,
    pub source: Option<String>,
    pub target: Option<String>,
    pub map: Option<String>,
    pub backend: Option<String>,
    pub allowed: bool,
    /// Why it was refused.
    pub reason: Option<String>,
    /// On the line written after an allowed operation: `ok` or `failed`.
    pub result: Option<String>,
    /// Why an allowed operation failed.
    pub error: Option<String>,
}

impl Record {
    /// The line recording how the allowed operation `self` ended.
    pub fn outcome(&self, result: Result<(), &str>) -> Self {
        Self {
            result: Some(if result.is_ok() { "ok" } else { "failed" }.into()),
            error: result.err().map(str::to_string),
            ..self.clone()
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    record: &'a Record,
}

pub struct Audit {
    path: PathBuf,
    syslog: Option<PathBuf>,
    /// One writer at a time, so lines never interleave.
    lock: Mutex<()>,
}

impl Audit {
    /// Appends to `path`; sends to the datagram socket `syslog` if given and present.
    pub fn new(path: &Path, syslog: Option<&Path>) -> Self {
        Self {
            path: path.to_path_buf(),
            syslog: syslog.map(Path::to_path_buf),
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records one decision. An error means the decision went unrecorded: the caller must
    /// then refuse whatever it was about to do.
    pub fn record(&self, rec: &Record) -> Result<(), Error> {
        let line = Line {
            time: rfc3339(SystemTime::now()),
            record: rec,
        };
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        let err = |source| Error {
            path: self.path.clone(),
            source,
        };
        let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(err)?;
        // One write call: O_APPEND keeps a whole line together even with other writers.
        f.write_all(text.as_bytes()).map_err(err)?;
        if let Some(sock) = &self.syslog {
            send_syslog(sock, rec);
        }
        Ok(())
    }
}

/// authpriv facility: the decisions are about who may do what.
const LOG_AUTHPRIV: u8 = 10 << 3;
const LOG_WARNING: u8 = 4;
const LOG_INFO: u8 = 6;

fn send_syslog(sock: &Path, rec: &Record) {
    let failed = rec.result.as_deref() == Some("failed");
    let severity = if rec.allowed && !failed {
        LOG_INFO
    } else {
        LOG_WARNING
    };
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let verdict = match (rec.allowed, rec.result.as_deref()) {
        (false, _) => "refused",
        (true, None) => "allowed",
        (true, Some("ok")) => "done",
        (true, Some(_)) => "failed",
    };
    let msg = format!(
        "<{}>shiftfsd[{}]: {} uid={} pid={} exe={} op={} source={} target={} map={} backend={}{}",
        LOG_AUTHPRIV | severity,
        std::process::id(),
        verdict,
        rec.uid,
        rec.pid,
        opt(&rec.exe),
        rec.op,
        opt(&rec.source),
        opt(&rec.target),
        opt(&rec.map),
        opt(&rec.backend),
        rec.reason
            .as_ref()
            .or(rec.error.as_ref())
            .map(|r| format!(": {r}"))
            .unwrap_or_default(),
    );
    let Ok(s) = UnixDatagram::unbound() else {
        return;
    };
    // A missing or full /dev/log must not hold up a decision: the file has the record.
    let _ = s.set_nonblocking(true);
    let _ = s.send_to(msg.as_bytes(), sock);
}

/// `2026-11-30T05:44:04Z`, without a date crate.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(allowed: bool) -> Record {
        Record {
            uid: 1000,
            pid: 42,
            exe: Some("/usr/bin/shiftfs".into()),
            op: "mount".into(),
            source: Some("/srv/a".into()),
            target: Some("/home/alice/m".into()),
            map: Some("b:0:100000:10".into()),
            backend: Some("auto".into()),
            allowed,
            reason: (!allowed).then(|| "source /srv/a is not allowed".into()),
            ..Record::default()
        }
    }

    #[test]
    fn appends_one_json_line_per_decision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/audit.log");
        let a = Audit::new(&path, None);
        a.record(&rec(false)).unwrap();
        a.record(&rec(true)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["allowed"], false);
        assert_eq!(lines[0]["reason"], "source /srv/a is not allowed");
        assert_eq!(lines[0]["uid"], 1000);
        assert_eq!(lines[0]["pid"], 42);
        assert_eq!(lines[0]["exe"], "/usr/bin/shiftfs");
        assert_eq!(lines[0]["map"], "b:0:100000:10");
        assert_eq!(lines[1]["allowed"], true);
        assert!(lines[1]["reason"].is_null());
        assert!(lines[1]["result"].is_null());
        a.record(&rec(true).outcome(Err("mount failed: busy")))
            .unwrap();
        let last: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(last["result"], "failed");
        assert_eq!(last["error"], "mount failed: busy");
        let time = lines[0]["time"].as_str().unwrap();
        assert!(time.len() == 20 && time.ends_with('Z'), "{time}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn an_unwritable_log_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        let a = Audit::new(&dir.path().join("file/audit.log"), None);
        let e = a.record(&rec(true)).unwrap_err().to_string();
        assert!(e.contains("file/audit.log"), "{e}");
    }

    #[test]
    fn sends_to_syslog_and_skips_a_missing_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("log.sock");
        let listener = UnixDatagram::bind(&sock).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let a = Audit::new(&dir.path().join("audit.log"), Some(&sock));
        a.record(&rec(false)).unwrap();
        let mut buf = [0u8; 2048];
        let n = listener.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(msg.starts_with("<84>shiftfsd["), "{msg}");
        assert!(
            msg.contains("refused uid=1000 pid=42") && msg.contains(": source /srv/a"),
            "{msg}"
        );
        let gone = Audit::new(
            &dir.path().join("audit.log"),
            Some(&dir.path().join("none")),
        );
        gone.record(&rec(true)).unwrap();
    }

    #[test]
    fn formats_dates() {
        let t = |s| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(t(0), "1970-01-01T00:00:00Z");
        assert_eq!(t(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(t(1_796_017_444), "2026-11-30T05:44:04Z");
    }
}
