#!/bin/sh
# attach.sh: attach a cryptvol export as a kernel block device /dev/nbdN with
# `cryptvol attach --watch` (netlink; reconnects after daemon restarts and upgrades), or
# with nbd-client (--with nbd-client, or when cryptvol is not installed).
# POSIX sh; works with bash, dash and busybox. See docs/attach.md.
set -eu

prog=attach.sh

usage() {
    cat <<'EOF'
Usage: attach.sh EXPORT [options]

Attach the cryptvol export EXPORT as a kernel block device (/dev/nbdN) and print the
device path. Needs root and the nbd kernel module.

Where the daemon listens (default: --unix /run/cryptvol/nbd.sock, the socket of a daemon
run by root; one run by another user listens on its $XDG_RUNTIME_DIR/cryptvol/nbd.sock):
  --unix PATH          connect to the Unix socket PATH
  --host HOST          connect over TCP to HOST (instead of a Unix socket; the daemon
                       listens on TCP only when started with --tcp or [listen] tcp)
  --port PORT          TCP port (default 10809)

Device options:
  --block-size N       logical block size, 512|1024|2048|4096 (default: the export's
                       preferred block size as reported by nbdinfo, i.e. the volume's
                       sector size; else 4096)
  --connections N      open N connections (needs an export that allows multi-conn)
  --device /dev/nbdN   use this device (default: the first free one)
  --timeout S          per-request timeout in seconds (nbd-client -t); default none
  --read-only          attach read-only
  --state-dir DIR      where the EXPORT -> device link is recorded
                       (default /run/cryptvol/attach)
  --with TOOL          cryptvol (default when the cryptvol binary is found: it stays
                       running and reconnects the device after a daemon restart) or
                       nbd-client
  -h, --help           show this help

Every option can also be set in the environment (the systemd unit reads them from
/etc/cryptvol/attach/EXPORT.env): CRYPTVOL_SOCKET, CRYPTVOL_HOST, CRYPTVOL_PORT,
CRYPTVOL_BLOCK_SIZE, CRYPTVOL_CONNECTIONS, CRYPTVOL_DEVICE, CRYPTVOL_TIMEOUT,
CRYPTVOL_READ_ONLY (yes/no), CRYPTVOL_ATTACH_STATE_DIR, CRYPTVOL_ATTACH_WITH,
CRYPTVOL_DEAD_CONN_TIMEOUT (cryptvol attach --dead-conn-timeout, default 60).
Options override the environment.

Detach with: detach.sh EXPORT (or detach.sh /dev/nbdN).
EOF
}

die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}

usage_error() {
    printf '%s: %s\nTry: %s --help\n' "$prog" "$*" "$prog" >&2
    exit 2
}

is_uint() {
    case "$1" in
        '' | *[!0-9]*) return 1 ;;
        *) return 0 ;;
    esac
}

# Percent-encodes a string for an NBD URI path component or a file name.
urlencode() {
    printf '%s' "$1" | od -An -v -tx1 | tr -s ' \n' '  ' | {
        out=''
        read -r bytes || true
        for h in $bytes; do
            case "$h" in
                3[0-9] | 4[1-9a-f] | 5[0-9a] | 6[1-9a-f] | 7[0-9a] | 2d | 2e | 5f | 7e)
                    # shellcheck disable=SC2059 # the format is built from hex digits only
                    out="$out$(printf "\\$(printf '%03o' "0x$h")")"
                    ;;
                *) out="$out%$h" ;;
            esac
        done
        printf '%s' "$out"
    }
}

truthy() {
    case "$1" in
        1 | y | Y | yes | YES | Yes | true | TRUE | True | on | ON) return 0 ;;
        *) return 1 ;;
    esac
}

# Test hooks (not for normal use): another sysfs root, nbd-client and modprobe.
sysfs=${CRYPTVOL_SYSFS:-/sys}
nbd_client=${CRYPTVOL_NBD_CLIENT:-nbd-client}
modprobe=${CRYPTVOL_MODPROBE:-modprobe}
cryptvol=${CRYPTVOL_BIN:-cryptvol}

socket=${CRYPTVOL_SOCKET:-}
host=${CRYPTVOL_HOST:-}
port=${CRYPTVOL_PORT:-10809}
block_size=${CRYPTVOL_BLOCK_SIZE:-}
connections=${CRYPTVOL_CONNECTIONS:-}
device=${CRYPTVOL_DEVICE:-}
timeout=${CRYPTVOL_TIMEOUT:-}
read_only=no
if truthy "${CRYPTVOL_READ_ONLY:-no}"; then read_only=yes; fi
state_dir=${CRYPTVOL_ATTACH_STATE_DIR:-/run/cryptvol/attach}
export_name=''
have_export=no
with=${CRYPTVOL_ATTACH_WITH:-}
dead_conn_timeout=${CRYPTVOL_DEAD_CONN_TIMEOUT:-60}
block_size_given=$block_size

need_arg() {
    [ "$2" -ge 2 ] || usage_error "option $1 needs a value"
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --unix) need_arg "$1" $#; socket=$2; host=''; shift 2 ;;
        --host) need_arg "$1" $#; host=$2; socket=''; shift 2 ;;
        --port) need_arg "$1" $#; port=$2; shift 2 ;;
        --block-size) need_arg "$1" $#; block_size=$2; block_size_given=$2; shift 2 ;;
        --with) need_arg "$1" $#; with=$2; shift 2 ;;
        --connections) need_arg "$1" $#; connections=$2; shift 2 ;;
        --device) need_arg "$1" $#; device=$2; shift 2 ;;
        --timeout) need_arg "$1" $#; timeout=$2; shift 2 ;;
        --read-only) read_only=yes; shift ;;
        --state-dir) need_arg "$1" $#; state_dir=$2; shift 2 ;;
        --) shift; break ;;
        -*) usage_error "unknown option $1" ;;
        *)
            [ "$have_export" = no ] || usage_error "only one EXPORT may be given (got $export_name and $1)"
            export_name=$1; have_export=yes; shift ;;
    esac
done
if [ $# -gt 0 ]; then
    if [ "$have_export" = yes ] || [ $# -ne 1 ]; then usage_error "only one EXPORT may be given"; fi
    export_name=$1; have_export=yes
fi
[ "$have_export" = yes ] || usage_error "missing EXPORT (the export name, e.g. data)"
[ -n "$export_name" ] || usage_error "EXPORT must not be empty"

if [ -z "$with" ]; then
    # The stand-in nbd-client of the tests (CRYPTVOL_NBD_CLIENT) keeps the nbd-client path.
    if [ -z "${CRYPTVOL_NBD_CLIENT:-}" ] && command -v "$cryptvol" >/dev/null 2>&1; then
        with=cryptvol
    else
        with=nbd-client
    fi
fi
case "$with" in
    cryptvol | nbd-client) ;;
    *) usage_error "invalid --with $with: cryptvol or nbd-client" ;;
esac
is_uint "$dead_conn_timeout" || usage_error "invalid CRYPTVOL_DEAD_CONN_TIMEOUT $dead_conn_timeout"

if [ -n "$host" ]; then socket=''; elif [ -z "$socket" ]; then socket=/run/cryptvol/nbd.sock; fi
if ! { is_uint "$port" && [ "$port" -ge 1 ] && [ "$port" -le 65535 ]; }; then
    usage_error "invalid --port $port"
fi
if [ -n "$block_size" ]; then
    case "$block_size" in
        512 | 1024 | 2048 | 4096) ;;
        *) usage_error "invalid --block-size $block_size: nbd-client accepts 512, 1024, 2048 or 4096" ;;
    esac
fi
if [ -n "$connections" ]; then
    if ! { is_uint "$connections" && [ "$connections" -ge 1 ]; }; then
        usage_error "invalid --connections $connections"
    fi
fi
if [ -n "$timeout" ]; then
    if ! { is_uint "$timeout" && [ "$timeout" -ge 1 ]; }; then
        usage_error "invalid --timeout $timeout (whole seconds)"
    fi
fi
if [ -n "$device" ]; then
    case "$device" in
        /dev/nbd[0-9] | /dev/nbd[0-9][0-9] | /dev/nbd[0-9][0-9][0-9]) ;;
        *) usage_error "invalid --device $device: expected /dev/nbdN" ;;
    esac
fi

enc_export=$(urlencode "$export_name")
if [ -n "$socket" ]; then
    where="unix:$socket"
    list_uri="nbd+unix://?socket=$socket"
    export_uri="nbd+unix:///$enc_export?socket=$socket"
    set -- -u "$socket"
else
    where="tcp:$host:$port"
    case "$host" in
        *:*) uri_host="[$host]" ;;
        *) uri_host=$host ;;
    esac
    list_uri="nbd://$uri_host:$port"
    export_uri="nbd://$uri_host:$port/$enc_export"
    set -- "$host" "$port"
fi
# "$@" now holds nbd-client's server arguments.

# 1. Is the daemon reachable, and does it serve the export? (No kernel module needed.)
daemon_hint="is the daemon running? (systemctl status cryptvol.service; or cryptvol serve); a daemon not run by root listens on \$XDG_RUNTIME_DIR/cryptvol/nbd.sock of its user: pass --unix PATH"
if command -v nbdinfo >/dev/null 2>&1; then
    if ! nbdinfo --list "$list_uri" >/dev/null 2>&1; then
        die "cannot reach the cryptvol daemon at $where: $daemon_hint"
    fi
    if ! info=$(nbdinfo --json "$export_uri" 2>/dev/null); then
        available=$(nbdinfo --list --json "$list_uri" 2>/dev/null |
            sed -n 's/^[[:space:]]*"export-name": "\(.*\)",*$/\1/p' | tr '\n' ' ' | sed 's/ *$//')
        die "export \"$export_name\" does not exist on $where (available: ${available:-none})"
    fi
    if [ -z "$block_size" ]; then
        # The preferred block size is the volume's sector size (the minimum is 1: the
        # daemon serves any alignment, by read-modify-write below a sector).
        pref=$(printf '%s\n' "$info" | sed -n 's/^[[:space:]]*"block_size_preferred": \([0-9]*\).*/\1/p' | head -n 1)
        if [ -z "$pref" ] || [ "$pref" -ge 4096 ]; then
            block_size=4096
        elif [ "$pref" -le 512 ]; then
            block_size=512
        else
            block_size=$pref
        fi
    fi
    if [ -n "$connections" ] && [ "$connections" -gt 1 ] &&
        ! printf '%s\n' "$info" | grep -q '"can_multi_conn": true'; then
        die "export \"$export_name\" does not allow multiple connections (no CAN_MULTI_CONN); drop --connections"
    fi
else
    if ! listing=$("$nbd_client" -l "$@" 2>&1); then
        die "cannot reach the cryptvol daemon at $where: $daemon_hint"
    fi
    found=no
    # Lines look like "NAME" or "NAME: description" after a "Negotiation: .." line.
    while IFS= read -r line; do
        case "$line" in
            "$export_name" | "$export_name: "*) found=yes ;;
        esac
    done <<EOF
$listing
EOF
    [ "$found" = yes ] || die "export \"$export_name\" does not exist on $where"
    [ -n "$block_size" ] || block_size=4096
fi

# 2. The kernel driver.
if [ ! -d "$sysfs/module/nbd" ]; then
    if ! "$modprobe" nbd >/dev/null 2>&1 && [ "$(id -u)" != 0 ]; then
        die "the nbd module is not loaded and only root can load it: run as root (or sudo modprobe nbd first)"
    fi
fi
if [ ! -d "$sysfs/module/nbd" ] || [ ! -e "$sysfs/block/nbd0" ]; then
    die "this kernel has no nbd driver: use nbdfuse + losetup (see docs/attach.md)"
fi

dev_size() {
    cat "$sysfs/block/$1/size" 2>/dev/null || echo 0
}

dev_free() {
    [ -e "$sysfs/block/$1" ] && [ "$(dev_size "$1")" = 0 ] && [ ! -e "$sysfs/block/$1/pid" ]
}

mkdir -p "$state_dir"
# The link is named after the percent-encoded export name ("data" -> data); a leading dot
# is encoded too so that "." and ".." stay ordinary names.
case "$enc_export" in
    .*) link="$state_dir/%2e${enc_export#.}" ;;
    *) link="$state_dir/$enc_export" ;;
esac

# Serialise device selection between concurrent attaches when flock(1) exists.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$state_dir/.lock"
    flock 9
fi

# 3. Refuse a second attach of the same export: two block devices over one volume would
# corrupt any filesystem on it.
if [ -L "$link" ]; then
    old=$(readlink "$link")
    if [ -n "$old" ] && ! dev_free "${old#/dev/}"; then
        die "export \"$export_name\" is already attached at $old (detach it first: detach.sh $export_name)"
    fi
    rm -f "$link"
fi

# 4. Pick the device.
if [ -n "$device" ]; then
    name=${device#/dev/}
    [ -e "$sysfs/block/$name" ] || die "$device does not exist (the nbd module creates nbd0..nbd15 by default; modprobe nbd nbds_max=N for more)"
    dev_free "$name" || die "$device is in use (size non-zero or connected); pick another --device or detach it"
else
    i=0
    while [ -e "$sysfs/block/nbd$i" ]; do
        if dev_free "nbd$i"; then
            name=nbd$i
            break
        fi
        i=$((i + 1))
    done
    [ -n "${name:-}" ] || die "no free /dev/nbdN device (all in use; modprobe nbd nbds_max=N for more)"
    device=/dev/$name
fi

# 5. Connect.
if [ "$with" = cryptvol ]; then
    if [ -n "$socket" ]; then connect="unix:$socket"; else
        case "$host" in *:*) connect="[$host]:$port" ;; *) connect="$host:$port" ;; esac
    fi
    set -- attach "$export_name" --connect "$connect" --device "$device" --watch \
        --dead-conn-timeout "$dead_conn_timeout"
    [ -z "$connections" ] || set -- "$@" --connections "$connections"
    [ -z "$timeout" ] || set -- "$@" --timeout "$timeout"
    [ -z "$block_size_given" ] || set -- "$@" --block-size "$block_size_given"
    [ "$read_only" = no ] || set -- "$@" --read-only
    # It stays running (--watch): reconnects the device after a daemon restart, exits
    # when the device is detached.
    watch_log="$link.log"
    "$cryptvol" "$@" > /dev/null 2> "$watch_log" < /dev/null &
    watcher=$!
    tries=0
    while [ "$(dev_size "$name")" = 0 ]; do
        if ! kill -0 "$watcher" 2>/dev/null; then
            die "cryptvol attach failed to attach \"$export_name\" to $device:
$(tail -n 5 "$watch_log")"
        fi
        tries=$((tries + 1))
        [ "$tries" -le 300 ] || die "$device did not come up within 30 s (see $watch_log)"
        sleep 0.1 2>/dev/null || sleep 1
    done
    ln -sfn "$device" "$link"
    printf '%s\n' "$device"
    exit 0
fi
set -- "$@" "$device" -N "$export_name" -b "$block_size"
[ -z "$connections" ] || set -- "$@" -C "$connections"
[ -z "$timeout" ] || set -- "$@" -t "$timeout"
[ "$read_only" = no ] || set -- "$@" -R
if ! out=$("$nbd_client" "$@" 2>&1); then
    hint=''
    [ "$(id -u)" = 0 ] || hint=' (not running as root?)'
    die "nbd-client failed to attach \"$export_name\" to $device$hint:
$out"
fi

# 6. Wait until the kernel sees the size.
tries=0
while [ "$(dev_size "$name")" = 0 ]; do
    tries=$((tries + 1))
    [ "$tries" -le 300 ] || die "$device did not come up within 30 s (nbd-client said: $out)"
    sleep 0.1 2>/dev/null || sleep 1
done

ln -sfn "$device" "$link"
printf '%s\n' "$device"
