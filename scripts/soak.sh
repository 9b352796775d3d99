#!/usr/bin/env bash
# Soak under concurrency (issue 17, item 4): one `cryptvol serve` daemon with a control
# socket serves a thin volume (multi-connection, --discard); four NBD connections do
# verified mixed I/O (self-describing blocks: index + generation + checksum; reads,
# writes, trims, write-zeroes, flushes) while a control loop repeatedly snapshots the
# volume through the daemon and verifies a restore of it (served as a live export),
# re-encrypts it online, rotates the master key and rewraps a second volume, and adds and
# removes that second export live. Ends with a clean daemon stop, an offline check of
# every block and `cryptvol check`; prints a summary (WORKDIR/summary.json).
#   scripts/soak.sh                       30 minutes in a temporary directory
#   scripts/soak.sh --minutes N [WORKDIR] N minutes (fractions allowed), in WORKDIR (kept)
#   scripts/soak.sh --seed S ...          repeat the clients' random choices
# The binary: $CRYPTVOL_BIN, else target/release/cryptvol (built here).
# Exits 0 only when every verify passed; 1 on any failure (the work directory is kept).
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=30
seed=""
workdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) minutes="${2:?--minutes needs a value}"; shift 2 ;;
        --seed) seed="${2:?--seed needs a value}"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        -*) echo "soak.sh: unknown option $1" >&2; exit 2 ;;
        *) workdir="$1"; shift ;;
    esac
done
if ! /usr/bin/python3 -c 'import nbd' 2>/dev/null; then
    echo "soak.sh: python3-libnbd is missing; run scripts/install-deps.sh (as root)" >&2
    exit 2
fi
bin="${CRYPTVOL_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --features rbd --quiet
    bin="$PWD/target/release/cryptvol"
fi
keep=1
if [ -z "$workdir" ]; then
    workdir="$(mktemp -d "${TMPDIR:-/tmp}/cryptvol-soak.XXXXXX")"
    keep=0
fi
mkdir -p "$workdir"
args=(--bin "$bin" --minutes "$minutes" --workdir "$workdir")
[ -n "$seed" ] && args+=(--seed "$seed")
rc=0
/usr/bin/python3 scripts/soak/soak.py "${args[@]}" || rc=$?
if [ "$rc" -eq 0 ] && [ "$keep" -eq 0 ]; then
    rm -rf "$workdir"
elif [ "$rc" -ne 0 ]; then
    echo "soak.sh: FAILED (exit $rc); work directory kept: $workdir (serve.log, summary.json)" >&2
fi
exit "$rc"
