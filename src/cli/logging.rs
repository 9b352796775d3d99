//! Where log lines go and in which form: `--log-format text|json|journald` (or
//! `log_format` in the `serve` config file). Without either, the journal is used when
//! stderr is systemd's journal stream (`JOURNAL_STREAM`, see systemd.exec(5)), else
//! plain text on stderr. The filter is `RUST_LOG` (default `info`) in every form.
//!
//! What the forms carry: `text` is one human-readable line; `json` is one JSON object a
//! line (`timestamp`, `level`, `target`, `fields` with `message` and the event's own
//! fields, `span`/`spans` with the fields of the enclosing spans); `journald` sends each
//! event natively to journald with its fields as journal fields (upper-cased, e.g.
//! `EXPORT=`, `PATH=`), `PRIORITY=` from the level and `SYSLOG_IDENTIFIER=cryptvol`.
//! Key material never reaches a log field: secret types (`Dek`, `SecretBytes`,
//! passphrases) have neither `Debug` nor `Display`, so they cannot be recorded.

use std::io::IsTerminal as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use clap::ValueEnum;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;

/// The form of the log output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum LogFormat {
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
    /// Native journald entries with structured fields (falls back to text on stderr
    /// when the journal socket is absent).
    Journald,
}

impl LogFormat {
    /// The value as written in the config file (`log_format = "json"`).
    fn parse(s: &str) -> Option<LogFormat> {
        <LogFormat as ValueEnum>::from_str(s, true).ok()
    }
}

/// The form to use: the flag, else the config file's `log_format`, else journald when
/// stderr is connected to the journal, else text. An unusable config value is reported
/// (as a warning in the chosen form) and ignored; `serve` reports the file's other errors.
pub(super) fn choose(
    flag: Option<LogFormat>,
    config: Option<&Path>,
) -> (LogFormat, Option<String>) {
    if let Some(f) = flag {
        return (f, None);
    }
    let mut warning = None;
    if let Some(path) = config {
        match config_log_format(path) {
            Ok(Some(f)) => return (f, None),
            Ok(None) => {}
            Err(w) => warning = Some(w),
        }
    }
    let detected = if stderr_is_journal(std::env::var_os("JOURNAL_STREAM").as_deref()) {
        LogFormat::Journald
    } else {
        LogFormat::Text
    };
    (detected, warning)
}

/// The `log_format` key of a config file, if the file sets it.
fn config_log_format(path: &Path) -> Result<Option<LogFormat>, String> {
    let Ok(file) = crate::config::load(path) else {
        return Ok(None);
    };
    match file.log_format.as_deref() {
        None => Ok(None),
        Some(s) => LogFormat::parse(s).map(Some).ok_or_else(|| {
            format!(
                "{}: log_format = {s:?} is not one of \"text\", \"json\", \"journald\"; using the default",
                path.display()
            )
        }),
    }
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM=DEV:INO`
/// naming stderr's device and inode), as systemd.exec(5) says to check.
fn stderr_is_journal(journal_stream: Option<&std::ffi::OsStr>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|v| parse_journal_stream(v.to_str()?)) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

/// `DEV:INO` as two decimal numbers.
fn parse_journal_stream(s: &str) -> Option<(u64, u64)> {
    let (dev, ino) = s.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Installs the global subscriber. `warning` (from [`choose`]) is logged once it is up.
pub(super) fn init(format: LogFormat, warning: Option<String>) {
    let fallback = match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier("cryptvol".to_string());
                let _ = tracing_subscriber::registry()
                    .with(layer.with_filter(env_filter()))
                    .try_init();
                None
            }
            Err(e) => Some(format!(
                "journald is not reachable ({e}); logging text to stderr instead"
            )),
        },
        LogFormat::Json => {
            let _ = tracing_subscriber::fmt()
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .with_env_filter(env_filter())
                .with_writer(std::io::stderr)
                .try_init();
            None
        }
        LogFormat::Text => {
            init_text();
            None
        }
    };
    if let Some(why) = &fallback {
        init_text();
        tracing::warn!("{why}");
    }
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
}

fn init_text() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_two_numbers() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(parse_journal_stream("1:"), None);
    }

    #[test]
    fn stderr_is_journal_only_when_dev_and_inode_match() {
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some(std::ffi::OsStr::new("0:0"))));
        let m = std::fs::metadata("/proc/self/fd/2").expect("stderr");
        let v = format!("{}:{}", m.dev(), m.ino());
        assert!(stderr_is_journal(Some(std::ffi::OsStr::new(&v))));
    }

    #[test]
    fn flag_wins_and_config_values_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "log_format = \"json\"\n").expect("write");
        assert_eq!(choose(Some(LogFormat::Text), Some(&p)).0, LogFormat::Text);
        assert_eq!(choose(None, Some(&p)), (LogFormat::Json, None));
        std::fs::write(&p, "log_format = \"xml\"\n").expect("write");
        let (_, w) = choose(None, Some(&p));
        assert!(w.expect("warning").contains("\"xml\""));
    }
}
