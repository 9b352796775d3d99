//! Principals: who uses a key. On this host a principal is a Unix user, identified by its
//! uid (names are only for display and for the command line).

use std::fmt;

use super::KeyError;

/// A Unix user as a key-policy principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub uid: u32,
    /// The user name at the time it was looked up, when the uid has one.
    pub name: Option<String>,
}

impl Principal {
    /// The effective user of this process (the daemon's principal).
    pub fn current() -> Principal {
        Principal::from_uid(nix::unistd::geteuid().as_raw())
    }

    /// The principal with this uid (its name looked up in the user database).
    pub fn from_uid(uid: u32) -> Principal {
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        Principal { uid, name }
    }

    /// A user name or a numeric uid, as typed on the command line.
    pub fn parse(s: &str) -> Result<Principal, KeyError> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            let uid = s.parse::<u32>().map_err(|_| {
                KeyError::Unsupported(format!("principal {s:?} is not a valid uid"))
            })?;
            return Ok(Principal::from_uid(uid));
        }
        match nix::unistd::User::from_name(s) {
            Ok(Some(u)) => Ok(Principal {
                uid: u.uid.as_raw(),
                name: Some(u.name),
            }),
            _ => Err(KeyError::Unsupported(format!(
                "no Unix user named {:?} on this host; give a user name or a numeric uid",
                s.escape_debug().to_string()
            ))),
        }
    }

    /// The user name, else `uid:N`.
    pub fn short(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("uid:{}", self.uid),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "user {n} (uid {})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_by_name_and_number() {
        let by_name = Principal::parse("root").unwrap();
        assert_eq!(by_name.uid, 0);
        assert_eq!(by_name.to_string(), "user root (uid 0)");
        assert_eq!(Principal::parse("0").unwrap(), by_name);
        assert_eq!(by_name.short(), "root");
    }

    #[test]
    fn unknown_user_and_bad_uid() {
        let err = Principal::parse("no-such-user-xyz").err().unwrap();
        assert!(err.to_string().contains("no-such-user-xyz"), "{err}");
        assert!(Principal::parse("99999999999").is_err());
        let nameless = Principal::from_uid(4_000_000_000);
        assert_eq!(nameless.to_string(), "uid 4000000000");
        assert_eq!(nameless.short(), "uid:4000000000");
    }
}
