#!/bin/bash
# Runs cryptvol.service and cryptvol.socket under a real systemd: boots this host's own
# root as a container with systemd-nspawn (--volatile=yes: a tmpfs root with this host's
# /usr, gone with the container), installs the units, the binary and a config
# file in it, and checks:
#   1. socket activation: the service is inactive until a client (nbdinfo) connects to
#      /run/cryptvol/nbd.sock, then it is started and serves the export;
#   2. systemctl reload (ExecReload, SIGHUP) keeps it running (same MainPID);
#   3. journalctl -o json -u cryptvol shows cryptvol's structured fields (F_EXPORT=, F_PATH=, …);
#   4. the watchdog: the daemon is SIGSTOPped, systemd kills it after WatchdogSec and
#      starts a new one (NRestarts grows, MainPID changes), which serves again.
# Needs root and systemd-nspawn (Debian: systemd-container). Prints "PASS: …" lines and
# "systemd-test: OK" at the end; exits non-zero on the first failure.
#
# Usage: scripts/systemd-test.sh [CRYPTVOL_BINARY]   (default: $CRYPTVOL_BIN, else
#        target/debug/cryptvol)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-${CRYPTVOL_BIN:-$repo/target/debug/cryptvol}}
bin=$(realpath "$bin")
watchdog_sec=${CRYPTVOL_TEST_WATCHDOG_SEC:-6}

die() { echo "systemd-test: FAIL: $*" >&2; exit 1; }
pass() { echo "PASS: $*"; }

[ "$(id -u)" = 0 ] || die "must run as root (systemd-nspawn boots a container)"
command -v systemd-nspawn >/dev/null || die "systemd-nspawn not found (apt-get install systemd-container)"
[ -x "$bin" ] || die "no cryptvol binary at $bin (cargo build first)"
for t in nbdinfo nsenter; do
    command -v "$t" >/dev/null || die "$t not found"
done

machine=cvtest-$$
log=$(mktemp /tmp/systemd-test-nspawn.XXXXXX)
# /usr/local of the container (the unit runs /usr/local/bin/cryptvol).
local_dir=$(mktemp -d /tmp/systemd-test-local.XXXXXX)
mkdir -p "$local_dir/bin"
install -m 0755 "$bin" "$local_dir/bin/cryptvol"
# --volatile=yes: the container's root is a tmpfs and only /usr comes from this host
# (read-only), so nothing the test does outlives it. --register=no --keep-unit: the
# host's PID 1 need not be systemd (no machined, no system bus).
systemd-nspawn --quiet --register=no --keep-unit --volatile=yes -D / -M "$machine" \
    --bind="$local_dir:/usr/local" --bind-ro="$repo:/mnt/repo" \
    --console=passive -b systemd.firstboot=off >"$log" 2>&1 &
nspawn=$!
cleanup() {
    kill "$nspawn" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$nspawn" 2>/dev/null || true
    rm -rf "$log" "$local_dir"
}
trap cleanup EXIT

# The container's PID 1 is the child of nspawn that runs systemd. nspawn forks helper
# processes while it sets the container up, so the first child seen may be a helper
# that is gone a moment later: look for the one whose command is systemd, every time.
leader=
find_leader() {
    local p
    for p in $(pgrep -P "$nspawn" || true); do
        case $(cat "/proc/$p/comm" 2>/dev/null) in
            systemd | init)
                echo "$p"
                return 0
                ;;
        esac
    done
    return 1
}
ct() { nsenter -t "$leader" -m -u -i -n -p -C -- "$@"; }

# Wait until systemd inside has finished booting (running, or degraded: some host
# services may not start in a container; they do not matter here). The bound is for a
# busy CI machine; a quiet one boots in a few seconds.
state=
for _ in $(seq 1 1200); do
    kill -0 "$nspawn" 2>/dev/null || { cat "$log" >&2; die "systemd-nspawn exited"; }
    if leader=$(find_leader); then
        state=$(ct systemctl is-system-running 2>/dev/null || true)
        case $state in running|degraded) break ;; esac
    fi
    sleep 0.2
done
case $state in
    running|degraded) ;;
    *)
        cat "$log" >&2
        ps -o pid,ppid,stat,comm --ppid "$nspawn" >&2 || true
        die "systemd did not boot (state: ${state:-none}; container PID 1: ${leader:-not found})"
        ;;
esac
pass "systemd $(ct systemctl --version | head -n1 | cut -d' ' -f2) booted in the container (state $state)"

# Install: binary, units, config, a volume (keystore default for root: /var/lib/cryptvol/keys).
ct install -m 0644 /mnt/repo/systemd/cryptvol.service /mnt/repo/systemd/cryptvol.socket /etc/systemd/system/
ct mkdir -p /etc/systemd/system/cryptvol.service.d /etc/cryptvol /var/lib/cryptvol
ct sh -c "printf '[Service]\nWatchdogSec=%ss\n' $watchdog_sec > /etc/systemd/system/cryptvol.service.d/test.conf"
ct install -m 0600 /mnt/repo/systemd/cryptvol.toml.example /etc/cryptvol/cryptvol.toml
ct /usr/local/bin/cryptvol create --size 16M /var/lib/cryptvol/data.img >/dev/null
ct systemctl daemon-reload

# 1. Socket activation.
ct systemctl start cryptvol.socket
[ "$(ct systemctl is-active cryptvol.service || true)" = inactive ] || die "cryptvol.service runs before any client connected"
uri='nbd+unix:///data?socket=/run/cryptvol/nbd.sock'
size=$(ct timeout 120 nbdinfo --size "$uri") || { ct journalctl -u cryptvol --no-pager | tail -n 30 >&2; die "nbdinfo through the activation socket failed"; }
[ "$size" = 16777216 ] || die "export size $size, expected 16777216"
[ "$(ct systemctl is-active cryptvol.service)" = active ] || die "cryptvol.service not active after the first client"
pid1=$(ct systemctl show -p MainPID --value cryptvol.service)
pass "socket activation: nbdinfo connected through cryptvol.socket, export size $size, daemon MainPID $pid1"

# 2. Reload.
ct systemctl reload cryptvol.service
[ "$(ct systemctl show -p MainPID --value cryptvol.service)" = "$pid1" ] || die "reload changed the MainPID"
for _ in $(seq 1 100); do
    ct journalctl -u cryptvol.service --no-pager -o cat | grep -q SIGHUP && break
    sleep 0.2
done
ct journalctl -u cryptvol.service --no-pager -o cat | grep -q SIGHUP || die "no SIGHUP line in the journal after systemctl reload"
pass "systemctl reload: SIGHUP handled, MainPID still $pid1"

# 3. Structured journal fields.
json=$(ct journalctl -u cryptvol.service -o json --no-pager)
opened=$(echo "$json" | grep '"MESSAGE":"export opened"' | head -n1)
[ -n "$opened" ] || die "no 'export opened' entry in journalctl -o json"
for field in '"F_EXPORT":"data"' '"SYSLOG_IDENTIFIER":"cryptvol"' '"F_PATH":"/var/lib/cryptvol/data.img"' '"F_SIZE":"16777216"' '"PRIORITY":"5"\|"PRIORITY":"6"'; do
    echo "$opened" | grep -q "$field" || die "journal entry lacks $field: $opened"
done
pass "journalctl -o json: $(echo "$opened" | grep -o '"F_EXPORT":"[^"]*"\|"F_UUID":"[^"]*"\|"TARGET":"[^"]*"\|"F_SIZE":"[^"]*"' | tr '\n' ' ')"
if echo "$json" | grep -qi 'passphrase=\|"DEK"\|"KEY_MATERIAL"'; then die "secret-looking field in the journal"; fi

# 4. Watchdog. First a healthy daemon outlives several WatchdogSec (its keep-alives
# arrive: systemd's WatchdogTimestamp moves), then a stopped one is restarted.
restarts0=$(ct systemctl show -p NRestarts --value cryptvol.service)
ping0=$(ct systemctl show -p WatchdogTimestampMonotonic --value cryptvol.service)
# Wait for 5 keep-alives to reach systemd (its WatchdogTimestamp moves; at one per
# WatchdogSec/2 that spans 2 x WatchdogSec or more): progress, not a fixed sleep. The
# loop count only bounds the wait on a busy machine.
moves=0
ping1=$ping0
for _ in $(seq 1 $((watchdog_sec * 20 + 600))); do
    now=$(ct systemctl show -p WatchdogTimestampMonotonic --value cryptvol.service)
    if [ "$now" != "$ping1" ]; then moves=$((moves + 1)); ping1=$now; fi
    [ "$moves" -ge 5 ] && break
    sleep 0.2
done
[ "$(ct systemctl show -p MainPID --value cryptvol.service)" = "$pid1" ] || die "the healthy daemon was restarted (keep-alives missing?)"
[ "$(ct systemctl show -p NRestarts --value cryptvol.service)" = "$restarts0" ] || die "NRestarts grew while the daemon was healthy"
[ "$moves" -ge 5 ] && [ "$ping1" -gt "$ping0" ] || die "systemd saw $moves keep-alives (WatchdogTimestampMonotonic $ping0 -> $ping1)"
pass "watchdog: healthy daemon $pid1 alive through 5 keep-alives with WatchdogSec=${watchdog_sec}s (WatchdogTimestampMonotonic ${ping0} -> ${ping1} us)"
# MainPID is a pid of the container's pid namespace: signal it from inside.
ct kill -STOP "$pid1"
stopped_at=$(date +%s)
pid2=$pid1
for _ in $(seq 1 $((watchdog_sec * 20 + 600))); do
    pid2=$(ct systemctl show -p MainPID --value cryptvol.service)
    restarts=$(ct systemctl show -p NRestarts --value cryptvol.service)
    if [ "$restarts" -gt "$restarts0" ] && [ "$pid2" != 0 ] && [ "$pid2" != "$pid1" ] \
        && [ "$(ct systemctl is-active cryptvol.service || true)" = active ]; then
        break
    fi
    sleep 0.2
done
took=$(( $(date +%s) - stopped_at ))
[ "$pid2" != "$pid1" ] && [ "$restarts" -gt "$restarts0" ] || { ct journalctl -u cryptvol --no-pager | tail -n 30 >&2; die "watchdog did not restart the stopped daemon (NRestarts $restarts, MainPID $pid2)"; }
ct journalctl -u cryptvol.service --no-pager -o cat | grep -qi 'watchdog timeout' \
    || ct journalctl --no-pager -o cat | grep -qi 'cryptvol.service: Watchdog timeout' \
    || die "no watchdog timeout recorded by systemd"
size=$(ct timeout 120 nbdinfo --size "$uri") || die "the restarted daemon does not serve"
pass "watchdog: SIGSTOPped daemon $pid1 killed after WatchdogSec=${watchdog_sec}s and restarted as $pid2 in ${took}s (NRestarts $restarts0 -> $restarts); it serves again (size $size)"

ct systemctl stop cryptvol.service cryptvol.socket
echo "systemd-test: OK"
