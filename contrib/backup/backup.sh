#!/usr/bin/env bash
# A backup through nbdproxy, start to end: a full backup, an incremental backup of what changed
# since (a qcow2 dirty bitmap exported with qemu-nbd -B), then a restore of the chain by upload
# to a new disk, checked with qemu-img compare.
#
#   contrib/backup/backup.sh [WORKDIR]
#
# It runs its own daemon (TLS with a throwaway self-signed certificate) and its own "VM disk" in
# WORKDIR (default: a new temporary directory), so it needs no root and touches nothing else.
# On a real host the daemon runs from systemd, the management layer adds the tickets, and the
# bitmaps of a running VM are managed through libvirt or QMP; the nbdproxy commands are the same.
# Set NBDPROXY to the command to use (default: nbdproxy from PATH).
set -euo pipefail

NBDPROXY=${NBDPROXY:-nbdproxy}
work=$(realpath "${1:-$(mktemp -d)}")
mkdir -p "$work"
cd "$work"
log() { echo "backup.sh: $*" >&2; }

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pidfile in "$work"/*.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    return 0
}
trap cleanup EXIT

# The daemon: a control socket, a local data socket and TLS on a free port, all in $work.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout key.pem -out cert.pem >/dev/null 2>&1
mkdir -p conf
$NBDPROXY serve --conf-dir conf --control-socket "$work/control.sock" \
    --local-socket "$work/local.sock" --host 127.0.0.1 --port 0 \
    --cert-file cert.pem --key-file key.pem >daemon.log 2>&1 &
pids+=($!)
for _ in $(seq 300); do
    grep -q "nbdproxy ready" daemon.log && break
    sleep 0.05
done
port=$(sed -n 's/.*nbdproxy ready .*remote=https:\/\/[^ ]*:\([0-9]*\).*/\1/p' daemon.log)
[ -n "$port" ] || { cat daemon.log >&2; exit 1; }
ticket_cmd() { $NBDPROXY ticket --control-socket "$work/control.sock" "$@"; }
url() { echo "https://localhost:$port/images/$1"; }
vsize() { qemu-img info -U --output=json "$1" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p'; }

# export NAME IMAGE FORMAT [qemu-nbd options]: serve IMAGE on NAME.sock until `unexport NAME`.
# --fork returns once qemu-nbd accepts connections.
export_disk() {
    local name=$1 image=$2 fmt=$3
    shift 3
    qemu-nbd --fork --pid-file "$work/$name.pid" --persistent --shared=8 --format "$fmt" \
        --socket "$work/$name.sock" "$@" "$image"
}
unexport() {
    kill "$(cat "$work/$1.pid")"
    while [ -e "$work/$1.sock" ]; do sleep 0.05; done
    rm -f "$work/$1.pid"
}

# 1. The VM's disk: 1 GiB virtual, a few MiB of data. The bitmap starts recording writes now:
#    it is taken together with the full backup, and the next backup copies what it records.
log "making the VM disk"
qemu-img create -q -f qcow2 disk.qcow2 1G
qemu-io -f qcow2 -c "write -P 0x11 0 4M" -c "write -P 0x22 300M 2M" \
    -c "write -P 0x33 1020M 4M" disk.qcow2 >/dev/null
qemu-img bitmap --add disk.qcow2 backup-1
size=$(vsize disk.qcow2)

# 2. Full backup: read-only export, a read ticket, download. Only data extents move.
log "full backup"
export_disk disk disk.qcow2 qcow2 --read-only
ticket=$(ticket_cmd add --url "nbd:unix:$work/disk.sock" --size "$size" --ops read)
$NBDPROXY download "$(url "$ticket")" full.qcow2 --cafile cert.pem --verify --quiet
ticket_cmd delete "$ticket"
unexport disk

# 3. The guest writes: new data, changed data, and data it discards (zeroes).
log "the guest writes"
qemu-io -f qcow2 -c "write -P 0x44 500M 1M" -c "write -P 0x55 1M 64k" \
    -c "write -z 300M 1M" disk.qcow2 >/dev/null

# 4. Incremental backup: export the bitmap (qemu-nbd -B), a dirty ticket, and download only
#    the dirty extents into a qcow2 whose backing file is the full backup.
#    (A real schedule adds backup-2 at this moment and removes backup-1 once this succeeded.)
log "incremental backup"
export_disk disk disk.qcow2 qcow2 --read-only --bitmap backup-1
ticket=$(ticket_cmd add --url "nbd:unix:$work/disk.sock" --size "$size" --ops read --dirty)
$NBDPROXY download "$(url "$ticket")" incr.qcow2 --incremental --backing-file full.qcow2 \
    --cafile cert.pem --verify --quiet
ticket_cmd show "$ticket" | grep '"transferred"' >&2
ticket_cmd delete "$ticket"
unexport disk
qemu-img compare -q disk.qcow2 incr.qcow2
log "incr.qcow2 (on top of full.qcow2) equals the disk"

# 5. Restore: a new empty disk, a write ticket, upload the chain incr.qcow2 -> full.qcow2.
#    The target is empty, so zero extents are skipped; only data is sent.
log "restore"
qemu-img create -q -f raw restored.raw "$size"
export_disk restored restored.raw raw
ticket=$(ticket_cmd add --url "nbd:unix:$work/restored.sock" --size "$size" --ops write)
$NBDPROXY upload incr.qcow2 "$(url "$ticket")" --cafile cert.pem --verify --quiet
ticket_cmd delete "$ticket"
unexport restored
qemu-img compare -q disk.qcow2 restored.raw
log "restored.raw equals the disk; backups: full.qcow2 $(du -k full.qcow2 | cut -f1) KiB," \
    "incr.qcow2 $(du -k incr.qcow2 | cut -f1) KiB"
echo OK
