#!/usr/bin/env bash
# Kernel attach test: proves that a real Linux nbd driver attaches cryptvol exports.
#
# The host's own kernel may have no nbd driver, so this boots a stock Debian cloud kernel
# under qemu-system-x86_64 (TCG, no KVM needed) with a small initramfs (busybox, the real
# nbd-client, mke2fs/e2fsck, fio) and lets the guest kernel's nbd driver attach exports
# served on the host's loopback. The guest reaches them through qemu user-mode networking
# with restrict=on: only guestfwd'ed ports exist (one socat per guest connection), nothing
# leaves the machine.
#
# Two boots share the served volumes:
#   boot 1  attach/mkfs/mount/write/fio (-b 4096), fstrim, detach + re-attach on another
#           device + e2fsck + checksums, raw-device fio, default 512-byte block size, a
#           -b 512 client on a 4096-sector volume (server read-modify-write), -C 4
#           multi-connection fio, an ext4 written onto the later read-only export, and
#           TLS: nbd-client -certfile/-keyfile/-cacertfile/-tlshostname attaches to a
#           `--tls require --tls-client-ca` server (mkfs/mount/write, e2fsck, checksums),
#           while a plaintext nbd-client is refused (certificates made here with openssl).
#           (cryptvol only) an RBD-backed export: the host starts a one-node Ceph cluster
#           (scripts/ceph-cluster.sh, stopped on exit), creates rbd:rbd/ktrbd and serves it
#           (`ktrbd=rbd:rbd/ktrbd`, --ceph-conf) from its own server; the guest attaches it
#           (-b 4096), mkfs.ext4+mount, fio verify, writes the marker, e2fsck -fn clean,
#           detaches; after the boot the host checks that no RADOS object of the pool holds
#           the marker (`rados get` of every object: rbd-no-plaintext).
#   host    SIGTERM the server while the guest is detached, start it again (same volumes,
#           same port); swap the read-write server of the read-only volume for a
#           --read-only one.
#   boot 2  re-attach after the restart (e2fsck, checksums), restart the server again
#           while a device is attached and idle (the guest asks over the console and
#           waits on a control port), re-attach; the read-only export refuses writes.
#   boot 3  (cryptvol only) `cryptvol attach --watch` in the guest (netlink, 2 connections)
#           to an export of a socket-activated daemon: scripts/kernel/socket-holder.py keeps
#           the listening socket and runs `cryptvol serve` with LISTEN_FDS/LISTEN_PID, as
#           systemd does. mkfs+mount, then a fio verify job (80 s) during which the guest asks
#           the host to restart the daemon and later to upgrade it (another binary file);
#           zero I/O errors, fio verify ok; then the host grows the served volume ONLINE
#           through the daemon's control socket (`cryptvol resize --control PATH att
#           --size +64M`, no daemon stop), and the guest picks the size up (`cryptvol
#           attach --refresh-size`) and grows the mounted ext4 with resize2fs; then the
#           same offline (the host stops the daemon, `cryptvol resize FILE +64M`, starts it
#           again; the watcher reconnects); e2fsck -fn clean, `cryptvol detach`; how long
#           I/O waited is in the check's detail. A TLS-only server is refused clearly.
#
#   boot 4  (cryptvol only; another kernel: Debian's 6.12 cloud kernel from bookworm-backports,
#           which has ublk_drv) the daemon runs in the guest with `--ublk vol:0` on a volume in
#           the guest's RAM: mkfs+mount /dev/ublkb0, a fio verify job during which the daemon is
#           killed with SIGKILL and a new one recovers the quiesced device (zero I/O errors,
#           verify ok), e2fsck -fn clean; the daemon's CPU time per 4k I/O on /dev/ublkb0 and
#           on /dev/nbd0 (same daemon, same volume, NBD over the guest's loopback) is printed
#           (KT-CPU line and the check's detail); SIGTERM removes the device.
#           See scripts/kernel/ublk-boot.sh and scripts/kernel/guest-ublk.sh.
#           Part of the default run. Each guest check is bounded (UBLK_T_* in
#           guest-ublk.sh): a hang fails its check with the daemon log on the console.
#
# Every check prints `KT-RESULT <name> PASS|FAIL <detail>`; the run passes only when every
# expected check is present and PASS. Ends with `kernel-test: N passed, M failed`.
#
# Environment:
#   KT_SERVER=cryptvol|nbdkit   server under test (default cryptvol; nbdkit for developing
#                               this script: plain files, no sector sizes)
#   CRYPTVOL_BIN                cryptvol binary (default: cargo build --release, then
#                               target/release/cryptvol at the repo root)
#   KT_CACHE_DIR                where the kernel package is cached (default
#                               $XDG_CACHE_HOME/cryptvol-kernel-test, else
#                               /var/cache/cryptvol-kernel-test as root, else
#                               ~/.cache/cryptvol-kernel-test)
#   KT_KERNEL_PKG               kernel package (default linux-image-cloud-amd64, resolved to
#                               its versioned package)
#   KT_QEMU_TIMEOUT             seconds each boot may take (default 300)
#   KT_ONLY=all|nbd|ublk        all four boots (all; the default), boots 1-3 (nbd), or boot
#                               4 only (ublk; also "4"). Boot 4's start-up hang (a failed
#                               queue thread the start waited for forever) is fixed and its
#                               checks are bounded: docs/ublk.md, "Start-up hang (fixed)"
#   KT_UBLK_KERNEL_PKG          boot 4's kernel package (default: what the newest 6.12
#                               linux-image-cloud-amd64 of bookworm-backports depends on;
#                               cached in $KT_CACHE_DIR/ublk)
#   KT_UBLK_QEMU_TIMEOUT        seconds boot 4 may take (default 900)
#   KT_LOG_DIR                  if set, console and server logs are copied there
#   KT_KEEP_WORK=1              keep the temporary work directory
#   KT_NO_INSTALL=1             never apt-get install; fail when something is missing
#
# Sourcing this file (`. scripts/kernel-test.sh`) only defines the functions
# (kt_volume_create, kt_server_start, kt_server_stop, ...) and runs nothing.

set -euo pipefail

KT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
KT_HELPERS=$KT_ROOT/scripts/kernel
KT_SERVER=${KT_SERVER:-cryptvol}
KT_QEMU_TIMEOUT=${KT_QEMU_TIMEOUT:-300}
KT_STOP_TIMEOUT=${KT_STOP_TIMEOUT:-20}
KT_KERNEL_PKG=${KT_KERNEL_PKG:-linux-image-cloud-amd64}
if [ -z "${KT_CACHE_DIR:-}" ]; then
    if [ -n "${XDG_CACHE_HOME:-}" ]; then
        KT_CACHE_DIR=$XDG_CACHE_HOME/cryptvol-kernel-test
    elif [ "$(id -u)" = 0 ]; then
        KT_CACHE_DIR=/var/cache/cryptvol-kernel-test
    else
        KT_CACHE_DIR=$HOME/.cache/cryptvol-kernel-test
    fi
fi

# Guest-side addresses (qemu user-mode network; guestfwd'ed to host loopback).
KT_GUEST_HOST=10.0.2.100
KT_GPORT_RW=10809   # the read-write server under test
KT_GPORT_RO=10810   # boot 1: read-write server of the ro volume; boot 2: --read-only server
KT_GPORT_CTL=10900  # control answers to the guest (cat of a file, per connection)
KT_GPORT_TLS=10811  # a --tls require server with client certificates (both boots)
KT_GPORT_ATT=10812  # boot 3: the socket-activated daemon behind socket-holder.py
KT_TLS_HOSTNAME=cryptvol-kt  # the name in the server certificate the guest checks
KT_GPORT_RBD=10813  # boot 1 (cryptvol only): the server of the RBD-backed export

# Written into a file by the guest in boot 1; must not appear in the volume file at rest.
KT_MARKER="kernel-test plaintext marker: hello from the guest kernel's nbd driver"

KT_WORK=
KT_QEMU_PID=
KT_CEPH_DIR=   # the one-node Ceph cluster of boot 1's RBD export (cryptvol only)
KT_CEPH_CONF=
declare -A KT_SERVER_PID=() KT_SERVER_PORT=() KT_SERVER_MODE=() KT_SERVER_VOLS=()
KT_STOP_STATUS=
KT_STOP_SECS=

log() { printf 'kernel-test: %s\n' "$*" >&2; }
die() {
    printf 'kernel-test: error: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ------------------------------------------------------------------ dependencies

kt_apt_updated=0
kt_apt_update() {
    if [ "$kt_apt_updated" = 0 ]; then
        log "apt-get update"
        apt-get update -qq || die "apt-get update failed"
        kt_apt_updated=1
    fi
}

# The Debian mirror the machine already uses (so no host name is baked in here).
. "$(dirname "${BASH_SOURCE[0]}")/lib/debian-mirror.sh"
# Boot 4: the ublk frontend on the bookworm-backports kernel (kt_ublk_boots).
. "$(dirname "${BASH_SOURCE[0]}")/kernel/ublk-boot.sh"
kt_debian_mirror() { debian_mirror; }

# Installs what the test needs and is missing (a CI machine starts without most of it).
kt_ensure_deps() {
    local need=()
    have_cmd() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
    have_cmd nbd-client || need+=(nbd-client)
    have_cmd fio || need+=(fio)
    have_cmd busybox || need+=(busybox-static)
    have_cmd mke2fs && have_cmd e2fsck || need+=(e2fsprogs)
    have_cmd socat || need+=(socat)
    have_cmd cpio || need+=(cpio)
    have_cmd depmod && have_cmd modprobe || need+=(kmod)
    have_cmd flock || need+=(util-linux)
    have_cmd openssl || need+=(openssl)
    have_cmd dmsetup || need+=(dmsetup)
    if [ "$KT_SERVER" = nbdkit ]; then have_cmd nbdkit || need+=(nbdkit); fi
    local qemu_missing=0
    have_cmd qemu-system-x86_64 || qemu_missing=1

    if [ "${#need[@]}" -eq 0 ] && [ "$qemu_missing" = 0 ]; then
        return 0
    fi
    if [ "${KT_NO_INSTALL:-0}" = 1 ] || [ "$(id -u)" != 0 ]; then
        [ "$qemu_missing" = 1 ] && need+=(qemu-system-x86)
        die "missing packages: ${need[*]} (install them, or run as root so this script installs them)"
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [ "${#need[@]}" -gt 0 ]; then
        kt_apt_update
        log "installing ${need[*]}"
        apt-get install -y -qq "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
    fi
    if [ "$qemu_missing" = 1 ]; then
        # qemu-utils on these machines comes from bookworm-backports; qemu-system-x86 must
        # match it, so take it from there too on bookworm.
        local codename
        # shellcheck disable=SC1091
        codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
        if [ "$codename" = bookworm ]; then
            if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
                local mirror
                mirror=$(kt_debian_mirror)
                [ -n "$mirror" ] || die "cannot find the Debian mirror in /etc/apt to add bookworm-backports"
                log "adding bookworm-backports ($mirror)"
                echo "deb $mirror bookworm-backports main" > /etc/apt/sources.list.d/backports.list
                kt_apt_updated=0
            fi
            kt_apt_update
            log "installing qemu-system-x86 from bookworm-backports"
            apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null ||
                die "apt-get install -t bookworm-backports qemu-system-x86 failed"
        else
            kt_apt_update
            log "installing qemu-system-x86"
            apt-get install -y -qq qemu-system-x86 >/dev/null || die "apt-get install qemu-system-x86 failed"
        fi
    fi
    for c in nbd-client fio busybox mke2fs e2fsck socat cpio depmod openssl qemu-system-x86_64; do
        have_cmd "$c" || die "$c is still missing after installing packages"
    done
}

# ------------------------------------------------------------------ kernel package

# Sets KT_VMLINUZ, KT_KROOT (unpacked package with depmod run), KT_KVER.
kt_ensure_kernel() {
    mkdir -p "$KT_CACHE_DIR" || die "cannot create the kernel cache $KT_CACHE_DIR"
    exec 8> "$KT_CACHE_DIR/.lock"
    flock -w 600 8 || die "another run holds $KT_CACHE_DIR/.lock"

    local pkg=$KT_KERNEL_PKG dep
    if [[ "$pkg" != linux-image-[0-9]* ]]; then
        dep=$(apt-cache depends "$pkg" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1 || true)
        if [ -z "$dep" ] && [ "$(id -u)" = 0 ] && [ "${KT_NO_INSTALL:-0}" != 1 ]; then
            kt_apt_update
            dep=$(apt-cache depends "$pkg" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1 || true)
        fi
        if [ -z "$dep" ]; then
            # Offline and lists gone: fall back to whatever is cached.
            dep=$(find "$KT_CACHE_DIR" -maxdepth 1 -name 'linux-image-[0-9]*.deb' -printf '%f\n' | sort -V | tail -n 1 | cut -d_ -f1)
            [ -n "$dep" ] || die "cannot resolve $pkg to a kernel package (apt-cache depends found nothing, cache empty)"
            log "apt cannot resolve $pkg; using cached $dep"
        fi
        pkg=$dep
    fi

    local deb
    deb=$(find "$KT_CACHE_DIR" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n 1)
    if [ -z "$deb" ]; then
        log "downloading $pkg into $KT_CACHE_DIR"
        local dl
        dl=$(mktemp -d "$KT_CACHE_DIR/.dl.XXXXXX")
        chmod 755 "$dl"
        (cd "$dl" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null) ||
            { rm -rf "$dl"; die "apt-get download $pkg failed"; }
        deb=$(find "$dl" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)
        [ -n "$deb" ] || { rm -rf "$dl"; die "apt-get download $pkg produced no .deb"; }
        mv "$deb" "$KT_CACHE_DIR/" && rm -rf "$dl"
        deb=$KT_CACHE_DIR/$(basename "$deb")
    fi

    KT_KROOT=$KT_CACHE_DIR/root-$(basename "$deb" .deb)
    if [ ! -e "$KT_KROOT/.complete" ]; then
        log "unpacking $(basename "$deb")"
        rm -rf "$KT_KROOT" "$KT_KROOT.tmp"
        mkdir -p "$KT_KROOT.tmp"
        dpkg -x "$deb" "$KT_KROOT.tmp" || die "dpkg -x $deb failed"
        local v
        v=$(ls "$KT_KROOT.tmp/lib/modules")
        depmod -b "$KT_KROOT.tmp" "$v" || die "depmod failed for $v"
        touch "$KT_KROOT.tmp/.complete"
        mv "$KT_KROOT.tmp" "$KT_KROOT"
    fi
    # Drop other (older) kernels from the cache.
    find "$KT_CACHE_DIR" -maxdepth 1 \( -name 'linux-image-*.deb' ! -name "$(basename "$deb")" \
        -o -name 'root-linux-image-*' ! -name "$(basename "$KT_KROOT")" \) -exec rm -rf {} + 2>/dev/null || true
    KT_KVER=$(ls "$KT_KROOT/lib/modules")
    KT_VMLINUZ=$KT_KROOT/boot/vmlinuz-$KT_KVER
    [ -r "$KT_VMLINUZ" ] || die "no kernel image at $KT_VMLINUZ"
    exec 8>&-
}

# ------------------------------------------------------------------ TLS certificates

# Makes $KT_WORK/pki: a CA; server/ (ca-cert.pem, server-cert.pem, server-key.pem: the
# layout nbdkit's --tls-certificates expects) for the name $KT_TLS_HOSTNAME; client/
# (ca-cert.pem, client-cert.pem, client-key.pem) for the guest's nbd-client.
kt_make_pki() {
    local d=$KT_WORK/pki
    mkdir -p "$d/server" "$d/client"
    chmod 700 "$d"
    (
        cd "$d" || exit 1
        ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
        openssl req -x509 "${ec[@]}" -days 2 -subj "/CN=kernel-test CA" -keyout ca-key.pem -out ca-cert.pem &&
            printf 'subjectAltName=DNS:%s,IP:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' \
                "$KT_TLS_HOSTNAME" "$KT_GUEST_HOST" > server.ext &&
            openssl req "${ec[@]}" -subj "/CN=$KT_TLS_HOSTNAME" -keyout server/server-key.pem -out server.csr &&
            openssl x509 -req -days 2 -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
                -extfile server.ext -out server/server-cert.pem &&
            printf 'extendedKeyUsage=clientAuth\n' > client.ext &&
            openssl req "${ec[@]}" -subj "/O=cryptvol/CN=kt-guest" -keyout client/client-key.pem -out client.csr &&
            openssl x509 -req -days 2 -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
                -extfile client.ext -out client/client-cert.pem &&
            cp ca-cert.pem server/ && cp ca-cert.pem client/ &&
            chmod 600 server/server-key.pem client/client-key.pem
    ) > "$KT_WORK/pki.log" 2>&1 || { cat "$KT_WORK/pki.log" >&2; die "making the test certificates failed"; }
}

# ------------------------------------------------------------------ initramfs

# Copies a binary and the shared libraries ldd lists into the staging tree.
kt_stage_bin() {
    local src=$1 dest=$2 stage=$3 lib
    [ -x "$src" ] || die "$src not found"
    mkdir -p "$stage$(dirname "$dest")"
    cp -L "$src" "$stage$dest"
    # "not a dynamic executable" (static busybox) makes ldd fail: nothing to copy then.
    while read -r lib; do
        [ -n "$lib" ] || continue
        if [ ! -e "$stage$lib" ]; then
            mkdir -p "$stage$(dirname "$lib")"
            cp -L "$lib" "$stage$lib"
        fi
    done < <(ldd "$src" 2>/dev/null | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]+ \(/ { print $1 }')
}

# Builds $KT_WORK/base.cpio: busybox, the tools, the modules, /init and /kt/conf.
kt_build_initramfs() {
    local stage=$KT_WORK/initramfs bb applet m
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,kt,lib/modules}

    bb=$(command -v busybox)
    kt_stage_bin "$bb" /bin/busybox "$stage"
    for applet in $("$bb" --list); do
        [ -e "$stage/bin/$applet" ] || ln -s busybox "$stage/bin/$applet"
    done
    kt_stage_bin "$(command -v nbd-client || echo /usr/sbin/nbd-client)" /usr/sbin/nbd-client "$stage"
    kt_stage_bin "$(command -v mke2fs || echo /sbin/mke2fs)" /usr/sbin/mke2fs "$stage"
    kt_stage_bin "$(command -v e2fsck || echo /sbin/e2fsck)" /usr/sbin/e2fsck "$stage"
    kt_stage_bin "$(command -v resize2fs || echo /sbin/resize2fs)" /usr/sbin/resize2fs "$stage"
    ln -s mke2fs "$stage/usr/sbin/mkfs.ext4"
    kt_stage_bin "$(command -v fio)" /usr/bin/fio "$stage"
    # break-glass: the guest maps a volume file with device-mapper (dm-crypt table line).
    kt_stage_bin "$(command -v dmsetup || echo /sbin/dmsetup)" /usr/sbin/dmsetup "$stage"
    [ -r /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$stage/etc/"
    # boot 3 runs `cryptvol attach` in the guest (a stripped copy: the guest has 1 GiB).
    if [ "$KT_SERVER" = cryptvol ]; then
        strip -o "$KT_WORK/cryptvol-guest" "$CRYPTVOL_BIN" || die "strip $CRYPTVOL_BIN failed"
        kt_stage_bin "$KT_WORK/cryptvol-guest" /usr/bin/cryptvol "$stage"
        rm -f "$KT_WORK/cryptvol-guest"
    fi
    # The guest's TLS client credentials (nbd-client links GnuTLS; kt_stage_bin copied it).
    mkdir -p "$stage/kt/tls"
    cp "$KT_WORK"/pki/client/*.pem "$stage/kt/tls/"

    # Modules in load order, deps first (virtio_pci and virtio_net for the NIC; nbd).
    : > "$stage/kt/modules.list"
    local seen=" "
    while read -r kind path args; do
        [ "$kind" = insmod ] || continue
        local rel=${path#"$KT_KROOT"}
        rel=/${rel#/}
        rel=${rel//\/.\//\/}
        case "$seen" in *" $rel "*) continue ;; esac
        seen="$seen$rel "
        mkdir -p "$stage$(dirname "$rel")"
        cp "$path" "$stage$rel"
        local extra=
        case "$rel" in */nbd.ko*) extra="nbds_max=8" ;; esac
        echo "$rel $args $extra" >> "$stage/kt/modules.list"
    done < <(for m in virtio_pci virtio_net nbd loop xts dm_crypt ${KT_EXTRA_MODULES:-}; do
        modprobe -C /dev/null -d "$KT_KROOT" -S "$KT_KVER" --show-depends "$m" || die "modprobe --show-depends $m failed"
    done)
    grep -q '/nbd\.ko' "$stage/kt/modules.list" || die "nbd.ko not found in $KT_KVER"
    grep -q '/virtio_net\.ko' "$stage/kt/modules.list" || die "virtio_net.ko not found in $KT_KVER"

    install -m 755 "$KT_HELPERS/guest-init.sh" "$stage/init"
    install -m 644 "$KT_HELPERS/guest-ublk.sh" "$stage/kt/guest-ublk.sh"
    local s512_sect=512 rmw_sect=4096
    if [ "$KT_SERVER" = nbdkit ]; then s512_sect="n/a(nbdkit)"; rmw_sect="n/a(nbdkit)"; fi
    cat > "$stage/kt/conf" <<EOF
HOST=$KT_GUEST_HOST
RW_PORT=$KT_GPORT_RW
PREP_PORT=$KT_GPORT_RO
RO_PORT=$KT_GPORT_RO
CTL_PORT=$KT_GPORT_CTL
TLS_PORT=$KT_GPORT_TLS
TLS_HOSTNAME=$KT_TLS_HOSTNAME
ATT_PORT=$KT_GPORT_ATT
RBD_PORT=$([ "$KT_SERVER" = cryptvol ] && echo "$KT_GPORT_RBD")
EXP_RBD=ktrbd
EXP_ATT=att
EXP_TLS=tls
EXP_FS=fs
EXP_RAW=raw
EXP_S512=s512
EXP_RMW=rmw
EXP_MC=mc
EXP_RO=ro
EXP_BG=bg
EXP_SECT_S512="$s512_sect"
EXP_SECT_RMW="$rmw_sect"
NBD_TIMEOUT=60
ATTACH_TIMEOUT=60
FIO_TIMEOUT=150
CTL_TRIES=240
MARKER="$KT_MARKER"
UBLK_VOL_SIZE=256M
UBLK_START_TIMEOUT=90
UBLK_FIO_SECS=60
UBLK_KILL_AFTER=20
UBLK_CPU_IOS=8192
EOF
    (cd "$stage" && find . | cpio -o -H newc --quiet) > "$KT_WORK/base.cpio" || die "cpio failed"
}

# ------------------------------------------------------------------ servers

# Prints a free TCP port on loopback, other than the ports given as arguments.
kt_free_port() {
    local p hex
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 40000))
        case " $* " in *" $p "*) continue ;; esac
        hex=$(printf '%04X' "$p")
        if ! awk -v h=":$hex" 'NR > 1 && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
            /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    die "no free TCP port found"
}

# True when something listens on TCP PORT (any address).
kt_listening() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v h=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

kt_cryptvol_bin() {
    if [ -z "${CRYPTVOL_BIN:-}" ]; then
        log "building cryptvol (cargo build --release)"
        (cd "$KT_ROOT" && cargo build --release --quiet --bin cryptvol) || die "cargo build --release failed"
        CRYPTVOL_BIN=$KT_ROOT/target/release/cryptvol
    fi
    [ -x "$CRYPTVOL_BIN" ] || die "CRYPTVOL_BIN=$CRYPTVOL_BIN is not an executable"
}

# kt_volume_create FILE SIZE SECTOR_SIZE
kt_volume_create() {
    local file=$1 size=$2 sect=$3
    case "$KT_SERVER" in
        cryptvol)
            "$CRYPTVOL_BIN" create --size "$size" --sector-size "$sect" --keystore "$KT_WORK/keystore" "$file" \
                > "$KT_WORK/create-$(basename "$file").log" 2>&1 ||
                { cat "$KT_WORK/create-$(basename "$file").log" >&2; die "cryptvol create $file failed"; }
            ;;
        nbdkit)
            truncate -s "$size" "$file" || die "truncate $file failed"
            ;;
        *) die "unknown KT_SERVER=$KT_SERVER (cryptvol or nbdkit)" ;;
    esac
}

# kt_server_start ID PORT rw|ro NAME=FILE...
# Starts a server on 127.0.0.1:PORT serving the volumes, waits until it listens.
kt_server_start() {
    local id=$1 port=$2 mode=$3
    shift 3
    local logf=$KT_WORK/server-$id.log pid
    echo "=== start $(date +%T.%N) port $port $mode $*" >> "$logf"
    case "$KT_SERVER" in
        cryptvol)
            local opts=() p=$KT_WORK/pki/server
            if [ "$mode" = ro ]; then opts+=(--read-only); else opts+=(--discard); fi
            [ "$id" = rbd ] && opts+=(--ceph-conf "$KT_CEPH_CONF")
            if [ "$mode" = tls ]; then
                # The guest's nbd-client proves its identity with a client certificate from
                # the test CA: no allow list needed (any verified certificate is admitted).
                opts+=(--tls require --tls-cert "$p/server-cert.pem" --tls-key "$p/server-key.pem"
                    --tls-client-ca "$p/ca-cert.pem")
            else
                # --allow-anyone: the guest's nbd-client comes over plaintext TCP, with no identity.
                opts+=(--allow-anyone)
            fi
            NO_COLOR=1 "$CRYPTVOL_BIN" serve --tcp "127.0.0.1:$port" "${opts[@]}" --keystore "$KT_WORK/keystore" "$@" \
                >> "$logf" 2>&1 < /dev/null &
            pid=$!
            ;;
        nbdkit)
            # nbdkit's file plugin serves every file of a directory, export name = file name.
            local dir=$KT_WORK/nbdkit-$id v
            rm -rf "$dir"
            mkdir -p "$dir"
            for v in "$@"; do ln "${v#*=}" "$dir/${v%%=*}"; done
            local opts=()
            [ "$mode" = ro ] && opts+=(-r)
            [ "$mode" = tls ] && opts+=(--tls=require "--tls-certificates=$KT_WORK/pki/server" --tls-verify-peer)
            nbdkit -f -i 127.0.0.1 -p "$port" "${opts[@]}" file dir="$dir" >> "$logf" 2>&1 < /dev/null &
            pid=$!
            ;;
        *) die "unknown KT_SERVER=$KT_SERVER (cryptvol or nbdkit)" ;;
    esac
    KT_SERVER_PID[$id]=$pid
    KT_SERVER_PORT[$id]=$port
    KT_SERVER_MODE[$id]=$mode
    KT_SERVER_VOLS[$id]="$*"
    local t0
    t0=$(now)
    until kt_listening "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            local st=0
            wait "$pid" || st=$?
            unset "KT_SERVER_PID[$id]"
            tail -n 20 "$logf" >&2
            die "server $id ($KT_SERVER) exited with status $st before listening on 127.0.0.1:$port"
        fi
        # A failure bound only (the wait is on the socket): generous, since an RBD-backed
        # server first connects to the cluster, which takes seconds on a loaded machine.
        if [ "$(elapsed "$t0" | cut -d. -f1)" -ge 120 ]; then
            tail -n 20 "$logf" >&2
            die "server $id ($KT_SERVER) not listening on 127.0.0.1:$port after 120 s"
        fi
        sleep 0.05
    done
}

# kt_server_stop ID: SIGTERM, wait up to KT_STOP_TIMEOUT s, SIGKILL after that.
# Sets KT_STOP_STATUS (exit status, or "hung") and KT_STOP_SECS. Returns 0 only when the
# server exited by itself with status 0.
kt_server_stop() {
    local id=$1 pid=${KT_SERVER_PID[$1]:-} t0 st=0
    [ -n "$pid" ] || { KT_STOP_STATUS=not-running; KT_STOP_SECS=0; return 1; }
    t0=$(now)
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$(elapsed "$t0" | cut -d. -f1)" -ge "$KT_STOP_TIMEOUT" ]; then
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            unset "KT_SERVER_PID[$id]"
            KT_STOP_STATUS=hung
            KT_STOP_SECS=$(elapsed "$t0")
            echo "=== SIGTERM ignored for ${KT_STOP_TIMEOUT}s, killed" >> "$KT_WORK/server-$id.log"
            return 1
        fi
        sleep 0.05
    done
    wait "$pid" || st=$?
    unset "KT_SERVER_PID[$id]"
    KT_STOP_STATUS=$st
    KT_STOP_SECS=$(elapsed "$t0")
    echo "=== stopped by SIGTERM: status $st after ${KT_STOP_SECS}s" >> "$KT_WORK/server-$id.log"
    [ "$st" = 0 ]
}

# kt_server_restart ID: stop with SIGTERM, start again with the same port and volumes.
# Records host-side results NAME-sigterm and NAME-restart.
kt_server_restart() {
    local id=$1 name=$2 port=${KT_SERVER_PORT[$1]} mode=${KT_SERVER_MODE[$1]}
    local -a vols
    read -r -a vols <<< "${KT_SERVER_VOLS[$id]}"
    if [ "$KT_SERVER" = nbdkit ] && [ "$name" = server-attached ]; then
        # nbdkit (1.32) keeps running after SIGTERM until its clients disconnect; that is
        # the reference peer's behaviour, not under test here: give it 3 s, then SIGKILL.
        if KT_STOP_TIMEOUT=3 kt_server_stop "$id"; then
            kt_result "$name-sigterm" PASS "server exited with status 0 ${KT_STOP_SECS}s after SIGTERM"
        else
            kt_result "$name-sigterm" PASS "nbdkit waits for attached clients after SIGTERM: SIGKILLed after ${KT_STOP_SECS}s (tolerated for nbdkit only)"
        fi
    elif kt_server_stop "$id"; then
        kt_result "$name-sigterm" PASS "server exited with status 0 ${KT_STOP_SECS}s after SIGTERM"
    else
        kt_result "$name-sigterm" FAIL "server stop: status $KT_STOP_STATUS after ${KT_STOP_SECS}s (see server-$id.log)"
    fi
    local t0
    t0=$(now)
    kt_server_start "$id" "$port" "$mode" "${vols[@]}"
    kt_result "$name-restart" PASS "listening again on the same port 127.0.0.1:$port after $(elapsed "$t0")s, same ${#vols[@]} volume(s)"
}

kt_cleanup_servers() {
    local id
    for id in "${!KT_SERVER_PID[@]}"; do
        kill -TERM "${KT_SERVER_PID[$id]}" 2>/dev/null || true
    done
    sleep 0.2
    for id in "${!KT_SERVER_PID[@]}"; do
        local _
        for _ in $(seq 1 50); do kill -0 "${KT_SERVER_PID[$id]}" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "${KT_SERVER_PID[$id]}" 2>/dev/null || true
        wait "${KT_SERVER_PID[$id]}" 2>/dev/null || true
    done
    KT_SERVER_PID=()
}

# ------------------------------------------------------------------ results

kt_result() {
    local line="KT-RESULT $1 $2 ${*:3}"
    echo "$line" >> "$KT_WORK/results"
    echo "$line"
}

# The guest wrote KT_MARKER into a file on the fs volume in boot 1: a server that encrypts
# must not have it in the backing file; nbdkit (plain files) must, which shows the probe works.
kt_check_at_rest() {
    local file=$1 found=0
    grep -qaF "$KT_MARKER" "$file" && found=1
    case "$KT_SERVER:$found" in
        cryptvol:0) kt_result at-rest-encrypted PASS "plaintext written by the guest is not in $(basename "$file") ($(du -h --apparent-size "$file" | cut -f1))" ;;
        cryptvol:1) kt_result at-rest-encrypted FAIL "plaintext written by the guest found in $(basename "$file")" ;;
        nbdkit:1) kt_result at-rest-encrypted PASS "nbdkit stores plaintext: the guest's marker found in $(basename "$file") (probe works; nothing to encrypt)" ;;
        nbdkit:0) kt_result at-rest-encrypted FAIL "the guest's marker is not in nbdkit's plain file: the probe is broken" ;;
    esac
}

# The TLS server's log after boot 1: the guest's client certificate was verified and the
# plaintext attach refused (cryptvol's log lines; nbdkit logs neither).
kt_check_tls_log() {
    local logf=$KT_WORK/server-tls.log
    if [ "$KT_SERVER" = nbdkit ]; then
        kt_result tls-server-log PASS "nbdkit: not checked"
    elif ! grep -q 'verified client certificate: subject "CN=kt-guest,O=cryptvol"' "$logf"; then
        kt_result tls-server-log FAIL "no verified client certificate CN=kt-guest in server-tls.log"
    elif ! grep -q 'plaintext client refused' "$logf"; then
        kt_result tls-server-log FAIL "the plaintext attach was not logged as refused in server-tls.log"
    else
        kt_result tls-server-log PASS "client certificate CN=kt-guest verified; plaintext client refused and logged"
    fi
}

# ------------------------------------------------------------------ RBD export

# kt_rbd_start PORT: a one-node Ceph cluster in $KT_WORK/ceph (stopped by kt_cleanup),
# rbd:rbd/ktrbd created with the test keystore and served as `ktrbd` on PORT.
kt_rbd_start() {
    local port=$1 t0
    t0=$(now)
    KT_CEPH_DIR=$KT_WORK/ceph
    log "starting a one-node Ceph cluster in $KT_CEPH_DIR"
    "$KT_ROOT/scripts/ceph-cluster.sh" start "$KT_CEPH_DIR" > "$KT_WORK/ceph-env" 2> "$KT_WORK/ceph-cluster.log" ||
        { tail -n 20 "$KT_WORK/ceph-cluster.log" >&2; die "scripts/ceph-cluster.sh start failed"; }
    KT_CEPH_CONF=$(sed -n 's/^CEPH_CONF=//p' "$KT_WORK/ceph-env")
    [ -r "$KT_CEPH_CONF" ] || die "ceph-cluster.sh printed no readable CEPH_CONF"
    log "Ceph cluster up in $(elapsed "$t0")s ($KT_CEPH_CONF)"
    "$CRYPTVOL_BIN" --ceph-conf "$KT_CEPH_CONF" create --size 256M --sector-size 4096 \
        --keystore "$KT_WORK/keystore" rbd:rbd/ktrbd > "$KT_WORK/create-ktrbd.log" 2>&1 ||
        { cat "$KT_WORK/create-ktrbd.log" >&2; die "cryptvol create rbd:rbd/ktrbd failed"; }
    kt_server_start rbd "$port" rw ktrbd=rbd:rbd/ktrbd
}

# kt_rbd_check: after boot 1, stop the RBD export's server (its writes reach the image)
# and look for the guest's marker in every RADOS object of the pool.
kt_rbd_check() {
    if kt_server_stop rbd; then
        kt_result rbd-server-sigterm PASS "server exited with status 0 ${KT_STOP_SECS}s after SIGTERM"
    else
        kt_result rbd-server-sigterm FAIL "status $KT_STOP_STATUS after ${KT_STOP_SECS}s (see server-rbd.log)"
    fi
    unset "KT_SERVER_PORT[rbd]"
    local rados=(timeout 120 rados --conf "$KT_CEPH_CONF" -p rbd) objs=0 hits=0 bytes=0 o f
    f=$KT_WORK/rados-obj
    if ! "${rados[@]}" ls > "$KT_WORK/rados-ls" 2> "$KT_WORK/rados.log"; then
        kt_result rbd-no-plaintext FAIL "rados ls failed: $(tail -n 1 "$KT_WORK/rados.log")"
        return 0
    fi
    while IFS= read -r o; do
        if ! "${rados[@]}" get "$o" "$f" 2>> "$KT_WORK/rados.log"; then
            kt_result rbd-no-plaintext FAIL "rados get $o failed: $(tail -n 1 "$KT_WORK/rados.log")"
            return 0
        fi
        objs=$((objs + 1))
        bytes=$((bytes + $(stat -c %s "$f")))
        hits=$((hits + $(grep -caF "$KT_MARKER" "$f" || true)))
    done < "$KT_WORK/rados-ls"
    rm -f "$f"
    local data
    data=$(grep -c '^rbd_data\.' "$KT_WORK/rados-ls" || true)
    if [ "$hits" = 0 ] && [ "$data" -gt 0 ]; then
        kt_result rbd-no-plaintext PASS "the guest's marker is in none of the pool's $objs RADOS objects ($data data objects, $bytes bytes read with rados get)"
    elif [ "$hits" != 0 ]; then
        kt_result rbd-no-plaintext FAIL "the guest's marker found $hits time(s) in the pool's $objs RADOS objects"
    else
        kt_result rbd-no-plaintext FAIL "no rbd_data objects in the pool ($objs objects): nothing was written to the image"
    fi
}

# ------------------------------------------------------------------ socket activation

KT_ATT_PORT=
KT_ATT_HOLDER_PID=
KT_ATT_UPGRADE_BIN=
KT_ATT_GROW_BIN=
KT_ATT_EXPORT=

# kt_holder_start PORT NAME=FILE: scripts/kernel/socket-holder.py keeps 127.0.0.1:PORT
# listening (as systemd does with cryptvol.socket) and runs `cryptvol serve` on it with
# LISTEN_FDS/LISTEN_PID; restarts go through its FIFO.
kt_holder_start() {
    local port=$1 vol=$2
    mkfifo "$KT_WORK/holder.fifo"
    : > "$KT_WORK/holder.status"
    KT_ATT_UPGRADE_BIN=$KT_WORK/upgrade/cryptvol
    mkdir -p "$KT_WORK/upgrade"
    cp "$CRYPTVOL_BIN" "$KT_ATT_UPGRADE_BIN"
    # The "grow" restart: the daemon is stopped, the volume grown offline by 64 MiB
    # (cryptvol resize, while the guest's device stays attached and its I/O waits), then
    # the daemon starts again (exec keeps the PID that LISTEN_PID names).
    KT_ATT_GROW_BIN=$KT_WORK/grow/cryptvol
    mkdir -p "$KT_WORK/grow"
    cat > "$KT_ATT_GROW_BIN" <<GROW
#!/bin/sh
env -u LISTEN_FDS -u LISTEN_PID -u LISTEN_FDNAMES "$CRYPTVOL_BIN" resize --keystore "$KT_WORK/keystore" \\
    "${vol#*=}" --size +64M >> "$KT_WORK/resize-att.log" 2>&1 3<&- || exit 1
exec "$CRYPTVOL_BIN" "\$@"
GROW
    chmod 0755 "$KT_ATT_GROW_BIN"
    KT_ATT_EXPORT=${vol%%=*}
    NO_COLOR=1 python3 "$KT_HELPERS/socket-holder.py" "$port" "$KT_WORK/holder.fifo" "$KT_WORK/holder.status" \
        "$CRYPTVOL_BIN" serve --allow-anyone --discard --unix "$KT_WORK/att-nbd.sock" \
        --control "$KT_WORK/att-control.sock" \
        --keystore "$KT_WORK/keystore" "$vol" >> "$KT_WORK/server-att.log" 2>&1 < /dev/null &
    KT_ATT_HOLDER_PID=$!
    KT_ATT_PORT=$port
    local t0
    t0=$(now)
    until kt_listening "$port" && grep -q '^started' "$KT_WORK/holder.status"; do
        kill -0 "$KT_ATT_HOLDER_PID" 2>/dev/null || { tail -n 20 "$KT_WORK/server-att.log" >&2; die "socket holder exited"; }
        [ "$(elapsed "$t0" | cut -d. -f1)" -lt 30 ] || die "socket holder not listening after 30 s"
        sleep 0.05
    done
}

# kt_holder_restart TOKEN RESULT BIN: SIGTERM the daemon, start BIN on the same socket;
# records RESULT and answers the guest with "done TOKEN".
kt_holder_restart() {
    local token=$1 name=$2 bin=$3 n t0 line
    n=$(grep -c '^restarted' "$KT_WORK/holder.status" || true)
    t0=$(now)
    echo "restart $bin" > "$KT_WORK/holder.fifo"
    until [ "$(grep -c '^restarted' "$KT_WORK/holder.status" || true)" -gt "$n" ]; do
        if [ "$(elapsed "$t0" | cut -d. -f1)" -ge 60 ]; then
            kt_result "$name" FAIL "the socket holder did not restart the daemon within 60 s"
            echo "done $token" > "$KT_WORK/ctl"
            return 0
        fi
        sleep 0.05
    done
    line=$(grep '^restarted' "$KT_WORK/holder.status" | tail -n 1)
    case "$line" in
        *stop_status=0*) kt_result "$name" PASS "SIGTERM: daemon exited 0, new daemon started on the held socket ($line; $(elapsed "$t0")s)" ;;
        *) kt_result "$name" FAIL "daemon did not exit 0 on SIGTERM: $line" ;;
    esac
    echo "done $token" > "$KT_WORK/ctl"
}

# kt_grow_online TOKEN NAME: the served att volume grows by 64 MiB through the daemon's
# control socket, with no restart (the guest's device stays attached and in use).
kt_grow_online() {
    local token=$1 name=$2 t0 out
    t0=$(now)
    if out=$("$CRYPTVOL_BIN" resize --control "$KT_WORK/att-control.sock" "$KT_ATT_EXPORT" \
        --size +64M 2>&1); then
        kt_result "$name" PASS "$out ($(elapsed "$t0")s, daemon not restarted)"
    else
        kt_result "$name" FAIL "cryptvol resize --control failed: $out"
    fi
    echo "$out" >> "$KT_WORK/resize-att.log"
    echo "done $token" > "$KT_WORK/ctl"
}

kt_holder_stop() {
    [ -n "$KT_ATT_HOLDER_PID" ] || return 0
    echo stop > "$KT_WORK/holder.fifo"
    wait "$KT_ATT_HOLDER_PID" 2>/dev/null || true
    KT_ATT_HOLDER_PID=
    KT_ATT_PORT=
    rm -f "$KT_ATT_UPGRADE_BIN"
}

# ------------------------------------------------------------------ boots

# kt_boot N RO_HOST_PORT [EXTRA_CPIO]: boots the guest in phase N, follows its console,
# answers its KT-REQ requests, copies its KT-RESULT lines into the results.
kt_boot() {
    local phase=$1 roport=$2 extra=${3:-}
    local con=$KT_WORK/console$phase.log initrd=$KT_WORK/initrd$phase.cpio
    local fwd=$KT_HELPERS/fwd.sh flog=$KT_WORK/fwd.log
    cat "$KT_WORK/base.cpio" ${extra:+"$extra"} > "$initrd"
    : > "$con"
    : > "$KT_WORK/ctl"
    local rwport=${KT_SERVER_PORT[rw]:-} tlsport=${KT_SERVER_PORT[tls]:-} rbdport=${KT_SERVER_PORT[rbd]:-}
    local net="user,id=n0,restrict=on"
    # Boot 4 (ublk) has no host-side servers: the guest serves itself.
    [ -n "$rwport" ] && net+=",guestfwd=tcp:$KT_GUEST_HOST:$KT_GPORT_RW-cmd:$fwd $flog $KT_GPORT_RW $rwport"
    [ -n "$roport" ] && net+=",guestfwd=tcp:$KT_GUEST_HOST:$KT_GPORT_RO-cmd:$fwd $flog $KT_GPORT_RO $roport"
    [ -n "$tlsport" ] && net+=",guestfwd=tcp:$KT_GUEST_HOST:$KT_GPORT_TLS-cmd:$fwd $flog $KT_GPORT_TLS $tlsport"
    [ -n "$rbdport" ] && net+=",guestfwd=tcp:$KT_GUEST_HOST:$KT_GPORT_RBD-cmd:$fwd $flog $KT_GPORT_RBD $rbdport"
    net+=",guestfwd=tcp:$KT_GUEST_HOST:$KT_GPORT_CTL-cmd:cat $KT_WORK/ctl"
    [ -n "$KT_ATT_PORT" ] && net+=",guestfwd=tcp:$KT_GUEST_HOST:$KT_GPORT_ATT-cmd:$fwd $flog $KT_GPORT_ATT $KT_ATT_PORT"

    local t0
    t0=$(now)
    log "boot $phase: kernel $KT_KVER, console $con"
    timeout -k 10 "$KT_QEMU_TIMEOUT" qemu-system-x86_64 \
        -accel tcg -cpu max -smp 2 -m 1024 \
        -nodefaults -no-user-config -no-reboot -display none \
        -kernel "$KT_VMLINUZ" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 quiet loglevel=4 kt.phase=$phase" \
        -serial "file:$con" \
        -netdev "$net" -device virtio-net-pci,netdev=n0,romfile= \
        > "$KT_WORK/qemu$phase.log" 2>&1 < /dev/null &
    KT_QEMU_PID=$!

    local done_lines=0 line n
    while :; do
        local alive=1
        kill -0 "$KT_QEMU_PID" 2>/dev/null || alive=0
        # Only complete lines; strip the console's CRs.
        n=$(wc -l < "$con")
        if [ "$n" -gt "$done_lines" ]; then
            while IFS= read -r line; do
                # A kernel message may have been printed in front of a guest line.
                case "$line" in
                    ?*KT-RESULT\ * | ?*KT-REQ\ * | ?*KT-LOG\ *) line=KT-${line#*KT-} ;;
                esac
                case "$line" in
                    KT-RESULT\ *)
                        echo "$line" >> "$KT_WORK/results"
                        echo "$line"
                        ;;
                    KT-LOG\ * | KT-DMESG\ *) echo "  $line" ;;
                    KT-REQ\ restart-rw)
                        log "guest asks: restart the server while attached"
                        kt_server_restart rw server-attached
                        echo "done restart-rw" > "$KT_WORK/ctl"
                        ;;
                    KT-REQ\ restart-att)
                        log "guest asks: restart the socket-activated daemon (same binary)"
                        kt_holder_restart restart-att att-daemon-restart "$CRYPTVOL_BIN"
                        ;;
                    KT-REQ\ restart-att-manual)
                        log "guest asks: restart the socket-activated daemon (for attach --reconnect)"
                        kt_holder_restart restart-att-manual att-daemon-restart-manual "$CRYPTVOL_BIN"
                        ;;
                    KT-REQ\ grow-att-online)
                        log "guest asks: grow the served volume online by 64 MiB (control socket)"
                        kt_grow_online grow-att-online att-daemon-grow-online
                        ;;
                    KT-REQ\ grow-att)
                        log "guest asks: stop the daemon, grow its volume offline by 64 MiB, start it"
                        kt_holder_restart grow-att att-daemon-grow "$KT_ATT_GROW_BIN"
                        ;;
                    KT-REQ\ upgrade-att)
                        log "guest asks: upgrade the socket-activated daemon (another binary file)"
                        kt_holder_restart upgrade-att att-daemon-upgrade "$KT_ATT_UPGRADE_BIN"
                        ;;
                    KT-REQ\ *) log "unknown guest request: $line" ;;
                esac
            done < <(tr -d '\r' < "$con" | sed -n "$((done_lines + 1)),${n}p")
            done_lines=$n
        fi
        [ "$alive" = 1 ] || break
        sleep 0.2
    done
    local st=0
    wait "$KT_QEMU_PID" || st=$?
    KT_QEMU_PID=
    if [ "$st" = 124 ] || [ "$st" = 137 ]; then
        kt_result "boot$phase-completed" FAIL "qemu killed after the ${KT_QEMU_TIMEOUT}s timeout"
    elif ! tr -d '\r' < "$con" | grep -q "KT-END phase=$phase"; then
        kt_result "boot$phase-completed" FAIL "guest did not finish (qemu status $st); console tail follows"
        tr -d '\r' < "$con" | tail -n 30 | sed 's/^/  console: /'
        sed 's/^/  qemu: /' "$KT_WORK/qemu$phase.log" | tail -n 10
    else
        kt_result "boot$phase-completed" PASS "booted, ran and powered off in $(elapsed "$t0")s"
    fi
}

# ------------------------------------------------------------------ main

kt_cleanup() {
    local st=$?
    set +e
    if [ -n "$KT_QEMU_PID" ]; then
        kill -TERM "$KT_QEMU_PID" 2>/dev/null
        wait "$KT_QEMU_PID" 2>/dev/null
    fi
    kt_cleanup_servers
    [ -n "$KT_CEPH_DIR" ] && "$KT_ROOT/scripts/ceph-cluster.sh" stop "$KT_CEPH_DIR" >&2
    if [ -n "$KT_ATT_HOLDER_PID" ]; then
        kill -TERM "$KT_ATT_HOLDER_PID" 2>/dev/null
        pkill -TERM -P "$KT_ATT_HOLDER_PID" 2>/dev/null
    fi
    if [ -n "$KT_WORK" ] && [ -d "$KT_WORK" ]; then
        if [ -n "${KT_LOG_DIR:-}" ]; then
            mkdir -p "$KT_LOG_DIR" && cp "$KT_WORK"/*.log "$KT_WORK"/results "$KT_LOG_DIR"/ 2>/dev/null
        fi
        if [ "${KT_KEEP_WORK:-0}" = 1 ]; then
            log "work directory kept: $KT_WORK"
        else
            rm -rf "$KT_WORK"
        fi
    fi
    exit "$st"
}

# Break-glass (issue 16 item 7): `cryptvol break-glass` on the stopped volume FILE (written
# in full by the guest in boot 1) puts the data key, the backing file and the command's
# dm-crypt table line into the next boot's extra initramfs (/kt/bg); checks the audit record.
kt_break_glass() {
    local file=$1 dir=$KT_WORK/extra/kt/bg out rc=0
    mkdir -p "$dir"
    if [ "$KT_SERVER" != cryptvol ]; then
        kt_result breakglass-dek PASS "n/a($KT_SERVER)"
        return 0
    fi
    out=$KT_WORK/break-glass.json
    (umask 077 && "$CRYPTVOL_BIN" break-glass --keystore "$KT_WORK/keystore" --json "$file" \
        --dek-fd 3 3> "$dir/dek" > "$out" 2> "$KT_WORK/break-glass.log") || rc=$?
    if [ "$rc" != 0 ]; then
        kt_result breakglass-dek FAIL "cryptvol break-glass exited $rc: $(tail -n 1 "$KT_WORK/break-glass.log")"
        return 0
    fi
    sed -n 's/^ *"dm_table": "\(.*\)",\{0,1\}$/\1/p' "$out" > "$dir/table"
    cp "$file" "$dir/bg.vol"
    local size audit
    size=$(stat -c %s "$dir/dek")
    audit=$(grep -c '"operation":"break-glass"' "$KT_WORK/keystore/audit.jsonl" || true)
    if [ "$size" = 64 ] && [ -s "$dir/table" ] && [ "$audit" -ge 1 ]; then
        kt_result breakglass-dek PASS "64-byte key, table '$(cut -d' ' -f6- "$dir/table")', $audit break-glass audit record(s); $(grep -o 'cryptsetup open[^"]*' "$out")"
    else
        kt_result breakglass-dek FAIL "key $size bytes, table '$(cat "$dir/table")', $audit audit record(s)"
    fi
}

# Boots 1-3 (the nbd driver) on the default kernel (KT_KERNEL_PKG), with their host-side
# servers; adds their checks to KT_EXPECTED.
kt_nbd_boots() {
    kt_ensure_kernel
    kt_build_initramfs
    KT_T_READY=$(now)
    log "server: $KT_SERVER${CRYPTVOL_BIN:+ ($CRYPTVOL_BIN)}; kernel $KT_KVER; initramfs $(du -h "$KT_WORK/base.cpio" | cut -f1) (setup $(elapsed "$KT_T_START")s)"

    local vdir=$KT_WORK/vols
    mkdir -p "$vdir" "$KT_WORK/keystore"
    chmod 700 "$KT_WORK/keystore"
    kt_volume_create "$vdir/fs.vol" 256M 4096
    kt_volume_create "$vdir/raw.vol" 64M 4096
    kt_volume_create "$vdir/s512.vol" 64M 512
    kt_volume_create "$vdir/rmw.vol" 64M 4096
    kt_volume_create "$vdir/mc.vol" 64M 4096
    kt_volume_create "$vdir/ro.vol" 64M 4096
    kt_volume_create "$vdir/tls.vol" 64M 4096
    kt_volume_create "$vdir/bg.vol" 32M 4096

    local rw_port prep_port ro_port tls_port
    rw_port=$(kt_free_port)
    prep_port=$(kt_free_port "$rw_port")
    ro_port=$(kt_free_port "$rw_port" "$prep_port")
    tls_port=$(kt_free_port "$rw_port" "$prep_port" "$ro_port")
    kt_server_start rw "$rw_port" rw fs="$vdir/fs.vol" raw="$vdir/raw.vol" s512="$vdir/s512.vol" \
        rmw="$vdir/rmw.vol" mc="$vdir/mc.vol"
    kt_server_start prep "$prep_port" rw ro="$vdir/ro.vol" bg="$vdir/bg.vol"
    kt_server_start tls "$tls_port" tls tls="$vdir/tls.vol"
    [ "$KT_SERVER" = cryptvol ] && kt_rbd_start "$(kt_free_port "$rw_port" "$prep_port" "$ro_port" "$tls_port")"

    # ---- boot 1
    kt_boot 1 "$prep_port"
    kt_check_tls_log
    [ "$KT_SERVER" = cryptvol ] && kt_rbd_check

    # Checksums written in boot 1, carried into boot 2.
    mkdir -p "$KT_WORK/extra/kt"
    tr -d '\r' < "$KT_WORK/console1.log" | sed -n 's/^.*KT-SUM //p' > "$KT_WORK/extra/kt/expected.sums"

    # ---- between the boots: SIGTERM while the guest is detached (and off), restart.
    kt_server_restart rw server-idle
    kt_check_at_rest "$vdir/fs.vol"
    if kt_server_stop prep; then :; else log "prep server stop: status $KT_STOP_STATUS"; fi
    kt_server_start ro "$ro_port" ro ro="$vdir/ro.vol"
    kt_break_glass "$vdir/bg.vol"
    (cd "$KT_WORK/extra" && find . | cpio -o -H newc --quiet) > "$KT_WORK/extra.cpio"

    # ---- boot 2
    kt_boot 2 "$ro_port" "$KT_WORK/extra.cpio"

    # ---- boot 3 (cryptvol only): cryptvol attach in the guest, the daemon behind a held
    # socket restarted and upgraded under fio on the mounted filesystem.
    if [ "$KT_SERVER" = cryptvol ]; then
        kt_volume_create "$vdir/att.vol" 256M 4096
        kt_holder_start "$(kt_free_port "$rw_port" "$prep_port" "$ro_port" "$tls_port")" att="$vdir/att.vol"
        kt_boot 3 "$ro_port"
        kt_holder_stop
        grep -q '^stopped stop_status=0' "$KT_WORK/holder.status" ||
            kt_result att-final-sigterm FAIL "$(tail -n 1 "$KT_WORK/holder.status")"
    fi

    kt_server_stop rw || kt_result server-final-sigterm FAIL "status $KT_STOP_STATUS after ${KT_STOP_SECS}s"
    kt_server_stop ro || kt_result ro-server-sigterm FAIL "status $KT_STOP_STATUS after ${KT_STOP_SECS}s"
    kt_server_stop tls || kt_result tls-server-sigterm FAIL "status $KT_STOP_STATUS after ${KT_STOP_SECS}s"

    KT_EXPECTED+=(
        boot1-setup fs-attach-mkfs fs-write fs-fio-verify fs-discard fs-reattach raw-fio-verify
        bs512-fio-verify rmw-bs512-fio-verify multiconn-fio-verify ro-prepare
        tls-attach-mkfs-fsck tls-plaintext-refused boot1-completed tls-server-log
        server-idle-sigterm server-idle-restart at-rest-encrypted
        boot2-setup restart-data-intact server-attached-sigterm server-attached-restart
        restart-while-attached ro-export-refuses-writes boot2-completed
        breakglass-prepare breakglass-dek breakglass-dm-crypt-mount
    )
    [ "$KT_SERVER" = cryptvol ] && KT_EXPECTED+=(
        rbd-attach-fs-fio rbd-server-sigterm rbd-no-plaintext
        boot3-setup attach-netlink-mkfs att-daemon-restart att-daemon-upgrade
        attach-restart-upgrade-fio att-daemon-grow-online attach-grow-resize2fs
        att-daemon-grow attach-grow-offline-resize2fs attach-fsck-detach att-daemon-restart-manual
        attach-reconnect-by-hand attach-tls-refused boot3-completed
    )
    return 0
}

kt_main() {
    local t_start
    t_start=$(now)
    case "$KT_SERVER" in cryptvol | nbdkit) ;; *) die "KT_SERVER must be cryptvol or nbdkit, not '$KT_SERVER'" ;; esac
    [ "$(uname -m)" = x86_64 ] || die "needs an x86_64 host (boots an amd64 kernel)"
    trap kt_cleanup EXIT
    trap 'log "interrupted"; exit 130' INT
    trap 'log "terminated"; exit 143' TERM
    KT_WORK=$(mktemp -d "${TMPDIR:-/tmp}/kernel-test.XXXXXX")
    : > "$KT_WORK/results"

    kt_ensure_deps
    [ "$KT_SERVER" = cryptvol ] && kt_cryptvol_bin
    kt_make_pki
    KT_EXPECTED=()
    KT_T_START=$t_start
    KT_T_READY=$t_start
    # KT_ONLY=all (default): boots 1-4; nbd: boots 1-3; ublk (or 4): boot 4 only (scripts/kernel/ublk-boot.sh).
    case "${KT_ONLY:-all}" in all | nbd) kt_nbd_boots ;; ublk | 4) ;; *) die "KT_ONLY must be nbd, ublk, 4 or all, not '$KT_ONLY'" ;; esac
    if [ "$KT_SERVER" = cryptvol ]; then
        case "${KT_ONLY:-all}" in all | ublk | 4) kt_ublk_boots ;; esac
    fi

    # ---- summary
    local pass=0 fail=0 name line st
    echo
    echo "kernel-test summary ($KT_SERVER, kernel $KT_KVER, $(elapsed "$t_start")s total, $(elapsed "$KT_T_READY")s after setup):"
    for name in "${KT_EXPECTED[@]}"; do
        line=$(grep "^KT-RESULT $name " "$KT_WORK/results" | tail -n 1 || true)
        st=$(echo "$line" | awk '{ print $3 }')
        if [ -z "$line" ]; then
            printf '  %-28s MISSING\n' "$name"
            fail=$((fail + 1))
        elif [ "$st" = PASS ]; then
            printf '  %-28s PASS\n' "$name"
            pass=$((pass + 1))
        else
            printf '  %-28s %s  %s\n' "$name" "$st" "$(echo "$line" | cut -d' ' -f4-)"
            fail=$((fail + 1))
        fi
    done
    # Unexpected FAIL lines (e.g. a failed final stop) count too.
    while read -r line; do
        name=$(echo "$line" | awk '{ print $2 }')
        case " ${KT_EXPECTED[*]} " in *" $name "*) continue ;; esac
        printf '  %-28s FAIL  %s\n' "$name" "$(echo "$line" | cut -d' ' -f4-)"
        fail=$((fail + 1))
    done < <(grep '^KT-RESULT [^ ]* FAIL' "$KT_WORK/results" || true)
    local wl
    wl=$(cat "$KT_WORK"/server-*.log | grep -cE '(^|[^A-Za-z])(WARN|ERROR)([^A-Za-z]|$)' || true)
    echo "  (server logs: $wl WARN/ERROR line(s))"
    echo "kernel-test: $pass passed, $fail failed"
    [ "$fail" = 0 ]
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    kt_main "$@"
fi
