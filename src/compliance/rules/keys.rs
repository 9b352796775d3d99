//! Rules on the keys that protect a volume: passphrase-only volumes, the state of each
//! keyslot's master key (disabled, pending deletion, missing, unknown backend, lookup
//! failed), and the key choice (`--require-key`, `--no-default-key`).

use super::facts::{KeyFacts, SlotFacts, VolumeFacts};
use super::policy::{KeyIdentity, Policy};
use super::rotation::rotation_findings;
use super::verdict::{Code, Finding};
use crate::keys::{KeyState, PASSPHRASE};

/// The key findings of a volume, in report order: passphrase-only, then each keyslot,
/// then a required key that no keyslot uses.
pub(super) fn key_findings(v: &VolumeFacts, policy: &Policy, now: u64, out: &mut Vec<Finding>) {
    if !v.slots.is_empty() && v.slots.iter().all(|s| s.backend == PASSPHRASE) {
        out.push(Finding::new(
            Code::PassphraseOnly,
            "every keyslot is a passphrase: no master key protects the data key (no key \
             states, policies or audit); add a key with `cryptvol keyslot add --key KEY`",
        ));
    }
    for (i, slot) in v.slots.iter().enumerate() {
        slot_findings(i, slot, policy, now, out);
    }
    if !policy.required_keys.is_empty()
        && !v.slots.iter().any(|s| {
            policy
                .required_keys
                .iter()
                .any(|k| k.matches(&s.backend, &s.key_id))
        })
    {
        out.push(Finding::new(
            Code::KeyNotRequired,
            format!(
                "no keyslot uses the required key ({}); move it with `cryptvol rekey FILE \
                 --to-key KEY`",
                labels(&policy.required_keys)
            ),
        ));
    }
}

fn labels(keys: &[KeyIdentity]) -> String {
    keys.iter()
        .map(|k| k.label.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

fn slot_findings(i: usize, s: &SlotFacts, policy: &Policy, now: u64, out: &mut Vec<Finding>) {
    let label = s.label();
    match &s.key {
        KeyFacts::Passphrase => return,
        KeyFacts::Missing(detail) => out.push(Finding::slot(
            Code::KeyMissing,
            i,
            format!(
                "keyslot {i} ({label}): the master key does not exist ({detail}); unless \
                 another keyslot opens it, the volume cannot be attached again"
            ),
        )),
        KeyFacts::UnsupportedBackend => out.push(Finding::slot(
            Code::KeyBackendUnsupported,
            i,
            format!("keyslot {i} ({label}): this cryptvol does not know that key backend"),
        )),
        KeyFacts::LookupFailed(why) => out.push(Finding::slot(
            Code::KeyLookupFailed,
            i,
            format!("keyslot {i} ({label}): cannot look up the master key: {why}"),
        )),
        KeyFacts::Found {
            state,
            deletion_date,
            rotation,
        } => {
            match state {
                KeyState::Enabled => {}
                KeyState::Disabled => out.push(Finding::slot(
                    Code::KeyDisabled,
                    i,
                    format!(
                        "keyslot {i} ({label}): the master key is disabled: the volume cannot \
                         be attached again until it is enabled"
                    ),
                )),
                KeyState::PendingDeletion => out.push(Finding::slot(
                    Code::KeyPendingDeletion,
                    i,
                    format!(
                        "keyslot {i} ({label}): the master key is pending deletion{}: cancel \
                         the deletion or rekey the volume before then",
                        deletion_date
                            .as_deref()
                            .map(|d| format!(" (destroyed after {d})"))
                            .unwrap_or_default()
                    ),
                )),
            }
            rotation_findings(i, &label, s, rotation.as_ref(), policy, now, out);
        }
    }
    key_choice_findings(i, &label, s, policy, out);
}

fn key_choice_findings(
    i: usize,
    label: &str,
    s: &SlotFacts,
    policy: &Policy,
    out: &mut Vec<Finding>,
) {
    let required = policy
        .required_keys
        .iter()
        .any(|k| k.matches(&s.backend, &s.key_id));
    if required {
        return;
    }
    let default = policy
        .default_keys
        .iter()
        .find(|k| k.matches(&s.backend, &s.key_id));
    let customer_key_required = policy.forbid_default_key || !policy.required_keys.is_empty();
    if let (Some(d), true) = (default, customer_key_required) {
        out.push(Finding::slot(
            Code::DefaultKey,
            i,
            format!(
                "keyslot {i} ({label}) uses the default key ({}) where a customer key is \
                 required; rekey it (`cryptvol rekey FILE --to-key KEY`)",
                d.label
            ),
        ));
    } else if !policy.required_keys.is_empty() {
        out.push(Finding::slot(
            Code::KeyNotRequired,
            i,
            format!(
                "keyslot {i} ({label}) uses a key other than the required one ({}); rekey or \
                 remove it",
                labels(&policy.required_keys)
            ),
        ));
    }
}
