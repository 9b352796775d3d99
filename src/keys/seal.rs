//! AES-256-GCM key wrapping shared by the local and passphrase backends, plus the
//! helpers both need (context checks, associated data, running blocking work).
//!
//! Blob layout: `nonce (12) ‖ ciphertext (64) ‖ tag (16)`. The associated data binds
//! the backend kind and the key id as well as the encryption context, so a blob cannot
//! be moved to another key, another backend or another volume without failing to
//! authenticate.

use std::fmt::Write as _;

use aes_gcm::aead::{AeadInOut, KeyInit, Nonce, Tag};
use aes_gcm::Aes256Gcm;
use zeroize::Zeroizing;

use super::{EncryptionContext, KeyError, WrappedDek};
use crate::crypto::canonical::{CanonicalWriter, KEYWRAP_V1};
use crate::crypto::{CryptoError, Dek, DEK_LEN};

/// Value of the `alg` parameter of every wrapped key we write.
pub(super) const ALG: &str = "AES-256-GCM";
/// Value of the `version` parameter (the wrapping scheme of this module).
pub(super) const WRAP_VERSION: &str = "1";

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Exact length of a wrapped DEK blob.
pub(super) const BLOB_LEN: usize = NONCE_LEN + DEK_LEN + TAG_LEN;
/// Length of a key-encryption key (AES-256).
pub(super) const KEK_LEN: usize = 32;

/// Domain separation prefix of the associated data.
const AAD_LABEL: &[u8] = b"cryptvol/keywrap/v1";

/// Associated data: label, backend kind, key id (each u32-LE length-prefixed), then
/// the canonical encoding of the encryption context (profile `KEYWRAP_V1`).
pub(super) fn associated_data(
    kind: &str,
    key_id: &str,
    ctx: &EncryptionContext,
) -> Result<Vec<u8>, KeyError> {
    let mut w = CanonicalWriter::new(KEYWRAP_V1);
    w.bytes(AAD_LABEL).str(kind).str(key_id);
    ctx.write_canonical(&mut w);
    Ok(w.finish()?)
}

/// Encrypts `dek` under `kek` with a fresh random nonce.
pub(super) fn seal(kek: &[u8], aad: &[u8], dek: &Dek) -> Result<Vec<u8>, KeyError> {
    let cipher = Aes256Gcm::new_from_slice(kek).map_err(|_| {
        KeyError::Unsupported(format!("key-encryption key must be {KEK_LEN} bytes"))
    })?;
    let mut nonce_bytes = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce_bytes).map_err(|e| CryptoError::Rng(e.to_string()))?;
    let nonce = Nonce::<Aes256Gcm>::from(nonce_bytes);
    // Preallocated to the final size so the transient plaintext is never reallocated
    // (and so never left behind in freed memory); it is overwritten by the ciphertext.
    let mut blob = Vec::with_capacity(BLOB_LEN);
    blob.extend_from_slice(&nonce_bytes);
    blob.extend_from_slice(dek.expose());
    let tag = cipher
        .encrypt_inout_detached(&nonce, aad, (&mut blob[NONCE_LEN..]).into())
        .map_err(|_| KeyError::Unsupported("AES-GCM refused to encrypt the data key".into()))?;
    blob.extend_from_slice(&tag);
    Ok(blob)
}

/// Decrypts a blob written by [`seal`]. `key` names the key in the `WrongKey` error.
pub(super) fn open(kek: &[u8], aad: &[u8], blob: &[u8], key: &str) -> Result<Dek, KeyError> {
    if blob.len() != BLOB_LEN {
        return Err(KeyError::Malformed(format!(
            "wrapped data key is {} bytes, expected {BLOB_LEN}",
            blob.len()
        )));
    }
    let (nonce_bytes, rest) = blob.split_at(NONCE_LEN);
    let (ciphertext, tag_bytes) = rest.split_at(DEK_LEN);
    let nonce = Nonce::<Aes256Gcm>::try_from(nonce_bytes)
        .map_err(|_| KeyError::Malformed("bad nonce length".into()))?;
    let tag = Tag::<Aes256Gcm>::try_from(tag_bytes)
        .map_err(|_| KeyError::Malformed("bad tag length".into()))?;
    let cipher = Aes256Gcm::new_from_slice(kek).map_err(|_| {
        KeyError::Unsupported(format!("key-encryption key must be {KEK_LEN} bytes"))
    })?;
    let mut plain = Zeroizing::new([0u8; DEK_LEN]);
    plain.copy_from_slice(ciphertext);
    cipher
        .decrypt_inout_detached(&nonce, aad, (&mut plain[..]).into(), &tag)
        .map_err(|_| KeyError::WrongKey {
            key: key.to_string(),
        })?;
    Ok(Dek::from_slice(&plain[..])?)
}

/// Standard parameters recorded in every wrapped key.
pub(super) fn base_params() -> std::collections::BTreeMap<String, String> {
    let mut p = std::collections::BTreeMap::new();
    p.insert("alg".to_string(), ALG.to_string());
    p.insert("version".to_string(), WRAP_VERSION.to_string());
    p
}

/// Refuses a wrapped key of another backend kind or another wrapping scheme.
pub(super) fn check_kind_and_alg(wrapped: &WrappedDek, kind: &str) -> Result<(), KeyError> {
    if wrapped.backend != kind {
        return Err(KeyError::Malformed(format!(
            "keyslot belongs to the {:?} backend, not {kind:?}",
            wrapped.backend
        )));
    }
    let alg = wrapped.params.get("alg").map(String::as_str);
    let version = wrapped.params.get("version").map(String::as_str);
    if alg != Some(ALG) || version != Some(WRAP_VERSION) {
        return Err(KeyError::Malformed(format!(
            "unsupported wrapping algorithm {:?} version {:?} (this cryptvol knows {ALG} version {WRAP_VERSION})",
            alg.unwrap_or("(missing)"),
            version.unwrap_or("(missing)")
        )));
    }
    Ok(())
}

/// `ContextMismatch` unless the stored context equals the expected one exactly.
pub(super) fn check_context(
    wrapped: &WrappedDek,
    expected: &EncryptionContext,
) -> Result<(), KeyError> {
    if &wrapped.context == expected {
        return Ok(());
    }
    Err(KeyError::ContextMismatch {
        expected: context_label(expected),
        found: context_label(&wrapped.context),
    })
}

const VOLUME_UUID_KEY: &str = "cryptvol:volume-uuid";

/// Human-readable context: `volume <uuid>` when it is a plain volume context, with the
/// full map appended otherwise. Values are escaped (they may come from a hostile header).
pub(super) fn context_label(ctx: &EncryptionContext) -> String {
    let mut all = String::from("{");
    for (i, (k, v)) in ctx.0.iter().enumerate() {
        if i > 0 {
            all.push_str(", ");
        }
        let _ = write!(all, "{}={}", k.escape_debug(), v.escape_debug());
    }
    all.push('}');
    match ctx.0.get(VOLUME_UUID_KEY) {
        Some(uuid) if ctx.0.len() == 1 => format!("volume {}", uuid.escape_debug()),
        Some(uuid) => format!("volume {} (context {all})", uuid.escape_debug()),
        None => format!("context {all}"),
    }
}

/// Runs blocking work (file I/O, flock, Argon2) on tokio's blocking pool when inside a
/// runtime, inline otherwise.
pub(super) async fn blocking<T, F>(f: F) -> Result<T, KeyError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, KeyError> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| KeyError::Transient(format!("key backend worker did not finish: {e}")))?,
        Err(_) => f(),
    }
}

/// `n` random bytes as lowercase hex.
pub(super) fn random_hex(n: usize) -> Result<String, KeyError> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| CryptoError::Rng(e.to_string()))?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(uuid: &str) -> EncryptionContext {
        let mut c = EncryptionContext::default();
        c.0.insert(VOLUME_UUID_KEY.to_string(), uuid.to_string());
        c
    }

    fn aad_of(kind: &str, key_id: &str, c: &EncryptionContext) -> Vec<u8> {
        associated_data(kind, key_id, c).unwrap()
    }

    fn canonical(c: &EncryptionContext) -> Vec<u8> {
        c.canonical_bytes().unwrap()
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let kek = [7u8; 32];
        let dek = Dek::generate().unwrap();
        let aad = aad_of("local", "mk-1", &ctx("a"));
        let blob = seal(&kek, &aad, &dek).unwrap();
        assert_eq!(blob.len(), BLOB_LEN);
        assert_ne!(&blob[NONCE_LEN..NONCE_LEN + DEK_LEN], &dek.expose()[..]);
        let back = open(&kek, &aad, &blob, "mk-1").unwrap();
        assert_eq!(back.expose(), dek.expose());

        let mut flipped = blob.clone();
        flipped[20] ^= 1;
        assert!(matches!(
            open(&kek, &aad, &flipped, "mk-1"),
            Err(KeyError::WrongKey { .. })
        ));
        let other_aad = aad_of("local", "mk-2", &ctx("a"));
        assert!(matches!(
            open(&kek, &other_aad, &blob, "mk-1"),
            Err(KeyError::WrongKey { .. })
        ));
        assert!(matches!(
            open(&[8u8; 32], &aad, &blob, "mk-1"),
            Err(KeyError::WrongKey { .. })
        ));
        assert!(matches!(
            open(&kek, &aad, &blob[..50], "mk-1"),
            Err(KeyError::Malformed(_))
        ));
    }

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", Test Case 15
    /// (AES-256, 96-bit IV, 64-byte plaintext, no AAD): `open` must accept the published
    /// ciphertext and tag and return the published plaintext.
    #[test]
    fn open_accepts_gcm_spec_test_case_15() {
        let key = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
        let mut blob = hex("cafebabefacedbaddecaf888");
        blob.extend(hex(
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
        ));
        blob.extend(hex("b094dac5d93471bdec1a502270e3cc6c"));
        let dek = open(&key, b"", &blob, "kat").unwrap();
        assert_eq!(
            &dek.expose()[..],
            &hex(
                "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                 1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
            )[..]
        );
        blob[12] ^= 1;
        assert!(matches!(
            open(&key, b"", &blob, "kat"),
            Err(KeyError::WrongKey { .. })
        ));
    }

    #[test]
    fn associated_data_is_unambiguous() {
        // Moving bytes between the kind and the key id must change the encoding.
        assert_ne!(aad_of("ab", "c", &ctx("x")), aad_of("a", "bc", &ctx("x")));
        assert_ne!(
            aad_of("local", "k", &ctx("x")),
            aad_of("local", "k", &ctx("y"))
        );
    }

    /// A context with two entries (keys are encoded in sorted order).
    fn sample_context() -> EncryptionContext {
        let mut c = ctx("6f1c0a52-3c1e-4d8e-9d2b-0a4f2b7c9e11");
        c.0.insert("cryptvol:snapshot".into(), "s1".into());
        c
    }

    /// The associated data of existing keyslots: these bytes must never change, or
    /// wrapped keys already on disk stop unwrapping.
    #[test]
    fn associated_data_vector_is_frozen() {
        let want: &[u8] = b"\x13\x00\x00\x00cryptvol/keywrap/v1\
            \x05\x00\x00\x00local\
            \x23\x00\x00\x00mk-00112233445566778899aabbccddeeff\
            \x11\x00\x00\x00cryptvol:snapshot\x02\x00\x00\x00s1\
            \x14\x00\x00\x00cryptvol:volume-uuid\
            \x24\x00\x00\x006f1c0a52-3c1e-4d8e-9d2b-0a4f2b7c9e11";
        let got = aad_of(
            "local",
            "mk-00112233445566778899aabbccddeeff",
            &sample_context(),
        );
        assert_eq!(got, want);
    }

    /// The passphrase backend's associated data: an empty key id and an empty context.
    #[test]
    fn associated_data_vector_with_empty_fields_is_frozen() {
        let want: &[u8] = b"\x13\x00\x00\x00cryptvol/keywrap/v1\
            \x0a\x00\x00\x00passphrase\
            \x00\x00\x00\x00";
        assert_eq!(
            aad_of("passphrase", "", &EncryptionContext::default()),
            want
        );
    }

    /// The encryption context alone: its pairs in key order, without a count.
    #[test]
    fn context_canonical_bytes_vector_is_frozen() {
        let want: &[u8] = b"\x11\x00\x00\x00cryptvol:snapshot\x02\x00\x00\x00s1\
            \x14\x00\x00\x00cryptvol:volume-uuid\
            \x24\x00\x00\x006f1c0a52-3c1e-4d8e-9d2b-0a4f2b7c9e11";
        assert_eq!(canonical(&sample_context()), want);
        assert!(canonical(&EncryptionContext::default()).is_empty());
    }

    #[test]
    fn context_label_shows_uuid_and_escapes() {
        assert_eq!(context_label(&ctx("1234")), "volume 1234");
        let mut c = ctx("1234");
        c.0.insert("cryptvol:snapshot".into(), "s\x1b[1m".into());
        let label = context_label(&c);
        assert!(label.starts_with("volume 1234 (context {"), "{label}");
        assert!(!label.contains('\x1b'), "{label}");
        assert_eq!(context_label(&EncryptionContext::default()), "context {}");
    }

    #[test]
    fn random_hex_has_requested_length() {
        let a = random_hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(a, random_hex(16).unwrap());
    }
}
