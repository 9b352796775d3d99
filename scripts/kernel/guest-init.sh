#!/bin/sh
# /init of the throw-away initramfs that scripts/kernel-test.sh boots under
# qemu-system-x86_64. It runs under busybox ash inside the guest, uses the guest
# kernel's own nbd driver (attached with the real nbd-client over netlink) and
# prints one line per check on the serial console:
#
#   KT-RESULT <name> PASS|FAIL <detail>
#
# plus KT-SUM lines (checksums the host carries into the next boot), KT-LOG
# lines (context for a failure) and KT-REQ lines (requests to the host, which
# answers through the control port; see ctl_wait). It never exits: it powers
# the VM off (reboot -f, qemu runs with -no-reboot) when done.
#
# Configuration: /kt/conf (sourced; written by the host), kt.phase=N on the
# kernel command line, /kt/expected.sums in later boots.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
mkdir -p /dev/shm /tmp /run /mnt/a /mnt/b
mount -t tmpfs tmpfs /dev/shm

# shellcheck disable=SC1091
. /kt/conf

PHASE=
# shellcheck disable=SC2013 # words, not lines
for w in $(cat /proc/cmdline); do
    case "$w" in kt.phase=*) PHASE=${w#kt.phase=} ;; esac
done

LOGDIR=/tmp/kt-logs
mkdir -p "$LOGDIR"

say() { echo "$*" > /dev/console; }

# result NAME PASS|FAIL DETAIL...
result() {
    n=$1; s=$2; shift 2
    say "KT-RESULT $n $s $*"
}

# Print the tail of a check's log so a failure explains itself on the console.
show_log() {
    [ -s "$LOGDIR/$1" ] || return 0
    tail -n 25 "$LOGDIR/$1" | while IFS= read -r l; do say "KT-LOG $1: $l"; done
}

# check NAME FUNCTION: run FUNCTION with stdout+stderr in the check's log; the
# function writes its one-line detail to $DETAIL. A non-zero status is a FAIL.
DETAIL=/tmp/kt-detail
check() {
    n=$1; f=$2
    : > "$DETAIL"
    t0=$(cut -d' ' -f1 /proc/uptime)
    if "$f" > "$LOGDIR/$n" 2>&1; then st=PASS; else st=FAIL; fi
    t1=$(cut -d' ' -f1 /proc/uptime)
    d=$(head -n 1 "$DETAIL")
    # A failure without its own detail: the last thing its log said.
    [ -n "$d" ] || [ "$st" = PASS ] || d=$(grep -v '^+ ' "$LOGDIR/$n" | tail -n 1)
    el=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1fs", b - a }')
    result "$n" "$st" "${d:-no detail} ($el)"
    if [ "$st" = FAIL ]; then
        show_log "$n"
        FAILED=$((FAILED + 1))
    fi
}
FAILED=0

detail() { echo "$*" > "$DETAIL"; }
die() { echo "ERROR: $*"; detail "$*"; return 1; }

# ---------------------------------------------------------------- helpers

# attach DEV PORT EXPORT [nbd-client options...]
# Attaches over netlink (nbd-client 3.24 wants the device named explicitly).
attach() {
    dev=$1; port=$2; name=$3; shift 3
    echo "+ nbd-client $HOST $port $dev -N $name -t $NBD_TIMEOUT $*"
    timeout "$ATTACH_TIMEOUT" nbd-client "$HOST" "$port" "$dev" -N "$name" -t "$NBD_TIMEOUT" "$@" ||
        { echo "nbd-client attach of '$name' on $dev failed"; return 1; }
    # The size appears when the kernel has taken the config.
    i=0
    while [ "$(cat /sys/block/"${dev#/dev/}"/size 2>/dev/null || echo 0)" = 0 ]; do
        i=$((i + 1)); [ $i -gt 50 ] && { echo "$dev has size 0 after attach"; return 1; }
        sleep 0.1
    done
    echo "attached $name on $dev: $(blockdev --getsize64 "$dev") bytes, lbs $(cat /sys/block/"${dev#/dev/}"/queue/logical_block_size)"
}

detach() {
    dev=$1
    echo "+ nbd-client -d $dev"
    timeout "$ATTACH_TIMEOUT" nbd-client -d "$dev" || { echo "detach of $dev failed"; return 1; }
    i=0
    while [ "$(cat /sys/block/"${dev#/dev/}"/size 2>/dev/null || echo 0)" != 0 ]; do
        i=$((i + 1)); [ $i -gt 50 ] && { echo "$dev still has a size after detach"; return 1; }
        sleep 0.1
    done
}

lbs() { cat "/sys/block/${1#/dev/}/queue/logical_block_size"; }

# Server transmission flags as the kernel recorded them (debugfs), as a number.
srv_flags() {
    f=/sys/kernel/debug/nbd/${1#/dev/}/flags
    [ -r "$f" ] || { echo -1; return; }
    h=$(sed -n 's/^Hex: 0x\([0-9a-fA-F]*\).*/\1/p' "$f")
    echo $((0x${h:-0}))
}

# Established TCP connections from this guest to HOST:PORT (the nbd sockets).
conns_to() {
    port_hex=$(printf '%04X' "$1")
    # 10.0.2.100 as /proc/net/tcp prints it (little-endian u32).
    awk -v p="6402000A:$port_hex" '$3 == p && $4 == "01" { n++ } END { print n + 0 }' /proc/net/tcp
}

# run_fio NAME ARGS...: fio with data verification; non-zero on any error.
run_fio() {
    fname=$1; shift
    echo "+ fio --name=$fname $*"
    timeout "$FIO_TIMEOUT" fio --name="$fname" --ioengine=libaio --direct=1 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --group_reporting "$@" || { echo "fio job $fname failed (status $?)"; return 1; }
}

# ask the host for ACTION and wait until it says it is done (control port).
ctl_wait() {
    token=$1
    say "KT-REQ $token"
    i=0
    while :; do
        got=$(timeout 5 nc "$HOST" "$CTL_PORT" < /dev/null 2>/dev/null || true)
        case "$got" in *"done $token"*) return 0 ;; esac
        i=$((i + 1)); [ $i -gt "$CTL_TRIES" ] && { echo "host never answered $token"; return 1; }
        sleep 0.5
    done
}

# ---------------------------------------------------------------- phase 1

c_fs_attach() {
    attach /dev/nbd0 "$RW_PORT" "$EXP_FS" -b 4096 || return 1
    [ "$(lbs /dev/nbd0)" = 4096 ] || die "logical block size $(lbs /dev/nbd0), want 4096" || return 1
    mkfs.ext4 -F -q -b 4096 -L ktfs /dev/nbd0 || die "mkfs.ext4 failed" || return 1
    mount -t ext4 /dev/nbd0 /mnt/a || die "mount failed" || return 1
    detail "/dev/nbd0 -N $EXP_FS -b 4096: $(blockdev --getsize64 /dev/nbd0) bytes, flags $(printf 0x%x "$(srv_flags /dev/nbd0)"), mkfs.ext4+mount ok"
}

c_fs_write() {
    mountpoint -q /mnt/a 2>/dev/null || grep -q ' /mnt/a ' /proc/mounts || die "fs not mounted" || return 1
    mkdir -p /mnt/a/data/sub
    i=0
    while [ $i -lt 8 ]; do
        dd if=/dev/urandom of=/mnt/a/data/f$i bs=64k count=$((i * 3 + 1)) 2>/dev/null || return 1
        i=$((i + 1))
    done
    dd if=/dev/urandom of=/mnt/a/data/sub/big bs=1M count=8 2>/dev/null || return 1
    # Odd sizes: partial blocks and a tail inside the last sector.
    dd if=/dev/urandom of=/mnt/a/data/sub/odd bs=1 count=77777 2>/dev/null || return 1
    echo "$MARKER" > /mnt/a/data/hello.txt
    sync
    (cd /mnt/a/data && find . -type f | sort | xargs sha256sum) > /tmp/fs.sums || return 1
    sz=$(du -sk /mnt/a/data | cut -f1)
    detail "$(wc -l < /tmp/fs.sums) files, ${sz} KiB, sha256 recorded"
}

c_fs_fio() {
    run_fio fsverify --directory=/mnt/a --filename=fio.dat --size=8M \
        --rw=randwrite --bsrange=4k-64k --iodepth=16 --unlink=1 || return 1
    detail "fio randwrite 8M bs 4k-64k qd16 verify=crc32c on ext4 over nbd0: no errors"
}

c_fs_discard() {
    # The export advertises trim (server run with --discard): fstrim goes down
    # to the server as NBD_CMD_TRIM.
    f=$(srv_flags /dev/nbd0)
    [ $((f & 0x20)) -ne 0 ] || die "server did not advertise SEND_TRIM (flags $(printf 0x%x "$f"))" || return 1
    out=$(fstrim -v /mnt/a 2>&1) || die "fstrim failed: $out" || return 1
    (cd /mnt/a/data && sha256sum -c -s /tmp/fs.sums) || die "checksums differ after fstrim" || return 1
    detail "SEND_TRIM advertised; $out; checksums unchanged"
}

c_fs_reattach() {
    umount /mnt/a || die "umount failed" || return 1
    detach /dev/nbd0 || return 1
    attach /dev/nbd1 "$RW_PORT" "$EXP_FS" -b 4096 || return 1
    e2fsck -fn /dev/nbd1 || die "e2fsck -fn reports problems (status $?)" || return 1
    mount -t ext4 /dev/nbd1 /mnt/b || die "mount on nbd1 failed" || return 1
    (cd /mnt/b/data && sha256sum -c /tmp/fs.sums) || die "checksums differ after re-attach" || return 1
    umount /mnt/b || return 1
    detach /dev/nbd1 || return 1
    detail "detached nbd0, attached nbd1: e2fsck -fn clean, $(wc -l < /tmp/fs.sums) checksums equal"
}

c_raw_fio() {
    attach /dev/nbd2 "$RW_PORT" "$EXP_RAW" -b 4096 || return 1
    run_fio rawverify --filename=/dev/nbd2 --size=12M --offset=4M --rw=randwrite \
        --bsrange=4k-128k --iodepth=16 || return 1
    run_fio rawseq --filename=/dev/nbd2 --offset=32M --size=8M --rw=write --bs=1M --iodepth=4 || return 1
    detach /dev/nbd2 || return 1
    detail "raw /dev/nbd2 -b 4096: randwrite 12M bs 4k-128k + seq 8M bs 1M, verify=crc32c ok"
}

c_s512() {
    attach /dev/nbd3 "$RW_PORT" "$EXP_S512" || return 1
    l=$(lbs /dev/nbd3)
    [ "$l" = 512 ] || die "default block size gave lbs $l, want 512" || return 1
    run_fio s512 --filename=/dev/nbd3 --size=8M --rw=randwrite --bsrange=512-64k --iodepth=16 || return 1
    detach /dev/nbd3 || return 1
    detail "$EXP_SECT_S512-byte-sector volume, client default bs (lbs $l): fio randwrite bs 512-64k verify ok"
}

c_rmw() {
    attach /dev/nbd4 "$RW_PORT" "$EXP_RMW" -b 512 || return 1
    l=$(lbs /dev/nbd4)
    [ "$l" = 512 ] || die "-b 512 gave lbs $l" || return 1
    # 512-byte and unaligned-to-4096 writes into a 4096-sector volume: the
    # server has to read-modify-write.
    run_fio rmw --filename=/dev/nbd4 --size=256K --rw=randwrite --bs=512 --iodepth=16 || return 1
    run_fio rmw2 --filename=/dev/nbd4 --offset=8M --size=2M --rw=randwrite --bsrange=1536-12800 \
        --blockalign=512 --iodepth=8 || return 1
    detach /dev/nbd4 || return 1
    detail "$EXP_SECT_RMW-byte-sector volume with -b 512: fio randwrite 256K bs=512 + 2M bs 1.5k-12.5k (512-aligned) verify ok"
}

c_multiconn() {
    attach /dev/nbd5 "$RW_PORT" "$EXP_MC" -b 4096 -C 4 || return 1
    c=$(conns_to "$RW_PORT")
    f=$(srv_flags /dev/nbd5)
    [ "$c" -ge 4 ] || die "expected 4 connections, found $c" || return 1
    run_fio mc --filename=/dev/nbd5 --size=4M --offset_increment=8M --numjobs=4 \
        --rw=randwrite --bsrange=4k-64k --iodepth=16 || return 1
    detach /dev/nbd5 || return 1
    detail "-C 4: $c TCP connections, flags $(printf 0x%x "$f") (CAN_MULTI_CONN), 4 fio jobs x 4M verify ok"
}

c_ro_prep() {
    attach /dev/nbd6 "$PREP_PORT" "$EXP_RO" -b 4096 || return 1
    mkfs.ext4 -F -q -b 4096 -L ktro /dev/nbd6 || return 1
    mount -t ext4 /dev/nbd6 /mnt/b || return 1
    mkdir -p /mnt/b/data
    dd if=/dev/urandom of=/mnt/b/data/ro.bin bs=64k count=40 2>/dev/null || return 1
    echo "read-only export payload" > /mnt/b/data/readme
    (cd /mnt/b/data && find . -type f | sort | xargs sha256sum) > /tmp/ro.sums || return 1
    umount /mnt/b || return 1
    detach /dev/nbd6 || return 1
    detail "ext4 with $(wc -l < /tmp/ro.sums) files written on '$EXP_RO' through the read-write server"
}

c_tls() {
    attach /dev/nbd7 "$TLS_PORT" "$EXP_TLS" -b 4096 -certfile /kt/tls/client-cert.pem \
        -keyfile /kt/tls/client-key.pem -cacertfile /kt/tls/ca-cert.pem -tlshostname "$TLS_HOSTNAME" || return 1
    mkfs.ext4 -F -q -b 4096 -L kttls /dev/nbd7 || die "mkfs.ext4 over TLS failed" || return 1
    mount -t ext4 /dev/nbd7 /mnt/b || die "mount over TLS failed" || return 1
    mkdir -p /mnt/b/data
    dd if=/dev/urandom of=/mnt/b/data/tls.bin bs=64k count=64 2>/dev/null || return 1
    echo "$MARKER" > /mnt/b/data/hello.txt
    (cd /mnt/b/data && find . -type f | sort | xargs sha256sum) > /tmp/tls.sums || return 1
    umount /mnt/b || return 1
    detach /dev/nbd7 || return 1
    attach /dev/nbd7 "$TLS_PORT" "$EXP_TLS" -b 4096 -certfile /kt/tls/client-cert.pem \
        -keyfile /kt/tls/client-key.pem -cacertfile /kt/tls/ca-cert.pem -tlshostname "$TLS_HOSTNAME" || return 1
    e2fsck -fn /dev/nbd7 || die "e2fsck -fn over TLS reports problems" || return 1
    mount -t ext4 /dev/nbd7 /mnt/b || return 1
    (cd /mnt/b/data && sha256sum -c /tmp/tls.sums) || die "checksums differ over TLS" || return 1
    umount /mnt/b || return 1
    detach /dev/nbd7 || return 1
    detail "nbd-client -certfile/-keyfile/-cacertfile/-tlshostname $TLS_HOSTNAME: mkfs.ext4+mount+write, re-attach, e2fsck -fn clean, $(wc -l < /tmp/tls.sums) checksums equal"
}

c_tls_plain() {
    echo "+ nbd-client $HOST $TLS_PORT /dev/nbd7 -N $EXP_TLS -b 4096 (no TLS; must fail)"
    if timeout "$ATTACH_TIMEOUT" nbd-client "$HOST" "$TLS_PORT" /dev/nbd7 -N "$EXP_TLS" -b 4096; then
        nbd-client -d /dev/nbd7
        die "a plaintext nbd-client attached to the --tls require server" || return 1
    fi
    [ "$(cat /sys/block/nbd7/size)" = 0 ] || die "nbd7 has a size after the refused attach" || return 1
    detail "plaintext nbd-client refused by the --tls require server; nbd7 stays unconfigured"
}

# Break-glass (issue 16 item 7), boot 1: a volume written in full (random bytes over the
# whole device, then ext4 and files) so that every chunk holds ciphertext; boot 2 opens
# its backing file with dm-crypt, not through cryptvol.
c_bg_prep() {
    attach /dev/nbd7 "$PREP_PORT" "$EXP_BG" -b 4096 || return 1
    dd if=/dev/urandom of=/dev/nbd7 bs=1M oflag=direct 2>/dev/null
    mkfs.ext4 -F -q -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 -L ktbg /dev/nbd7 || return 1
    mount -t ext4 /dev/nbd7 /mnt/b || return 1
    mkdir -p /mnt/b/data
    dd if=/dev/urandom of=/mnt/b/data/bg.bin bs=64k count=40 2>/dev/null || return 1
    echo "$MARKER (break-glass)" > /mnt/b/data/readme
    (cd /mnt/b/data && find . -type f | sort | xargs sha256sum) > /tmp/bg.sums || return 1
    umount /mnt/b || return 1
    detach /dev/nbd7 || return 1
    detail "'$EXP_BG' written in full (urandom, then ext4 with $(wc -l < /tmp/bg.sums) files)"
}

# The RBD-backed export (cryptvol only; RBD_PORT is empty for nbdkit): the host serves
# rbd:rbd/ktrbd from a one-node Ceph cluster; after the boot it looks for the marker in
# every RADOS object of the pool (rbd-no-plaintext).
c_rbd() {
    attach /dev/nbd6 "$RBD_PORT" "$EXP_RBD" -b 4096 || return 1
    [ "$(lbs /dev/nbd6)" = 4096 ] || die "logical block size $(lbs /dev/nbd6), want 4096" || return 1
    sz=$(blockdev --getsize64 /dev/nbd6)
    mkfs.ext4 -F -q -b 4096 -L ktrbd /dev/nbd6 || die "mkfs.ext4 on the RBD export failed" || return 1
    mount -t ext4 /dev/nbd6 /mnt/b || die "mount of the RBD export failed" || return 1
    run_fio rbdverify --directory=/mnt/b --filename=fio.dat --size=16M \
        --rw=randwrite --bsrange=4k-64k --iodepth=16 || return 1
    mkdir -p /mnt/b/data
    echo "$MARKER" > /mnt/b/data/hello.txt
    sync
    umount /mnt/b || die "umount of the RBD export failed" || return 1
    e2fsck -fn /dev/nbd6 || die "e2fsck -fn on the RBD export reports problems (status $?)" || return 1
    detach /dev/nbd6 || return 1
    detail "'$EXP_RBD' (rbd:rbd/ktrbd, $sz bytes) -b 4096: mkfs.ext4+mount, fio randwrite 16M bs 4k-64k qd16 verify=crc32c ok, marker written, e2fsck -fn clean, detached"
}

phase1() {
    check fs-attach-mkfs c_fs_attach
    check fs-write c_fs_write
    check fs-fio-verify c_fs_fio
    check fs-discard c_fs_discard
    check fs-reattach c_fs_reattach
    check raw-fio-verify c_raw_fio
    check bs512-fio-verify c_s512
    check rmw-bs512-fio-verify c_rmw
    check multiconn-fio-verify c_multiconn
    check ro-prepare c_ro_prep
    check tls-attach-mkfs-fsck c_tls
    check tls-plaintext-refused c_tls_plain
    check breakglass-prepare c_bg_prep
    [ -z "$RBD_PORT" ] || check rbd-attach-fs-fio c_rbd
    # Carry the checksums to the next boot (and the host's log).
    sed 's/^/KT-SUM fs /' /tmp/fs.sums 2>/dev/null | while IFS= read -r l; do say "$l"; done
    sed 's/^/KT-SUM ro /' /tmp/ro.sums 2>/dev/null | while IFS= read -r l; do say "$l"; done
    sed 's/^/KT-SUM bg /' /tmp/bg.sums 2>/dev/null | while IFS= read -r l; do say "$l"; done
}

# ---------------------------------------------------------------- phase 2

expected() { # expected fs|ro > file
    sed -n "s/^$1 //p" /kt/expected.sums
}

c_restart_verify() {
    [ -s /kt/expected.sums ] || die "no checksums carried from boot 1" || return 1
    expected fs > /tmp/fs.sums
    [ -s /tmp/fs.sums ] || die "no fs checksums carried from boot 1" || return 1
    attach /dev/nbd0 "$RW_PORT" "$EXP_FS" -b 4096 || return 1
    e2fsck -fn /dev/nbd0 || die "e2fsck -fn after server restart reports problems" || return 1
    mount -t ext4 /dev/nbd0 /mnt/a || return 1
    (cd /mnt/a/data && sha256sum -c /tmp/fs.sums) || die "checksums differ after server restart" || return 1
    umount /mnt/a || return 1
    detail "after SIGTERM+restart of the server: fresh kernel attached, e2fsck -fn clean, $(wc -l < /tmp/fs.sums) checksums equal"
    # stays detached? no: keep it attached for the idle-restart check.
}

c_idle_restart() {
    # nbd0 is attached (from c_restart_verify) and idle. The host SIGTERMs the
    # server and starts it again; the guest then drops the dead device and
    # re-attaches.
    ctl_wait restart-rw || return 1
    timeout "$ATTACH_TIMEOUT" nbd-client -d /dev/nbd0 || true
    i=0
    while [ "$(cat /sys/block/nbd0/size)" != 0 ]; do
        i=$((i + 1)); [ $i -gt 50 ] && { echo "nbd0 still configured"; return 1; }
        sleep 0.1
    done
    attach /dev/nbd1 "$RW_PORT" "$EXP_FS" -b 4096 || return 1
    mount -t ext4 /dev/nbd1 /mnt/a || return 1
    (cd /mnt/a/data && sha256sum -c /tmp/fs.sums) || die "checksums differ after restart-while-attached" || return 1
    umount /mnt/a || return 1
    detach /dev/nbd1 || return 1
    detail "server restarted while nbd0 was attached and idle: re-attached on nbd1, checksums equal"
}

c_ro() {
    expected ro > /tmp/ro.sums
    [ -s /tmp/ro.sums ] || die "no ro checksums carried from boot 1" || return 1
    attach /dev/nbd2 "$RO_PORT" "$EXP_RO" -b 4096 || return 1
    f=$(srv_flags /dev/nbd2)
    ro=$(blockdev --getro /dev/nbd2)
    [ $((f & 0x2)) -ne 0 ] || die "server did not set READ_ONLY (flags $(printf 0x%x "$f"))" || return 1
    [ "$ro" = 1 ] || die "blockdev --getro says $ro" || return 1
    if out=$(dd if=/dev/zero of=/dev/nbd2 bs=4096 count=1 seek=100 oflag=direct conv=fsync 2>&1); then
        die "direct write to the read-only device succeeded" || return 1
    fi
    echo "dd refused: $out"
    err=$(echo "$out" | grep -o -m1 -e 'Operation not permitted' -e 'Read-only file system' -e 'Permission denied' || echo "$out" | tail -n 1)
    # A mount without -o ro must not come up writable (busybox mount falls back
    # to read-only when the device refuses read-write).
    if mount -t ext4 /dev/nbd2 /mnt/b; then
        opts=$(awk '$2 == "/mnt/b" { print $4 }' /proc/mounts)
        umount /mnt/b
        case ",$opts," in *,ro,*) ;; *) die "mount without -o ro came up writable ($opts)" || return 1 ;; esac
    fi
    mount -t ext4 -o ro /dev/nbd2 /mnt/b || die "mount -o ro failed" || return 1
    (cd /mnt/b/data && sha256sum -c /tmp/ro.sums) || die "checksums differ on the read-only export" || return 1
    if touch /mnt/b/data/new 2>/dev/null; then die "created a file on the ro mount" || return 1; fi
    umount /mnt/b || return 1
    detach /dev/nbd2 || return 1
    detail "flags $(printf 0x%x "$f") READ_ONLY, getro=1, dd oflag=direct refused ($err), plain mount came up ro, mount -o ro ok, $(wc -l < /tmp/ro.sums) checksums equal"
}

# Break-glass, boot 2: the host ran `cryptvol break-glass` on the stopped volume and put
# its backing file, the data key and the command's dm-crypt table line into /kt/bg. The
# guest maps the file with device-mapper (no cryptvol involved), mounts and compares.
c_bg_dm() {
    [ -r /kt/bg/table ] || die "no break-glass output from the host" || return 1
    expected bg > /tmp/bg.sums
    [ -s /tmp/bg.sums ] || die "no break-glass checksums carried from boot 1" || return 1
    losetup -r /dev/loop0 /kt/bg/bg.vol || die "losetup of the backing file failed" || return 1
    hex=$(od -An -v -tx1 /kt/bg/dek | tr -d ' \n')
    [ ${#hex} = 128 ] || die "the data key is ${#hex} hex digits, not 128" || return 1
    table=$(sed -e "s/HEXKEY/$hex/" -e "s|LOOPDEV|/dev/loop0|" /kt/bg/table)
    echo "+ dmsetup create ktbg --readonly --table '$(sed "s|LOOPDEV|/dev/loop0|" /kt/bg/table)'"
    dmsetup --noudevsync create ktbg --readonly --table "$table" || die "dmsetup create failed" || return 1
    dev=/dev/mapper/ktbg
    [ -b "$dev" ] || dev=/dev/$(ls /sys/block | grep -m1 '^dm-')
    e2fsck -fn "$dev" || die "e2fsck -fn of the dm-crypt device failed" || return 1
    mount -t ext4 -o ro,noload "$dev" /mnt/b || die "mount of the dm-crypt device failed" || return 1
    (cd /mnt/b/data && sha256sum -c /tmp/bg.sums) || die "checksums differ through dm-crypt" || return 1
    grep -q "break-glass" /mnt/b/data/readme || die "marker missing" || return 1
    umount /mnt/b
    dmsetup --noudevsync remove ktbg
    losetup -d /dev/loop0
    detail "dm-crypt table from break-glass (offset and options: $(cut -d' ' -f8- /kt/bg/table)): e2fsck -fn clean, ext4 mounted, $(wc -l < /tmp/bg.sums) checksums equal"
}

phase2() {
    check restart-data-intact c_restart_verify
    check restart-while-attached c_idle_restart
    check ro-export-refuses-writes c_ro
    check breakglass-dm-crypt-mount c_bg_dm
}

# ---------------------------------------------------------------- phase 3: cryptvol attach

# The export on the socket-activated daemon (the host's socket-holder.py keeps the
# listening socket; the daemon behind it is restarted and upgraded on request).
ATT_DEV=/dev/nbd0
ATT_LOG=/tmp/att-watch.log

c_att_attach() {
    echo "+ cryptvol attach $EXP_ATT --connect $HOST:$ATT_PORT --device $ATT_DEV --connections 2 --dead-conn-timeout 60 --timeout 10 --watch"
    cryptvol attach "$EXP_ATT" --connect "$HOST:$ATT_PORT" --device "$ATT_DEV" --connections 2 \
        --dead-conn-timeout 60 --timeout 10 --watch > /tmp/att-watch.out 2> "$ATT_LOG" &
    echo $! > /tmp/att-watch.pid
    i=0
    while [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" = 0 ]; do
        i=$((i + 1))
        [ $i -gt 600 ] && { cat "$ATT_LOG"; die "nbd0 not configured 60 s after cryptvol attach" || return 1; }
        kill -0 "$(cat /tmp/att-watch.pid)" 2>/dev/null || { cat "$ATT_LOG"; die "cryptvol attach exited: $(tail -n 1 "$ATT_LOG")" || return 1; }
        sleep 0.1
    done
    # It prints the device once attached: wait for that line (bounded), not for a second.
    i=0
    while [ ! -s /tmp/att-watch.out ]; do
        i=$((i + 1))
        [ $i -gt 600 ] && { cat "$ATT_LOG"; die "cryptvol attach printed nothing 60 s after nbd0 was configured" || return 1; }
        sleep 0.1
    done
    cat "$ATT_LOG"
    out=$(cat /tmp/att-watch.out)
    [ "$out" = "$ATT_DEV" ] || die "cryptvol attach printed '$out', want $ATT_DEV" || return 1
    l=$(lbs "$ATT_DEV")
    [ "$l" = 4096 ] || die "logical block size $l, want 4096 (the export's preferred size)" || return 1
    c=$(conns_to "$ATT_PORT")
    [ "$c" -ge 2 ] || die "expected 2 connections, found $c" || return 1
    mkfs.ext4 -F -q -b 4096 -L ktatt "$ATT_DEV" || die "mkfs.ext4 failed" || return 1
    mount -t ext4 "$ATT_DEV" /mnt/a || die "mount failed" || return 1
    detail "cryptvol attach --connections 2 --watch: $ATT_DEV $(blockdev --getsize64 $ATT_DEV) bytes, lbs $l, $c TCP connections, flags $(printf 0x%x "$(srv_flags $ATT_DEV)"), mkfs.ext4+mount ok"
}

c_att_restart() {
    grep -q ' /mnt/a ' /proc/mounts || die "fs not mounted" || return 1
    dmesg -c > /dev/null
    echo "+ fio attverify (time_based 80 s, verify_backlog) in the background"
    fio --name=attverify --directory=/mnt/a --filename=fio.dat --size=32M --rw=randwrite \
        --bsrange=4k-64k --iodepth=8 --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --verify_backlog=512 --time_based --runtime=80 > /tmp/att-fio.log 2>&1 &
    fpid=$!
    sleep 20
    kill -0 $fpid 2>/dev/null || { cat /tmp/att-fio.log; die "fio ended before the restart" || return 1; }
    ctl_wait restart-att || return 1
    sleep 20
    ctl_wait upgrade-att || return 1
    st=0
    wait $fpid || st=$?
    cat /tmp/att-fio.log
    echo "--- watch log"
    cat "$ATT_LOG"
    echo "--- dmesg"
    dmesg
    [ "$st" = 0 ] || die "fio failed (status $st)" || return 1
    grep -q 'err= 0' /tmp/att-fio.log || die "fio reported errors" || return 1
    ioerr=$(dmesg | grep -c -e 'I/O error' -e 'EXT4-fs error' -e 'Buffer I/O' || true)
    [ "$ioerr" = 0 ] || die "$ioerr I/O error line(s) in dmesg" || return 1
    waits=$(grep -o 'reconnected after [0-9.]* s' "$ATT_LOG" | sed 's/reconnected after //; s/ s$/s/' | tr '\n' ' ')
    nrec=$(grep -c 'reconnected after' "$ATT_LOG" || true)
    [ "$nrec" -ge 2 ] || die "the watcher reconnected $nrec time(s), want at least 2 (restart and upgrade)" || return 1
    clat=$(grep -o 'clat ([mun]sec): min=[^,]*, max=[^,]*' /tmp/att-fio.log | sed 's/.*(\(.*\)): .*max=\(.*\)/\2 \1/' | head -n 1)
    hits=$(dmesg | grep -c 'reconnected socket' || true)
    detail "fio randwrite 80 s verify=crc32c on ext4 over cryptvol attach: restart + upgrade of the daemon, fio ok (err=0), 0 I/O errors in dmesg; I/O waited (LINK_DEAD to reconnect): ${waits}; fio max completion latency $clat (requests the stopping daemon had not read wait for --timeout 10, then are resent); $hits socket(s) reconnected"
}

# The attached device's new size after the host grew the volume: --refresh-size tells the
# kernel (netlink RECONFIGURE), resize2fs grows the mounted fs, MiB ($2) written after,
# no I/O error. $1: the device size before.
grow_mounted() {
    old=$1
    out=$(cryptvol attach --refresh-size "$ATT_DEV" "$EXP_ATT" --connect "$HOST:$ATT_PORT" 2>&1) ||
        die "cryptvol attach --refresh-size failed: $out" || return 1
    echo "$out"
    new=$(blockdev --getsize64 "$ATT_DEV")
    [ "$new" = $((old + 64 * 1024 * 1024)) ] || die "device size $new after the refresh, want $old + 64 MiB" || return 1
    resize2fs "$ATT_DEV" || die "resize2fs failed" || return 1
    newfs=$(df -k /mnt/a | awk 'NR == 2 { print $2 }')
    [ "$newfs" -gt "$oldfs" ] || die "the filesystem did not grow ($oldfs -> $newfs KiB)" || return 1
    dd if=/dev/urandom of="/mnt/a/after-grow-$2" bs=1M count="$2" 2>/dev/null && sync || die "writing after the grow failed" || return 1
    dmesg
    ioerr=$(dmesg | grep -c -e 'I/O error' -e 'EXT4-fs error' || true)
    [ "$ioerr" = 0 ] || die "$ioerr I/O error line(s) in dmesg" || return 1
}

# Grow a mounted ext4 online: the host grows the served volume through the daemon's
# control socket (cryptvol resize --control PATH att --size +64M) with no restart, while
# a writer keeps the fs busy; the watcher does not reconnect (nothing to reconnect).
c_att_grow() {
    grep -q ' /mnt/a ' /proc/mounts || die "fs not mounted" || return 1
    old=$(blockdev --getsize64 "$ATT_DEV")
    oldfs=$(df -k /mnt/a | awk 'NR == 2 { print $2 }')
    recs=$(grep -c 'reconnected after' "$ATT_LOG" || true)
    dmesg -c > /dev/null
    (dd if=/dev/urandom of=/mnt/a/during-grow bs=1M count=24 2>/dev/null && sync) &
    busy=$!
    ctl_wait grow-att-online || return 1
    wait "$busy" || die "writing during the online grow failed" || return 1
    [ "$(blockdev --getsize64 "$ATT_DEV")" = "$old" ] || die "the device size changed before --refresh-size" || return 1
    grow_mounted "$old" 48 || return 1
    now_recs=$(grep -c 'reconnected after' "$ATT_LOG" || true)
    [ "$now_recs" = "$recs" ] || die "the watcher reconnected ($recs -> $now_recs): the daemon was restarted" || return 1
    detail "volume grown ONLINE through the control socket while attached and written to (no daemon restart, no reconnect); --refresh-size: $old -> $new bytes; resize2fs on the mounted ext4: $oldfs -> $newfs KiB; 48 MiB written after, no I/O error"
}

# The offline variant: the host stops the daemon, grows the volume (cryptvol resize FILE
# +64M) and starts it again on the held socket; the watcher reconnects; then as above.
c_att_grow_offline() {
    grep -q ' /mnt/a ' /proc/mounts || die "fs not mounted" || return 1
    old=$(blockdev --getsize64 "$ATT_DEV")
    oldfs=$(df -k /mnt/a | awk 'NR == 2 { print $2 }')
    # (not $n: check() keeps the check's name in it)
    recs=$(grep -c 'reconnected after' "$ATT_LOG" || true)
    dmesg -c > /dev/null
    ctl_wait grow-att || return 1
    i=0
    until [ "$(grep -c 'reconnected after' "$ATT_LOG" || true)" -gt "$recs" ]; do
        i=$((i + 1))
        [ $i -gt 600 ] && { cat "$ATT_LOG"; die "the watcher did not reconnect within 60 s" || return 1; }
        sleep 0.1
    done
    grow_mounted "$old" 32 || return 1
    detail "volume grown offline while attached (daemon stopped, watcher reconnected); --refresh-size: $old -> $new bytes; resize2fs on the mounted ext4: $oldfs -> $newfs KiB; 32 MiB written after, no I/O error"
}

c_att_fsck() {
    umount /mnt/a || die "umount failed" || return 1
    e2fsck -fn "$ATT_DEV" || die "e2fsck -fn reports problems (status $?)" || return 1
    cryptvol detach "$ATT_DEV" || die "cryptvol detach failed" || return 1
    i=0
    while [ "$(cat /sys/block/nbd0/size)" != 0 ]; do
        i=$((i + 1)); [ $i -gt 100 ] && { die "nbd0 still has a size after cryptvol detach" || return 1; }
        sleep 0.1
    done
    i=0
    while kill -0 "$(cat /tmp/att-watch.pid)" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt 150 ] && { die "the watcher did not exit after the detach" || return 1; }
        sleep 0.1
    done
    detail "umount, e2fsck -fn clean, cryptvol detach: size 0, the --watch process exited"
}

c_att_tls() {
    if out=$(timeout "$ATTACH_TIMEOUT" cryptvol attach "$EXP_TLS" --connect "$HOST:$TLS_PORT" --device /dev/nbd7 2>&1); then
        cryptvol detach /dev/nbd7
        die "cryptvol attach to the TLS-only server succeeded" || return 1
    fi
    echo "$out"
    echo "$out" | grep -q 'TLS cannot be handed to the kernel' || die "no clear TLS refusal: $out" || return 1
    [ "$(cat /sys/block/nbd7/size)" = 0 ] || die "nbd7 has a size" || return 1
    detail "refused: $(echo "$out" | cut -c1-120)..."
}

# cryptvol attach --reconnect by hand (no --watch): the daemon restarts while the device
# is attached; new connections are handed over and the data reads back.
c_att_reconnect() {
    cryptvol attach "$EXP_ATT" --connect "$HOST:$ATT_PORT" --device /dev/nbd1 --dead-conn-timeout 60 ||
        die "cryptvol attach on nbd1 failed" || return 1
    dd if=/dev/urandom of=/tmp/att.blk bs=64k count=16 2>/dev/null || return 1
    dd if=/tmp/att.blk of=/dev/nbd1 bs=64k seek=100 oflag=direct conv=fsync 2>/dev/null || die "write failed" || return 1
    dmesg -c > /dev/null
    ctl_wait restart-att-manual || return 1
    sleep 1
    out=$(cryptvol attach --reconnect /dev/nbd1 "$EXP_ATT" --connect "$HOST:$ATT_PORT" 2>&1) ||
        die "cryptvol attach --reconnect failed: $out" || return 1
    echo "$out"
    echo 3 > /proc/sys/vm/drop_caches
    a=$(sha256sum < /tmp/att.blk | cut -d' ' -f1)
    b=$(dd if=/dev/nbd1 bs=64k skip=100 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$a" = "$b" ] || die "data differs after --reconnect" || return 1
    dmesg
    r=$(dmesg | grep -c 'reconnected socket' || true)
    [ "$r" -ge 1 ] || die "the kernel logged no reconnected socket" || return 1
    ioerr=$(dmesg | grep -c -e 'I/O error' || true)
    [ "$ioerr" = 0 ] || die "$ioerr I/O error line(s) in dmesg" || return 1
    cryptvol detach /dev/nbd1 || return 1
    detail "daemon restarted under an attached /dev/nbd1; cryptvol attach --reconnect handed over new connections ($r reconnected socket(s)), 1 MiB written before reads back equal, no I/O error"
}

phase3() {
    check attach-netlink-mkfs c_att_attach
    check attach-restart-upgrade-fio c_att_restart
    check attach-grow-resize2fs c_att_grow
    check attach-grow-offline-resize2fs c_att_grow_offline
    check attach-fsck-detach c_att_fsck
    check attach-reconnect-by-hand c_att_reconnect
    check attach-tls-refused c_att_tls
}

# ---------------------------------------------------------------- main

setup() {
    while read -r m args; do
        # shellcheck disable=SC2086 # module parameters, one word each
        insmod "$m" $args || { echo "insmod $m $args failed"; return 1; }
    done < /kt/modules.list
    i=0
    while [ ! -e /sys/class/net/eth0 ]; do
        i=$((i + 1)); [ $i -gt 100 ] && { echo "no eth0"; return 1; }
        sleep 0.1
    done
    ip link set lo up
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    [ -e /dev/nbd7 ] || die "nbd module did not create /dev/nbd0-7" || return 1
    detail "kernel $(uname -r), $(nproc) cpus, virtio_net + nbd loaded"
}

say "KT-BOOT phase=$PHASE kernel=$(uname -r)"
check "boot$PHASE-setup" setup
case "$PHASE" in
    1) phase1 ;;
    2) phase2 ;;
    3) phase3 ;;
    # shellcheck disable=SC1091 # staged by kernel-test.sh
    4) . /kt/guest-ublk.sh && phase4 ;;
    *) result "boot-phase" FAIL "unknown phase '$PHASE'" ;;
esac
if [ "$FAILED" -gt 0 ]; then
    dmesg | tail -n 40 | while IFS= read -r l; do say "KT-DMESG $l"; done
fi
say "KT-END phase=$PHASE failed=$FAILED"
sync
reboot -f
sleep 30
