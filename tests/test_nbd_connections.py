"""NBD connections (API.md 4, 7e): nothing acknowledged is lost silently, idle connections are
closed after nbd_idle_timeout (flushed first), and a server that never greets fails the request
after nbd_connect_timeout instead of hanging."""

import hashlib
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from support import (Daemon, patch_json as patch, put_at as put, qemu_nbd, read_qcow2, request,
                     restart)

MiB = 1024**2


def block_hash(data, block_size):
    """API.md 4c, written out: blake2b-256 of each block, then of the digests in order."""
    outer = hashlib.blake2b(digest_size=32)
    for i in range(0, len(data), block_size):
        outer.update(hashlib.blake2b(data[i:i + block_size], digest_size=32).digest())
    return outer.hexdigest()


@pytest.fixture
def qcow2(tmp_path):
    """A fresh qcow2: qemu-nbd keeps the metadata of new clusters in memory until a flush."""
    image = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    return image


# Defect 2 of the integrity issue: a flush after lost writes must fail

def test_flush_fails_after_writes_were_lost(tmp_path, cert, qcow2):
    """PUT ?flush=n, the NBD server is killed and restarted, then flush: writes the daemon
    acknowledged are gone, so no flush of the ticket may answer 200 again."""
    server = qemu_nbd(qcow2, str(tmp_path / "nbd.sock"), "qcow2")
    d = Daemon(str(tmp_path / "d"), *cert, args=["--nbd-idle-timeout", "60"])
    try:
        d.add_ticket(server.url, 64 * MiB)
        data = os.urandom(4 * MiB)
        assert put(d, "test", MiB, data) == 200
        server.kill()
        server = restart(server)
        assert patch(d, "test", {"op": "flush"})[0] == 500
        # Every later flush of the ticket fails, however it is asked for.
        assert put(d, "test", 8 * MiB, os.urandom(4096), flush=True) == 500
        assert patch(d, "test", {"op": "zero", "offset": 0, "size": 4096, "flush": True})[0] \
            == 500
        assert patch(d, "test", {"op": "flush"})[0] == 500
        log = d.read_log()
        assert f"NBD server {server.sock}: {4 * MiB} acknowledged bytes may be lost" in log
        # Writes without a flush still work; a new ticket starts clean.
        assert put(d, "test", 8 * MiB, b"x" * 4096) == 200
        d.add_ticket(server.url, 64 * MiB, ticket_id="again")
        assert put(d, "again", 8 * MiB, b"y" * 4096, flush=True) == 200
    finally:
        assert d.stop() == 0
        server.stop()


def test_failed_request_connection_is_flushed_before_close(tmp_path, cert, qcow2):
    """A request that fails after earlier unflushed writes on its connection (here a PUT whose
    body is cut short) closes that connection: it is flushed first, so the data survives the
    server's death right after, and a later flush answers 200."""
    server = qemu_nbd(qcow2, str(tmp_path / "nbd.sock"), "qcow2")
    d = Daemon(str(tmp_path / "d"), *cert, args=["--nbd-idle-timeout", "60",
                                                  "--nbd-connections", "1"])
    try:
        d.add_ticket(server.url, 64 * MiB)
        data = os.urandom(MiB)
        assert put(d, "test", 0, data) == 200
        # Same NBD connection (only one): a body that ends early fails the request.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(d.local_socket)
            s.sendall(b"PUT /images/test?flush=n HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 1048576\r\n\r\n" + b"z" * 1000)
        time.sleep(0.5)
        server.kill()
        assert read_qcow2(qcow2, str(tmp_path / "check.sock"), 0, MiB) == data
        server = restart(server)
        assert patch(d, "test", {"op": "flush"})[0] == 200
        assert "may be lost" not in d.read_log()
    finally:
        assert d.stop() == 0
        server.stop()


def test_idle_close_flushes_first(tmp_path, cert, qcow2):
    """A client that pauses before its flush: the idle NBD connection is closed meanwhile, after
    a flush, so the data is durable and the flush answers 200 even if the server restarts."""
    server = qemu_nbd(qcow2, str(tmp_path / "nbd.sock"), "qcow2")
    d = Daemon(str(tmp_path / "d"), *cert, args=["--nbd-idle-timeout", "1"])
    try:
        d.add_ticket(server.url, 64 * MiB)
        data = os.urandom(4 * MiB)
        assert put(d, "test", MiB, data) == 200
        time.sleep(2.5)     # past nbd_idle_timeout: the connection was flushed and closed
        server.kill()
        assert read_qcow2(qcow2, str(tmp_path / "check.sock"), MiB, len(data)) == data
        server = restart(server)
        assert patch(d, "test", {"op": "flush"})[0] == 200
        assert "may be lost" not in d.read_log()
    finally:
        assert d.stop() == 0
        server.stop()


def test_replaced_ticket_flushes_its_connections(tmp_path, cert, qcow2):
    server = qemu_nbd(qcow2, str(tmp_path / "nbd.sock"), "qcow2")
    d = Daemon(str(tmp_path / "d"), *cert, args=["--nbd-idle-timeout", "60"])
    try:
        d.add_ticket(server.url, 64 * MiB)
        data = os.urandom(MiB)
        assert put(d, "test", 0, data) == 200
        d.add_ticket(server.url, 64 * MiB)      # the same id again: the old pool closes
        time.sleep(0.3)
        server.kill()
        assert read_qcow2(qcow2, str(tmp_path / "check.sock"), 0, MiB) == data
        server = restart(server)
    finally:
        assert d.stop() == 0
        server.stop()


# API.md 7e: nbd_idle_timeout

def _get_within(daemon, ticket_id, seconds):
    """(status, seconds taken) of a GET of the first MiB, failing the test if it hangs."""
    conn = daemon.local()
    conn.timeout = seconds
    started = time.monotonic()
    status, _ = request(conn, "GET", f"/images/{ticket_id}", headers={"Range": "bytes=0-1048575"})
    return status, time.monotonic() - started


@pytest.mark.parametrize("idle", ["1", "0"])
def test_idle_connections_make_room_on_a_single_client_server(tmp_path, cert, idle):
    """qemu-nbd --shared=1 admits one client: a second ticket on the export gets served once
    the first ticket's idle NBD connection is closed, though its HTTP connection stays open."""
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    server = qemu_nbd(image, str(tmp_path / "nbd.sock"), "raw", "--shared=1")
    d = Daemon(str(tmp_path / "d"), *cert, args=["--nbd-idle-timeout", idle])
    try:
        for t in ("a", "b"):
            d.add_ticket(server.url, 16 * MiB, ticket_id=t)
        keep = d.local()
        keep.request("GET", "/images/a", headers={"Range": "bytes=0-4095"})
        assert keep.getresponse().read() == bytes(4096)
        status, took = _get_within(d, "b", 8)
        assert status == 206
        assert took < 4
        keep.close()
    finally:
        assert d.stop() == 0
        server.stop()


# API.md 7e: nbd_connect_timeout

@pytest.fixture
def silent_server(tmp_path):
    """A unix socket that accepts connections and never says anything."""
    path = str(tmp_path / "silent.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join()
    for s in accepted:
        s.close()
    listener.close()


def test_server_that_never_greets(tmp_path, cert, silent_server):
    d = Daemon(str(tmp_path / "d"), *cert, args=["--nbd-connect-timeout", "1"])
    try:
        d.add_ticket(f"nbd:unix:{silent_server}", MiB)
        for method in ("OPTIONS", "GET"):
            started = time.monotonic()
            status, body = request(d.local(), method, "/images/test")
            assert status == 503
            assert body == b"NBD server not answering\n"
            assert time.monotonic() - started < 5
        assert f"NBD server {silent_server} did not complete the handshake" in d.read_log()
        # The daemon's own control socket named as an NBD server: the same, not a hang.
        d.add_ticket(f"nbd:unix:{d.control_socket}", MiB, ticket_id="self")
        status, _ = request(d.local(), "GET", "/images/self")
        assert status == 503
    finally:
        assert d.stop() == 0


# Defect 5 of the integrity issue: a ticket smaller than its export

def test_small_ticket_describes_only_its_range(tmp_path, cert):
    image = str(tmp_path / "disk.raw")
    data = os.urandom(8 * MiB)
    with open(image, "wb") as f:
        f.write(data)
    server = qemu_nbd(image, str(tmp_path / "nbd.sock"))
    d = Daemon(str(tmp_path / "d"), *cert)
    size = 3 * MiB + 4096
    try:
        d.add_ticket(server.url, size, ops=["read"])
        status, body = request(d.local(), "OPTIONS", "/images/test")
        assert status == 200 and json.loads(body)["size"] == size
        status, body = request(d.local(), "GET", "/images/test/extents")
        extents = json.loads(body)
        assert extents[-1]["start"] + extents[-1]["length"] == size
        status, body = request(d.local(), "GET", "/images/test/extents?context=zero&start="
                               f"{size}")
        assert status == 200 and json.loads(body) == []
        status, body = request(d.local(), "GET", "/images/test/checksum")
        assert json.loads(body)["checksum"] == block_hash(data[:size], 4 * MiB)
        status, body = request(d.local(), "GET", "/images/test")
        assert status == 200 and body == data[:size]
    finally:
        assert d.stop() == 0
        server.stop()
