#!/usr/bin/env bash
# kill -9 cycles under verified I/O (issue 17): serve a thin and a thick volume, write
# self-describing blocks over NBD with a journaling client (scripts/crash/crashclient.py,
# two connections per volume), kill -9 the daemon at a random point of the clients'
# progress -- also during an online re-encryption and a served snapshot, and kill an
# offline rekey or resize of the crashed volume -- restart, verify every block against
# the journals (flushed writes exact, nothing but old data, new data or zeros), check that
# the daemon comes up, that a resumed re-encryption finishes and that `cryptvol check`
# is clean.
#   scripts/crash-test.sh                  100 cycles, mixing the variants
#   scripts/crash-test.sh --cycles N       N cycles
#   scripts/crash-test.sh --short          10 cycles: each variant on each volume (CI)
#   scripts/crash-test.sh --seed S         repeat the random choices of a run
#   scripts/crash-test.sh --workdir DIR    work in DIR (kept); default a temporary directory,
#                                          removed on success, kept on failure
# The binary: $CRYPTVOL_BIN, else target/release/cryptvol (built here).
# Prints one line per cycle and a final tally; exits 1 on the first failed cycle.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! /usr/bin/python3 -c 'import nbd' 2>/dev/null; then
    echo "crash-test.sh: python3-libnbd is missing; run scripts/install-deps.sh (as root)" >&2
    exit 2
fi
bin="${CRYPTVOL_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin="$PWD/target/release/cryptvol"
fi
exec /usr/bin/python3 scripts/crash/cycles.py --bin "$bin" "$@"
