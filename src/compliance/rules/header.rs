//! Rules on the volume's integrity: header copies, a header that cannot be opened, the
//! allocation map, a truncated data area and an unfinished re-encryption.

use super::facts::{HeaderProblem, VolumeFacts};
use super::verdict::{Code, Finding};
use crate::volume::CopyStatus;

/// The required feature the online re-encryption marks an in-progress re-encryption
/// with (set when it starts, cleared when it finishes).
pub const REENCRYPT_FEATURE: &str = "reencrypt";

/// Whether a header's required features say a re-encryption was started and has not
/// finished (an interrupted or still running re-encryption).
pub fn reencrypt_in_progress<S: AsRef<str>>(required_features: &[S]) -> bool {
    required_features
        .iter()
        .any(|f| f.as_ref() == REENCRYPT_FEATURE)
}

pub(super) fn broken_volume(p: &HeaderProblem) -> Vec<Finding> {
    match p {
        HeaderProblem::BothCopiesDamaged { primary, secondary } => vec![Finding::new(
            Code::HeaderBothCopiesDamaged,
            format!(
                "both header copies are damaged (primary: {primary}; secondary: {secondary}); \
                 the volume cannot be opened: restore the header from a backup"
            ),
        )],
        HeaderProblem::Truncated(detail) => vec![Finding::new(
            Code::HeaderBothCopiesDamaged,
            format!("cryptvol magic, but the header area is truncated ({detail})"),
        )],
        HeaderProblem::UnsupportedVersion { version, supported } => vec![Finding::new(
            Code::UnsupportedVersion,
            format!(
                "format version {version} is not supported (this cryptvol understands \
                 {supported}); its keys and header cannot be checked: upgrade cryptvol"
            ),
        )],
        HeaderProblem::UnsupportedFeature { features } => {
            let mut out = Vec::new();
            if reencrypt_in_progress(features) {
                out.push(reencrypt_finding());
            }
            let others: Vec<&str> = features
                .iter()
                .map(String::as_str)
                .filter(|f| *f != REENCRYPT_FEATURE)
                .collect();
            if !others.is_empty() || out.is_empty() {
                out.push(Finding::new(
                    Code::UnsupportedFeature,
                    format!(
                        "the volume requires feature(s) {} that this cryptvol does not know; \
                         its keys cannot be checked: upgrade cryptvol",
                        if others.is_empty() {
                            features.join(", ")
                        } else {
                            others.join(", ")
                        }
                    ),
                ));
            }
            out
        }
    }
}

fn reencrypt_finding() -> Finding {
    Finding::new(
        Code::ReencryptionInterrupted,
        "a re-encryption under a new data key was started and has not finished: part of the \
         volume is still under the old data key; resume it (`cryptvol reencrypt`, or serve the \
         volume)",
    )
}

fn copy_finding(which: &str, status: &CopyStatus) -> Option<Finding> {
    match status {
        CopyStatus::Ok => None,
        CopyStatus::Stale(seq) => Some(Finding::new(
            Code::HeaderCopyStale,
            format!(
                "the {which} header copy is stale (sequence {seq}): a header update was \
                 interrupted; the next header update (e.g. `cryptvol rekey`) rewrites it"
            ),
        )),
        CopyStatus::Damaged(reason) => Some(Finding::new(
            Code::HeaderCopyDamaged,
            format!(
                "the {which} header copy is damaged ({reason}): the volume has no header \
                 redundancy left; the next header update (e.g. `cryptvol rekey`) rewrites it"
            ),
        )),
    }
}

/// The integrity findings of a volume with a usable header, in report order: header
/// copies, an impossible geometry, the allocation map, a truncated file, an unfinished
/// re-encryption.
pub(super) fn integrity_findings(v: &VolumeFacts, out: &mut Vec<Finding>) {
    out.extend(copy_finding("primary", &v.health.primary));
    out.extend(copy_finding("secondary", &v.health.secondary));
    if let Some(why) = &v.header_invalid {
        out.push(Finding::new(
            Code::HeaderInvalid,
            format!(
                "the header cannot be right for this file ({why}); the volume cannot be \
                 opened: restore the header from a backup (or the file, if it was cut \
                 short)"
            ),
        ));
    }
    if let Some(p) = &v.map_problem {
        out.push(Finding::new(
            Code::AllocationMapDamaged,
            format!(
                "the allocation map is damaged ({p}); opening the volume read-write (cryptvol \
                 serve) rewrites it from the surviving copy, or marks the pages without one as \
                 allocated"
            ),
        ));
    }
    if let Some(len) = v.file_len {
        if len < v.needed_len {
            out.push(Finding::new(
                Code::VolumeTruncated,
                format!(
                    "the file holds {len} bytes, but the header needs {} (data offset + \
                     size): the end of the volume is missing",
                    v.needed_len
                ),
            ));
        }
    }
    if reencrypt_in_progress(&v.required_features) {
        out.push(reencrypt_finding());
    }
}
