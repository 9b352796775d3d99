# Boot 4 of the kernel VM test: the ublk frontend (sourced by scripts/kernel-test.sh,
# which provides log, die, now, kt_apt_update, kt_debian_mirror, kt_ensure_kernel,
# kt_build_initramfs and kt_boot).
#
# The default kernel (bookworm's 6.1 cloud kernel) has no ublk_drv; Debian's 6.12 cloud
# kernel from bookworm-backports has it as a module. Its package is resolved through apt
# (never a fixed host or version), downloaded once and cached in $KT_CACHE_DIR/ublk, apart
# from the default kernel's cache so that neither run evicts the other. The guest side is
# scripts/kernel/guest-ublk.sh.

KT_UBLK_PKG=

# The newest 6.12 version of the linux-image-cloud-amd64 meta package apt knows.
kt_ublk_meta_version() {
    apt-cache madison linux-image-cloud-amd64 2>/dev/null |
        awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep '^6\.12\.' | sort -V | tail -n 1 || true
}

# On bookworm, the 6.12 kernel is in bookworm-backports: adds that source (on the mirror
# apt already uses) when it is missing, and refreshes the lists.
kt_ublk_add_backports() {
    local codename mirror
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [ "$codename" = bookworm ] || return 0
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        mirror=$(kt_debian_mirror)
        [ -n "$mirror" ] || die "cannot find the Debian mirror in /etc/apt to add bookworm-backports"
        log "adding bookworm-backports ($mirror) for the ublk kernel"
        echo "deb $mirror bookworm-backports main" > /etc/apt/sources.list.d/backports.list
        kt_apt_updated=0
    fi
    kt_apt_update
}

# Sets KT_UBLK_PKG: KT_UBLK_KERNEL_PKG, else the versioned package the newest 6.12
# linux-image-cloud-amd64 depends on, else (offline) the newest one cached.
kt_ublk_resolve_kernel() {
    if [ -n "${KT_UBLK_KERNEL_PKG:-}" ]; then
        KT_UBLK_PKG=$KT_UBLK_KERNEL_PKG
        return 0
    fi
    local v dep=
    v=$(kt_ublk_meta_version)
    if [ -z "$v" ] && [ "$(id -u)" = 0 ] && [ "${KT_NO_INSTALL:-0}" != 1 ]; then
        kt_ublk_add_backports
        v=$(kt_ublk_meta_version)
    fi
    if [ -n "$v" ]; then
        dep=$(apt-cache depends "linux-image-cloud-amd64=$v" 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1 || true)
    fi
    if [ -z "$dep" ]; then
        dep=$(find "$KT_CACHE_DIR/ublk" -maxdepth 1 -name 'linux-image-6.12*.deb' -printf '%f\n' 2>/dev/null |
            sort -V | tail -n 1 | cut -d_ -f1 || true)
        [ -n "$dep" ] || die "cannot resolve a 6.12 linux-image-cloud-amd64 (bookworm-backports) for the ublk boot, and none is cached in $KT_CACHE_DIR/ublk"
        log "apt cannot resolve the 6.12 cloud kernel; using cached $dep"
    fi
    KT_UBLK_PKG=$dep
}

# Boot 4: switches to the ublk kernel, rebuilds the initramfs with ublk_drv, boots.
kt_ublk_boots() {
    kt_ublk_resolve_kernel
    KT_CACHE_DIR=$KT_CACHE_DIR/ublk KT_KERNEL_PKG=$KT_UBLK_PKG kt_ensure_kernel
    [ -e "$KT_KROOT/lib/modules/$KT_KVER/kernel/drivers/block/ublk_drv.ko.xz" ] ||
        [ -e "$KT_KROOT/lib/modules/$KT_KVER/kernel/drivers/block/ublk_drv.ko" ] ||
        die "$KT_UBLK_PKG has no ublk_drv module"
    KT_EXTRA_MODULES=ublk_drv kt_build_initramfs
    case "${KT_ONLY:-all}" in ublk | 4) KT_T_READY=$(now) ;; esac
    log "boot 4 (ublk): kernel $KT_KVER; initramfs $(du -h "$KT_WORK/base.cpio" | cut -f1)"
    KT_QEMU_TIMEOUT=${KT_UBLK_QEMU_TIMEOUT:-900} kt_boot 4 ""
    KT_EXPECTED+=(boot4-setup ublk-start-mkfs ublk-kill-recover ublk-fsck ublk-vs-nbd-cpu ublk-sigterm ublk-queue-failure boot4-completed)
}
