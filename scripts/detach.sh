#!/bin/sh
# detach.sh: detach a /dev/nbdN attached by attach.sh (by device or by export name).
# POSIX sh; works with bash, dash and busybox. See docs/attach.md.
set -eu

prog=detach.sh

usage() {
    cat <<'EOF'
Usage: detach.sh DEVICE|EXPORT [options]

Detach a kernel NBD device: DEVICE is /dev/nbdN; EXPORT is an export name attached
with attach.sh (looked up in the state directory). Unmount filesystems on the device
first. Detaching a device that is not attached succeeds and says so.

Options:
  --state-dir DIR   where attach.sh records EXPORT -> device links
                    (default: $CRYPTVOL_ATTACH_STATE_DIR, else /run/cryptvol/attach)
  --timeout S       seconds to wait for the device to report size 0 (default 30)
  -h, --help        show this help
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

# Percent-encodes a string exactly like attach.sh does for its link names.
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

# Test hooks (not for normal use): another sysfs root and nbd-client.
sysfs=${CRYPTVOL_SYSFS:-/sys}
nbd_client=${CRYPTVOL_NBD_CLIENT:-nbd-client}
cryptvol=${CRYPTVOL_BIN:-cryptvol}

state_dir=${CRYPTVOL_ATTACH_STATE_DIR:-/run/cryptvol/attach}
wait_s=30
target=''
have_target=no

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --state-dir)
            [ $# -ge 2 ] || usage_error "option $1 needs a value"
            state_dir=$2; shift 2 ;;
        --timeout)
            [ $# -ge 2 ] || usage_error "option $1 needs a value"
            wait_s=$2; shift 2 ;;
        --) shift; break ;;
        -*) usage_error "unknown option $1" ;;
        *)
            [ "$have_target" = no ] || usage_error "only one DEVICE or EXPORT may be given"
            target=$1; have_target=yes; shift ;;
    esac
done
if [ $# -gt 0 ]; then
    if [ "$have_target" = yes ] || [ $# -ne 1 ]; then usage_error "only one DEVICE or EXPORT may be given"; fi
    target=$1; have_target=yes
fi
if [ "$have_target" = no ] || [ -z "$target" ]; then
    usage_error "missing DEVICE (/dev/nbdN) or EXPORT"
fi
case "$wait_s" in
    '' | *[!0-9]*) usage_error "invalid --timeout $wait_s (whole seconds)" ;;
esac

case "$target" in
    /dev/nbd[0-9] | /dev/nbd[0-9][0-9] | /dev/nbd[0-9][0-9][0-9])
        device=$target
        ;;
    /dev/*)
        usage_error "invalid device $target: expected /dev/nbdN"
        ;;
    *)
        enc=$(urlencode "$target")
        case "$enc" in
            .*) link="$state_dir/%2e${enc#.}" ;;
            *) link="$state_dir/$enc" ;;
        esac
        [ -L "$link" ] || die "export \"$target\" is not attached (no $link); give the device instead: detach.sh /dev/nbdN"
        device=$(readlink "$link")
        ;;
esac
name=${device#/dev/}

dev_size() {
    cat "$sysfs/block/$1/size" 2>/dev/null || echo 0
}

# Removes every state link that points at the device.
forget() {
    for l in "$state_dir"/*; do
        if [ -L "$l" ] && [ "$(readlink "$l")" = "$device" ]; then
            rm -f "$l"
        fi
    done
}

[ -e "$sysfs/block/$name" ] || die "$device does not exist (is the nbd module loaded?)"

if [ "$(dev_size "$name")" = 0 ] && [ ! -e "$sysfs/block/$name/pid" ]; then
    forget
    printf '%s is not attached; nothing to do\n' "$device"
    exit 0
fi

# `cryptvol detach` (netlink) when cryptvol is installed, else nbd-client -d; a device
# attached with `cryptvol attach --watch` ends its watcher this way too.
if [ -z "${CRYPTVOL_NBD_CLIENT:-}" ] && command -v "$cryptvol" >/dev/null 2>&1; then
    if ! out=$("$cryptvol" detach "$device" 2>&1); then
        die "cryptvol detach $device failed:
$out"
    fi
elif ! out=$("$nbd_client" -d "$device" 2>&1); then
    die "nbd-client -d $device failed:
$out"
fi

tries=0
limit=$((wait_s * 10))
while [ "$(dev_size "$name")" != 0 ]; do
    tries=$((tries + 1))
    [ "$tries" -le "$limit" ] || die "$device still reports a size after ${wait_s} s; is it still in use (mounted, open)? See docs/attach.md"
    sleep 0.1 2>/dev/null || sleep 1
done
forget
printf 'detached %s\n' "$device"
