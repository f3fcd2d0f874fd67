//! The client side of the broker, for `shiftfs` run by a user who is not root: one request,
//! one reply line, and the fd of a detached mount when one comes with it.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::protocol::{MAX_LINE, Request};
use super::server::DEFAULT_SOCKET;

/// Names another broker socket than [`DEFAULT_SOCKET`] (tests, a second broker).
pub const SOCKET_ENV: &str = "SHIFTFS_BROKER";

/// Adopting a large tree takes its time; a broker that says nothing for this long is stuck.
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot reach the shiftfs broker at {path}: {source}; shiftfsd must be running for users \
         other than root (ask the administrator, or set {SOCKET_ENV} to its socket)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the shiftfs broker at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The broker's refusal or failure, as it worded it.
    #[error("the broker says: {0}")]
    Refused(String),
    #[error("the broker sent a reply this shiftfs does not understand: {0}")]
    BadReply(String),
}

/// The broker's socket: `$SHIFTFS_BROKER`, else the default.
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| DEFAULT_SOCKET.into(), PathBuf::from)
}

/// A successful reply: its fields, and the fd that came with it, if any.
#[derive(Debug)]
pub struct Answer {
    pub fields: Value,
    pub fd: Option<OwnedFd>,
}

/// Sends one request and reads its reply.
pub fn ask(socket: &Path, req: &Request) -> Result<Answer, Error> {
    let io = |source| Error::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
    stream
        .write_all(format!("{}\n", req.to_line()).as_bytes())
        .map_err(io)?;
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 8192];
    while !line.ends_with(b"\n") {
        let (n, got) = crate::sys::fdpass::recv_with_fds(stream.as_fd(), &mut buf).map_err(io)?;
        fds.extend(got);
        if n == 0 {
            return Err(Error::BadReply("the broker closed the connection".into()));
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > MAX_LINE * 16 {
            return Err(Error::BadReply("reply too long".into()));
        }
    }
    let text = String::from_utf8_lossy(&line);
    let fields: Value =
        serde_json::from_str(text.trim_end()).map_err(|e| Error::BadReply(e.to_string()))?;
    if fields["ok"] != true {
        let why = fields["error"].as_str().unwrap_or("no reason given");
        return Err(Error::Refused(why.to_string()));
    }
    Ok(Answer {
        fields,
        fd: fds.into_iter().next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::protocol::Empty;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// A one-shot server that checks the request line and answers with `reply` (and a file).
    fn serve(reply: &'static str, with_fd: bool) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert_eq!(line, "{\"op\":\"list\",\"version\":1}\n");
            if with_fd {
                let f = tempfile::tempfile().unwrap();
                let n = crate::sys::fdpass::send_with_fd(s.as_fd(), reply.as_bytes(), f.as_fd())
                    .unwrap();
                (&s).write_all(&reply.as_bytes()[n..]).unwrap();
            } else {
                (&s).write_all(reply.as_bytes()).unwrap();
            }
        });
        (dir, path)
    }

    #[test]
    fn reads_the_reply_and_its_fd() {
        let (_d, path) = serve("{\"ok\":true,\"detached\":true}\n", true);
        let a = ask(&path, &Request::List(Empty {})).unwrap();
        assert_eq!(a.fields["detached"], true);
        assert!(a.fd.is_some());
    }

    #[test]
    fn a_refusal_is_an_error_with_the_brokers_words() {
        let (_d, path) = serve("{\"ok\":false,\"error\":\"no way\"}\n", false);
        let e = ask(&path, &Request::List(Empty {})).unwrap_err();
        assert_eq!(e.to_string(), "the broker says: no way");
    }

    #[test]
    fn says_what_to_do_when_no_broker_listens() {
        let dir = tempfile::tempdir().unwrap();
        let e = ask(&dir.path().join("none"), &Request::List(Empty {})).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("shiftfsd must be running") && text.contains(SOCKET_ENV),
            "{text}"
        );
    }
}
