#!/usr/bin/env bash
# A one-node Ceph cluster for tests: one monitor and one bluestore OSD on a sparse file,
# loopback only, no systemd, no mgr (RBD I/O does not need one). Everything lives in DIR.
#
#   scripts/ceph-cluster.sh start DIR   bootstrap (first time) or restart the daemons in DIR,
#                                       wait for the OSD to be up and the pool `rbd` to exist,
#                                       print the environment (as `env` does)
#   scripts/ceph-cluster.sh stop DIR    stop the daemons (OSD first), by their pids
#   scripts/ceph-cluster.sh env DIR     print CEPH_CONF=… and CEPH_KEYRING=… lines
#   scripts/ceph-cluster.sh stop-osd DIR   stop only the OSD (to test timeouts)
#
# Installs Debian's ceph-mon, ceph-osd and ceph-common when missing (as root).
# CEPH_CLUSTER_TIMEOUT (seconds, default 300: about 17 s on an idle 2-core machine, over
# 2 minutes seen with 8 builds running) bounds the start; on a timeout the script says
# which step did not finish and where the daemon logs are, and stops the daemons it started.
# The monitor listens on 127.0.0.1 on CEPH_MON_PORT (default: a free port the kernel
# picks, kept in DIR/ceph.conf), so two clusters can run at once. The cephx keys are written to DIR's
# keyring files (mode 0600) only, never to argv or the output.
set -euo pipefail

usage() { echo "usage: $0 start|stop|stop-osd|env DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
dir=$2
timeout=${CEPH_CLUSTER_TIMEOUT:-300}

# The daemons this invocation started: a failed start stops these and nothing else (a
# monitor that was already running, say while only the OSD is restarted, keeps running).
started=()
die() {
    echo "ceph-cluster: $*" >&2
    local d
    for d in osd mon; do
        case " ${started[*]-} " in *" $d "*) stop_daemon "$d" ;; esac
    done
    exit 1
}

ensure_packages() {
    local need=()
    command -v ceph-mon >/dev/null 2>&1 || need+=(ceph-mon)
    command -v ceph-osd >/dev/null 2>&1 || need+=(ceph-osd)
    command -v ceph >/dev/null 2>&1 || need+=(ceph-common)
    [ ${#need[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}: install them (apt-get install ${need[*]}) or run as root"
    echo "ceph-cluster: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# A TCP port nobody listens on (the kernel picks it).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

write_conf() {
    local port=$1 fsid=$2
    cat > "$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon initial members = a
mon host = [v1:127.0.0.1:$port]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $dir/\$name.keyring
run dir = $dir/run
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.\$pid.\$cctid.asok
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on msgr2 not enabled = false
mon data avail warn = 2
mon data avail crit = 1
mon osd full ratio = 0.97
osd objectstore = bluestore

[mon]
mon data = $dir/mon/\$cluster-\$id

[osd]
osd data = $dir/osd/\$cluster-\$id
bluestore block create = true
bluestore block size = 4294967296
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096
osd max object name len = 256
osd max object namespace len = 64
EOF
}

# Runs a `ceph` command as client.admin with a bound on how long it may wait.
ceph_admin() {
    ceph --conf "$dir/ceph.conf" --name client.admin --connect-timeout 10 "$@"
}

bootstrap() {
    mkdir -p "$dir/run" "$dir/log" "$dir/mon" "$dir/osd/ceph-0"
    chmod 700 "$dir"
    local port=${CEPH_MON_PORT:-$(free_port)}
    local fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$port" "$fsid"
    (
        umask 077
        ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
        ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
        cp "$dir/mon.keyring" "$dir/mon.a.keyring"
        ceph-authtool "$dir/mon.a.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
        monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    )
    ceph-mon --conf "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" \
        --keyring "$dir/mon.a.keyring" >>"$dir/log/bootstrap.log" 2>&1 \
        || die "ceph-mon --mkfs failed: see $dir/log/bootstrap.log"
    start_mon
    wait_for "the monitor to answer" mon_answers
    # The OSD: registered with its own generated cephx secret, then its store made.
    local osd_uuid
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    (
        umask 077
        ceph-authtool --create-keyring "$dir/osd.0.keyring" --gen-key -n osd.0 >/dev/null
        # The secret goes keyring → stdout → a 0600 file through printf (a shell builtin):
        # never into any program's argv.
        secret=$(ceph-authtool "$dir/osd.0.keyring" -n osd.0 -p)
        printf '{"cephx_secret": "%s"}\n' "$secret" > "$dir/osd.json"
    )
    # `ceph osd new` reads the secret from the file (-i).
    local id
    id=$(ceph_admin osd new "$osd_uuid" -i "$dir/osd.json") || die "ceph osd new failed"
    rm -f "$dir/osd.json"
    [ "$id" = 0 ] || die "ceph osd new gave id $id, expected 0"
    cp "$dir/osd.0.keyring" "$dir/osd/ceph-0/keyring"
    ceph-osd --conf "$dir/ceph.conf" -i 0 --mkfs --osd-uuid "$osd_uuid" \
        >>"$dir/log/bootstrap.log" 2>&1 || die "ceph-osd --mkfs failed: see $dir/log/bootstrap.log and $dir/log/osd.0.log"
    touch "$dir/bootstrapped"
}

mon_answers() { ceph_admin mon stat >/dev/null 2>&1; }
osd_up() { ceph_admin osd stat 2>/dev/null | grep -q '1 up'; }
# The pool serves I/O (no mgr here, so no `pg stat`): listing its images reads an object.
pool_active() {
    rbd --conf "$dir/ceph.conf" --name client.admin --rados-osd-op-timeout 5 \
        --rados-mon-op-timeout 5 ls rbd >/dev/null 2>&1
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_mon() {
    pid_alive "$dir/run/mon.pid" && return 0
    ceph-mon --conf "$dir/ceph.conf" -i a -f >>"$dir/log/mon.a.stderr" 2>&1 &
    echo $! > "$dir/run/mon.pid"
    started+=(mon)
}

start_osd() {
    pid_alive "$dir/run/osd.pid" && return 0
    ceph-osd --conf "$dir/ceph.conf" -i 0 -f >>"$dir/log/osd.0.stderr" 2>&1 &
    echo $! > "$dir/run/osd.pid"
    started+=(osd)
}

# wait_for WHAT CHECK: polls CHECK (each try is itself bounded by the client timeouts)
# until it succeeds or the start's deadline passes.
wait_for() {
    local what=$1 check=$2
    while ! "$check"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "timed out after ${timeout}s waiting for $what; daemon logs: $dir/log/"
        fi
        for p in mon osd; do
            if [ -f "$dir/run/$p.pid" ] && ! pid_alive "$dir/run/$p.pid"; then
                die "the $p daemon exited while waiting for $what; see $dir/log/ ($(tail -n 3 "$dir"/log/"$p".*.stderr 2>/dev/null | tr '\n' ' '))"
            fi
        done
        sleep 0.5
    done
}

create_pool() {
    if ! ceph_admin osd pool ls 2>/dev/null | grep -qx rbd; then
        ceph_admin osd pool create rbd 8 8 >/dev/null 2>&1 || die "creating pool rbd failed"
        rbd --conf "$dir/ceph.conf" --name client.admin pool init rbd || die "rbd pool init failed"
    fi
}

print_env() {
    echo "CEPH_CONF=$dir/ceph.conf"
    echo "CEPH_KEYRING=$dir/client.admin.keyring"
    echo "CEPH_MON_PID=$(cat "$dir/run/mon.pid" 2>/dev/null || true)"
    echo "CEPH_OSD_PID=$(cat "$dir/run/osd.pid" 2>/dev/null || true)"
}

stop_daemon() {
    local name=$1 pidfile="$dir/run/$1.pid"
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        local end=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$SECONDS" -ge "$end" ]; then
                echo "ceph-cluster: $name ($pid) did not stop in 30 s; killing it" >&2
                kill -9 "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
    fi
    rm -f "$pidfile"
}

# Every ceph tool here uses this cluster's configuration, whatever the caller's environment
# names (tools without --conf, such as ceph-authtool, read CEPH_CONF).
unset CEPH_ARGS
case "$cmd" in
    start)
        ensure_packages
        mkdir -p "$dir"
        dir=$(cd "$dir" && pwd)
        export CEPH_CONF="$dir/ceph.conf"
        deadline=$((SECONDS + timeout))
        if [ ! -f "$dir/bootstrapped" ]; then
            rm -rf "${dir:?}"/{mon,osd,run,log,ceph.conf,monmap,bootstrapped} "$dir"/*.keyring
            bootstrap
        else
            start_mon
            wait_for "the monitor to answer" mon_answers
        fi
        start_osd
        wait_for "the OSD to be up" osd_up
        create_pool
        wait_for "the pool rbd to serve I/O" pool_active
        print_env
        ;;
    stop)
        [ -d "$dir" ] || exit 0
        dir=$(cd "$dir" && pwd)
        stop_daemon osd
        stop_daemon mon
        ;;
    stop-osd)
        dir=$(cd "$dir" && pwd)
        stop_daemon osd
        ;;
    env)
        dir=$(cd "$dir" && pwd)
        [ -f "$dir/ceph.conf" ] || die "no cluster in $dir (run: $0 start $dir)"
        print_env
        ;;
    *) usage ;;
esac
