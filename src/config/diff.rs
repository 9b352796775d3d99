//! What a config reload changes: the exports of the configuration applied last against
//! those of the file as it is now (pure; the daemon applies it, see `cli/live_exports.rs`),
//! and the export an `export-add` request describes.

use super::access::cli_policy;
use super::overrides::AllowFlags;
use super::settings::ExportSpec;
use crate::server::control::ExportAdd;
use crate::volume::OpenOptions;

/// The difference between two sets of exports, by name.
#[derive(Debug, Default)]
pub struct ExportDiff {
    /// Named only in the new configuration.
    pub added: Vec<ExportSpec>,
    /// Named only in the old configuration.
    pub removed: Vec<String>,
    /// Named in both with a different file, open options or access rules (the new spec).
    pub changed: Vec<ExportSpec>,
    /// Named in both, the same.
    pub unchanged: Vec<String>,
}

impl ExportDiff {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Whether two specs describe the same export (same name, file, options and access).
pub fn same_export(a: &ExportSpec, b: &ExportSpec) -> bool {
    a.name == b.name
        && a.path == b.path
        && a.options.read_only == b.options.read_only
        && a.options.discard == b.options.discard
        && a.access == b.access
}

/// What changes from `old` to `new` (each in its own order).
pub fn diff_exports(old: &[ExportSpec], new: &[ExportSpec]) -> ExportDiff {
    let mut d = ExportDiff::default();
    for n in new {
        match old.iter().find(|o| o.name == n.name) {
            None => d.added.push(n.clone()),
            Some(o) if same_export(o, n) => d.unchanged.push(n.name.clone()),
            Some(_) => d.changed.push(n.clone()),
        }
    }
    for o in old {
        if !new.iter().any(|n| n.name == o.name) {
            d.removed.push(o.name.clone());
        }
    }
    d
}

/// The export an `export-add` request describes; the daemon's `--read-only` and
/// `--discard` apply to it as to every export. User and group names are resolved here.
pub fn spec_from_add(add: &ExportAdd, daemon: OpenOptions) -> Result<ExportSpec, String> {
    let allow = AllowFlags {
        uid: add.allow_uid.clone(),
        gid: add.allow_gid.clone(),
        tls_subject: add.allow_tls_subject.clone(),
        tls_san: add.allow_tls_san.clone(),
        anyone: add.allow_anyone,
    };
    Ok(ExportSpec {
        name: add.name.clone(),
        path: add.path.clone().into(),
        options: OpenOptions {
            read_only: add.read_only || daemon.read_only,
            discard: add.discard || daemon.discard,
            ..daemon
        },
        access: cli_policy(&allow)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::AccessPolicy;

    fn spec(name: &str, path: &str, read_only: bool) -> ExportSpec {
        ExportSpec {
            name: name.into(),
            path: path.into(),
            options: OpenOptions {
                read_only,
                discard: false,
                ..OpenOptions::default()
            },
            access: AccessPolicy::default(),
        }
    }

    fn names(v: &[ExportSpec]) -> Vec<&str> {
        v.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn added_removed_changed_and_unchanged_exports_are_told_apart() {
        let old = [
            spec("a", "/v/a.img", false),
            spec("b", "/v/b.img", false),
            spec("d", "/v/d.img", false),
            spec("e", "/v/e.img", false),
        ];
        let mut e2 = spec("e", "/v/e.img", false);
        e2.access.allow_uid = vec![1000];
        let new = [
            spec("a", "/v/a.img", false),
            spec("c", "/v/c.img", false),
            spec("d", "/v/d.img", true),
            e2,
        ];
        let d = diff_exports(&old, &new);
        assert_eq!(names(&d.added), ["c"]);
        assert_eq!(d.removed, ["b"]);
        assert_eq!(names(&d.changed), ["d", "e"]);
        assert_eq!(d.unchanged, ["a"]);
        assert!(d.changed[0].options.read_only);
        assert!(!d.is_empty());
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        let old = [spec("a", "/v/a.img", false), spec("b", "/v/b.img", true)];
        let d = diff_exports(&old, &old.clone());
        assert!(d.is_empty());
        assert_eq!(d.unchanged, ["a", "b"]);
    }

    #[test]
    fn a_moved_file_is_a_change() {
        let d = diff_exports(
            &[spec("a", "/v/a.img", false)],
            &[spec("a", "/w/a.img", false)],
        );
        assert_eq!(names(&d.changed), ["a"]);
        assert!(d.added.is_empty() && d.removed.is_empty());
    }

    #[test]
    fn an_add_request_takes_the_daemons_read_only_and_resolves_uids() {
        let add = ExportAdd {
            name: "b".into(),
            path: "/v/b.img".into(),
            allow_uid: vec!["0".into()],
            ..ExportAdd::default()
        };
        let daemon = OpenOptions {
            read_only: true,
            discard: false,
            ..OpenOptions::default()
        };
        let s = spec_from_add(&add, daemon).unwrap();
        assert!(s.options.read_only && !s.options.discard);
        assert_eq!(s.access.allow_uid, [0]);
        let bad = ExportAdd {
            allow_uid: vec!["no-such-user-cryptvol".into()],
            ..add
        };
        assert!(spec_from_add(&bad, OpenOptions::default()).is_err());
    }
}
