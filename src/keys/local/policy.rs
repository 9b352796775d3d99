//! Key policies: which uids hold which permission on a key, checking them, and granting
//! and revoking them.

use std::collections::BTreeSet;

use crate::keys::{KeyError, Permission, Principal};

use super::record::KeyMeta;
use super::LocalKeystore;

/// Which uids may use a key for what. Root (uid 0) is always allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyPolicy {
    #[serde(default)]
    pub generate: BTreeSet<u32>,
    #[serde(default)]
    pub unwrap: BTreeSet<u32>,
    #[serde(default)]
    pub rewrap: BTreeSet<u32>,
    #[serde(default)]
    pub administer: BTreeSet<u32>,
}

impl KeyPolicy {
    /// The default policy: `uid` may do everything.
    pub fn owner(uid: u32) -> KeyPolicy {
        let one: BTreeSet<u32> = [uid].into_iter().collect();
        KeyPolicy {
            generate: one.clone(),
            unwrap: one.clone(),
            rewrap: one.clone(),
            administer: one,
        }
    }

    pub(super) fn set(&self, p: Permission) -> &BTreeSet<u32> {
        match p {
            Permission::Generate => &self.generate,
            Permission::Unwrap => &self.unwrap,
            Permission::Rewrap => &self.rewrap,
            Permission::Administer => &self.administer,
        }
    }

    fn set_mut(&mut self, p: Permission) -> &mut BTreeSet<u32> {
        match p {
            Permission::Generate => &mut self.generate,
            Permission::Unwrap => &mut self.unwrap,
            Permission::Rewrap => &mut self.rewrap,
            Permission::Administer => &mut self.administer,
        }
    }

    /// Whether `uid` holds permission `p` (root always does).
    pub fn allows(&self, p: Permission, uid: u32) -> bool {
        uid == 0 || self.set(p).contains(&uid)
    }
}

impl LocalKeystore {
    pub(super) fn authorize(
        &self,
        meta: &KeyMeta,
        p: Permission,
        operation: &str,
    ) -> Result<(), KeyError> {
        if meta.policy.allows(p, self.principal.uid) {
            return Ok(());
        }
        let operation = if p == Permission::Administer {
            format!("administer ({operation})")
        } else {
            p.as_str().to_string()
        };
        Err(KeyError::AccessDenied {
            key: meta.key_id.clone(),
            operation,
            principal: self.principal.to_string(),
        })
    }

    /// Grants `principal` the `permissions` on a key (administer permission needed).
    pub fn grant(
        &self,
        key: &str,
        principal: &Principal,
        permissions: &[Permission],
    ) -> Result<String, KeyError> {
        let detail = policy_detail(principal, permissions);
        self.admin("grant", key, |m| {
            for p in permissions {
                m.meta.policy.set_mut(*p).insert(principal.uid);
            }
            Ok((m.meta.key_id.clone(), Some(detail)))
        })
    }

    /// Revokes `permissions` on a key from `principal` (administer permission needed).
    pub fn revoke(
        &self,
        key: &str,
        principal: &Principal,
        permissions: &[Permission],
    ) -> Result<String, KeyError> {
        let detail = policy_detail(principal, permissions);
        self.admin("revoke", key, |m| {
            for p in permissions {
                m.meta.policy.set_mut(*p).remove(&principal.uid);
            }
            Ok((m.meta.key_id.clone(), Some(detail)))
        })
    }
}

fn policy_detail(principal: &Principal, permissions: &[Permission]) -> String {
    let ops: Vec<&str> = permissions.iter().map(|p| p.as_str()).collect();
    format!(
        "principal={} uid={} operations={}",
        principal.short(),
        principal.uid,
        ops.join(",")
    )
}
