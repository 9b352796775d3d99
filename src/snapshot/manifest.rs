//! The snapshot manifest: what a snapshot is (geometry, chunk list, parent, wrapped DEK
//! keyslots), JSON-encoded, authenticated by an HMAC under a DEK-derived key over a
//! canonical binary encoding of every field, plus a key check value that tells a wrong
//! key apart from tampering. Byte-level description: docs/format.md, "Snapshots".

use std::collections::BTreeMap;

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{chunk_count, SnapshotError};
use crate::crypto::canonical::{CanonicalWriter, MAC_V1};
use crate::crypto::{Dek, SectorSize, DEK_LEN};
use crate::keys::{EncryptionContext, WrappedDek};
use crate::volume::{geometry, CIPHER};

/// Manifest format version written and understood.
pub const MANIFEST_VERSION: u32 = 1;
/// The `format` field of every manifest.
pub const MANIFEST_FORMAT: &str = "cryptvol-snapshot";
/// Encryption-context key binding a re-encrypted snapshot copy's keyslots to it.
pub const CONTEXT_SNAPSHOT_ID: &str = "cryptvol:snapshot-id";
/// Encryption-context key binding a volume's keyslots to it (as in volume headers).
pub const CONTEXT_VOLUME_UUID: &str = "cryptvol:volume-uuid";

const MAC_INFO: &[u8] = b"cryptvol snapshot manifest";
const KCV_INFO: &[u8] = b"cryptvol snapshot kcv";
const MAC_DOMAIN: &[u8] = b"cryptvol snapshot manifest v1\0";
const KCV_DOMAIN: &[u8] = b"cryptvol snapshot kcv v1\0";
/// Largest chunk size accepted from a manifest (and so the largest chunk object read
/// from a store).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Largest manifest object read from a store, checked before it is downloaded: about
/// 50 million chunk entries (25 TiB of written data in 512 KiB chunks).
pub const MAX_MANIFEST_LEN: u64 = 4 << 30;
/// Longest description accepted.
pub const MAX_DESCRIPTION: usize = 4096;
const MAX_KEYSLOTS: usize = 32;

type HmacSha256 = hmac::Hmac<Sha256>;

/// A snapshot id: `snap-` followed by 17 lowercase hex digits (as EBS snapshot ids).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(String);

impl SnapshotId {
    /// A new random id.
    pub fn generate() -> Result<SnapshotId, SnapshotError> {
        let mut raw = [0u8; 9];
        getrandom::fill(&mut raw).map_err(|e| SnapshotError::Internal(format!("rng: {e}")))?;
        let digits = hex::encode(raw);
        Ok(SnapshotId(format!("snap-{}", &digits[..17])))
    }

    /// Parses and validates an id (nothing else can reach an object name).
    pub fn parse(s: &str) -> Result<SnapshotId, SnapshotError> {
        let ok = s.len() == 22
            && s.starts_with("snap-")
            && s[5..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(SnapshotId(s.to_string()))
        } else {
            Err(SnapshotError::BadId(s.escape_debug().to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SnapshotId {
    type Err = SnapshotError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SnapshotId::parse(s)
    }
}

/// Decodes a SHA-256 name ([`is_hash`]: 64 lowercase hex digits; upper case is refused).
pub(crate) fn from_hex32(s: &str) -> Option<[u8; 32]> {
    if !is_hash(s) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// A SHA-256 name: 64 lowercase hex digits.
pub fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// SHA-256 of a chunk's stored bytes, in hex: its object name.
pub fn chunk_hash(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The decoded, structurally valid manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub id: SnapshotId,
    /// The volume the data came from (kept by copies: the lineage).
    pub volume_uuid: uuid::Uuid,
    pub volume_size: u64,
    pub sector_size: u32,
    pub chunk_size: u32,
    pub cipher: String,
    /// Chunk index → SHA-256 of its stored ciphertext; missing indexes are holes.
    pub chunks: BTreeMap<u64, [u8; 32]>,
    pub parent: Option<SnapshotId>,
    /// RFC 3339 UTC with microseconds.
    pub created_at: String,
    pub description: String,
    /// The context every keyslot is bound to: `{cryptvol:volume-uuid: volume_uuid}` for a
    /// snapshot taken from a volume, `{cryptvol:snapshot-id: id}` for a re-encrypted copy.
    pub encryption_context: EncryptionContext,
    pub keyslots: Vec<WrappedDek>,
    pub key_check: [u8; 32],
    pub mac: [u8; 32],
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Json {
    format: String,
    version: u32,
    id: String,
    volume_uuid: String,
    volume_size: u64,
    sector_size: u32,
    chunk_size: u32,
    cipher: String,
    chunks: Vec<(u64, String)>,
    parent: Option<String>,
    created_at: String,
    description: String,
    encryption_context: BTreeMap<String, String>,
    keyslots: Vec<SlotJson>,
    key_check: String,
    mac: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotJson {
    backend: String,
    key_id: String,
    blob: String,
    context: BTreeMap<String, String>,
    params: BTreeMap<String, String>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn derive(dek: &Dek, info: &[u8]) -> Result<HmacSha256, SnapshotError> {
    let hk = hkdf::Hkdf::<Sha256>::new(None, dek.expose());
    let mut key = Zeroizing::new([0u8; 32]);
    hk.expand(info, &mut key[..])
        .map_err(|_| SnapshotError::Internal("HKDF output length".into()))?;
    <HmacSha256 as KeyInit>::new_from_slice(&key[..])
        .map_err(|_| SnapshotError::Internal("HMAC key length".into()))
}

/// The snapshot key check value of `dek` for snapshot `id`.
pub fn key_check(dek: &Dek, id: &SnapshotId) -> Result<[u8; 32], SnapshotError> {
    let mut m = derive(dek, KCV_INFO)?;
    m.update(KCV_DOMAIN);
    m.update(id.as_str().as_bytes());
    Ok(m.finalize().into_bytes().into())
}

impl Manifest {
    /// Number of chunks the volume is cut into.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.volume_size, self.chunk_size)
    }

    /// Bytes of volume data in chunk `index`.
    pub fn chunk_len(&self, index: u64) -> usize {
        super::chunk_len(self.volume_size, self.chunk_size, index)
    }

    /// The hex name of chunk `index`, `None` for a hole.
    pub fn chunk_name(&self, index: u64) -> Option<String> {
        self.chunks.get(&index).map(hex::encode)
    }

    /// The first sector of chunk `index` (its XTS tweak).
    pub fn first_sector(&self, index: u64) -> u64 {
        index * u64::from(self.chunk_size / self.sector_size.max(1))
    }

    /// The canonical byte string the MAC covers (docs/format.md, "Snapshots"), in the
    /// [`MAC_V1`] profile of the volume header MAC. The chunk list's count is a `u64`, as
    /// it always was, not the profile's `u32` count.
    pub fn mac_input(&self) -> Result<Vec<u8>, SnapshotError> {
        let mut e = CanonicalWriter::with_capacity(MAC_V1, 256 + self.chunks.len() * 40);
        e.bytes(MAC_DOMAIN)
            .u32(self.version)
            .str(self.id.as_str())
            .raw(self.volume_uuid.as_bytes())
            .u64(self.volume_size)
            .u32(self.sector_size)
            .u32(self.chunk_size)
            .str(&self.cipher)
            .u64(self.chunks.len() as u64);
        for (i, h) in &self.chunks {
            e.u64(*i).raw(h);
        }
        e.flag(self.parent.is_some());
        if let Some(p) = &self.parent {
            e.str(p.as_str());
        }
        e.str(&self.created_at)
            .str(&self.description)
            .map(&self.encryption_context.0)
            .count(self.keyslots.len());
        for s in &self.keyslots {
            e.str(&s.backend)
                .str(&s.key_id)
                .bytes(&s.blob)
                .map(&s.context.0)
                .map(&s.params);
        }
        e.raw(&self.key_check);
        Ok(e.finish()?)
    }

    /// Computes the key check value and the MAC with `dek` (after every other field is set).
    pub fn seal(&mut self, dek: &Dek) -> Result<(), SnapshotError> {
        self.key_check = key_check(dek, &self.id)?;
        let mut m = derive(dek, MAC_INFO)?;
        m.update(&self.mac_input()?);
        self.mac = m.finalize().into_bytes().into();
        Ok(())
    }

    /// Whether `dek` is this snapshot's data key (key check value).
    pub fn is_key(&self, dek: &Dek) -> Result<bool, SnapshotError> {
        let mut m = derive(dek, KCV_INFO)?;
        m.update(KCV_DOMAIN);
        m.update(self.id.as_str().as_bytes());
        Ok(m.verify_slice(&self.key_check).is_ok())
    }

    /// Checks, in constant time, the key check value (a mismatch is a wrong key), then the
    /// MAC (a mismatch is tampering).
    pub fn verify(&self, dek: &Dek) -> Result<(), SnapshotError> {
        if !self.is_key(dek)? {
            return Err(SnapshotError::WrongKey {
                id: self.id.to_string(),
            });
        }
        let mut m = derive(dek, MAC_INFO)?;
        m.update(&self.mac_input()?);
        if m.verify_slice(&self.mac).is_err() {
            return Err(SnapshotError::ManifestTampered {
                id: self.id.to_string(),
            });
        }
        Ok(())
    }

    /// The context keyslots must be unwrapped with; refuses any other form (a manifest
    /// cannot name an arbitrary context).
    pub fn expected_context(&self) -> Result<EncryptionContext, SnapshotError> {
        let by_volume = EncryptionContext::for_volume(&self.volume_uuid);
        let by_snapshot = snapshot_context(&self.id);
        if self.encryption_context == by_volume || self.encryption_context == by_snapshot {
            Ok(self.encryption_context.clone())
        } else {
            Err(self.bad(format!(
                "encryption context {:?} is neither the source volume's nor the snapshot's",
                self.encryption_context.0
            )))
        }
    }

    fn bad(&self, reason: impl Into<String>) -> SnapshotError {
        SnapshotError::BadManifest {
            id: self.id.to_string(),
            reason: reason.into(),
        }
    }

    /// JSON encoding (compact).
    pub fn to_json(&self) -> Result<Vec<u8>, SnapshotError> {
        let j = Json {
            format: MANIFEST_FORMAT.into(),
            version: self.version,
            id: self.id.to_string(),
            volume_uuid: self.volume_uuid.to_string(),
            volume_size: self.volume_size,
            sector_size: self.sector_size,
            chunk_size: self.chunk_size,
            cipher: self.cipher.clone(),
            chunks: self
                .chunks
                .iter()
                .map(|(i, h)| (*i, hex::encode(h)))
                .collect(),
            parent: self.parent.as_ref().map(|p| p.to_string()),
            created_at: self.created_at.clone(),
            description: self.description.clone(),
            encryption_context: self.encryption_context.0.clone(),
            keyslots: self
                .keyslots
                .iter()
                .map(|s| SlotJson {
                    backend: s.backend.clone(),
                    key_id: s.key_id.clone(),
                    blob: b64().encode(&s.blob),
                    context: s.context.0.clone(),
                    params: s.params.clone(),
                })
                .collect(),
            key_check: b64().encode(self.key_check),
            mac: b64().encode(self.mac),
        };
        serde_json::to_vec(&j).map_err(|e| self.bad(e.to_string()))
    }

    /// Decodes and structurally validates the manifest stored as snapshot `id` (no key
    /// needed; authenticity is checked by [`Manifest::verify`]).
    pub fn parse(id: &SnapshotId, bytes: &[u8]) -> Result<Manifest, SnapshotError> {
        let bad = |reason: String| bad_manifest(id, reason);
        let j: Json = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not valid manifest JSON: {e}")))?;
        check_identity(id, &j)?;
        let volume_uuid = uuid::Uuid::try_parse(&j.volume_uuid)
            .map_err(|_| bad("volume_uuid is not a UUID".into()))?;
        check_geometry(id, &j)?;
        let chunks = parse_chunks(id, &j)?;
        let parent = j
            .parent
            .as_deref()
            .map(SnapshotId::parse)
            .transpose()
            .map_err(|_| bad("parent is not a snapshot id".into()))?;
        if j.description.len() > MAX_DESCRIPTION || j.created_at.len() > 64 {
            return Err(bad("description or creation time too long".into()));
        }
        let keyslots = parse_keyslots(id, j.keyslots)?;
        let m = Manifest {
            version: j.version,
            id: id.clone(),
            volume_uuid,
            volume_size: j.volume_size,
            sector_size: j.sector_size,
            chunk_size: j.chunk_size,
            cipher: j.cipher,
            chunks,
            parent,
            created_at: j.created_at,
            description: j.description,
            encryption_context: EncryptionContext(j.encryption_context),
            keyslots,
            key_check: decode_b64_32(id, "key_check", &j.key_check)?,
            mac: decode_b64_32(id, "mac", &j.mac)?,
        };
        m.expected_context()?;
        Ok(m)
    }
}

/// The error for a manifest stored as `id` that is not structurally valid.
fn bad_manifest(id: &SnapshotId, reason: String) -> SnapshotError {
    SnapshotError::BadManifest {
        id: id.to_string(),
        reason,
    }
}

/// Checks the format name, the version, and that the manifest names the snapshot it is
/// stored as.
fn check_identity(id: &SnapshotId, j: &Json) -> Result<(), SnapshotError> {
    let bad = |reason: String| Err(bad_manifest(id, reason));
    if j.format != MANIFEST_FORMAT {
        return bad(format!("format {:?} is not {MANIFEST_FORMAT:?}", j.format));
    }
    if j.version != MANIFEST_VERSION {
        return bad(format!(
            "manifest version {} is not supported (this cryptvol reads version {MANIFEST_VERSION}); upgrade cryptvol",
            j.version
        ));
    }
    if j.id != id.as_str() {
        return bad(format!(
            "it names snapshot {:?}, not the one it is stored as",
            j.id.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// Checks the sector size, the volume size, the chunk size and the cipher.
fn check_geometry(id: &SnapshotId, j: &Json) -> Result<(), SnapshotError> {
    let bad = |reason: String| Err(bad_manifest(id, reason));
    let Ok(sector) = SectorSize::try_from(j.sector_size) else {
        return bad(format!(
            "sector size {} (must be 512 or 4096)",
            j.sector_size
        ));
    };
    // Half the largest file offset: the manifest's own bound, leaving room for a header.
    if !geometry::is_whole_sectors(j.volume_size, sector) || j.volume_size > i64::MAX as u64 / 2 {
        return bad(format!(
            "volume size {} is not a positive multiple of the sector size",
            j.volume_size
        ));
    }
    if !geometry::is_whole_sectors(u64::from(j.chunk_size), sector) || j.chunk_size > MAX_CHUNK_SIZE
    {
        return bad(format!("chunk size {}", j.chunk_size));
    }
    if j.cipher != CIPHER {
        return bad(format!("cipher {:?} (only {CIPHER:?})", j.cipher));
    }
    Ok(())
}

/// The chunk list: strictly increasing indexes within the volume (checked geometry),
/// each with a SHA-256 hex name.
fn parse_chunks(id: &SnapshotId, j: &Json) -> Result<BTreeMap<u64, [u8; 32]>, SnapshotError> {
    let count = chunk_count(j.volume_size, j.chunk_size);
    let mut chunks = BTreeMap::new();
    let mut last: Option<u64> = None;
    for (i, h) in &j.chunks {
        if *i >= count || last.is_some_and(|l| *i <= l) {
            return Err(bad_manifest(
                id,
                format!(
                    "chunk index {i} is out of order or beyond the {count} chunks of the volume"
                ),
            ));
        }
        last = Some(*i);
        let hash = from_hex32(h).ok_or_else(|| {
            bad_manifest(id, format!("chunk {i}: {h:?} is not a SHA-256 hex name"))
        })?;
        chunks.insert(*i, hash);
    }
    Ok(chunks)
}

/// The keyslots: 1 to [`MAX_KEYSLOTS`], each with a backend name and a base64 blob.
fn parse_keyslots(id: &SnapshotId, slots: Vec<SlotJson>) -> Result<Vec<WrappedDek>, SnapshotError> {
    let bad = |reason: String| bad_manifest(id, reason);
    if slots.is_empty() || slots.len() > MAX_KEYSLOTS {
        return Err(bad(format!(
            "{} keyslots (must be 1 to {MAX_KEYSLOTS})",
            slots.len()
        )));
    }
    let mut keyslots = Vec::with_capacity(slots.len());
    for s in slots {
        if s.backend.is_empty() {
            return Err(bad("a keyslot has an empty backend name".into()));
        }
        keyslots.push(WrappedDek {
            backend: s.backend,
            key_id: s.key_id,
            blob: b64()
                .decode(&s.blob)
                .map_err(|_| bad("a keyslot blob is not base64".into()))?,
            context: EncryptionContext(s.context),
            params: s.params,
        });
    }
    Ok(keyslots)
}

/// Field `name` (the key check value or the MAC): exactly 32 bytes of base64.
fn decode_b64_32(id: &SnapshotId, name: &str, s: &str) -> Result<[u8; 32], SnapshotError> {
    b64()
        .decode(s)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
        .ok_or_else(|| bad_manifest(id, format!("{name} is not 32 bytes of base64")))
}

/// The encryption context binding a re-encrypted snapshot copy's keyslots to the copy:
/// `{"cryptvol:snapshot-id": "<id>"}`.
pub fn snapshot_context(id: &SnapshotId) -> EncryptionContext {
    let mut m = BTreeMap::new();
    m.insert(CONTEXT_SNAPSHOT_ID.to_string(), id.to_string());
    EncryptionContext(m)
}

/// The current time as RFC 3339 UTC with microseconds (sorts as text).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

// The DEK length is part of the format (AES-256-XTS); keep it visible here.
const _: () = assert!(DEK_LEN == 64);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn dek(seed: u8) -> Dek {
        let mut b = [0u8; 64];
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed.wrapping_add(i as u8);
        }
        Dek::from_slice(&b).unwrap()
    }

    pub(crate) fn sample(dek: &Dek) -> Manifest {
        let uuid = uuid::Uuid::from_bytes([7; 16]);
        let mut m = Manifest {
            version: MANIFEST_VERSION,
            id: SnapshotId::parse("snap-00000000000000001").unwrap(),
            volume_uuid: uuid,
            volume_size: 4 << 20,
            sector_size: 4096,
            chunk_size: super::super::CHUNK_SIZE,
            cipher: CIPHER.into(),
            chunks: [(0u64, [1u8; 32]), (5, [2u8; 32])].into_iter().collect(),
            parent: Some(SnapshotId::parse("snap-0000000000000000a").unwrap()),
            created_at: "2026-01-02T03:04:05.000006Z".into(),
            description: "nightly".into(),
            encryption_context: EncryptionContext::for_volume(&uuid),
            keyslots: vec![WrappedDek {
                backend: "local".into(),
                key_id: "mk-1".into(),
                blob: vec![1, 2, 3],
                context: EncryptionContext::for_volume(&uuid),
                params: [("alg".to_string(), "x".to_string())].into_iter().collect(),
            }],
            key_check: [0; 32],
            mac: [0; 32],
        };
        m.seal(dek).unwrap();
        m
    }

    /// A small manifest with every optional part present (one chunk, a parent, one
    /// keyslot with a param), unsealed so that its key check value is fixed.
    fn pinned() -> Manifest {
        let uuid = uuid::Uuid::from_bytes([7; 16]);
        Manifest {
            version: MANIFEST_VERSION,
            id: SnapshotId::parse("snap-00000000000000001").unwrap(),
            volume_uuid: uuid,
            volume_size: 1 << 20,
            sector_size: 4096,
            chunk_size: super::super::CHUNK_SIZE,
            cipher: CIPHER.into(),
            chunks: [(1u64, [0xab; 32])].into_iter().collect(),
            parent: Some(SnapshotId::parse("snap-0000000000000000a").unwrap()),
            created_at: "t".into(),
            description: "d".into(),
            encryption_context: snapshot_context(
                &SnapshotId::parse("snap-00000000000000001").unwrap(),
            ),
            keyslots: vec![WrappedDek {
                backend: "b".into(),
                key_id: "k".into(),
                blob: vec![1, 2],
                context: EncryptionContext::default(),
                params: [("p".to_string(), "v".to_string())].into_iter().collect(),
            }],
            key_check: [0xcc; 32],
            mac: [0; 32],
        }
    }

    /// The MAC input is part of the on-disk format: stored snapshots must keep verifying.
    #[test]
    fn mac_input_is_pinned() {
        const PARENT: &str = "011600000000000000736e61702d3030303030303030303030303030303061";
        const WANT: &str = concat!(
            // domain: u64 length, bytes
            "1e000000000000006372797074766f6c20736e617073686f74206d616e696665737420763100",
            // version: u32
            "01000000",
            // id: u64 length, bytes
            "1600000000000000736e61702d3030303030303030303030303030303031",
            // volume uuid: raw
            "07070707070707070707070707070707",
            // volume size: u64
            "0000100000000000",
            // sector size: u32
            "00100000",
            // chunk size: u32
            "00000800",
            // cipher: u64 length, bytes
            "0f000000000000006165732d7874732d706c61696e3634",
            // chunk count: u64
            "0100000000000000",
            // chunk 1: u64 index, raw hash
            "0100000000000000abababababababababababababababababababababababababababababababab",
            // parent: flag 1, u64 length, bytes
            "011600000000000000736e61702d3030303030303030303030303030303061",
            // created_at
            "010000000000000074",
            // description
            "010000000000000064",
            // encryption context: u32 count, key, value
            "0100000014000000000000006372797074766f6c3a736e617073686f742d69641600000000000000736e61702d3030303030303030303030303030303031",
            // keyslot count: u32
            "01000000",
            // keyslot backend
            "010000000000000062",
            // keyslot key_id
            "01000000000000006b",
            // keyslot blob
            "02000000000000000102",
            // keyslot context: u32 count 0
            "00000000",
            // keyslot params: u32 count, key, value
            "01000000010000000000000070010000000000000076",
            // key check: raw
            "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
        );
        let m = pinned();
        assert_eq!(hex::encode(m.mac_input().unwrap()), WANT);
        // No parent: a single 0 byte in its place.
        let mut orphan = m;
        orphan.parent = None;
        assert_eq!(
            hex::encode(orphan.mac_input().unwrap()),
            WANT.replacen(PARENT, "00", 1)
        );
    }

    #[test]
    fn ids() {
        let id = SnapshotId::generate().unwrap();
        assert_eq!(SnapshotId::parse(id.as_str()).unwrap(), id);
        assert_ne!(SnapshotId::generate().unwrap(), id);
        for bad in [
            "",
            "snap-",
            "snap-0123456789ABCDEF0",
            "snap-0123456789abcdef",
            "../etc/passwd",
            "snap-0123456789abcdef0/x",
        ] {
            assert!(SnapshotId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashes() {
        let h = chunk_hash(b"abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_hash(&h));
        assert_eq!(hex::encode(from_hex32(&h).unwrap()), h);
        assert!(from_hex32(&h.to_uppercase()).is_none());
        assert!(!is_hash("abc"));
    }

    #[test]
    fn round_trip_and_verify() {
        let k = dek(1);
        let m = sample(&k);
        let json = m.to_json().unwrap();
        let back = Manifest::parse(&m.id, &json).unwrap();
        assert_eq!(back, m);
        back.verify(&k).unwrap();
        assert_eq!(back.chunk_count(), 8);
        assert_eq!(back.chunk_name(5).unwrap(), "02".repeat(32));
        assert!(back.chunk_name(1).is_none());
        assert_eq!(back.first_sector(5), 5 * 128);
    }

    #[test]
    fn wrong_key_is_not_tampering() {
        let m = sample(&dek(1));
        assert!(matches!(
            m.verify(&dek(2)),
            Err(SnapshotError::WrongKey { .. })
        ));
    }

    #[test]
    fn every_field_is_authenticated() {
        let k = dek(1);
        let m = sample(&k);
        let mut variants: Vec<Manifest> = Vec::new();
        let mut v = m.clone();
        v.volume_size += 4096;
        variants.push(v);
        let mut v = m.clone();
        v.chunks.insert(1, [3; 32]);
        variants.push(v);
        let mut v = m.clone();
        v.chunks.insert(5, [3; 32]);
        variants.push(v);
        let mut v = m.clone();
        v.parent = None;
        variants.push(v);
        let mut v = m.clone();
        v.description.push('!');
        variants.push(v);
        let mut v = m.clone();
        v.created_at = "2027-01-02T03:04:05.000006Z".into();
        variants.push(v);
        let mut v = m.clone();
        v.keyslots[0].blob.push(0);
        variants.push(v);
        let mut v = m.clone();
        v.keyslots[0].params.insert("x".into(), "y".into());
        variants.push(v);
        let mut v = m.clone();
        v.sector_size = 512;
        variants.push(v);
        let mut v = m.clone();
        v.volume_uuid = uuid::Uuid::from_bytes([8; 16]);
        variants.push(v);
        for (n, v) in variants.iter().enumerate() {
            assert!(
                matches!(v.verify(&k), Err(SnapshotError::ManifestTampered { .. })),
                "variant {n} not detected"
            );
        }
    }

    #[test]
    fn tampered_json_is_detected() {
        let k = dek(1);
        let m = sample(&k);
        let json = String::from_utf8(m.to_json().unwrap()).unwrap();
        let t = json.replace("nightly", "nightlx");
        let back = Manifest::parse(&m.id, t.as_bytes()).unwrap();
        assert!(matches!(
            back.verify(&k),
            Err(SnapshotError::ManifestTampered { .. })
        ));
        // Stored under another id: refused before any key is used.
        let other = SnapshotId::parse("snap-00000000000000002").unwrap();
        assert!(matches!(
            Manifest::parse(&other, json.as_bytes()),
            Err(SnapshotError::BadManifest { .. })
        ));
        // Structural damage.
        for (from, to) in [
            ("\"version\":1", "\"version\":2"),
            ("[5,", "[9,"),
            ("aes-xts-plain64", "aes-cbc"),
        ] {
            let t = json.replace(from, to);
            assert!(Manifest::parse(&m.id, t.as_bytes()).is_err(), "{from}");
        }
        assert!(Manifest::parse(&m.id, b"{").is_err());
    }

    #[test]
    fn context_must_be_the_volume_or_the_snapshot() {
        let k = dek(1);
        let mut m = sample(&k);
        assert!(m.expected_context().is_ok());
        m.encryption_context = snapshot_context(&m.id);
        assert!(m.expected_context().is_ok());
        m.encryption_context = EncryptionContext::for_volume(&uuid::Uuid::from_bytes([9; 16]));
        assert!(m.expected_context().is_err());
    }

    #[test]
    fn geometry_outside_the_format_is_refused_before_any_key_is_used() {
        let k = dek(1);
        let m = sample(&k);
        let json = String::from_utf8(m.to_json().unwrap()).unwrap();
        let chunk = format!("\"chunk_size\":{}", m.chunk_size);
        for (from, to) in [
            ("\"sector_size\":4096", "\"sector_size\":1000".to_string()),
            ("\"sector_size\":4096", "\"sector_size\":0".to_string()),
            ("\"volume_size\":4194304", "\"volume_size\":0".to_string()),
            (
                "\"volume_size\":4194304",
                "\"volume_size\":4194305".to_string(),
            ),
            (chunk.as_str(), "\"chunk_size\":6144".to_string()),
            (chunk.as_str(), "\"chunk_size\":0".to_string()),
        ] {
            assert!(json.contains(from), "{from} not in {json}");
            let t = json.replace(from, &to);
            assert!(
                matches!(
                    Manifest::parse(&m.id, t.as_bytes()),
                    Err(SnapshotError::BadManifest { .. })
                ),
                "{to}"
            );
        }
    }
}
