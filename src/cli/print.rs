//! Presentation helpers shared by several commands: how a keyslot is named, the
//! `keyslots now:` summary, percentages and pretty JSON on stdout.

use std::io::Write as _;

use anyhow::Result;

use crate::keys::WrappedDek;
use crate::ops::KeyslotInfo;

/// `local key mk-…`, `passphrase`, `exec key vault:k1`.
pub(super) fn slot_label(s: &WrappedDek) -> String {
    if s.key_id.is_empty() {
        s.backend.escape_debug().to_string()
    } else {
        format!(
            "{} key {}",
            s.backend.escape_debug(),
            s.key_id.escape_debug()
        )
    }
}

/// The label of a volume's first keyslot (what wraps a new volume's data key).
pub(super) fn first_slot_label(slots: &[WrappedDek]) -> String {
    slots.first().map(slot_label).unwrap_or_else(|| "?".into())
}

/// `0: local key mk-…; 1: passphrase`, for `keyslots now: …`.
pub(super) fn keyslot_list(slots: &[WrappedDek]) -> String {
    let slots: Vec<String> = slots
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{i}: {}", slot_label(s)))
        .collect();
    slots.join("; ")
}

/// `N: BACKEND key ID` (or `N: BACKEND`), one keyslot of `info` and `snapshot describe`.
pub(super) fn keyslot_line(k: &KeyslotInfo) -> String {
    let id = if k.key_id.is_empty() {
        String::new()
    } else {
        format!(" key {}", k.key_id)
    };
    format!("{}: {}{}", k.slot, k.backend, id)
}

/// `done` as a percentage of `total` (an empty total is complete).
pub(super) fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    }
}

/// `v` as pretty JSON on stdout, with a final newline.
pub(super) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}
