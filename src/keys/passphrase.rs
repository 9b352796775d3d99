//! The passphrase backend: Argon2id derives a key-encryption key from a passphrase;
//! AES-256-GCM wraps the DEK with the encryption context as associated data.
//!
//! A passphrase keyslot is a [`WrappedDek`] with `backend = "passphrase"`, an empty
//! `key_id`, and string-valued `params`:
//!
//! ```text
//! alg = "AES-256-GCM"   version = "1"   kdf = "argon2id"   (Argon2 version 0x13)
//! memory_kib = "262144" time = "3"      lanes = "2"        salt = "<base64 of 16 random bytes>"
//! ```
//!
//! A fresh salt is drawn for every wrap. On unwrap the costs are read back from the
//! keyslot and refused as `Malformed` when outside [`Argon2Params::validate`]'s bounds.
//! The keyslot is not authenticated before its passphrase is derived (the header MAC
//! needs the data key), so the costs are also held to this host's limit
//! ([`Argon2Limits`]) before any work: a memory limit (default 1 GiB, like cryptsetup's
//! `--pbkdf-memory` ceiling; `--max-argon2-memory` or `CRYPTVOL_ARGON2_MAX_MEMORY`), at
//! most [`PASSES_PER_LIMIT`] passes' worth of that memory per keyslot, and twice that in
//! all for one backend (one unlock), so a header with many forged slots cannot make an
//! unlock run for hours.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zeroize::Zeroizing;

use super::seal;
use super::{EncryptionContext, KeyBackend, KeyDescription, KeyError, KeyState, WrappedDek};
use crate::crypto::{CryptoError, Dek, SecretBytes};

const KIND: &str = "passphrase";
/// Key id of passphrase keyslots (there is no key to name).
const KEY_ID: &str = "";
const KDF: &str = "argon2id";
/// Names the "key" in `WrongKey` errors, so the message says what went wrong.
const WRONG_PASSPHRASE: &str = "the supplied passphrase (wrong passphrase)";

/// Upper bound on Argon2 memory accepted from a keyslot or for a wrap: 4 GiB.
pub const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
/// Upper bound on Argon2 passes.
pub const MAX_TIME: u32 = 100;
/// Upper bound on Argon2 lanes.
pub const MAX_LANES: u32 = 64;
/// This host's Argon2 memory limit when nothing sets it: 1 GiB.
pub const DEFAULT_HOST_MAX_MEMORY_KIB: u32 = 1024 * 1024;
/// Argon2 work (memory × passes) one keyslot may ask for, in passes of the memory limit:
/// at the limit 16 passes, at a quarter of it 64.
pub const PASSES_PER_LIMIT: u64 = 16;
/// Argon2 work one backend (one unlock) spends in all, in keyslots of the largest work.
const SLOTS_PER_UNLOCK: u64 = 2;
/// The environment variable that sets this host's Argon2 memory limit (KiB).
pub const MAX_MEMORY_ENV: &str = "CRYPTVOL_ARGON2_MAX_MEMORY";
/// The limit set by `--max-argon2-memory` (0: not set).
static HOST_MAX_MEMORY_KIB: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Sets this process's Argon2 memory limit (`--max-argon2-memory KIB`, clamped to
/// 8..=[`MAX_MEMORY_KIB`]); it takes precedence over [`MAX_MEMORY_ENV`].
pub fn set_host_max_memory_kib(kib: u32) {
    HOST_MAX_MEMORY_KIB.store(
        kib.clamp(8, MAX_MEMORY_KIB),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// How much Argon2 work this host lets keyslots ask for (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Limits {
    /// Most memory of one derivation, KiB.
    pub max_memory_kib: u32,
}

impl Argon2Limits {
    /// The limit in effect: `--max-argon2-memory`, else [`MAX_MEMORY_ENV`], else
    /// [`DEFAULT_HOST_MAX_MEMORY_KIB`].
    pub fn host() -> Result<Argon2Limits, KeyError> {
        let set = HOST_MAX_MEMORY_KIB.load(std::sync::atomic::Ordering::Relaxed);
        if set != 0 {
            return Ok(Argon2Limits {
                max_memory_kib: set,
            });
        }
        let Some(v) = std::env::var_os(MAX_MEMORY_ENV) else {
            return Ok(Argon2Limits {
                max_memory_kib: DEFAULT_HOST_MAX_MEMORY_KIB,
            });
        };
        let kib = v
            .to_str()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|k| (8..=MAX_MEMORY_KIB).contains(k))
            .ok_or_else(|| {
                KeyError::Unsupported(format!(
                    "{MAX_MEMORY_ENV}={:?} is not a memory size in KiB from 8 to {MAX_MEMORY_KIB}",
                    v.to_string_lossy()
                ))
            })?;
        Ok(Argon2Limits {
            max_memory_kib: kib,
        })
    }

    /// Most work (KiB × passes) of one keyslot.
    fn slot_work(&self) -> u64 {
        u64::from(self.max_memory_kib) * PASSES_PER_LIMIT
    }

    /// Refuses costs above this host's limits, before any work.
    fn admit(&self, p: &Argon2Params) -> Result<(), KeyError> {
        if p.memory_kib > self.max_memory_kib || p.work() > self.slot_work() {
            return Err(KeyError::Unsupported(format!(
                "the keyslot asks for Argon2 memory {} KiB x {} passes, above this host's limit of {} KiB (x {PASSES_PER_LIMIT} passes); raise it with --max-argon2-memory KIB or {MAX_MEMORY_ENV}=KIB if intended",
                p.memory_kib, p.time, self.max_memory_kib
            )));
        }
        Ok(())
    }
}

const SALT_LEN: usize = 16;
const MIN_SALT_LEN: usize = 8;
const MAX_SALT_LEN: usize = 64;
/// Longest passphrase (or key file) accepted from a file or descriptor.
const MAX_PASSPHRASE_LEN: usize = 64 * 1024;

/// Argon2id cost, recorded in each passphrase keyslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    pub memory_kib: u32,
    pub time: u32,
    pub lanes: u32,
}

impl Default for Argon2Params {
    fn default() -> Self {
        Argon2Params {
            memory_kib: 262_144,
            time: 3,
            lanes: 2,
        }
    }
}

impl Argon2Params {
    /// Checks the costs are within what cryptvol accepts: 1..=[`MAX_TIME`] passes,
    /// 1..=[`MAX_LANES`] lanes, and 8 KiB per lane up to [`MAX_MEMORY_KIB`] of memory.
    pub fn validate(&self) -> Result<(), KeyError> {
        self.check().map_err(KeyError::Unsupported)
    }

    fn check(&self) -> Result<(), String> {
        if !(1..=MAX_TIME).contains(&self.time) {
            return Err(format!(
                "argon2 time cost {} is outside 1..={MAX_TIME}",
                self.time
            ));
        }
        if !(1..=MAX_LANES).contains(&self.lanes) {
            return Err(format!(
                "argon2 lanes {} is outside 1..={MAX_LANES}",
                self.lanes
            ));
        }
        let min_memory = 8 * self.lanes;
        if !(min_memory..=MAX_MEMORY_KIB).contains(&self.memory_kib) {
            return Err(format!(
                "argon2 memory {} KiB is outside {min_memory}..={MAX_MEMORY_KIB} KiB",
                self.memory_kib
            ));
        }
        Ok(())
    }

    /// Memory × passes, the work of one derivation.
    fn work(&self) -> u64 {
        u64::from(self.memory_kib) * u64::from(self.time)
    }

    fn record(&self, params: &mut BTreeMap<String, String>) {
        params.insert("memory_kib".into(), self.memory_kib.to_string());
        params.insert("time".into(), self.time.to_string());
        params.insert("lanes".into(), self.lanes.to_string());
    }

    /// Reads and bounds-checks the costs stored in a keyslot.
    fn from_keyslot(params: &BTreeMap<String, String>) -> Result<Argon2Params, KeyError> {
        let field = |name: &str| -> Result<u32, KeyError> {
            let value = params.get(name).ok_or_else(|| {
                KeyError::Malformed(format!("passphrase keyslot lacks the {name} parameter"))
            })?;
            value.parse::<u32>().map_err(|_| {
                KeyError::Malformed(format!(
                    "passphrase keyslot parameter {name} = {:?} is not a number",
                    value.escape_debug().to_string()
                ))
            })
        };
        let parsed = Argon2Params {
            memory_kib: field("memory_kib")?,
            time: field("time")?,
            lanes: field("lanes")?,
        };
        parsed
            .check()
            .map_err(|reason| KeyError::Malformed(format!("passphrase keyslot: {reason}")))?;
        Ok(parsed)
    }
}

/// Derives the 32-byte key-encryption key. Blocking and costly: run it off the runtime.
fn derive_kek(passphrase: &[u8], salt: &[u8], params: Argon2Params) -> Result<SecretBytes, String> {
    let argon_params = argon2::Params::new(
        params.memory_kib,
        params.time,
        params.lanes,
        Some(seal::KEK_LEN),
    )
    .map_err(|e| format!("argon2 refused the parameters: {e}"))?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    );
    let mut out = Zeroizing::new([0u8; seal::KEK_LEN]);
    argon
        .hash_password_into(passphrase, salt, &mut out[..])
        .map_err(|e| format!("argon2 failed: {e}"))?;
    // On the heap so moving the result out of the blocking task moves only a pointer.
    let mut kek = Vec::with_capacity(seal::KEK_LEN);
    kek.extend_from_slice(&out[..]);
    Ok(SecretBytes::new(kek))
}

/// Where a passphrase comes from. Never argv.
#[derive(Debug)]
pub enum PassphraseSource {
    File(PathBuf),
    Fd(i32),
    Prompt,
}

impl PassphraseSource {
    /// Reads the passphrase (a trailing newline is stripped for files/fds).
    /// `confirm` asks twice when prompting (used on create).
    ///
    /// Files and descriptors are read to end of file (at most 64 KiB); exactly one
    /// trailing `"\n"` or `"\r\n"` is removed. An empty passphrase is refused. The
    /// prompt reads from the controlling terminal (`/dev/tty`), not from stdin.
    pub fn read(&self, confirm: bool) -> Result<SecretBytes, KeyError> {
        match self {
            PassphraseSource::File(path) => {
                let label = path.display().to_string();
                let file = File::open(path).map_err(|e| {
                    source_err(&label, format!("cannot open the passphrase file: {e}"))
                })?;
                finish(read_bounded(file, &label)?, &label)
            }
            PassphraseSource::Fd(fd) => {
                let label = format!("file descriptor {fd}");
                finish(read_bounded(FdReader(*fd), &label)?, &label)
            }
            PassphraseSource::Prompt => prompt(confirm),
        }
    }
}

fn source_err(label: &str, reason: String) -> KeyError {
    KeyError::Passphrase {
        source_name: label.to_string(),
        reason,
    }
}

/// Reads from a raw descriptor the caller handed us, without taking ownership of it
/// (it is not closed), through `read(2)`.
struct FdReader(RawFd);

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        nix::unistd::read(self.0, buf).map_err(std::io::Error::from)
    }
}

/// Reads to EOF into one preallocated zeroizing buffer (never reallocated, so no
/// copy of the secret is left behind), refusing more than `MAX_PASSPHRASE_LEN` bytes.
fn read_bounded(mut reader: impl Read, label: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let mut buf = Zeroizing::new(vec![0u8; MAX_PASSPHRASE_LEN + 1]);
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(source_err(
                label,
                format!("the passphrase is longer than {MAX_PASSPHRASE_LEN} bytes"),
            ));
        }
        match reader.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(source_err(
                    label,
                    format!("cannot read the passphrase: {e}"),
                ))
            }
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// Strips one trailing newline and refuses an empty passphrase.
fn finish(mut buf: Zeroizing<Vec<u8>>, label: &str) -> Result<SecretBytes, KeyError> {
    let newline = if buf.ends_with(b"\r\n") {
        2
    } else if buf.ends_with(b"\n") {
        1
    } else {
        0
    };
    let len = buf.len() - newline;
    buf.truncate(len);
    if buf.is_empty() {
        return Err(source_err(
            label,
            "the passphrase is empty; write the passphrase into it".to_string(),
        ));
    }
    // Moves the allocation (SecretBytes zeroizes its whole capacity on drop).
    Ok(SecretBytes::new(std::mem::take(&mut *buf)))
}

fn prompt(confirm: bool) -> Result<SecretBytes, KeyError> {
    let tty_err = |e: std::io::Error| {
        source_err(
            "/dev/tty",
            format!(
                "cannot prompt for a passphrase on the terminal ({e}); \
                 give it in a file or on a file descriptor instead"
            ),
        )
    };
    let first = Zeroizing::new(rpassword::prompt_password("Passphrase: ").map_err(tty_err)?);
    if first.is_empty() {
        return Err(source_err(
            "/dev/tty",
            "the passphrase is empty; type a passphrase".to_string(),
        ));
    }
    if confirm {
        let second =
            Zeroizing::new(rpassword::prompt_password("Confirm passphrase: ").map_err(tty_err)?);
        if *first != *second {
            return Err(source_err(
                "/dev/tty",
                "the two passphrases differ; nothing was changed, try again".to_string(),
            ));
        }
    }
    let mut bytes = Vec::with_capacity(first.len());
    bytes.extend_from_slice(first.as_bytes());
    Ok(SecretBytes::new(bytes))
}

/// Wraps/unwraps with a passphrase-derived key.
#[allow(missing_debug_implementations)] // no Debug by design: holds key material
pub struct PassphraseBackend {
    /// Shared with the blocking Argon2 task.
    passphrase: Arc<SecretBytes>,
    params: Argon2Params,
    /// `None`: this host's limits, read at the first derivation.
    limits: Option<Argon2Limits>,
    /// Argon2 work (KiB × passes) spent by unwraps so far.
    spent: std::sync::Mutex<u64>,
}

impl PassphraseBackend {
    /// `params` are the Argon2id costs used for new wraps (unwrap uses the keyslot's).
    /// They are checked with [`Argon2Params::validate`] when wrapping. Derivations are
    /// held to this host's [`Argon2Limits::host`].
    pub fn new(passphrase: SecretBytes, params: Argon2Params) -> PassphraseBackend {
        PassphraseBackend {
            passphrase: Arc::new(passphrase),
            params,
            limits: None,
            spent: std::sync::Mutex::new(0),
        }
    }

    /// The same, held to `limits` instead of this host's.
    pub fn with_limits(
        passphrase: SecretBytes,
        params: Argon2Params,
        limits: Argon2Limits,
    ) -> PassphraseBackend {
        PassphraseBackend {
            limits: Some(limits),
            ..PassphraseBackend::new(passphrase, params)
        }
    }

    fn limits(&self) -> Result<Argon2Limits, KeyError> {
        match self.limits {
            Some(l) => Ok(l),
            None => Argon2Limits::host(),
        }
    }

    /// Admits one unwrap's derivation: within the per-slot limit and within what is left
    /// of this backend's total budget (which it then takes).
    fn admit_unwrap(&self, p: &Argon2Params) -> Result<(), KeyError> {
        let limits = self.limits()?;
        limits.admit(p)?;
        let budget = limits.slot_work() * SLOTS_PER_UNLOCK;
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        if spent.saturating_add(p.work()) > budget {
            return Err(KeyError::Unsupported(format!(
                "not tried: the keyslots tried before it already used this unlock's Argon2 budget ({budget} KiB x passes, {SLOTS_PER_UNLOCK} keyslots at this host's limit of {} KiB x {PASSES_PER_LIMIT} passes); raise it with --max-argon2-memory KIB or {MAX_MEMORY_ENV}=KIB if intended",
                limits.max_memory_kib
            )));
        }
        *spent += p.work();
        Ok(())
    }

    /// Derives the KEK on the blocking pool; `map` turns Argon2 failures into an error.
    async fn kek(
        &self,
        salt: Vec<u8>,
        params: Argon2Params,
        map: fn(String) -> KeyError,
    ) -> Result<SecretBytes, KeyError> {
        let passphrase = self.passphrase.clone();
        seal::blocking(move || derive_kek(passphrase.expose(), &salt, params).map_err(map)).await
    }
}

/// Passphrase keyslots have no key id: accept only "no key", `""` or `"passphrase"`.
fn check_key_ref(key: Option<&str>) -> Result<(), KeyError> {
    match key {
        None | Some("") | Some(KIND) => Ok(()),
        Some(other) => Err(KeyError::NotFound {
            backend: KIND.to_string(),
            key: other.escape_debug().to_string(),
        }),
    }
}

fn decode_salt(params: &BTreeMap<String, String>) -> Result<Vec<u8>, KeyError> {
    let b64 = params
        .get("salt")
        .ok_or_else(|| KeyError::Malformed("passphrase keyslot lacks the salt parameter".into()))?;
    let salt = STANDARD
        .decode(b64)
        .map_err(|_| KeyError::Malformed("passphrase keyslot salt is not base64".into()))?;
    if !(MIN_SALT_LEN..=MAX_SALT_LEN).contains(&salt.len()) {
        return Err(KeyError::Malformed(format!(
            "passphrase keyslot salt is {} bytes, expected {MIN_SALT_LEN}..={MAX_SALT_LEN}",
            salt.len()
        )));
    }
    Ok(salt)
}

#[async_trait::async_trait]
impl KeyBackend for PassphraseBackend {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn describe_key(&self, key: Option<&str>) -> Result<KeyDescription, KeyError> {
        check_key_ref(key)?;
        Ok(KeyDescription {
            backend: KIND.to_string(),
            key_id: KEY_ID.to_string(),
            aliases: Vec::new(),
            state: KeyState::Enabled,
            created_at: String::new(),
        })
    }

    async fn wrap(
        &self,
        key: Option<&str>,
        dek: &Dek,
        ctx: &EncryptionContext,
    ) -> Result<WrappedDek, KeyError> {
        check_key_ref(key)?;
        self.params.validate()?;
        // A keyslot this host could not open again is refused now, not at the next unlock.
        self.limits()?.admit(&self.params)?;
        let mut salt = vec![0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(|e| CryptoError::Rng(e.to_string()))?;
        let salt_b64 = STANDARD.encode(&salt);
        let kek = self.kek(salt, self.params, KeyError::Unsupported).await?;
        let aad = seal::associated_data(KIND, KEY_ID, ctx)?;
        let blob = seal::seal(kek.expose(), &aad, dek)?;
        let mut params = seal::base_params();
        params.insert("kdf".into(), KDF.into());
        self.params.record(&mut params);
        params.insert("salt".into(), salt_b64);
        Ok(WrappedDek {
            backend: KIND.to_string(),
            key_id: KEY_ID.to_string(),
            blob,
            context: ctx.clone(),
            params,
        })
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
    ) -> Result<Dek, KeyError> {
        seal::check_kind_and_alg(wrapped, KIND)?;
        seal::check_context(wrapped, expected)?;
        if wrapped.key_id != KEY_ID {
            return Err(KeyError::Malformed(
                "passphrase keyslot carries a key id; it was not written by this backend".into(),
            ));
        }
        if wrapped.params.get("kdf").map(String::as_str) != Some(KDF) {
            return Err(KeyError::Malformed(format!(
                "passphrase keyslot kdf is not {KDF}"
            )));
        }
        let params = Argon2Params::from_keyslot(&wrapped.params)?;
        let salt = decode_salt(&wrapped.params)?;
        if wrapped.blob.len() != seal::BLOB_LEN {
            // Checked before the costly derivation.
            return Err(KeyError::Malformed(format!(
                "wrapped data key is {} bytes, expected {}",
                wrapped.blob.len(),
                seal::BLOB_LEN
            )));
        }
        self.admit_unwrap(&params)?;
        let kek = self.kek(salt, params, KeyError::Malformed).await?;
        let aad = seal::associated_data(KIND, KEY_ID, &wrapped.context)?;
        seal::open(kek.expose(), &aad, &wrapped.blob, WRONG_PASSPHRASE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// Small costs so tests are fast.
    const FAST: Argon2Params = Argon2Params {
        memory_kib: 8 * 1024,
        time: 1,
        lanes: 1,
    };

    fn backend(pass: &str) -> PassphraseBackend {
        PassphraseBackend::new(SecretBytes::new(pass.as_bytes().to_vec()), FAST)
    }

    fn ctx(uuid: &uuid::Uuid) -> EncryptionContext {
        EncryptionContext::for_volume(uuid)
    }

    #[tokio::test]
    async fn round_trip_and_params_recorded() {
        let b = backend("correct horse");
        let vol = uuid::Uuid::new_v4();
        let (dek, wrapped) = b.generate_dek(None, &ctx(&vol)).await.unwrap();
        assert_eq!(wrapped.backend, "passphrase");
        assert_eq!(wrapped.key_id, "");
        assert_eq!(wrapped.context, ctx(&vol));
        let p = &wrapped.params;
        assert_eq!(p.get("kdf").map(String::as_str), Some("argon2id"));
        assert_eq!(p.get("memory_kib").map(String::as_str), Some("8192"));
        assert_eq!(p.get("time").map(String::as_str), Some("1"));
        assert_eq!(p.get("lanes").map(String::as_str), Some("1"));
        assert_eq!(p.get("alg").map(String::as_str), Some("AES-256-GCM"));
        assert_eq!(STANDARD.decode(&p["salt"]).unwrap().len(), SALT_LEN);

        // Another backend instance with the same passphrase but different default
        // costs unwraps it: the costs come from the keyslot.
        let other = PassphraseBackend::new(
            SecretBytes::new(b"correct horse".to_vec()),
            Argon2Params {
                memory_kib: 16 * 1024,
                time: 2,
                lanes: 2,
            },
        );
        let back = other.unwrap(&wrapped, &ctx(&vol)).await.unwrap();
        assert_eq!(back.expose(), dek.expose());
    }

    #[tokio::test]
    async fn keyslot_costs_above_the_limits_are_refused_before_any_work() {
        let limits = Argon2Limits { max_memory_kib: 64 };
        let small = Argon2Params {
            memory_kib: 64,
            time: 16,
            lanes: 1,
        };
        let pass = || SecretBytes::new(b"pw".to_vec());
        let b = PassphraseBackend::with_limits(pass(), small, limits);
        let vol = uuid::Uuid::new_v4();
        let (dek, wrapped) = b.generate_dek(None, &ctx(&vol)).await.unwrap();
        // More memory, or more work, than the limit: refused, naming the costs.
        for (memory, time) in [("128", "1"), ("64", "17"), ("4194304", "100")] {
            let mut w = wrapped.clone();
            w.params.insert("memory_kib".into(), memory.into());
            w.params.insert("time".into(), time.into());
            let fresh = PassphraseBackend::with_limits(pass(), small, limits);
            let e = fresh.unwrap(&w, &ctx(&vol)).await.err().expect("refused");
            assert!(matches!(e, KeyError::Unsupported(_)), "{e}");
            assert!(
                e.to_string().contains(&format!(
                    "asks for Argon2 memory {memory} KiB x {time} passes, above this host's limit of 64 KiB"
                )),
                "{e}"
            );
        }
        // One backend (one unlock) spends at most two slots' worth of work in all.
        let once = PassphraseBackend::with_limits(pass(), small, limits);
        for _ in 0..2 {
            let back = once.unwrap(&wrapped, &ctx(&vol)).await.unwrap();
            assert_eq!(back.expose(), dek.expose());
        }
        let e = once
            .unwrap(&wrapped, &ctx(&vol))
            .await
            .err()
            .expect("refused");
        assert!(e.to_string().contains("Argon2 budget"), "{e}");
        // A wrap this host could not open again is refused.
        let big = Argon2Params {
            memory_kib: 128,
            ..small
        };
        let e = PassphraseBackend::with_limits(pass(), big, limits)
            .generate_dek(None, &ctx(&vol))
            .await
            .err()
            .expect("refused");
        assert!(e.to_string().contains("above this host's limit"), "{e}");
    }

    #[tokio::test]
    async fn two_wraps_differ() {
        let b = backend("pw");
        let vol = uuid::Uuid::new_v4();
        let (d1, w1) = b.generate_dek(None, &ctx(&vol)).await.unwrap();
        let (d2, w2) = b.generate_dek(None, &ctx(&vol)).await.unwrap();
        assert_ne!(d1.expose(), d2.expose());
        assert_ne!(w1.params["salt"], w2.params["salt"]);
        // Same DEK wrapped twice: fresh salt and nonce each time.
        let w3 = b.wrap(None, &d1, &ctx(&vol)).await.unwrap();
        assert_ne!(w1.blob, w3.blob);
        assert_eq!(
            b.unwrap(&w3, &ctx(&vol)).await.unwrap().expose(),
            d1.expose()
        );
    }

    #[tokio::test]
    async fn wrong_passphrase_refused() {
        let vol = uuid::Uuid::new_v4();
        let (_dek, wrapped) = backend("right")
            .generate_dek(None, &ctx(&vol))
            .await
            .unwrap();
        let err = backend("wrong")
            .unwrap(&wrapped, &ctx(&vol))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, KeyError::WrongKey { .. }), "{err:?}");
        assert!(err.to_string().contains("wrong passphrase"), "{err}");
    }

    #[tokio::test]
    async fn context_mismatch_and_edited_context() {
        let b = backend("pw");
        let (vol_a, vol_b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let (_dek, wrapped) = b.generate_dek(None, &ctx(&vol_a)).await.unwrap();
        let err = b.unwrap(&wrapped, &ctx(&vol_b)).await.err().unwrap();
        assert!(matches!(err, KeyError::ContextMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&vol_a.to_string()) && msg.contains(&vol_b.to_string()),
            "{msg}"
        );

        let mut edited = wrapped.clone();
        edited.context = ctx(&vol_b);
        let err = b.unwrap(&edited, &ctx(&vol_b)).await.err().unwrap();
        assert!(matches!(err, KeyError::WrongKey { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn hostile_params_refused_before_derivation() {
        let b = backend("pw");
        let vol = uuid::Uuid::new_v4();
        let (_dek, wrapped) = b.generate_dek(None, &ctx(&vol)).await.unwrap();
        let cases: [(&str, &str); 8] = [
            ("memory_kib", "4194305"),
            ("memory_kib", "4294967295"),
            ("memory_kib", "4"),
            ("time", "101"),
            ("time", "0"),
            ("lanes", "0"),
            ("lanes", "1000"),
            ("time", "lots"),
        ];
        for (name, value) in cases {
            let mut w = wrapped.clone();
            w.params.insert(name.into(), value.into());
            let err = b.unwrap(&w, &ctx(&vol)).await.err().unwrap();
            assert!(
                matches!(err, KeyError::Malformed(_)),
                "{name}={value}: {err:?}"
            );
        }
        for name in ["salt", "memory_kib", "kdf", "alg"] {
            let mut w = wrapped.clone();
            w.params.remove(name);
            let err = b.unwrap(&w, &ctx(&vol)).await.err().unwrap();
            assert!(
                matches!(err, KeyError::Malformed(_)),
                "without {name}: {err:?}"
            );
        }
        let mut w = wrapped.clone();
        w.params.insert("salt".into(), STANDARD.encode([0u8; 4]));
        assert!(matches!(
            b.unwrap(&w, &ctx(&vol)).await,
            Err(KeyError::Malformed(_))
        ));
        let mut w = wrapped.clone();
        w.blob.truncate(10);
        assert!(matches!(
            b.unwrap(&w, &ctx(&vol)).await,
            Err(KeyError::Malformed(_))
        ));
        let mut w = wrapped.clone();
        w.backend = "local".into();
        assert!(matches!(
            b.unwrap(&w, &ctx(&vol)).await,
            Err(KeyError::Malformed(_))
        ));
        let mut w = wrapped;
        w.key_id = "mk-x".into();
        assert!(matches!(
            b.unwrap(&w, &ctx(&vol)).await,
            Err(KeyError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn absurd_params_refused_for_wrap() {
        let b = PassphraseBackend::new(
            SecretBytes::new(b"pw".to_vec()),
            Argon2Params {
                memory_kib: u32::MAX,
                time: 1,
                lanes: 1,
            },
        );
        let vol = uuid::Uuid::new_v4();
        let err = b.generate_dek(None, &ctx(&vol)).await.err().unwrap();
        assert!(matches!(err, KeyError::Unsupported(_)), "{err:?}");
        assert!(Argon2Params::default().validate().is_ok());
        assert!(FAST.validate().is_ok());
    }

    #[tokio::test]
    async fn describe_and_key_refs() {
        let b = backend("pw");
        let d = b.describe_key(None).await.unwrap();
        assert_eq!(d.backend, "passphrase");
        assert_eq!(d.key_id, "");
        assert_eq!(d.state, KeyState::Enabled);
        assert!(b.describe_key(Some("passphrase")).await.is_ok());
        let err = b.describe_key(Some("mk-abc")).await.err().unwrap();
        assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("mk-abc"), "{err}");
        let vol = uuid::Uuid::new_v4();
        assert!(b.generate_dek(Some("alias/x"), &ctx(&vol)).await.is_err());
    }

    fn read_file_source(content: &[u8]) -> Result<SecretBytes, KeyError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        f.flush().unwrap();
        PassphraseSource::File(f.path().to_path_buf()).read(true)
    }

    #[test]
    fn file_source_strips_one_newline() {
        assert_eq!(read_file_source(b"secret\n").unwrap().expose(), b"secret");
        assert_eq!(read_file_source(b"secret\r\n").unwrap().expose(), b"secret");
        assert_eq!(read_file_source(b"secret").unwrap().expose(), b"secret");
        assert_eq!(
            read_file_source(b"secret\n\n").unwrap().expose(),
            b"secret\n"
        );
        assert_eq!(read_file_source(b" s p \n").unwrap().expose(), b" s p ");
    }

    #[test]
    fn file_source_refuses_empty_missing_and_huge() {
        for content in [&b""[..], b"\n", b"\r\n"] {
            let err = read_file_source(content).err().unwrap();
            assert!(err.to_string().contains("empty"), "{err}");
        }
        let huge = vec![b'a'; MAX_PASSPHRASE_LEN + 1];
        let err = read_file_source(&huge).err().unwrap();
        assert!(err.to_string().contains("longer"), "{err}");
        let exact = vec![b'a'; MAX_PASSPHRASE_LEN];
        assert_eq!(
            read_file_source(&exact).unwrap().expose().len(),
            MAX_PASSPHRASE_LEN
        );

        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        let err = PassphraseSource::File(missing.clone())
            .read(false)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn fd_source_reads_to_eof_and_leaves_fd_open() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let mut writer = File::from(write_end);
        writer.write_all(b"from a pipe\n").unwrap();
        drop(writer);
        let secret = PassphraseSource::Fd(read_end.as_raw_fd())
            .read(false)
            .unwrap();
        assert_eq!(secret.expose(), b"from a pipe");
        // Still open (we did not take ownership): a second read sees EOF, i.e. empty.
        let err = PassphraseSource::Fd(read_end.as_raw_fd())
            .read(false)
            .err()
            .unwrap();
        assert!(err.to_string().contains("empty"), "{err}");
        drop(read_end);
    }

    #[test]
    fn bad_fd_refused() {
        let err = PassphraseSource::Fd(-1).read(false).err().unwrap();
        assert!(err.to_string().contains("file descriptor -1"), "{err}");
    }

    /// RFC 9106 section 5.3 inputs (password 32 x 0x01, salt 16 x 0x02, m = 32 KiB,
    /// t = 3, p = 4) without the secret and associated data, which cryptvol does not use.
    /// Expected value computed with an independent implementation (OpenSSL's Argon2id).
    #[test]
    fn derive_kek_matches_independent_argon2id() {
        let params = Argon2Params {
            memory_kib: 32,
            time: 3,
            lanes: 4,
        };
        let kek = derive_kek(&[1u8; 32], &[2u8; 16], params).unwrap();
        let expected = "03aab965c12001c9d7d0d2de33192c0494b684bb148196d73c1df1acaf6d0c2e";
        let got = hex::encode(kek.expose());
        assert_eq!(got, expected);
    }

    #[test]
    fn derive_kek_is_deterministic_and_salted() {
        let a = derive_kek(b"pw", b"saltsaltsalt1234", FAST).unwrap();
        let b = derive_kek(b"pw", b"saltsaltsalt1234", FAST).unwrap();
        let c = derive_kek(b"pw", b"saltsaltsalt5678", FAST).unwrap();
        let d = derive_kek(b"pW", b"saltsaltsalt1234", FAST).unwrap();
        assert_eq!(a.expose().len(), 32);
        assert_eq!(a.expose(), b.expose());
        assert_ne!(a.expose(), c.expose());
        assert_ne!(a.expose(), d.expose());
    }
}
