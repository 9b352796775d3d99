//! The exec backend's reading of a program's answers, for the fuzz targets
//! (`crate::fuzzing`): every answer is read as the reply to `describe`, `wrap` and
//! `unwrap`, and what is accepted must respect the protocol's bounds.

use std::path::PathBuf;

use super::{
    ExecBackend, ExecSpec, Response, MAX_BLOB_LEN, MAX_KEY_ID_LEN, MAX_MESSAGE_LEN, MAX_PARAMS,
};
use crate::crypto::DEK_LEN;
use crate::keys::{EncryptionContext, Principal};

/// The key the replies are read for.
const KEY: &str = "fuzz-key";

/// Longest error text an answer can produce: the fixed wording, the backend's name and
/// the escaped, bounded strings the program chose (the key, the message, the kind).
const MAX_ERROR_TEXT: usize = 1024 + 4 * 4 * MAX_MESSAGE_LEN;

/// Reads `out` as the program's answer to each operation; panics if an accepted answer
/// breaks a bound or an error's text grows with the answer. Whether it is a protocol
/// response at all (an error answer is one).
pub(crate) fn exec_replies(out: &[u8]) -> bool {
    let spec = ExecSpec {
        program: PathBuf::from("/nonexistent/fuzz"),
        args: Vec::new(),
        timeout_secs: 1,
        env: Vec::new(),
    };
    let backend = ExecBackend::new("fuzz", spec, Principal::from_uid(0));
    let ctx = EncryptionContext::for_volume(&uuid::Uuid::from_bytes([7; 16]));
    let bounded = |e: crate::keys::KeyError| {
        let text = e.to_string();
        assert!(
            text.len() <= MAX_ERROR_TEXT,
            "unbounded error text: {} bytes",
            text.len()
        );
    };
    match backend.describe_reply(out, Some(KEY)) {
        Ok(d) => {
            let id = d
                .key_id
                .strip_prefix("fuzz:")
                .expect("describe: key id of another backend");
            assert!(!id.is_empty() && id.len() <= MAX_KEY_ID_LEN);
        }
        Err(e) => bounded(e),
    }
    match backend.wrap_reply(out, Some(KEY), &ctx) {
        Ok(w) => {
            assert_eq!(w.backend, "exec");
            assert!(w.key_id.starts_with("fuzz:"));
            assert!(!w.blob.is_empty() && w.blob.len() <= MAX_BLOB_LEN);
            assert!(w.params.len() <= MAX_PARAMS);
            assert_eq!(
                w.context, ctx,
                "wrap: the keyslot must carry the context asked for"
            );
        }
        Err(e) => bounded(e),
    }
    match backend.unwrap_reply(out, KEY) {
        Ok(dek) => assert_eq!(dek.expose().len(), DEK_LEN),
        Err(e) => bounded(e),
    }
    serde_json::from_slice::<Response<'_>>(out).is_ok()
}
