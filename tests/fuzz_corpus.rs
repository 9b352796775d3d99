//! Replays the checked-in fuzz corpus (`fuzz/corpus/TARGET/*`, minimized by cargo fuzz
//! cmin) and the inputs that once crashed a parser (`fuzz/regressions/TARGET/*`, kept out
//! of the corpus so that no minimization drops them) through the target bodies the fuzzer
//! runs (`cryptvol::fuzzing`), on every commit; and checks that every seed
//! input is accepted by its parser (so the round-trip and key checks behind acceptance
//! are exercised).
//!
//! `CRYPTVOL_WRITE_FUZZ_SEEDS=DIR` also writes the seeds to `DIR/TARGET/seed-N`
//! (`scripts/fuzz.sh` starts every run from them).

use std::collections::BTreeSet;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use cryptvol::fuzzing::{seeds, target, TARGETS};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn regressions_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions")
}

/// The crash inputs kept for one target (none for most).
fn regression_files(name: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(regressions_root().join(name)) else {
        return Vec::new();
    };
    entries
        .map(|e| e.expect("a directory entry").path())
        .collect()
}

/// The files of one target's corpus; fails when the directory is missing or empty.
fn corpus_files(name: &str) -> Vec<PathBuf> {
    let dir = corpus_root().join(name);
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: target {name} has no checked-in corpus",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "{}: the corpus of target {name} is empty",
        dir.display()
    );
    files
}

#[test]
fn every_corpus_file_of_every_target_replays_cleanly() {
    let mut failures = Vec::new();
    let mut total = 0;
    for &(name, body) in TARGETS {
        for path in corpus_files(name).into_iter().chain(regression_files(name)) {
            let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
                failures.push(path.display().to_string());
            }
            total += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} corpus inputs fail: {failures:#?}",
        failures.len()
    );
    println!(
        "{total} corpus inputs replayed for {} targets",
        TARGETS.len()
    );
}

#[test]
fn the_corpus_holds_only_known_targets() {
    let known: BTreeSet<&str> = TARGETS.iter().map(|&(n, _)| n).collect();
    for root in [corpus_root(), regressions_root()] {
        for entry in fs::read_dir(&root).expect("fuzz/corpus and fuzz/regressions") {
            let name = entry.expect("an entry").file_name();
            let name = name.to_string_lossy();
            assert!(
                known.contains(name.as_ref()),
                "{}/{name} belongs to no target",
                root.display()
            );
        }
    }
    let fuzz_toml =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
            .expect("fuzz/Cargo.toml");
    for name in known {
        assert!(
            fuzz_toml.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no binary {name}"
        );
    }
}

#[test]
fn every_seed_is_accepted_by_its_target() {
    let write_to = std::env::var_os("CRYPTVOL_WRITE_FUZZ_SEEDS").map(PathBuf::from);
    let mut per_target = std::collections::BTreeMap::new();
    for (name, input) in seeds() {
        let body = target(name).unwrap_or_else(|| panic!("a seed for unknown target {name}"));
        assert!(
            body(&input),
            "target {name} refuses its seed {}",
            per_target.get(name).unwrap_or(&0)
        );
        let n = per_target.entry(name).or_insert(0);
        if let Some(dir) = &write_to {
            let dir = dir.join(name);
            fs::create_dir_all(&dir).expect("seed directory");
            fs::write(dir.join(format!("seed-{n}")), &input).expect("writing a seed");
        }
        *n += 1;
    }
    for &(name, _) in TARGETS {
        assert!(per_target.contains_key(name), "target {name} has no seed");
    }
}
