//! Keyslot records: a [`WrappedDek`] as the metadata JSON stores it (`SlotV1`, blob in
//! base64) and as the header MAC covers it. The same record serves the volume's
//! keyslots and the new key's keyslots of a re-encryption.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::crypto::canonical::CanonicalWriter;
use crate::keys::{EncryptionContext, WrappedDek};

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SlotV1 {
    backend: String,
    blob: String,
    context: BTreeMap<String, String>,
    key_id: String,
    params: BTreeMap<String, String>,
}

pub(super) fn slot_v1(k: &WrappedDek) -> SlotV1 {
    SlotV1 {
        backend: k.backend.clone(),
        blob: B64.encode(&k.blob),
        context: k.context.0.clone(),
        key_id: k.key_id.clone(),
        params: k.params.clone(),
    }
}

pub(super) fn slots_from_v1(slots: Vec<SlotV1>, what: &str) -> Result<Vec<WrappedDek>, String> {
    let mut out = Vec::with_capacity(slots.len());
    for (i, s) in slots.into_iter().enumerate() {
        let blob = B64
            .decode(&s.blob)
            .map_err(|e| format!("{what} {i}: blob is not valid base64: {e}"))?;
        out.push(WrappedDek {
            backend: s.backend,
            key_id: s.key_id,
            blob,
            context: EncryptionContext(s.context),
            params: s.params,
        });
    }
    Ok(out)
}

/// The MAC encoding of a list of keyslots: the count, then each slot's backend,
/// key id, blob, encryption context and parameters.
pub(super) fn encode_slots(w: &mut CanonicalWriter, slots: &[WrappedDek]) {
    w.count(slots.len());
    for slot in slots {
        w.str(&slot.backend)
            .str(&slot.key_id)
            .bytes(&slot.blob)
            .map(&slot.context.0)
            .map(&slot.params);
    }
}
