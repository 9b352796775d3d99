#!/usr/bin/env bash
# Benchmarks cryptvol side by side with the NBD servers users would otherwise pick:
# plain `nbdkit file` (the unencrypted ceiling), `nbdkit --filter=luks` and `qemu-nbd` on a
# LUKS image, with the same fio jobs over Unix sockets; cryptvol's thin volumes against
# the no-map layout and on never-written volumes (first writes); and cryptvol over TLS
# against plaintext. See docs/performance.md.
#
#   scripts/bench.sh             full run (1 GiB volumes, 3 runs per job, XTS vs openssl)
#   scripts/bench.sh --quick     a check in under 2 minutes (1 run of 2 s per job, no XTS)
#   scripts/bench.sh --modes attach,exports --quick   only some of the extended modes
#
# Beside the main job table, the extended modes (issue 18 item 4, scripts/bench/modes.py)
# measure multi-connection scaling, qd1 latency percentiles, attach time, daemon RSS under
# load and the cost of many exports and of a 16 TiB thin volume.
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
#   --modes LIST       subset of main,scaling,latency,attach,rss,exports,thin (default: all;
#                      main is the job table above; the others, issue 18 item 4, each print
#                      their own table with medians of --repeat runs, ratios to plain
#                      nbdkit file where it is a peer, and the issue's targets met/missed):
#                      scaling: 4k randread/randwrite qd32 over 1, 2, 4 NBD connections
#                               (fio --numjobs), cryptvol and nbdkit file;
#                      latency: qd1 4k randread/randwrite clat p50/p99/p99.9, same two;
#                      attach:  spawn of the server to the first block a client reads
#                               (socket-activated listener), cryptvol with the local
#                               keystore and with AWS KMS (moto_server), nbdkit file;
#                      rss:     the daemon's idle RSS and peak VmHWM under fio jobs;
#                      exports: cryptvol serving 1, 10, 200 volumes: start to READY=1
#                               (sd_notify) and RSS, per export;
#                      thin:    a 16 TiB thin volume: create time, map memory (RSS against
#                               a 1 GiB volume), first write to a fresh chunk vs a later one
#   --conns LIST       connection counts of the scaling mode (default 1,2,4)
#   --export-counts L  export counts of the exports mode (default 1,10,200)
#   --thin-size SIZE   the thin mode's volume (default 16T; on a filesystem that cannot hold
#                      it, e.g. ext4, the volume goes to /dev/shm and the output says so)
#   --thin-dir DIR     where the thin mode's volume lives (default: the work directory)
#   --thin-writes N    first and later writes timed by the thin mode (default 64; quick 16)
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
        --size|--runtime|--ramp|--repeat|--jobs|--servers|--out|--fresh-size|--fresh-max|\
        --modes|--conns|--export-counts|--thin-size|--thin-dir|--thin-writes)
            if [ $# -lt 2 ]; then echo "bench.sh: $1 needs a value (see --help)" >&2; exit 2; fi
            args+=("$1" "$2"); shift ;;
        --size=*|--runtime=*|--ramp=*|--repeat=*|--jobs=*|--servers=*|--out=*|--fresh-size=*|--fresh-max=*|\
        --modes=*|--conns=*|--export-counts=*|--thin-size=*|--thin-dir=*|--thin-writes=*)
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
