#!/usr/bin/env bash
# Installs the real peers the test suite runs against, when missing (Debian 12 host, as root).
# Idempotent: does nothing when everything is present.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have nbdkit        || need+=(nbdkit)
have nbdinfo       || need+=(libnbd-bin)
have nbdsh         || need+=(python3-libnbd)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
have nbd-client    || need+=(nbd-client)
have fio           || need+=(fio)
have socat         || need+=(socat)
have qemu-img      || need+=(qemu-utils)
have mkfs.ext4     || need+=(e2fsprogs)
have losetup       || need+=(mount)
have fusermount3   || need+=(fuse3)
have jq            || need+=(jq)
# The exec backend's example program (scripts/exec-backend-example.py) and its tests.
/usr/bin/python3 -c 'import cryptography.hazmat.primitives.ciphers.aead' 2>/dev/null || need+=(python3-cryptography)
# The key policy test runs the daemon as a second Unix user.
have useradd       || need+=(passwd)
have setpriv       || need+=(util-linux)
have openssl       || need+=(openssl)
have cpio          || need+=(cpio)
have depmod        || need+=(kmod)
[ -x /bin/busybox ] || need+=(busybox-static)
have systemd-analyze || need+=(systemd)
# tests/systemd_real.rs boots a real systemd in a container (scripts/systemd-test.sh).
have systemd-nspawn || need+=(systemd-container)
# The break-glass check of the kernel VM test maps a volume with dmsetup (dm-crypt).
have dmsetup       || need+=(dmsetup)
# Saturating the CPUs beside the test command (docs/testing.md, "Under CPU saturation").
have stress-ng     || need+=(stress-ng)
# The RBD engine (cargo feature rbd) links librbd and librados; tests/rbd.rs runs a one-node
# Ceph cluster (scripts/ceph-cluster.sh) with Debian's monitor, OSD and the ceph/rbd tools.
[ -f /usr/include/rbd/librbd.h ] || need+=(librbd-dev)
[ -f /usr/include/rados/librados.h ] || need+=(librados-dev)
have ceph-mon      || need+=(ceph-mon)
have ceph-osd      || need+=(ceph-osd)
have rbd           || need+=(ceph-common)
# libublk's build script (libublk-rs-sys) runs bindgen, which loads libclang.
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need+=(libclang-dev)

apt_updated=0
apt_update() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
}

if [ "${#need[@]}" -gt 0 ]; then
    echo "install-deps: installing ${need[*]}" >&2
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# qemu-system-x86 must match the installed qemu-utils; on machines where qemu-utils comes
# from bookworm-backports, so must qemu-system-x86.
if ! have qemu-system-x86_64; then
    echo "install-deps: installing qemu-system-x86" >&2
    qver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [[ "$qver" == *bpo* ]]; then
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            # The mirror this machine's apt already uses: no host name is written here.
            . "$(dirname "${BASH_SOURCE[0]}")/lib/debian-mirror.sh"
            mirror=$(debian_mirror)
            if [ -z "$mirror" ]; then
                echo "install-deps: cannot find the Debian mirror in /etc/apt to add bookworm-backports" >&2
                exit 1
            fi
            echo "deb $mirror bookworm-backports main" > /etc/apt/sources.list.d/backports.list
            apt_updated=0
        fi
        apt_update
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null
    else
        apt_update
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
    fi
fi
# The aws-kms backend's tests run moto_server (PyPI `moto[server]`) with the `python3` on PATH.
if ! python3 -c 'import moto.server, flask' 2>/dev/null; then
    echo "install-deps: installing moto[server] from PyPI" >&2
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_update
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    fi
    # Debian's system Python refuses plain `pip install` (PEP 668) unless told otherwise.
    python3 -m pip install -q 'moto[server]' 2>/dev/null \
        || python3 -m pip install -q --break-system-packages 'moto[server]'
fi
echo "install-deps: all peers present" >&2
