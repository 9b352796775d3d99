#!/usr/bin/env bash
# The project's one test command: installs the peers the tests need when missing, checks
# formatting and lints, then runs every test (unit, property, integration against real
# NBD peers, and the kernel VM attach test).
#   scripts/test.sh            everything
#   scripts/test.sh --no-vm    skip the VM test (for quick local runs; CI never passes this)
set -euo pipefail
cd "$(dirname "$0")/.."

vm=1
for a in "$@"; do
    case "$a" in
        --no-vm) vm=0 ;;
        *) echo "usage: $0 [--no-vm]" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" = 0 ]; then
    scripts/install-deps.sh
else
    echo "test.sh: not root; assuming the peers are installed (see scripts/install-deps.sh)" >&2
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
# --features rbd: the RBD engine (src/rbd/, tests/rbd.rs) links librbd, which
# install-deps.sh installs; a plain `cargo build` needs no Ceph.
echo "== cargo clippy"
cargo clippy --all-targets --features rbd --quiet -- -D warnings
echo "== cargo build --release"
cargo build --release --features rbd --quiet
echo "== cargo test"
# Unit tests and the integration-test programs are built in the debug profile (the
# release profile's single codegen unit and LTO would make ~30 test programs take longer
# to build than to run); every integration test runs the *release* binary through
# $CRYPTVOL_BIN (tests/common/mod.rs::bin), i.e. what ships, and fails, never skips, when a
# peer is missing. --no-fail-fast: one run reports every failing test file.
# The fuzz corpus is replayed here too (tests/fuzz_corpus.rs: every file of fuzz/corpus/
# through the fuzz targets' bodies); fuzzing itself is scripts/fuzz.sh, not part of CI.
CRYPTVOL_BIN="$PWD/target/release/cryptvol" cargo test --features rbd --no-fail-fast --quiet 2>&1 | tee target/test-output.txt
if [ "$vm" = 1 ]; then
    echo "== kernel VM attach test"
    CRYPTVOL_BIN="$PWD/target/release/cryptvol" scripts/kernel-test.sh
fi
echo "test.sh: all tests passed"
