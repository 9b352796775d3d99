//! Log output forms: `--log-format json` (one JSON object a line, with the event's
//! fields), `log_format` in the serve config file, and native journald output (to a
//! journal socket of the test's own, bind-mounted over /run in a private mount namespace
//! with `unshare`, since tracing-journald always sends to /run/systemd/journal/socket),
//! with the fallback to text when no journal listens.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require, s, Env};

fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

/// The "export opened" event of a JSON log, checked for the common fields.
fn export_opened<'a>(lines: &'a [serde_json::Value], export: &str) -> &'a serde_json::Value {
    let ev = lines
        .iter()
        .find(|v| v["fields"]["message"] == "export opened")
        .unwrap_or_else(|| panic!("no 'export opened' event in {lines:#?}"));
    assert_eq!(ev["fields"]["export"], export, "{ev}");
    assert_eq!(ev["level"], "INFO", "{ev}");
    assert_eq!(ev["target"], "cryptvol::cli::serve", "{ev}");
    let ts = ev["timestamp"].as_str().expect("timestamp");
    assert!(
        chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
        "timestamp {ts:?} is not RFC 3339"
    );
    ev
}

#[test]
fn json_lines_carry_timestamp_level_target_and_fields() {
    let env = Env::new();
    let vol = env.create("vol.img", "16M", &[]);
    let srv = env.serve(
        &[&format!("data={}", vol.display())],
        &["--log-format", "json"],
        false,
    );
    let log = srv.stop();
    let lines = json_lines(&log);
    let ev = export_opened(&lines, "data");
    assert_eq!(ev["fields"]["size"], 16u64 << 20, "{ev}");
    assert_eq!(ev["fields"]["path"], s(&vol), "{ev}");
    // Shutdown lines are JSON too.
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "stopped; all volumes flushed"),
        "{log}"
    );
}

#[test]
fn config_file_sets_the_log_format_and_the_flag_overrides_it() {
    let env = Env::new();
    let vol = env.create("vol.img", "16M", &[]);
    let cfg = env.path("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "log_format = \"json\"\n[[export]]\nname = \"cfg\"\npath = \"{}\"\n",
            vol.display()
        ),
    )
    .expect("config");
    let srv = env.serve(&[], &["--config", s(&cfg)], false);
    let lines = json_lines(&srv.stop());
    export_opened(&lines, "cfg");

    let srv = env.serve(&[], &["--config", s(&cfg), "--log-format", "text"], false);
    let log = srv.stop();
    assert!(log.contains("export opened"), "{log}");
    assert!(
        log.lines().all(|l| !l.trim_start().starts_with('{')),
        "--log-format text still wrote JSON:\n{log}"
    );
}

#[test]
fn a_bad_config_log_format_is_a_warning_naming_the_value() {
    let env = Env::new();
    let vol = env.create("vol.img", "16M", &[]);
    let cfg = env.path("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "log_format = \"xml\"\n[[export]]\nname = \"cfg\"\npath = \"{}\"\n",
            vol.display()
        ),
    )
    .expect("config");
    let log = env.serve(&[], &["--config", s(&cfg)], false).stop();
    assert!(log.contains("log_format = \"xml\""), "{log}");
    assert!(log.contains("export opened"), "{log}");
}

/// `cryptvol serve --log-format journald` in a private mount namespace whose /run is
/// `run_dir`; returns its stderr once it has served and stopped.
fn serve_with_run_dir(env: &Env, run_dir: &Path, vol: &Path) -> String {
    require("unshare");
    let sock = env.path("j.sock");
    let log = env.path("j.log");
    let script = "mount --make-rprivate / && mount --bind \"$1\" /run && shift && exec \"$@\"";
    let mut child = Command::new("unshare")
        .env("CRYPTVOL_KEYSTORE", env.keystore())
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .args(["--mount", "sh", "-c", script, "sh", s(run_dir)])
        .arg(common::bin())
        .args(["serve", "--log-format", "journald", "--unix", s(&sock)])
        .arg(format!("data={}", vol.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("serve exited early ({st}): {}", read(&log));
        }
        assert!(Instant::now() < deadline, "not ready: {}", read(&log));
        std::thread::sleep(Duration::from_millis(50));
    }
    common::run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let st = child.wait().expect("wait");
    assert!(st.success(), "{}", read(&log));
    read(&log)
}

/// The fields of one datagram of journald's native protocol, as `KEY=VALUE`: each field
/// is `KEY=VALUE\n`, or `KEY\n` + a 64-bit little-endian length + the value + `\n`.
fn parse_native(mut d: &[u8]) -> Vec<String> {
    let mut fields = Vec::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(&d[..nl]).into_owned();
        d = &d[nl + 1..];
        if line.contains('=') {
            fields.push(line);
            continue;
        }
        let len_bytes: [u8; 8] = d[..8].try_into().expect("length");
        let len = usize::try_from(u64::from_le_bytes(len_bytes)).expect("len");
        let value = String::from_utf8_lossy(&d[8..8 + len]).into_owned();
        fields.push(format!("{line}={value}"));
        d = &d[8 + len + 1..];
    }
    fields
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn journald_entries_carry_structured_fields() {
    let env = Env::new();
    let vol = env.create("vol.img", "16M", &[]);
    let run_dir = env.path("run");
    std::fs::create_dir_all(run_dir.join("systemd/journal")).expect("mkdir");
    let journal = UnixDatagram::bind(run_dir.join("systemd/journal/socket")).expect("bind");
    let stderr = serve_with_run_dir(&env, &run_dir, &vol);
    journal.set_nonblocking(true).expect("nonblocking");
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n) = journal.recv(&mut buf) {
        entries.push(parse_native(&buf[..n]));
    }
    let opened = entries
        .iter()
        .find(|e| e.iter().any(|f| f == "MESSAGE=export opened"))
        .unwrap_or_else(|| panic!("no 'export opened' entry in {entries:#?}\nstderr: {stderr}"));
    for field in [
        "F_EXPORT=data",
        &format!("F_PATH={}", vol.display()),
        "F_SIZE=16777216",
        "SYSLOG_IDENTIFIER=cryptvol",
        "TARGET=cryptvol::cli::serve",
        "PRIORITY=5",
    ] {
        assert!(
            opened.iter().any(|f| f == field),
            "{field} missing in {opened:?}"
        );
    }
    assert!(
        !stderr.contains("export opened"),
        "journald output also went to stderr: {stderr}"
    );
}

#[test]
fn journald_without_a_journal_falls_back_to_text_on_stderr() {
    let env = Env::new();
    let vol = env.create("vol.img", "16M", &[]);
    let run_dir = env.path("empty-run");
    std::fs::create_dir_all(&run_dir).expect("mkdir");
    let stderr = serve_with_run_dir(&env, &run_dir, &vol);
    assert!(stderr.contains("journald is not reachable"), "{stderr}");
    assert!(stderr.contains("export opened"), "{stderr}");
}
