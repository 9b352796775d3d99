//! The client side, blocking, used by the CLI: one request, its progress lines, and the
//! final answer.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::Path;

use serde_json::{Map, Value};

use super::protocol::{
    parse_reply, ProgressEvent, ProtocolError, Reply, Request, DEFAULT_CONTROL_PATH,
};

/// Errors talking to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the cryptvol daemon at {path}: {source}. Is `cryptvol serve` running with this control socket (--control PATH, default {DEFAULT_CONTROL_PATH} for root)?")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the daemon closed the connection without an answer")]
    NoAnswer,
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Sends `req` to the daemon at `path`, calls `on_progress` for each progress line, and
/// returns the fields of the final `{"ok":true,...}` line.
pub fn request(
    path: &Path,
    req: &Request,
    mut on_progress: impl FnMut(&ProgressEvent),
) -> Result<Map<String, Value>, ControlError> {
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    s.write_all(req.to_line().as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(s);
    loop {
        let mut line = String::new();
        // Bounded: one line of the answer is at most 1 MiB.
        let n = (&mut reader)
            .take(1 << 20)
            .read_line(&mut line)
            .map_err(io)?;
        if n == 0 {
            return Err(ControlError::NoAnswer);
        }
        match parse_reply(&line)? {
            Reply::Progress(ev) => on_progress(&ev),
            Reply::Ok(m) => return Ok(m),
            Reply::Err(e) => return Err(ControlError::Refused(e)),
        }
    }
}
