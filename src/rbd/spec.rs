//! `rbd:[POOL/[NAMESPACE/]]IMAGE`: where a volume lives on a Ceph cluster, parsed in one
//! pure function. The grammar is the `rbd` tool's image spec behind an `rbd:` prefix: the
//! pool defaults to `rbd` (as `rbd`'s `rbd_default_pool`), the namespace to the pool's
//! default one. Snapshots (`@SNAP`) are refused: a served volume is writable.

use std::fmt;

/// The prefix that marks an RBD image wherever a volume path is accepted.
pub const RBD_PREFIX: &str = "rbd:";
/// The pool an image spec without one names, as the `rbd` tool's default.
pub const DEFAULT_POOL: &str = "rbd";
/// The longest pool, namespace or image name accepted (RADOS object names are bounded).
pub const MAX_NAME_LEN: usize = 255;

/// One RBD image: pool, optional namespace, image name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
}

/// Why an `rbd:` spec was refused (the message says what to type instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid RBD image {spec:?}: {reason} (expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE)"
)]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

impl ImageSpec {
    /// True when `s` names an RBD image (starts with `rbd:`) rather than a file.
    pub fn is_rbd(s: &str) -> bool {
        s.starts_with(RBD_PREFIX)
    }

    /// Parses `rbd:[POOL/[NAMESPACE/]]IMAGE`.
    pub fn parse(spec: &str) -> Result<ImageSpec, SpecError> {
        let err = |reason: &str| SpecError {
            spec: spec.chars().take(300).collect(),
            reason: reason.to_string(),
        };
        let rest = spec
            .strip_prefix(RBD_PREFIX)
            .ok_or_else(|| err("it does not start with rbd:"))?;
        if rest.contains('@') {
            return Err(err(
                "snapshots (@SNAP) cannot be served; name the image itself",
            ));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        for part in &parts {
            check_name(part).map_err(|r| err(&r))?;
        }
        let (pool, namespace, image) = match parts.as_slice() {
            [image] => (DEFAULT_POOL, None, *image),
            [pool, image] => (*pool, None, *image),
            [pool, ns, image] => (*pool, Some(ns.to_string()), *image),
            _ => return Err(err("too many '/' separators")),
        };
        Ok(ImageSpec {
            pool: pool.to_string(),
            namespace,
            image: image.to_string(),
        })
    }
}

fn check_name(part: &str) -> Result<(), String> {
    if part.is_empty() {
        return Err("a pool, namespace or image name is empty".into());
    }
    if part.len() > MAX_NAME_LEN {
        return Err(format!("a name is longer than {MAX_NAME_LEN} bytes"));
    }
    if part.chars().any(|c| c.is_control()) {
        return Err("a name contains a control character".into());
    }
    Ok(())
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{RBD_PREFIX}{}/{ns}/{}", self.pool, self.image),
            None => write!(f, "{RBD_PREFIX}{}/{}", self.pool, self.image),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pool: &str, ns: Option<&str>, image: &str) -> ImageSpec {
        ImageSpec {
            pool: pool.into(),
            namespace: ns.map(String::from),
            image: image.into(),
        }
    }

    #[test]
    fn pool_and_image() {
        assert_eq!(
            ImageSpec::parse("rbd:rbd/vol1").unwrap(),
            spec("rbd", None, "vol1")
        );
        assert_eq!(
            ImageSpec::parse("rbd:fast/db-01").unwrap(),
            spec("fast", None, "db-01")
        );
    }

    #[test]
    fn namespace() {
        assert_eq!(
            ImageSpec::parse("rbd:pool/tenant-a/vol").unwrap(),
            spec("pool", Some("tenant-a"), "vol")
        );
    }

    #[test]
    fn image_alone_is_in_the_default_pool() {
        assert_eq!(
            ImageSpec::parse("rbd:vol").unwrap(),
            spec("rbd", None, "vol")
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["rbd:rbd/vol1", "rbd:p/ns/img"] {
            assert_eq!(ImageSpec::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(ImageSpec::parse("rbd:v").unwrap().to_string(), "rbd:rbd/v");
    }

    #[test]
    fn refusals_say_why() {
        let cases = [
            ("vol", "does not start with rbd:"),
            ("rbd:", "empty"),
            ("rbd:/img", "empty"),
            ("rbd:pool/", "empty"),
            ("rbd:pool//img", "empty"),
            ("rbd:a/b/c/d", "too many"),
            ("rbd:pool/img@snap", "snapshots"),
            ("rbd:pool/im\0g", "control character"),
            ("rbd:pool/im\ng", "control character"),
        ];
        for (input, why) in cases {
            let e = ImageSpec::parse(input).expect_err(input);
            assert!(e.to_string().contains(why), "{input}: {e}");
            assert!(e.to_string().contains("rbd:POOL/IMAGE"), "{input}: {e}");
        }
    }

    #[test]
    fn long_names_are_bounded() {
        let ok = format!("rbd:p/{}", "a".repeat(MAX_NAME_LEN));
        assert!(ImageSpec::parse(&ok).is_ok());
        let long = format!("rbd:p/{}", "a".repeat(MAX_NAME_LEN + 1));
        assert!(ImageSpec::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("longer"));
    }

    #[test]
    fn is_rbd_only_for_the_prefix() {
        assert!(ImageSpec::is_rbd("rbd:rbd/x"));
        assert!(!ImageSpec::is_rbd("/var/lib/vol"));
        assert!(!ImageSpec::is_rbd("./rbd:x"));
    }
}
