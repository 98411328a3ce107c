#!/usr/bin/env bash
# A backup through nbdproxy, start to end, with image tickets only (API.md 7d): a full backup, an
# incremental backup of what changed since (a qcow2 persistent dirty bitmap), then a restore of
# the chain by upload to a new disk, checked with qemu-img compare. The daemon starts and stops
# the qemu-nbd of each ticket itself: no NBD server to run, no socket to pick or clean up.
#
#   contrib/backup/backup.sh [WORKDIR]
#
# It runs its own daemon (TLS with a throwaway self-signed certificate) and its own "VM disk" in
# WORKDIR (default: a new temporary directory), so it needs no root and touches nothing else.
# On a real host the daemon runs from systemd, the management layer adds the tickets, and the
# bitmaps of a running VM are managed through libvirt or QMP (a running VM holds its image: an
# image ticket on it gets 409; export it from the VM's qemu with an nbd: ticket instead); the
# nbdproxy commands are the same. Set NBDPROXY to the command to use (default: nbdproxy from PATH).
set -euo pipefail

NBDPROXY=${NBDPROXY:-nbdproxy}
work=$(realpath "${1:-$(mktemp -d)}")
mkdir -p "$work"
cd "$work"
log() { echo "backup.sh: $*" >&2; }

daemon=
cleanup() {
    # SIGTERM: the daemon stops the qemu-nbd of every ticket left before it exits.
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    return 0
}
trap cleanup EXIT

# The daemon: a control socket, a local data socket and TLS on a free port, and the run_dir of
# its qemu-nbd sockets, all in $work.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout key.pem -out cert.pem >/dev/null 2>&1
mkdir -p conf
$NBDPROXY serve --conf-dir conf --control-socket "$work/control.sock" \
    --local-socket "$work/local.sock" --host 127.0.0.1 --port 0 --run-dir "$work/run" \
    --cert-file cert.pem --key-file key.pem >daemon.log 2>&1 &
daemon=$!
for _ in $(seq 300); do
    grep -q "nbdproxy ready" daemon.log && break
    sleep 0.05
done
port=$(sed -n 's/.*nbdproxy ready .*remote=https:\/\/[^ ]*:\([0-9]*\).*/\1/p' daemon.log)
[ -n "$port" ] || { cat daemon.log >&2; exit 1; }
ticket_cmd() { $NBDPROXY ticket --control-socket "$work/control.sock" "$@"; }
url() { echo "https://localhost:$port/images/$1"; }

# 1. The VM's disk: 1 GiB virtual, a few MiB of data. The bitmap starts recording writes now:
#    it is taken together with the full backup, and the next backup copies what it records.
log "making the VM disk"
qemu-img create -q -f qcow2 disk.qcow2 1G
qemu-io -f qcow2 -c "write -P 0x11 0 4M" -c "write -P 0x22 300M 2M" \
    -c "write -P 0x33 1020M 4M" disk.qcow2 >/dev/null
qemu-img bitmap --add disk.qcow2 backup-1

# 2. Full backup: a read ticket on the image (its size is the virtual size), download. Only
#    data extents move. DELETE returns once the ticket's qemu-nbd has exited.
log "full backup"
ticket=$(ticket_cmd add --image disk.qcow2 --format qcow2 --ops read)
$NBDPROXY download "$(url "$ticket")" full.qcow2 --cafile cert.pem --verify --quiet
ticket_cmd delete "$ticket"

# 3. The guest writes: new data, changed data, and data it discards (zeroes).
log "the guest writes"
qemu-io -f qcow2 -c "write -P 0x44 500M 1M" -c "write -P 0x55 1M 64k" \
    -c "write -z 300M 1M" disk.qcow2 >/dev/null

# 4. Incremental backup: a read ticket with the bitmap (a dirty ticket), and download only the
#    dirty extents into a qcow2 whose backing file is the full backup.
#    (A real schedule adds backup-2 at this moment and removes backup-1 once this succeeded.)
log "incremental backup"
ticket=$(ticket_cmd add --image disk.qcow2 --format qcow2 --bitmap backup-1 --ops read)
$NBDPROXY download "$(url "$ticket")" incr.qcow2 --incremental --backing-file full.qcow2 \
    --cafile cert.pem --verify --quiet
ticket_cmd show "$ticket" | grep '"transferred"' >&2
ticket_cmd delete "$ticket"
qemu-img compare -q disk.qcow2 incr.qcow2
log "incr.qcow2 (on top of full.qcow2) equals the disk"

# 5. Restore: a new empty disk, a write ticket on it, upload the chain incr.qcow2 -> full.qcow2.
#    The target is empty, so zero extents are skipped; only data is sent.
log "restore"
qemu-img create -q -f raw restored.raw "$(qemu-img info --output=json disk.qcow2 |
    sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')"
ticket=$(ticket_cmd add --image restored.raw --format raw --ops write)
$NBDPROXY upload incr.qcow2 "$(url "$ticket")" --cafile cert.pem --verify --quiet
ticket_cmd delete "$ticket"
qemu-img compare -q disk.qcow2 restored.raw
log "restored.raw equals the disk; backups: full.qcow2 $(du -k full.qcow2 | cut -f1) KiB," \
    "incr.qcow2 $(du -k incr.qcow2 | cut -f1) KiB"
echo OK
