#!/usr/bin/env bash
# Benchmarks cryptvol side by side with the NBD servers users would otherwise pick:
# plain `nbdkit file` (the unencrypted ceiling), `nbdkit --filter=luks` and `qemu-nbd` on a
# LUKS image, with the same fio jobs over Unix sockets; cryptvol's thin volumes against
# the no-map layout and on never-written volumes (first writes); and cryptvol over TLS
# against plaintext. See docs/performance.md.
#
#   scripts/bench.sh             full run (1 GiB volumes, 3 runs per job, XTS vs openssl)
#   scripts/bench.sh --quick     a check in under 2 minutes (1 run of 2 s per job, no XTS)
#
# Options:
#   --quick            1 run of 1 s ramp + 2 s per job, XTS comparison skipped
#   --size SIZE        volume size (default 1G)
#   --runtime SEC      measured seconds per run (default 5; quick 2)
#   --ramp SEC         unmeasured warm-up per run (default 2; quick 1)
#   --repeat N         runs per server and job; the table shows medians (default 3; quick 1)
#   --jobs LIST        subset of randread-4k-qd32,randwrite-4k-qd32,read-1m-qd8,write-1m-qd8,
#                      randread-4k-qd1 (aliases: randread,randwrite,seqread,seqwrite,qd1)
#   --servers LIST     subset of cryptvol,cryptvol-nomap,cryptvol-fresh,cryptvol-tls,
#                      nbdkit-file,nbdkit-luks,qemu-nbd (the default: all seven), or
#                      qemu-nbd variants:
#                      qemu-nbd-none-threads, qemu-nbd-none-native, qemu-nbd-none-io_uring,
#                      qemu-nbd-writeback-threads, qemu-nbd-writeback-io_uring,
#                      or the file engines: cryptvol-threads, cryptvol-uring (the
#                      cryptvol volume served with --engine threads / uring; plain
#                      `cryptvol` uses the default, auto).
#                      cryptvol-nomap: a volume made with --no-allocation-map, prefilled
#                      like cryptvol (the thin-volume target compares the two);
#                      cryptvol-fresh: the write jobs on a new, never-written thin volume
#                      (first-write cost and write amplification);
#                      cryptvol-tls: the cryptvol volume served with --tls require, fio
#                      over nbds+unix:// (TLS / plaintext ratio, same run)
#   --fresh-size SIZE  size of the never-written cryptvol-fresh volume (default 64G; sparse)
#   --fresh-max SIZE   most the backing file may grow in one fresh run (default 2G; quick
#                      512M); the 4k job writes at most 1/16 of it (64 KiB chunk per 4 KiB)
#   --xts / --no-xts   force / skip the XTS engine vs `openssl speed` comparison
#   --out DIR          results directory (default bench/results/, git-ignored); each run
#                      writes DIR/<timestamp>/{results.json,chart.png,fio/,logs/} and
#                      points DIR/latest at it
#   --keep-work        keep the images (DIR/<timestamp>/work/) instead of deleting them
#   --no-chart         skip the PNG
#   --no-install       do not try to install missing peers
#   --no-build         use target/release/cryptvol as it is
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

install=1
build=1
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --no-install) install=0 ;;
        --no-build) build=0 ;;
        --quick|--xts|--no-xts|--no-chart|--keep-work) args+=("$1") ;;
        --size|--runtime|--ramp|--repeat|--jobs|--servers|--out|--fresh-size|--fresh-max)
            if [ $# -lt 2 ]; then echo "bench.sh: $1 needs a value (see --help)" >&2; exit 2; fi
            args+=("$1" "$2"); shift ;;
        --size=*|--runtime=*|--ramp=*|--repeat=*|--jobs=*|--servers=*|--out=*|--fresh-size=*|--fresh-max=*)
            args+=("$1") ;;
        *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# The peers (nbdkit, libnbd tools, fio, qemu-utils, openssl) as for the test suite, and
# Debian's matplotlib for the chart (drawn with Debian's /usr/bin/python3).
py=/usr/bin/python3
[ -x "$py" ] || py=$(command -v python3)
if [ "$install" = 1 ]; then
    if [ "$(id -u)" = 0 ]; then
        scripts/install-deps.sh
        if ! "$py" -c 'import matplotlib' 2>/dev/null; then
            echo "bench.sh: installing python3-matplotlib (for the chart)" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-matplotlib >/dev/null
        fi
    else
        echo "bench.sh: not root; assuming the peers are installed (see scripts/install-deps.sh)" >&2
    fi
fi
missing=()
for c in nbdkit nbdcopy fio qemu-img qemu-nbd openssl; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench.sh: missing ${missing[*]}; run scripts/install-deps.sh as root" >&2
    exit 1
fi
if ! "$py" -c 'import matplotlib' 2>/dev/null; then
    echo "bench.sh: matplotlib not importable by $py: no chart (apt-get install python3-matplotlib)" >&2
fi

if [ "$build" = 1 ]; then
    echo "bench.sh: cargo build --release" >&2
    cargo build --release --quiet
fi
bin=$repo/target/release/cryptvol
if [ ! -x "$bin" ]; then
    echo "bench.sh: $bin not found; build it with cargo build --release" >&2
    exit 1
fi

# The driver starts, samples and stops every server itself and stops them on any exit
# (including Ctrl-C); servers also get SIGTERM if the driver dies (PR_SET_PDEATHSIG).
exec "$py" scripts/bench/bench.py --bin "$bin" --repo "$repo" "${args[@]}"
