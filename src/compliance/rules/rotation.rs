//! The rotation rule (`--require-rotation`, `--max-key-age`): how old a master key's
//! newest material may be.

use super::facts::{RotationFacts, SlotFacts};
use super::policy::Policy;
use super::verdict::{Code, Finding};

pub(super) const SECS_PER_DAY: u64 = 86_400;

pub(super) fn rotation_findings(
    i: usize,
    label: &str,
    s: &SlotFacts,
    rotation: Option<&RotationFacts>,
    policy: &Policy,
    now: u64,
    out: &mut Vec<Finding>,
) {
    let Some(days) = policy.rotation_period_days() else {
        return;
    };
    let Some(r) = rotation else {
        out.push(Finding::slot(
            Code::KeyRotationNotChecked,
            i,
            format!(
                "keyslot {i} ({label}): the {} backend does not tell cryptvol when its keys \
                 were rotated; check rotation in the key service itself",
                s.backend
            ),
        ));
        return;
    };
    let age = now.saturating_sub(r.current_since_unix);
    if age < u64::from(days) * SECS_PER_DAY {
        return;
    }
    let age_days = age / SECS_PER_DAY;
    let fix = format!("rotate it (`cryptvol key rotate {}`)", s.key_id);
    if policy.require_rotation && r.versions <= 1 {
        out.push(Finding::slot(
            Code::KeyRotationOff,
            i,
            format!(
                "keyslot {i} ({label}): the master key has never been rotated and its material \
                 is {age_days} day(s) old (rotation period {days} day(s)); {fix}"
            ),
        ));
    } else {
        out.push(Finding::slot(
            Code::KeyRotationOverdue,
            i,
            format!(
                "keyslot {i} ({label}): the master key's newest material (version {}) is \
                 {age_days} day(s) old; it must be rotated every {days} day(s); {fix}",
                r.versions
            ),
        ));
    }
}
