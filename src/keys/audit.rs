//! The key audit log: one JSON object per line for every key operation (generate, wrap,
//! unwrap, rewrap, state and policy changes, denials), and for every client the server
//! refused to let open an export ([`AccessEvent`]). Never key material.
//!
//! Each record is appended with a single `write(2)` on a descriptor opened with
//! `O_APPEND` (so concurrent writers never interleave inside a line) and synced. The file
//! is created with mode 0600. The format is documented in `docs/keys.md`.
//!
//! Syncs are group-committed: writers of the same log file (same inode) that append at
//! the same time share one `fdatasync` (see [`SyncGroup`]). Every writer still returns
//! only once its own record is on disk, so an operation is never reported done before
//! its record is durable; only the number of syncs drops (at `serve` start-up, the
//! unwrap records of exports opened in parallel).
//!
//! A refused operation (a local key policy, an exec backend's `access_denied`, an AWS IAM
//! or key policy) is a record with `result: "error"`, `error: "AccessDenied"` and a
//! `denied` object naming who was refused (the Unix user, or the AWS principal ARN), the
//! key, the operation and, for AWS KMS, the KMS action (`kms:Decrypt`).
//!
//! Auditing fails closed: when the log cannot be opened, a cryptographic operation is
//! refused before it is attempted; when the record of a successful operation cannot be
//! written, the operation's result is withheld (for a state change, which is already
//! done, the error says so).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{clock, EncryptionContext, KeyError, Principal};

/// File name of the default audit log inside the keystore directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// Context key holding the volume UUID.
const VOLUME_UUID_KEY: &str = "cryptvol:volume-uuid";

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLog {
    path: PathBuf,
    /// The default log lives in the keystore directory and is only written when that
    /// directory exists (cryptvol never creates a keystore just to log into it).
    needs_dir: Option<PathBuf>,
}

/// One audit record.
#[derive(Debug)]
pub struct AuditEvent<'a> {
    /// `generate`, `wrap`, `unwrap`, `rewrap-from`, `rewrap-to`, `create-key`, `enable`, ...
    pub operation: &'a str,
    /// Backend kind: `local`, `passphrase`, `exec`, `aws-kms`.
    pub backend: &'a str,
    /// The resolved key id, else the reference as given (empty for passphrases).
    pub key_id: &'a str,
    /// The encryption context, for operations on a volume's data key.
    pub context: Option<&'a EncryptionContext>,
    pub principal: &'a Principal,
    pub outcome: Result<(), &'a KeyError>,
    /// Operation-specific facts (e.g. `days=7`, an alias, a granted principal).
    pub detail: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct Line<'a> {
    time: String,
    principal: String,
    uid: u32,
    pid: u32,
    operation: &'a str,
    backend: &'a str,
    key_id: &'a str,
    volume_uuid: Option<&'a str>,
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    /// Present when the outcome is an access denial.
    #[serde(skip_serializing_if = "Option::is_none")]
    denied: Option<Denied<'a>>,
}

/// Who was refused what, on which key.
#[derive(serde::Serialize)]
struct Denied<'a> {
    /// The refused principal: a Unix user for local keys, an ARN for AWS KMS.
    principal: &'a str,
    key: &'a str,
    /// The key operation (`unwrap`, `generate`, ...).
    operation: &'a str,
    /// The service's action, for AWS KMS (`kms:Decrypt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'a str>,
}

impl<'a> Denied<'a> {
    fn of(e: &'a KeyError) -> Option<Denied<'a>> {
        match e {
            KeyError::AccessDenied {
                key,
                operation,
                principal,
            } => Some(Denied {
                principal,
                key,
                operation,
                action: None,
            }),
            KeyError::KmsAccessDenied(d) => Some(Denied {
                principal: &d.principal,
                key: &d.key,
                operation: &d.operation,
                action: Some(&d.action),
            }),
            _ => None,
        }
    }
}

/// A client the server refused to let open an export (operation `open-export`, result
/// `denied`): who, which export, from where, why.
#[derive(Debug)]
pub struct AccessEvent<'a> {
    pub export: &'a str,
    /// The listener the client came in on (`unix:///run/cryptvol/nbd.sock`, `tcp://...`).
    pub listener: &'a str,
    /// The client's address (`IP:PORT`, or `unix:PATH`).
    pub peer: &'a str,
    /// `SO_PEERCRED` of a Unix-socket client.
    pub peer_uid: Option<u32>,
    pub peer_gid: Option<u32>,
    pub peer_pid: Option<i32>,
    /// Subject of the client's verified TLS certificate.
    pub tls_subject: Option<&'a str>,
    pub reason: &'a str,
}

#[derive(serde::Serialize)]
struct AccessLine<'a> {
    time: String,
    /// The daemon's user and pid, as in key records.
    principal: String,
    uid: u32,
    pid: u32,
    operation: &'static str,
    result: &'static str,
    export: &'a str,
    listener: &'a str,
    peer: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_subject: Option<&'a str>,
    reason: &'a str,
}

/// An open audit log (or none, when the default log's keystore does not exist).
#[derive(Debug)]
pub struct AuditWriter {
    file: Option<File>,
    path: PathBuf,
    /// The group commit shared by every writer of this file (its inode).
    group: Option<Arc<SyncGroup>>,
}

/// A file's identity: its device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Inode {
    dev: u64,
    ino: u64,
}

/// Group commit of one audit file: appends are numbered in the order their `write(2)`
/// completed, and a sync records the highest number it covers. A writer whose record a
/// sync that started after its write already covered does not sync again.
///
/// Why this keeps the durability of one `fdatasync` per record: a writer takes its
/// number only after its `write(2)` returned; a syncer reads the highest number *before*
/// calling `fdatasync`, so every record it counts was in the file before that sync
/// began, and `fdatasync` on any descriptor of the inode writes all of its data. A sync
/// that fails advances nothing: each writer still waiting then syncs itself and sees the
/// error (fail closed, as before).
#[derive(Debug, Default)]
struct SyncGroup {
    /// Appends whose `write(2)` completed.
    written: AtomicU64,
    /// The highest append number known to be on disk; held while syncing, so syncs of
    /// one file run one at a time and the writers queued behind one share the next.
    synced: Mutex<u64>,
}

impl SyncGroup {
    /// The group of the file `md` describes (one per device and inode, for the process's
    /// life: a handful of audit files at most).
    fn of(md: &std::fs::Metadata) -> Arc<SyncGroup> {
        static GROUPS: Mutex<BTreeMap<Inode, Arc<SyncGroup>>> = Mutex::new(BTreeMap::new());
        let mut groups = GROUPS.lock().unwrap_or_else(PoisonError::into_inner);
        let inode = Inode {
            dev: md.dev(),
            ino: md.ino(),
        };
        groups.entry(inode).or_default().clone()
    }

    /// Makes the append that just completed on `file` durable (syncing, or finding that
    /// a sync begun after it already did).
    fn commit(&self, file: &File) -> std::io::Result<()> {
        let mine = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        if *synced >= mine {
            return Ok(());
        }
        let upto = self.written.load(Ordering::SeqCst);
        file.sync_data()?;
        *synced = upto;
        Ok(())
    }
}

fn audit_err(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::Audit {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl AuditLog {
    /// An explicit log file (`--audit-log PATH`, `audit_log` in the serve config).
    pub fn at(path: &Path) -> AuditLog {
        AuditLog {
            path: path.to_path_buf(),
            needs_dir: None,
        }
    }

    /// The default: `DIR/audit.jsonl`, written only when the keystore `DIR` exists.
    pub fn in_keystore(dir: &Path) -> AuditLog {
        AuditLog {
            path: dir.join(AUDIT_FILE),
            needs_dir: Some(dir.to_path_buf()),
        }
    }

    /// `explicit` when given, else the keystore default.
    pub fn choose(explicit: Option<&Path>, keystore_dir: &Path) -> AuditLog {
        match explicit {
            Some(p) => AuditLog::at(p),
            None => AuditLog::in_keystore(keystore_dir),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the log for appending (creating it with mode 0600).
    pub fn open(&self) -> Result<AuditWriter, KeyError> {
        if let Some(dir) = &self.needs_dir {
            if !dir.is_dir() {
                return Ok(AuditWriter {
                    file: None,
                    path: self.path.clone(),
                    group: None,
                });
            }
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(|e| {
                audit_err(
                    &self.path,
                    format!(
                        "cannot open it for appending ({e}); key operations are refused while \
                         they cannot be audited: fix its permissions or choose another file \
                         with --audit-log PATH"
                    ),
                )
            })?;
        let md = file
            .metadata()
            .map_err(|e| audit_err(&self.path, format!("cannot inspect it: {e}")))?;
        if !md.is_file() {
            return Err(audit_err(&self.path, "not a regular file"));
        }
        Ok(AuditWriter {
            file: Some(file),
            path: self.path.clone(),
            group: Some(SyncGroup::of(&md)),
        })
    }

    /// Opens the log and appends one record.
    pub fn record(&self, event: &AuditEvent<'_>) -> Result<(), KeyError> {
        self.open()?.write(event)
    }

    /// Opens the log and appends the record of a refused client; `daemon` is the
    /// server's own user.
    pub fn record_access(
        &self,
        event: &AccessEvent<'_>,
        daemon: &Principal,
    ) -> Result<(), KeyError> {
        self.open()?.write_line(&encode_access(event, daemon))
    }
}

impl AuditWriter {
    /// Appends one record: one line, one `write(2)`, then fdatasync (group-committed with
    /// concurrent writers of the same file, see [`SyncGroup`]).
    pub fn write(&self, event: &AuditEvent<'_>) -> Result<(), KeyError> {
        self.write_line(&encode(event))
    }

    /// One `resize` record for volume `volume`: grown as `detail` says, or (with
    /// `failure`) a grow that was refused or failed, and why. Offline (`cryptvol resize
    /// FILE`) and online (the daemon's `resize` request) grows write the same record.
    pub fn write_resize(
        &self,
        volume: &uuid::Uuid,
        detail: &str,
        failure: Option<String>,
    ) -> Result<(), KeyError> {
        let ctx = EncryptionContext::for_volume(volume);
        // The record's `error` field names a key error kind: a failed resize is recorded
        // as the volume being in a state that does not allow it.
        let failure = failure.map(|reason| KeyError::InvalidState {
            key: volume.to_string(),
            reason,
        });
        self.write(&AuditEvent {
            operation: "resize",
            backend: "volume",
            key_id: "",
            context: Some(&ctx),
            principal: &Principal::current(),
            outcome: failure.as_ref().map_or(Ok(()), Err),
            detail: Some(detail),
        })
    }

    fn write_line(&self, line: &[u8]) -> Result<(), KeyError> {
        let Some(mut file) = self.file.as_ref() else {
            return Ok(());
        };
        let written = file.write(line).and_then(|n| {
            if n == line.len() {
                Ok(())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short write ({n} of {} bytes)", line.len()),
                ))
            }
        });
        written
            .and_then(|()| match &self.group {
                Some(g) => g.commit(file),
                None => file.sync_data(),
            })
            .map_err(|e| audit_err(&self.path, format!("cannot append a record: {e}")))
    }
}

/// The JSON line of an event, newline-terminated.
fn encode(event: &AuditEvent<'_>) -> Vec<u8> {
    let (result, error, message) = match event.outcome {
        Ok(()) => ("ok", None, None),
        Err(e) => ("error", Some(e.kind()), Some(e.to_string())),
    };
    let line = Line {
        time: clock::now_rfc3339_millis(),
        principal: event.principal.short(),
        uid: event.principal.uid,
        pid: std::process::id(),
        operation: event.operation,
        backend: event.backend,
        key_id: event.key_id,
        volume_uuid: event
            .context
            .and_then(|c| c.0.get(VOLUME_UUID_KEY))
            .map(String::as_str),
        result,
        error,
        message,
        detail: event.detail,
        denied: event.outcome.err().and_then(Denied::of),
    };
    // Serializing plain strings and numbers cannot fail.
    let mut out = serde_json::to_vec(&line).unwrap_or_default();
    out.push(b'\n');
    out
}

/// The JSON line of a refused client, newline-terminated.
fn encode_access(event: &AccessEvent<'_>, daemon: &Principal) -> Vec<u8> {
    let line = AccessLine {
        time: clock::now_rfc3339_millis(),
        principal: daemon.short(),
        uid: daemon.uid,
        pid: std::process::id(),
        operation: "open-export",
        result: "denied",
        export: event.export,
        listener: event.listener,
        peer: event.peer,
        peer_uid: event.peer_uid,
        peer_gid: event.peer_gid,
        peer_pid: event.peer_pid,
        tls_subject: event.tls_subject,
        reason: event.reason,
    };
    // Serializing plain strings and numbers cannot fail.
    let mut out = serde_json::to_vec(&line).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn read_lines(p: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn records_are_json_lines_with_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.jsonl");
        let log = AuditLog::at(&path);
        let me = Principal::from_uid(0);
        let uuid = uuid::Uuid::new_v4();
        let ctx = EncryptionContext::for_volume(&uuid);
        log.record(&AuditEvent {
            operation: "unwrap",
            backend: "local",
            key_id: "mk-1",
            context: Some(&ctx),
            principal: &me,
            outcome: Ok(()),
            detail: None,
        })
        .unwrap();
        let denied = KeyError::AccessDenied {
            key: "mk-1".into(),
            operation: "unwrap".into(),
            principal: "user bob (uid 1001)".into(),
        };
        log.record(&AuditEvent {
            operation: "unwrap",
            backend: "local",
            key_id: "mk-1",
            context: None,
            principal: &me,
            outcome: Err(&denied),
            detail: Some("x=1"),
        })
        .unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["operation"], "unwrap");
        assert_eq!(lines[0]["result"], "ok");
        assert_eq!(lines[0]["volume_uuid"], uuid.to_string());
        assert_eq!(lines[0]["principal"], "root");
        assert_eq!(lines[0]["uid"], 0);
        assert!(lines[0].get("error").is_none());
        assert_eq!(lines[1]["result"], "error");
        assert_eq!(lines[1]["error"], "AccessDenied");
        assert_eq!(lines[1]["detail"], "x=1");
        assert!(lines[1]["volume_uuid"].is_null());
        assert!(lines[1]["message"]
            .as_str()
            .unwrap()
            .contains("access denied"));
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn access_refusals_are_json_lines_beside_key_records() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.jsonl");
        let log = AuditLog::at(&path);
        let daemon = Principal::from_uid(0);
        log.record_access(
            &AccessEvent {
                export: "data",
                listener: "unix:///run/cryptvol/nbd.sock",
                peer: "unix:/run/cryptvol/nbd.sock",
                peer_uid: Some(65534),
                peer_gid: Some(65534),
                peer_pid: Some(4242),
                tls_subject: None,
                reason: "uid 65534 is not allowed",
            },
            &daemon,
        )
        .unwrap();
        log.record_access(
            &AccessEvent {
                export: "x\"y\n",
                listener: "tcp://0.0.0.0:10809",
                peer: "192.0.2.1:5000",
                peer_uid: None,
                peer_gid: None,
                peer_pid: None,
                tls_subject: Some("CN=c1,O=Example"),
                reason: "no match",
            },
            &daemon,
        )
        .unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["operation"], "open-export");
        assert_eq!(lines[0]["result"], "denied");
        assert_eq!(lines[0]["export"], "data");
        assert_eq!(lines[0]["peer_uid"], 65534);
        assert_eq!(lines[0]["peer_gid"], 65534);
        assert_eq!(lines[0]["peer_pid"], 4242);
        assert_eq!(lines[0]["principal"], "root");
        assert!(lines[0].get("tls_subject").is_none());
        assert_eq!(lines[0]["reason"], "uid 65534 is not allowed");
        // A hostile export name stays inside its JSON string.
        assert_eq!(lines[1]["export"], "x\"y\n");
        assert_eq!(lines[1]["tls_subject"], "CN=c1,O=Example");
        assert!(lines[1].get("peer_uid").is_none());
    }

    #[test]
    fn access_denials_are_recorded_with_principal_key_and_action() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.jsonl");
        let log = AuditLog::at(&path);
        let me = Principal::from_uid(0);
        let key = "arn:aws:kms:us-east-1:1:key/x";
        let user = "arn:aws:iam::1:user/bob";
        let kms = KeyError::KmsAccessDenied(Box::new(crate::keys::KmsDenial {
            key: key.into(),
            operation: "unwrap".into(),
            action: "kms:Decrypt".into(),
            principal: user.into(),
            aws_said: "AccessDeniedException: no".into(),
            remedy: "grant it".into(),
        }));
        let local = KeyError::AccessDenied {
            key: "mk-1".into(),
            operation: "unwrap".into(),
            principal: "user bob (uid 1001)".into(),
        };
        let other = KeyError::WrongKey { key: "mk-1".into() };
        for (backend, e) in [("aws-kms", &kms), ("local", &local), ("local", &other)] {
            log.record(&AuditEvent {
                operation: "unwrap",
                backend,
                key_id: "k",
                context: None,
                principal: &me,
                outcome: Err(e),
                detail: None,
            })
            .unwrap();
        }
        let lines = read_lines(&path);
        assert_eq!(lines[0]["error"], "AccessDenied");
        assert_eq!(
            lines[0]["denied"],
            serde_json::json!({"principal": user, "key": key, "operation": "unwrap",
                               "action": "kms:Decrypt"})
        );
        assert_eq!(
            lines[1]["denied"],
            serde_json::json!({"principal": "user bob (uid 1001)", "key": "mk-1",
                               "operation": "unwrap"})
        );
        assert!(lines[2].get("denied").is_none(), "{}", lines[2]);
    }

    #[test]
    fn default_log_needs_the_keystore_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let log = AuditLog::in_keystore(&dir);
        let me = Principal::from_uid(0);
        let ev = AuditEvent {
            operation: "generate",
            backend: "passphrase",
            key_id: "",
            context: None,
            principal: &me,
            outcome: Ok(()),
            detail: None,
        };
        log.record(&ev).unwrap();
        assert!(!dir.exists());
        std::fs::create_dir(&dir).unwrap();
        log.record(&ev).unwrap();
        assert_eq!(read_lines(&dir.join(AUDIT_FILE)).len(), 1);
    }

    #[test]
    fn unwritable_log_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let log = AuditLog::at(&tmp.path().join("no/such/dir/audit.jsonl"));
        let err = log.open().err().unwrap();
        assert!(matches!(err, KeyError::Audit { .. }), "{err:?}");
        assert!(err.to_string().contains("--audit-log"), "{err}");
        // A symlink is refused.
        let target = tmp.path().join("t");
        std::fs::write(&target, b"").unwrap();
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(AuditLog::at(&link).open().is_err());
    }

    /// Group commit: writers of one file share one group; a sync covers every append
    /// that completed before it began (here five by other writers, then this one).
    #[test]
    fn one_sync_covers_the_appends_before_it() {
        let tmp = tempfile::tempdir().unwrap();
        let log = AuditLog::at(&tmp.path().join("a.jsonl"));
        let (a, b) = (log.open().unwrap(), log.open().unwrap());
        let other = AuditLog::at(&tmp.path().join("b.jsonl")).open().unwrap();
        let (ga, gb) = (a.group.clone().unwrap(), b.group.clone().unwrap());
        assert!(Arc::ptr_eq(&ga, &gb));
        assert!(!Arc::ptr_eq(&ga, other.group.as_ref().unwrap()));
        // (The counters only grow: a group outlives an inode number reused by a new file.)
        let before = ga.written.fetch_add(5, Ordering::SeqCst);
        ga.commit(a.file.as_ref().unwrap()).unwrap();
        assert_eq!(*ga.synced.lock().unwrap(), before + 6);
    }

    /// Writers appending at once all get their records in, whole, each line once.
    #[test]
    fn concurrent_records_are_all_written() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.jsonl");
        let log = AuditLog::at(&path);
        std::thread::scope(|s| {
            for t in 0..6 {
                let log = &log;
                s.spawn(move || {
                    for i in 0..10 {
                        let detail = format!("t={t} i={i}");
                        log.record(&AuditEvent {
                            operation: "unwrap",
                            backend: "local",
                            key_id: "mk-1",
                            context: None,
                            principal: &Principal::from_uid(0),
                            outcome: Ok(()),
                            detail: Some(&detail),
                        })
                        .unwrap();
                    }
                });
            }
        });
        let mut details: Vec<String> = read_lines(&path)
            .iter()
            .map(|l| l["detail"].as_str().unwrap().to_string())
            .collect();
        details.sort();
        details.dedup();
        assert_eq!(details.len(), 60);
        let g = log.open().unwrap().group.unwrap();
        assert_eq!(*g.synced.lock().unwrap(), g.written.load(Ordering::SeqCst));
    }
}
