//! Key states and their lifecycle: enabling, disabling, scheduling and cancelling
//! deletion, rotating the material, and destroying keys whose deletion is due.

use crate::keys::clock::{now_rfc3339, now_unix, rfc3339_utc};
use crate::keys::{KeyError, KeyState};

use super::admin::done_but_unaudited;
use super::files::shred_file;
use super::record::{fresh_material, KeyMeta, MaterialVersion};
use super::LocalKeystore;

/// Shortest deletion waiting period, in days (as AWS KMS).
pub const MIN_DELETION_DAYS: u32 = 7;
/// Longest (and default) deletion waiting period, in days.
pub const MAX_DELETION_DAYS: u32 = 30;
/// Most material versions a key may accumulate through rotation.
const MAX_MATERIAL_VERSIONS: usize = 100;

/// The unusable-state error for a key that is not Enabled.
pub(super) fn unusable(meta: &KeyMeta) -> KeyError {
    let id = &meta.key_id;
    let state = match meta.state {
        KeyState::Enabled => "enabled".to_string(),
        KeyState::Disabled => {
            format!("disabled; enable it with `cryptvol key enable {id}` (or use another key)")
        }
        KeyState::PendingDeletion => format!(
            "pending deletion (its material is destroyed after {}); to keep it, run \
             `cryptvol key cancel-deletion {id}` then `cryptvol key enable {id}`",
            meta.deletion_date()
                .unwrap_or_else(|| "the waiting period".into())
        ),
    };
    KeyError::KeyUnusable {
        key: id.clone(),
        state,
    }
}

impl LocalKeystore {
    /// Enables a disabled key. A key pending deletion must have its deletion cancelled
    /// first (as AWS KMS).
    pub fn enable(&self, key: &str) -> Result<String, KeyError> {
        self.admin("enable", key, |m| {
            match m.meta.state {
                KeyState::PendingDeletion => {
                    return Err(KeyError::InvalidState {
                        key: m.meta.key_id.clone(),
                        reason: format!(
                            "it is pending deletion; cancel the deletion first with `cryptvol \
                             key cancel-deletion {}`",
                            m.meta.key_id
                        ),
                    })
                }
                KeyState::Enabled | KeyState::Disabled => m.meta.state = KeyState::Enabled,
            }
            Ok((m.meta.key_id.clone(), None))
        })
    }

    /// Disables a key: it can no longer wrap or unwrap, so volumes using it cannot be
    /// attached (volumes already attached keep working).
    pub fn disable(&self, key: &str) -> Result<String, KeyError> {
        self.admin("disable", key, |m| {
            match m.meta.state {
                KeyState::PendingDeletion => {
                    return Err(KeyError::InvalidState {
                        key: m.meta.key_id.clone(),
                        reason: "it is pending deletion (already unusable)".into(),
                    })
                }
                KeyState::Enabled | KeyState::Disabled => m.meta.state = KeyState::Disabled,
            }
            Ok((m.meta.key_id.clone(), None))
        })
    }

    /// Schedules the destruction of a key after `days` (7 to 30) days; until then the key
    /// is `PendingDeletion` (unusable). Returns the deletion date.
    pub fn schedule_deletion(&self, key: &str, days: u32) -> Result<String, KeyError> {
        self.admin("schedule-deletion", key, |m| {
            if !(MIN_DELETION_DAYS..=MAX_DELETION_DAYS).contains(&days) {
                return Err(KeyError::Unsupported(format!(
                    "the deletion waiting period must be {MIN_DELETION_DAYS} to {MAX_DELETION_DAYS} days, not {days}"
                )));
            }
            if m.meta.state == KeyState::PendingDeletion {
                return Err(KeyError::InvalidState {
                    key: m.meta.key_id.clone(),
                    reason: format!(
                        "it is already pending deletion (on {})",
                        m.meta.deletion_date().unwrap_or_default()
                    ),
                });
            }
            let at = now_unix() + u64::from(days) * 86_400;
            m.meta.state = KeyState::PendingDeletion;
            m.meta.deletion_unix = Some(at);
            let date = rfc3339_utc(at);
            let detail = format!("days={days} deletion_date={date}");
            Ok((date, Some(detail)))
        })
    }

    /// Cancels a scheduled deletion; the key is left `Disabled` (as AWS KMS).
    pub fn cancel_deletion(&self, key: &str) -> Result<String, KeyError> {
        self.admin("cancel-deletion", key, |m| {
            if m.meta.state != KeyState::PendingDeletion {
                return Err(KeyError::InvalidState {
                    key: m.meta.key_id.clone(),
                    reason: "it is not pending deletion".into(),
                });
            }
            m.meta.state = KeyState::Disabled;
            m.meta.deletion_unix = None;
            Ok((m.meta.key_id.clone(), None))
        })
    }

    /// Adds a new material version; new wraps use it, older versions still unwrap.
    /// Returns the new version number.
    pub fn rotate(&self, key: &str) -> Result<u32, KeyError> {
        self.admin("rotate", key, |m| {
            if m.meta.state != KeyState::Enabled {
                return Err(unusable(&m.meta));
            }
            if m.materials.len() >= MAX_MATERIAL_VERSIONS {
                return Err(KeyError::InvalidState {
                    key: m.meta.key_id.clone(),
                    reason: format!(
                        "it already has {MAX_MATERIAL_VERSIONS} material versions; create a new \
                         key and rekey volumes to it instead"
                    ),
                });
            }
            let version = m.meta.current_version() + 1;
            let created_at = now_rfc3339();
            m.materials.push((version, fresh_material()?));
            m.meta.versions.push(MaterialVersion {
                version,
                created_at,
            });
            Ok((version, Some(format!("material_version={version}"))))
        })
    }

    /// Destroys every key whose deletion waiting period has passed: the key file is
    /// overwritten with zeros and removed, with its aliases (and the default-key settings
    /// naming it). Also removes leftovers of interrupted writes. Returns the deleted ids.
    pub fn purge_expired(&self) -> Result<Vec<String>, KeyError> {
        let writer = self.audit.open()?;
        let _lock = self.lock()?;
        self.remove_stale_tmp_files()?;
        let now = now_unix();
        let mut deleted = Vec::new();
        for id in self.key_ids()? {
            let meta = self.load_key(&id, false)?.meta;
            let due = meta.state == KeyState::PendingDeletion
                && meta.deletion_unix.is_some_and(|t| t <= now);
            if !due {
                continue;
            }
            let result = self.destroy_key(&id);
            let detail = format!("deletion_date={}", meta.deletion_date().unwrap_or_default());
            match result {
                Ok(()) => {
                    self.audit_write(&writer, "delete", &id, None, Ok(()), Some(&detail))
                        .map_err(|e| done_but_unaudited("delete", &id, e))?;
                    deleted.push(id);
                }
                Err(e) => {
                    let _ = self.audit_write(&writer, "delete", &id, None, Err(&e), Some(&detail));
                    return Err(e);
                }
            }
        }
        Ok(deleted)
    }

    /// Overwrites and removes a key file, then drops its aliases and default settings.
    /// The caller holds the lock.
    fn destroy_key(&self, id: &str) -> Result<(), KeyError> {
        let path = self.key_path(id);
        shred_file(&path)?;
        let mut index = self.load_index()?;
        let aliases = index.aliases_of(id);
        for a in &aliases {
            index.aliases.remove(a);
        }
        if index.default_key.as_deref() == Some(id) {
            index.default_key = None;
        }
        self.save_index(&index)?;
        let mut settings = self.load_settings()?;
        if let Some(r) = &settings.default_key {
            let r = r.strip_prefix("local:").unwrap_or(r);
            if r == id || aliases.iter().any(|a| a == r) {
                settings.default_key = None;
                self.save_settings(&settings)?;
            }
        }
        Ok(())
    }
}
