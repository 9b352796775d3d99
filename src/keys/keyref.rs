//! Key references: what a user types to name a master key (`--key`, `--kms-key-id`,
//! `--to-key`, `cryptvol key set-default`).
//!
//! | reference | backend | meaning |
//! |---|---|---|
//! | `mk-<32 hex>` | local | a local key id |
//! | `alias/NAME` | local | a local alias, resolved when wrapping |
//! | `local:mk-…`, `local:alias/NAME` | local | the same, explicit |
//! | `arn:aws:kms:REGION:ACCOUNT:key/ID` or `…:alias/NAME` | aws-kms | a KMS key or alias ARN |
//! | `aws-kms:KEY_ID`, `aws-kms:alias/NAME` | aws-kms | a KMS key id or alias |
//! | `exec:NAME` | exec | the default key of the exec backend registered as NAME |
//! | `exec:NAME:KEY` | exec | key KEY of that exec backend |
//!
//! With [`BareRefs::AwsKms`] (the `bare_key_refs = "aws-kms"` setting, for operators whose
//! keys live in AWS KMS), a bare `alias/NAME` and a bare key id (a UUID) name an AWS KMS
//! key instead; `local:alias/NAME` and `mk-…` still name local keys and every other form
//! keeps its meaning.

use std::fmt;

use super::KeyError;

/// Backend kind of local keys.
pub const LOCAL: &str = "local";
/// Backend kind of AWS KMS keys.
pub const AWS_KMS: &str = "aws-kms";
/// Backend kind of exec-backend keys.
pub const EXEC: &str = "exec";
/// Backend kind of passphrase keyslots.
pub const PASSPHRASE: &str = "passphrase";

/// Longest reference accepted.
const MAX_REF_LEN: usize = 2048;
/// Longest exec backend name.
pub const MAX_EXEC_NAME_LEN: usize = 64;

/// A parsed key reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// A local key id or `alias/NAME`; `None` is the local default key
    /// (`alias/cryptvol/default`, created on first use).
    Local(Option<String>),
    /// An AWS KMS key ARN, alias ARN, key id or `alias/NAME`.
    AwsKms(String),
    /// A key of the exec backend registered under `name`; `key: None` is that program's
    /// default key.
    Exec { name: String, key: Option<String> },
}

/// Exec backend names: 1 to 64 ASCII letters, digits, `_` and `-`.
pub fn is_exec_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_EXEC_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

fn bad(s: &str, why: &str) -> KeyError {
    KeyError::Unsupported(format!(
        "invalid key reference {:?}: {why}. Accepted forms: a local key id (mk-…) or \
         alias/NAME; arn:aws:kms:…, aws-kms:KEY_ID or aws-kms:alias/NAME; exec:NAME or \
         exec:NAME:KEY",
        s.escape_debug().to_string()
    ))
}

/// What a bare `alias/NAME` or key id (UUID) names: the setting `bare_key_refs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BareRefs {
    /// `alias/NAME` is a local alias; a bare UUID is refused (the default).
    #[default]
    Local,
    /// `alias/NAME` and bare UUIDs are AWS KMS aliases and key ids (as in the AWS CLI).
    AwsKms,
}

impl std::str::FromStr for BareRefs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            LOCAL => Ok(BareRefs::Local),
            AWS_KMS => Ok(BareRefs::AwsKms),
            _ => Err(format!(
                "bare key references must mean \"local\" or \"aws-kms\", not {:?}",
                s.escape_debug().to_string()
            )),
        }
    }
}

/// A bare `alias/NAME` or UUID as an AWS KMS reference, when `bare` says so.
fn bare_kms_ref(s: &str, bare: BareRefs) -> Option<KeyRef> {
    let plain = s.len() <= MAX_REF_LEN && !s.chars().any(char::is_control);
    (bare == BareRefs::AwsKms && plain && (s.starts_with("alias/") || looks_like_uuid(s)))
        .then(|| KeyRef::AwsKms(s.to_string()))
}

fn looks_like_uuid(s: &str) -> bool {
    uuid::Uuid::try_parse(s).is_ok()
}

impl KeyRef {
    /// Parses a reference (see the module documentation for the forms), bare aliases
    /// and ids naming local keys.
    pub fn parse(s: &str) -> Result<KeyRef, KeyError> {
        KeyRef::parse_with(s, BareRefs::Local)
    }

    /// Parses a reference; `bare` says what a bare `alias/NAME` or UUID names.
    pub fn parse_with(s: &str, bare: BareRefs) -> Result<KeyRef, KeyError> {
        if let Some(r) = bare_kms_ref(s, bare) {
            return Ok(r);
        }
        if s.is_empty() {
            return Err(bad(s, "it is empty"));
        }
        if s.len() > MAX_REF_LEN {
            return Err(bad(&s[..32.min(s.len())], "it is too long"));
        }
        if s.chars().any(char::is_control) {
            return Err(bad(s, "it contains control characters"));
        }
        if let Some(rest) = s.strip_prefix("arn:") {
            let mut parts = rest.splitn(3, ':');
            let partition = parts.next().unwrap_or("");
            let service = parts.next().unwrap_or("");
            if partition.starts_with("aws") && service == "kms" && parts.next().is_some() {
                return Ok(KeyRef::AwsKms(s.to_string()));
            }
            return Err(bad(s, "only AWS KMS ARNs (arn:aws:kms:…) name keys"));
        }
        if let Some(rest) = s.strip_prefix("aws-kms:") {
            if rest.is_empty() {
                return Err(bad(s, "aws-kms: needs a key id, alias/NAME or ARN"));
            }
            if rest.starts_with("arn:") {
                return KeyRef::parse(rest);
            }
            return Ok(KeyRef::AwsKms(rest.to_string()));
        }
        if let Some(rest) = s.strip_prefix("exec:") {
            let (name, key) = match rest.split_once(':') {
                Some((n, k)) => (n, Some(k)),
                None => (rest, None),
            };
            if !is_exec_name(name) {
                return Err(bad(
                    s,
                    "the exec backend NAME must be 1 to 64 letters, digits, '_' or '-'",
                ));
            }
            if key == Some("") {
                return Err(bad(s, "the KEY after exec:NAME: is empty"));
            }
            return Ok(KeyRef::Exec {
                name: name.to_string(),
                key: key.map(str::to_string),
            });
        }
        let local = s.strip_prefix("local:").unwrap_or(s);
        if local.starts_with("alias/") || local.starts_with("mk-") {
            return Ok(KeyRef::Local(Some(local.to_string())));
        }
        if looks_like_uuid(local) {
            return Err(bad(
                s,
                "a bare UUID is not a local key id; for an AWS KMS key id write aws-kms:ID",
            ));
        }
        Err(bad(s, "not a recognised key reference"))
    }

    /// The backend kind this reference names.
    pub fn backend(&self) -> &'static str {
        match self {
            KeyRef::Local(_) => LOCAL,
            KeyRef::AwsKms(_) => AWS_KMS,
            KeyRef::Exec { .. } => EXEC,
        }
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Local(Some(k)) => write!(f, "{k}"),
            KeyRef::Local(None) => write!(f, "the local default key"),
            KeyRef::AwsKms(k) if k.starts_with("arn:") => write!(f, "{k}"),
            KeyRef::AwsKms(k) => write!(f, "aws-kms:{k}"),
            KeyRef::Exec { name, key: None } => write!(f, "exec:{name}"),
            KeyRef::Exec { name, key: Some(k) } => write!(f, "exec:{name}:{k}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn local_forms() {
        let id = "mk-0123456789abcdef0123456789abcdef";
        assert_eq!(KeyRef::parse(id).unwrap(), KeyRef::Local(Some(id.into())));
        assert_eq!(
            KeyRef::parse(&format!("local:{id}")).unwrap(),
            KeyRef::Local(Some(id.into()))
        );
        assert_eq!(
            KeyRef::parse("alias/db").unwrap(),
            KeyRef::Local(Some("alias/db".into()))
        );
        assert_eq!(KeyRef::parse("alias/db").unwrap().backend(), "local");
        assert_eq!(KeyRef::parse("alias/db").unwrap().to_string(), "alias/db");
    }

    #[test]
    fn aws_forms() {
        let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(KeyRef::parse(arn).unwrap(), KeyRef::AwsKms(arn.into()));
        assert_eq!(KeyRef::parse(arn).unwrap().to_string(), arn);
        let gov = "arn:aws-us-gov:kms:us-gov-west-1:123456789012:alias/x";
        assert_eq!(KeyRef::parse(gov).unwrap().backend(), "aws-kms");
        assert_eq!(
            KeyRef::parse("aws-kms:alias/ebs").unwrap(),
            KeyRef::AwsKms("alias/ebs".into())
        );
        let id = "1234abcd-12ab-34cd-56ef-1234567890ab";
        let r = KeyRef::parse(&format!("aws-kms:{id}")).unwrap();
        assert_eq!(r, KeyRef::AwsKms(id.into()));
        assert_eq!(r.to_string(), format!("aws-kms:{id}"));
        // A bare UUID is refused with a hint.
        let err = KeyRef::parse(id).err().unwrap().to_string();
        assert!(err.contains("aws-kms:ID"), "{err}");
        assert!(KeyRef::parse("arn:aws:s3:::bucket").is_err());
        assert!(KeyRef::parse("aws-kms:").is_err());
    }

    #[test]
    fn exec_forms() {
        assert_eq!(
            KeyRef::parse("exec:vault").unwrap(),
            KeyRef::Exec {
                name: "vault".into(),
                key: None
            }
        );
        let r = KeyRef::parse("exec:vault:transit/k1:v2").unwrap();
        assert_eq!(
            r,
            KeyRef::Exec {
                name: "vault".into(),
                key: Some("transit/k1:v2".into())
            }
        );
        assert_eq!(r.to_string(), "exec:vault:transit/k1:v2");
        assert_eq!(r.backend(), "exec");
        for bad in ["exec:", "exec:a b", "exec:x:", "exec:../x"] {
            assert!(KeyRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_refused_with_the_forms() {
        for s in ["", "default", "passphrase", "key-1", "a\nb"] {
            let err = KeyRef::parse(s).err().unwrap().to_string();
            assert!(err.contains("Accepted forms"), "{s}: {err}");
        }
    }

    #[test]
    fn bare_refs_aws_kms() {
        let aws = BareRefs::AwsKms;
        let id = "1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(
            KeyRef::parse_with("alias/db", aws).unwrap(),
            KeyRef::AwsKms("alias/db".into())
        );
        assert_eq!(
            KeyRef::parse_with(id, aws).unwrap(),
            KeyRef::AwsKms(id.into())
        );
        // Explicit forms keep their meaning.
        assert_eq!(
            KeyRef::parse_with("local:alias/db", aws).unwrap(),
            KeyRef::Local(Some("alias/db".into()))
        );
        let mk = "mk-0123456789abcdef0123456789abcdef";
        assert_eq!(KeyRef::parse_with(mk, aws).unwrap().backend(), LOCAL);
        assert_eq!(KeyRef::parse_with("exec:v", aws).unwrap().backend(), EXEC);
        assert!(KeyRef::parse_with("alias/a\nb", aws).is_err());
        // The default is unchanged.
        assert_eq!(KeyRef::parse("alias/db").unwrap().backend(), LOCAL);
        assert_eq!("aws-kms".parse::<BareRefs>().unwrap(), aws);
        assert!("kms".parse::<BareRefs>().is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(s in "\\PC{0,80}") {
            if let Ok(r) = KeyRef::parse(&s) {
                if r != KeyRef::Local(None) {
                    prop_assert_eq!(KeyRef::parse(&r.to_string()).unwrap(), r);
                }
            }
        }
    }
}
