# Boot 4 of the kernel VM test (sourced by guest-init.sh, busybox ash): the ublk
# frontend. The guest kernel (Debian's 6.12 cloud kernel from bookworm-backports) has
# ublk_drv; the daemon runs in the guest on a volume in the guest's RAM:
#
#   ublk-start-mkfs     cryptvol serve --ublk vol:0: /dev/ublkb0 with the volume's block
#                       size; mkfs.ext4 + mount
#   ublk-kill-recover   fio verify on the mounted ext4; kill -9 of the daemon under fio;
#                       a new daemon with the same --ublk vol:0 recovers the quiesced
#                       device; fio ends with err=0 and verify ok, no I/O error in dmesg
#   ublk-fsck           umount, e2fsck -fn clean
#   ublk-vs-nbd-cpu     the daemon's CPU time (utime+stime from /proc/PID/stat) per 4k
#                       I/O on /dev/ublkb0 and on /dev/nbd0 (the same daemon and volume
#                       over NBD on loopback TCP), for random writes and reads
#   ublk-sigterm        SIGTERM: the daemon exits 0 and the device is removed
#   ublk-queue-failure  a daemon whose queue 1 fails at set-up (the test hook
#                       CRYPTVOL_TEST_UBLK_FAIL_QUEUE=1, then =1:panic) exits non-zero within
#                       UBLK_T_QFAIL s, its error names queue 1 and the cause, and the
#                       device it added (id 1) is removed: the start no longer waits forever
#                       for a queue that is gone (the start-up hang of docs/ublk.md)
#
# Every check is bounded (ub_bounded, UBLK_T_* seconds from /kt/conf): a check that hangs
# (a request the daemon never answers blocks mkfs or fio in the kernel) fails after its
# bound with the daemon's log, its threads' states and the kernel log on the console
# (KT-LOG ublk-diag lines), instead of running into qemu's timeout. After a failed
# start the later checks are reported as skipped.
#
# Uses check/detail/die/say from guest-init.sh and UBLK_* from /kt/conf.

UB_DIR=/tmp/ublk
UB_VOL=$UB_DIR/vol.vol
UB_KS=$UB_DIR/keystore
UB_LOG=$UB_DIR/serve.log
UB_DEV=/dev/ublkb0
UB_PORT=10809
# Bounds of the checks in seconds of guest time (a passing boot under TCG on a loaded
# 2-core host needs well under half of each); /kt/conf may set them.
: "${UBLK_T_START:=300}" "${UBLK_T_RECOVER:=360}" "${UBLK_T_FSCK:=180}"
: "${UBLK_T_CPU:=600}" "${UBLK_T_STOP:=120}" "${UBLK_T_QFAIL:=60}"

# The daemon's pid.
ub_pid() { cat "$UB_DIR/pid" 2>/dev/null; }

# Whole seconds since boot.
ub_now() { cut -d. -f1 /proc/uptime; }

# ub_serve [SPEC [ENV]]: starts a daemon (`--ublk SPEC`, default vol:0, with the
# environment assignment ENV if given; NBD on loopback TCP) that appends to UB_LOG;
# its pid goes to UB_DIR/pid and, once it exits, its status to UB_DIR/exit.PID. It runs
# under a wrapper that init adopts (double fork), so that a check bounded by ub_bounded
# can be killed with its whole process tree without killing the daemon.
ub_serve() {
    rm -f "$UB_DIR/pid" "$UB_DIR/pid.tmp"
    echo "=== serve at $(cut -d' ' -f1 /proc/uptime) s" >> "$UB_LOG"
    spec=${1:-vol:0}
    envset=${2:-CRYPTVOL_KT=1}
    echo "+ $envset cryptvol serve --tcp 127.0.0.1:$UB_PORT --allow-anyone --discard --ublk $spec vol=$UB_VOL"
    (
        (
            env "$envset" RUST_BACKTRACE=1 NO_COLOR=1 cryptvol serve --tcp "127.0.0.1:$UB_PORT" \
                --allow-anyone --discard --keystore "$UB_KS" --ublk "$spec" "vol=$UB_VOL" \
                >> "$UB_LOG" 2>&1 < /dev/null &
            d=$!
            echo "$d" > "$UB_DIR/pid.tmp" && mv "$UB_DIR/pid.tmp" "$UB_DIR/pid"
            st=0
            wait "$d" || st=$?
            echo "$st" > "$UB_DIR/exit.$d"
        ) &
    )
    i=0
    until [ -s "$UB_DIR/pid" ]; do
        i=$((i + 1))
        [ $i -gt 100 ] && { die "the daemon's wrapper wrote no pid in 10 s" || return 1; }
        sleep 0.1
    done
}

# ub_alive PID: the process exists and is not a zombie (the daemon is this shell's child).
ub_alive() {
    s=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$s" ] && [ "$s" != Z ]
}

# ub_reap PID SECS: waits for the daemon PID to exit (SIGKILL after SECS, then up to 10 s
# more); sets REAPED to its exit status (137: killed), or 255 if it never exited.
ub_reap() {
    end=$(($(ub_now) + $2))
    killed=0
    until [ -s "$UB_DIR/exit.$1" ]; do
        if [ "$(ub_now)" -ge "$end" ]; then
            [ "$killed" = 1 ] && { REAPED=255; return 0; }
            echo "+ the daemon $1 is still running after $2 s: kill -9"
            kill -KILL "$1" 2>/dev/null
            killed=1
            end=$(($(ub_now) + 10))
        fi
        sleep 0.1
    done
    REAPED=$(cat "$UB_DIR/exit.$1")
}

# The end of the daemon log without backtrace frames (a panic's message stays visible).
ub_log_tail() { grep -v -e '^ *[0-9]*: *0x' -e '^ *at ' "$UB_LOG" | tail -n 20; }

# ub_wait_log PATTERN N SECS: waits until PATTERN occurs N times in the daemon log (SECS of
# wall-clock time: under TCG an iteration takes far longer than its sleep).
ub_wait_log() {
    end=$(($(ub_now) + $3))
    until [ "$(grep -c "$1" "$UB_LOG" || true)" -ge "$2" ]; do
        [ "$(ub_now)" -ge "$end" ] && { ub_log_tail; die "no '$1' (x$2) in the daemon log after $3 s" || return 1; }
        ub_alive "$(ub_pid)" || { ub_log_tail; die "the daemon exited: $(tail -n 1 "$UB_LOG")" || return 1; }
        sleep 0.2
    done
}

# ub_diag WHY: what the daemon and the kernel were doing, on the console (the check's own
# log only shows its tail): the daemon log, each daemon thread's state and kernel wait
# channel, the tasks blocked in the kernel, and the end of the kernel log.
ub_diag() {
    say "KT-LOG ublk-diag: $1"
    grep -v -e '^ *[0-9]*: *0x' -e '^ *at ' "$UB_LOG" 2>/dev/null | tail -n 40 |
        while IFS= read -r l; do say "KT-LOG ublk-diag: log: $l"; done
    p=$(ub_pid)
    if [ -n "$p" ] && [ -d "/proc/$p/task" ]; then
        for t in /proc/"$p"/task/*; do
            say "KT-LOG ublk-diag: thread ${t##*/} $(cat "$t/comm" 2>/dev/null) state $(sed 's/^.*) //' "$t/stat" 2>/dev/null | cut -d' ' -f1) wchan $(cat "$t/wchan" 2>/dev/null)"
            [ -r "$t/stack" ] && sed 's/^/    /' "$t/stack" 2>/dev/null | head -n 12 | while IFS= read -r l; do say "KT-LOG ublk-diag:   $l"; done
        done
    else
        say "KT-LOG ublk-diag: no daemon process (pid '${p}')"
    fi
    for s in /proc/[0-9]*/stat; do
        pstate=$(sed 's/^.*) //' "$s" 2>/dev/null | cut -d' ' -f1)
        [ "$pstate" = D ] || continue
        d=${s%/stat}
        say "KT-LOG ublk-diag: blocked (D): ${d#/proc/} $(cat "$d/comm" 2>/dev/null) wchan $(cat "$d/wchan" 2>/dev/null)"
    done
    dmesg | tail -n 25 | while IFS= read -r l; do say "KT-LOG ublk-diag: dmesg: $l"; done
}

# ub_kill_tree PID: SIGKILL to PID and its descendants (the daemon is not among them: init
# adopted its wrapper). A task blocked in the kernel on a request nobody answers dies only
# once the request ends; nobody waits for that.
ub_kill_tree() {
    local ks kpp kc
    for ks in /proc/[0-9]*/stat; do
        kpp=$(sed 's/^.*) //' "$ks" 2>/dev/null | cut -d' ' -f2)
        [ "$kpp" = "$1" ] || continue
        kc=${ks%/stat}
        ub_kill_tree "${kc#/proc/}"
    done
    kill -KILL "$1" 2>/dev/null
}

# ub_bounded SECS FUNCTION: runs FUNCTION in the background (its output goes where this
# shell's does) and returns its status; if it has not ended within SECS, kills it and its
# children and fails. Either failure puts the diagnostics (ub_diag) on the console.
# (Its variables are its own: ub_diag and the checks use st, s, p... of their own.)
ub_bounded() {
    local bsecs bfn bjob bend brc
    bsecs=$1; bfn=$2
    "$bfn" &
    bjob=$!
    bend=$(($(ub_now) + bsecs))
    while ub_alive "$bjob"; do
        if [ "$(ub_now)" -ge "$bend" ]; then
            ub_diag "$bfn did not end within $bsecs s"
            ub_kill_tree "$bjob"
            ub_log_tail
            die "$bfn did not end within $bsecs s (a hang: see the KT-LOG ublk-diag lines)" || return 1
        fi
        sleep 0.5
    done
    brc=0
    wait "$bjob" || brc=$?
    [ "$brc" = 0 ] || ub_diag "$bfn failed (status $brc)"
    return "$brc"
}

c_ublk_start() {
    mkdir -p "$UB_DIR" "$UB_KS" /run
    chmod 700 "$UB_KS"
    cryptvol create --size "$UBLK_VOL_SIZE" --sector-size 4096 --keystore "$UB_KS" "$UB_VOL" ||
        die "cryptvol create failed" || return 1
    ub_serve || return 1
    ub_wait_log 'ublk device started' 1 "$UBLK_START_TIMEOUT" || { dmesg | tail -n 20; return 1; }
    cat "$UB_LOG"
    [ -b "$UB_DEV" ] || die "$UB_DEV is not a block device" || return 1
    size=$(blockdev --getsize64 "$UB_DEV")
    [ "$size" = "$(($(echo "$UBLK_VOL_SIZE" | tr -d M) * 1024 * 1024))" ] || die "$UB_DEV has $size bytes, want $UBLK_VOL_SIZE" || return 1
    l=$(lbs "$UB_DEV")
    [ "$l" = 4096 ] || die "logical block size $l, want 4096 (the volume's sector size)" || return 1
    nq=$(ls /sys/block/ublkb0/mq | wc -l)
    wc=$(cat /sys/block/ublkb0/queue/write_cache)
    dg=$(cat /sys/block/ublkb0/queue/discard_granularity)
    fua=$(cat /sys/block/ublkb0/queue/fua 2>/dev/null || echo '?')
    timeout 300 mkfs.ext4 -F -q -b 4096 -L ktublk "$UB_DEV" ||
        { dmesg | tail -n 20; ub_log_tail; die "mkfs.ext4 failed or hung (status $?)" || return 1; }
    mount -t ext4 -o discard "$UB_DEV" /mnt/a || die "mount failed" || return 1
    detail "$UB_DEV: $size bytes, lbs $l, $nq hw queue(s), write_cache '$wc', fua $fua, discard_granularity $dg; mkfs.ext4 + mount ok"
}

c_ublk_recover() {
    grep -q ' /mnt/a ' /proc/mounts || die "fs not mounted" || return 1
    dmesg -c > /dev/null
    echo "+ fio ublkverify (time_based $UBLK_FIO_SECS s, verify_backlog) in the background"
    fio --name=ublkverify --directory=/mnt/a --filename=fio.dat --size=32M --rw=randwrite \
        --bsrange=4k-64k --iodepth=8 --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --verify_backlog=512 --time_based --runtime="$UBLK_FIO_SECS" > "$UB_DIR/fio.log" 2>&1 &
    fpid=$!
    sleep "$UBLK_KILL_AFTER"
    kill -0 $fpid 2>/dev/null || { cat "$UB_DIR/fio.log"; die "fio ended before the kill" || return 1; }
    old=$(ub_pid)
    t0=$(cut -d' ' -f1 /proc/uptime)
    echo "+ kill -9 $old (under fio)"
    kill -9 "$old"
    ub_reap "$old" 30
    [ "$REAPED" = 137 ] || die "the killed daemon's status is $REAPED, want 137" || return 1
    ub_serve || return 1
    ub_wait_log 'ublk device recovered' 1 "$UBLK_START_TIMEOUT" || return 1
    t1=$(cut -d' ' -f1 /proc/uptime)
    waited=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    st=0
    wait $fpid || st=$?
    cat "$UB_DIR/fio.log"
    echo "--- daemon log"
    cat "$UB_LOG"
    echo "--- dmesg"
    dmesg
    [ "$st" = 0 ] || die "fio failed (status $st)" || return 1
    grep -q 'err= 0' "$UB_DIR/fio.log" || die "fio reported errors" || return 1
    ioerr=$(dmesg | grep -c -e 'I/O error' -e 'EXT4-fs error' -e 'Buffer I/O' || true)
    [ "$ioerr" = 0 ] || die "$ioerr I/O error line(s) in dmesg" || return 1
    ios=$(sed -n 's/.*issued rwts: total=\([0-9]*\),\([0-9]*\).*/reads \1, writes \2/p' "$UB_DIR/fio.log" | head -n 1)
    clat=$(grep -o 'clat ([mun]sec): min=[^,]*, max=[^,]*' "$UB_DIR/fio.log" | sed 's/.*(\(.*\)): .*max=\(.*\)/\2 \1/' | head -n 1)
    detail "fio randwrite ${UBLK_FIO_SECS}s verify=crc32c on ext4 over /dev/ublkb0: kill -9 of the daemon after ${UBLK_KILL_AFTER}s, the new daemon recovered the quiesced device ${waited}s after the kill; fio ok (err=0, $ios), 0 I/O errors in dmesg; fio max completion latency $clat"
}

c_ublk_fsck() {
    umount /mnt/a || die "umount failed" || return 1
    e2fsck -fn "$UB_DEV" || die "e2fsck -fn reports problems (status $?)" || return 1
    detail "umount, e2fsck -fn clean after the kill -9 and recovery"
}

# ub_cpu_ticks: the daemon's utime+stime (all threads) in clock ticks.
ub_cpu_ticks() {
    # Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    sed 's/^.*) //' "/proc/$(ub_pid)/stat" | awk '{ print $12 + $13 }'
}

# ub_cpu_per_io DEV RW: fio of UBLK_CPU_IOS 4k I/Os on DEV; prints microseconds of daemon
# CPU per I/O.
ub_cpu_per_io() {
    dev=$1; rw=$2
    a=$(ub_cpu_ticks)
    fio --name="cpu-$rw" --filename="$dev" --rw="$rw" --bs=4k --size=64M \
        --io_size=$((UBLK_CPU_IOS * 4))k --iodepth=16 --ioengine=libaio --direct=1 \
        --randrepeat=0 --norandommap > "$UB_DIR/cpu-$rw-${dev#/dev/}.log" 2>&1 ||
        { cat "$UB_DIR/cpu-$rw-${dev#/dev/}.log"; echo "fio $rw on $dev failed" >&2; return 1; }
    b=$(ub_cpu_ticks)
    # USER_HZ is 100 on Debian kernels: one tick is 10 ms.
    awk -v a="$a" -v b="$b" -v n="$UBLK_CPU_IOS" 'BEGIN { printf "%.1f", (b - a) * 10000 / n }'
}

c_ublk_cpu() {
    # Fill the measured range once so reads are of written blocks on both paths.
    dd if=/dev/zero of="$UB_DEV" bs=1M count=64 oflag=direct 2>/dev/null || die "prefill failed" || return 1
    uw=$(ub_cpu_per_io "$UB_DEV" randwrite) || die "fio on $UB_DEV failed" || return 1
    ur=$(ub_cpu_per_io "$UB_DEV" randread) || die "fio on $UB_DEV failed" || return 1
    echo "+ nbd-client 127.0.0.1 $UB_PORT /dev/nbd0 -N vol"
    timeout "$ATTACH_TIMEOUT" nbd-client 127.0.0.1 "$UB_PORT" /dev/nbd0 -N vol -t "$NBD_TIMEOUT" ||
        die "nbd-client attach over loopback failed" || return 1
    nw=$(ub_cpu_per_io /dev/nbd0 randwrite) || die "fio on /dev/nbd0 failed" || return 1
    nr=$(ub_cpu_per_io /dev/nbd0 randread) || die "fio on /dev/nbd0 failed" || return 1
    nbd-client -d /dev/nbd0 || die "nbd-client -d failed" || return 1
    for f in "$UB_DIR"/cpu-*.log; do echo "--- $f"; cat "$f"; done
    verdict=$(awk -v uw="$uw" -v nw="$nw" -v ur="$ur" -v nr="$nr" 'BEGIN {
        w = (uw < nw) ? "met" : "missed"; r = (ur < nr) ? "met" : "missed";
        printf "target ublk < NBD: writes %s, reads %s", w, r }')
    say "KT-LOG cpu per 4k I/O: ublk randwrite ${uw} us/IO, nbd randwrite ${nw} us/IO, ublk randread ${ur} us/IO, nbd randread ${nr} us/IO"
    detail "daemon CPU (utime+stime) per 4k I/O, $UBLK_CPU_IOS I/Os each, iodepth 16, same daemon and volume: randwrite ublk ${uw} us vs NBD ${nw} us; randread ublk ${ur} us vs NBD ${nr} us ($verdict; TCG emulation: compare, do not read as absolute)"
}

c_ublk_stop() {
    pid=$(ub_pid)
    t0=$(cut -d' ' -f1 /proc/uptime)
    kill -TERM "$pid"
    ub_reap "$pid" 30
    st=$REAPED
    t1=$(cut -d' ' -f1 /proc/uptime)
    tail -n 5 "$UB_LOG"
    [ "$st" = 0 ] || die "the daemon exited with status $st after SIGTERM (137: killed after 30 s)" || return 1
    [ ! -e /sys/block/ublkb0 ] || die "/sys/block/ublkb0 still exists after the daemon stopped" || return 1
    grep -q 'stopped and removed' "$UB_LOG" || die "no 'stopped and removed' in the daemon log" || return 1
    detail "SIGTERM: the daemon exited 0 in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')s and removed /dev/ublkb0"
}

# ub_queue_failure HOOK: a daemon with CRYPTVOL_TEST_UBLK_FAIL_QUEUE=HOOK and --ublk vol:1
# must exit non-zero, naming queue 1 and the cause, and leave no device 1. Sets QF_SECS.
ub_queue_failure() {
    : > "$UB_LOG"
    t0=$(ub_now)
    ub_serve vol:1 "CRYPTVOL_TEST_UBLK_FAIL_QUEUE=$1" || return 1
    p=$(ub_pid)
    ub_reap "$p" "$UBLK_T_QFAIL"
    QF_SECS=$(($(ub_now) - t0))
    cat "$UB_LOG"
    # On the console too: how the start ended and whether the device removal had to wait.
    grep -e 'WARN' -e 'ERROR' -e 'error:' "$UB_LOG" | cut -c1-300 |
        while IFS= read -r l; do say "KT-LOG ublk-queue-failure ($1): $l"; done
    [ "$REAPED" != 255 ] && [ "$REAPED" != 137 ] ||
        die "hook $1: the daemon did not exit by itself within $UBLK_T_QFAIL s (status $REAPED): the start hung" || return 1
    [ "$REAPED" != 0 ] || die "hook $1: the daemon exited 0" || return 1
    grep -q 'ublk queue 1 failed: .*CRYPTVOL_TEST_UBLK_FAIL_QUEUE' "$UB_LOG" ||
        die "hook $1: no 'ublk queue 1 failed: ...' naming the cause in the daemon log" || return 1
    [ ! -e /sys/class/ublk-char/ublkc1 ] && [ ! -e /sys/block/ublkb1 ] ||
        die "hook $1: device 1 is still there after the failed start" || return 1
}

c_ublk_queue_failure() {
    ub_queue_failure 1 || return 1
    e=$QF_SECS
    ub_queue_failure 1:panic || return 1
    grep -q 'ublk queue 1 failed: panicked: injected' "$UB_LOG" ||
        die "the panic's message is not in the error" || return 1
    detail "queue 1 failing at set-up (error, then panic): the daemon exited with status $REAPED in ${e}s and ${QF_SECS}s, the error names queue 1 and the cause, device 1 removed"
}

# Each check bounded (seconds from /kt/conf).
b_ublk_start() { ub_bounded "$UBLK_T_START" c_ublk_start; }
b_ublk_recover() { ub_bounded "$UBLK_T_RECOVER" c_ublk_recover; }
b_ublk_fsck() { ub_bounded "$UBLK_T_FSCK" c_ublk_fsck; }
b_ublk_cpu() { ub_bounded "$UBLK_T_CPU" c_ublk_cpu; }
b_ublk_stop() { ub_bounded "$UBLK_T_STOP" c_ublk_stop; }
b_ublk_queue_failure() { ub_bounded "$((2 * UBLK_T_QFAIL + 30))" c_ublk_queue_failure; }

phase4() {
    [ -e /dev/ublk-control ] || { result ublk-start-mkfs FAIL "no /dev/ublk-control: ublk_drv not loaded"; return 0; }
    check ublk-start-mkfs b_ublk_start
    if [ "$FAILED" -gt 0 ]; then
        for n in ublk-kill-recover ublk-fsck ublk-vs-nbd-cpu ublk-sigterm ublk-queue-failure; do
            result "$n" FAIL "skipped: ublk-start-mkfs failed"
        done
        return 0
    fi
    check ublk-kill-recover b_ublk_recover
    check ublk-fsck b_ublk_fsck
    check ublk-vs-nbd-cpu b_ublk_cpu
    check ublk-sigterm b_ublk_stop
    check ublk-queue-failure b_ublk_queue_failure
}
