"""Issue 2, item 6: the libnbd backend against real qemu-nbd and nbdkit, every ticket URL form,
failing NBD servers; and API.md 4d, /info/ on the remote service only.

Data written through the daemon is checked in the image afterwards: read back through NBD,
compared with `qemu-img compare`, or read from the file.
"""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from nbdproxy import __version__
from support import nbdkit, qemu_nbd, read_export, request

MiB = 1024**2
SIZE = 8 * MiB
SERVER_FAILED = b"Server failed to perform the request, check logs\n"


@pytest.fixture(scope="module")
def daemon(module_daemon):
    return module_daemon




class TCPServer:
    """qemu-nbd listening on TCP (127.0.0.1 or ::1) at a free port."""

    def __init__(self, image, fmt="raw", host="127.0.0.1", *extra):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.bind((host, 0))
            self.port = s.getsockname()[1]
        self.host = host
        self.proc = subprocess.Popen(
            ["qemu-nbd", "--persistent", "--shared=8", "--cache=writeback", "--format", fmt,
             "--bind", host, "--port", str(self.port), *extra, image],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((host, self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("qemu-nbd did not listen")
                time.sleep(0.01)

    def stop(self):
        while self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass


def read_tcp(host, port, export, offset, length):
    import nbd
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_tcp(host, str(port))
    try:
        return h.pread(length, offset)
    finally:
        h.shutdown()


def add(daemon, url, ticket_id, size=SIZE, **extra):
    daemon.add_ticket(url, size, ticket_id=ticket_id, **extra)


def delete(daemon, ticket_id):
    status, _ = request(daemon.control(), "DELETE", f"/tickets/{ticket_id}")
    assert status == 204


def call(conn, method, url, body=None, headers=None):
    try:
        conn.request(method, url, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def roundtrip(daemon, ticket_id, offset=MiB + 512, size=MiB + 4096, connect=None):
    """Upload random data through the daemon and download it back; returns the data."""
    connect = connect or daemon.local
    data = os.urandom(size)
    status, body = call(connect(), "PUT", f"/images/{ticket_id}", data,
                        {"Content-Range": f"bytes {offset}-*/*"})
    assert status == 200, body
    status, body = call(connect(), "GET", f"/images/{ticket_id}",
                        headers={"Range": f"bytes={offset}-{offset + size - 1}"})
    assert status == 206 and body == data
    return data


@pytest.fixture
def raw_file(tmp_path):
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(MiB))
    return path


# URL forms

@pytest.mark.parametrize("form", ["plain", "exportname"])
def test_url_nbd_unix(daemon, tmp_path, raw_file, form):
    sock = str(tmp_path / "u.sock")
    extra = ("-x", "disk1") if form == "exportname" else ()
    server = qemu_nbd(raw_file, sock, "raw", *extra)
    try:
        url = f"nbd:unix:{sock}" + (":exportname=disk1" if form == "exportname" else "")
        add(daemon, url, "u")
        data = roundtrip(daemon, "u")
        delete(daemon, "u")
    finally:
        server.stop()
    with open(raw_file, "rb") as f:
        f.seek(MiB + 512)
        assert f.read(len(data)) == data


def test_url_nbd_unix_wrong_export_name_500(daemon, tmp_path, raw_file):
    sock = str(tmp_path / "x.sock")
    server = qemu_nbd(raw_file, sock, "raw", "-x", "right")
    try:
        add(daemon, f"nbd:unix:{sock}:exportname=wrong", "x")
        status, body = call(daemon.local(), "GET", "/images/x")
        assert status == 500 and body == SERVER_FAILED
        assert "cannot open NBD export" in daemon.read_log()
        delete(daemon, "x")
    finally:
        server.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("form", ["old", "old-exportname", "uri"])
def test_url_nbd_tcp(daemon, raw_file, host, form):
    extra = () if form == "old" else ("-x", "disk2")
    server = TCPServer(raw_file, "raw", host, *extra)
    try:
        h = f"[{host}]" if ":" in host else host
        url = {"old": f"nbd:{h}:{server.port}",
               "old-exportname": f"nbd:{h}:{server.port}:exportname=disk2",
               "uri": f"nbd://{h}:{server.port}/disk2"}[form]
        add(daemon, url, "t")
        data = roundtrip(daemon, "t", connect=daemon.remote)
        delete(daemon, "t")
        assert read_tcp(host, server.port, "" if form == "old" else "disk2",
                        MiB + 512, len(data)) == data
    finally:
        server.stop()


def test_url_nbd_plus_unix(daemon, tmp_path, raw_file):
    sock = str(tmp_path / "pu.sock")
    server = qemu_nbd(raw_file, sock, "raw", "-x", "disk3")
    try:
        add(daemon, f"nbd+unix:///disk3?socket={sock}", "pu")
        data = roundtrip(daemon, "pu")
        delete(daemon, "pu")
    finally:
        server.stop()
    with open(raw_file, "rb") as f:
        f.seek(MiB + 512)
        assert f.read(len(data)) == data


@pytest.mark.parametrize("url", [
    "http://localhost/disk",
    "file:///tmp/disk.raw",
    "nbd:unix:",
    "nbd+unix:///disk",              # no socket=
    "nbd://",                        # no host
    "nbd:localhost:99999",           # bad port
    "nbd:localhost:0",
    "nbd:localhost",
    "",
    "/tmp/disk.raw",
])
def test_bad_url_400(daemon, url):
    ticket = {"uuid": "bad", "size": SIZE, "ops": ["read"], "timeout": 60, "url": url}
    status, body = request(daemon.control(), "PUT", "/tickets/bad", json.dumps(ticket).encode())
    assert status == 400, body
    assert body.startswith(b"Invalid ticket: ")
    status, _ = request(daemon.control(), "GET", "/tickets/bad")
    assert status == 404


# qemu-nbd

def test_qemu_nbd_raw_upload_compare(daemon, tmp_path, raw_file):
    """A whole-image upload through the daemon, checked with qemu-img compare."""
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.seek(2 * MiB)
        f.write(os.urandom(3 * MiB))
    server = qemu_nbd(raw_file, str(tmp_path / "r.sock"), "raw")
    try:
        add(daemon, server.url, "r")
        with open(src, "rb") as f:
            status, body = call(daemon.local(), "PUT", "/images/r", f.read())
        assert status == 200, body
        delete(daemon, "r")
    finally:
        server.stop()
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", src, raw_file],
                   check=True)


@pytest.mark.parametrize("extra", [("--allocation-depth",), ("--allocation-depth", "-B", "b0")],
                         ids=["allocation-depth", "bitmap"])
def test_qemu_nbd_qcow2(daemon, tmp_path, extra):
    """Upload, zero and download on a qcow2 export; qemu-img compare with the source after."""
    path = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", path, "b0"], check=True)
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(2 * MiB))
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    server = qemu_nbd(path, str(tmp_path / "q.sock"), "qcow2", *extra)
    try:
        add(daemon, server.url, "q", dirty="-B" in extra)
        with open(src, "rb") as f:
            f.seek(0)
            first = f.read(4 * MiB)
            f.seek(5 * MiB)
            second = f.read(MiB)
        for offset, data in ((0, first), (5 * MiB, second)):
            status, body = call(daemon.local(), "PUT", "/images/q?flush=n", data,
                                {"Content-Range": f"bytes {offset}-*/*"})
            assert status == 200, body
        # Zero a range that was written as zeros in the source anyway, then flush.
        status, _ = call(daemon.local(), "PATCH", "/images/q",
                         json.dumps({"op": "zero", "offset": 3 * MiB, "size": MiB}).encode())
        assert status == 200
        status, _ = call(daemon.remote(), "PATCH", "/images/q", b'{"op":"flush"}')
        assert status == 200
        status, body = call(daemon.remote(), "GET", "/images/q")
        with open(src, "rb") as f:
            assert status == 200 and body == f.read()
        status, body = call(daemon.local(), "GET", "/images/q/extents")
        extents = json.loads(body)
        assert extents[-1]["start"] + extents[-1]["length"] == SIZE
        # Clusters never written are holes in this qcow2 (allocation depth).
        assert {"start": 6 * MiB, "length": 2 * MiB, "zero": True, "hole": True} in extents
        if "-B" in extra:
            status, body = call(daemon.local(), "GET", "/images/q/extents?context=dirty")
            assert status == 200
            dirty = []
            for e in json.loads(body):
                if not e["dirty"]:
                    continue
                if dirty and sum(dirty[-1]) == e["start"]:
                    dirty[-1] = (dirty[-1][0], dirty[-1][1] + e["length"])
                else:
                    dirty.append((e["start"], e["length"]))
            assert dirty == [(0, 4 * MiB), (5 * MiB, MiB)], dirty
        delete(daemon, "q")
    finally:
        server.stop()
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", src, path],
                   check=True)


# nbdkit

def test_nbdkit_memory(daemon, tmp_path):
    server = nbdkit(str(tmp_path / "m.sock"), "memory", f"size={SIZE}")
    try:
        add(daemon, server.url, "m")
        data = roundtrip(daemon, "m", connect=daemon.remote)
        status, _ = call(daemon.local(), "PATCH", "/images/m",
                         json.dumps({"op": "zero", "offset": MiB + 512, "size": 4096,
                                     "flush": True}).encode())
        assert status == 200
        assert read_export(server.sock, MiB + 512, len(data)) == bytes(4096) + data[4096:]
        delete(daemon, "m")
    finally:
        server.stop()


def test_nbdkit_file(daemon, tmp_path, raw_file):
    server = nbdkit(str(tmp_path / "f.sock"), "file", raw_file)
    try:
        add(daemon, server.url, "f")
        data = roundtrip(daemon, "f")
        status, _ = call(daemon.local(), "PATCH", "/images/f", b'{"op":"flush"}')
        assert status == 200
        delete(daemon, "f")
    finally:
        server.stop()
    with open(raw_file, "rb") as f:
        f.seek(MiB + 512)
        assert f.read(len(data)) == data


@pytest.mark.parametrize("argv", [("--no-sr", "memory", f"size={SIZE}"),
                                  ("--filter=noextents", "memory", f"size={SIZE}")],
                         ids=["no-structured-replies", "noextents"])
def test_nbdkit_without_block_status(daemon, tmp_path, argv):
    """No block status: data moves, extents is one data extent, checksum reads everything."""
    server = nbdkit(str(tmp_path / "n.sock"), *argv)
    try:
        add(daemon, server.url, "n")
        data = roundtrip(daemon, "n")
        status, body = call(daemon.local(), "GET", "/images/n/extents")
        assert status == 200
        assert json.loads(body) == [{"start": 0, "length": SIZE, "zero": False, "hole": False}]
        status, body = call(daemon.local(), "GET", "/images/n/checksum")
        assert status == 200
        image = read_export(server.sock)
        assert image[MiB + 512:MiB + 512 + len(data)] == data
        delete(daemon, "n")
    finally:
        server.stop()
    from ovirt_imageio._internal import blkhash
    h = blkhash.Hash()
    for i in range(0, SIZE, blkhash.BLOCK_SIZE):
        h.update(image[i:i + blkhash.BLOCK_SIZE])
    assert json.loads(body)["checksum"] == h.hexdigest()


def test_nbdkit_read_only_plugin(daemon, tmp_path):
    """The pattern plugin: read-only, no extents. GET works; a write fails with 500."""
    server = nbdkit(str(tmp_path / "p.sock"), "pattern", f"size={SIZE}")
    try:
        add(daemon, server.url, "p")
        status, body = call(daemon.local(), "GET", "/images/p",
                            headers={"Range": "bytes=4096-8191"})
        assert status == 206
        assert body == read_export(server.sock, 4096, 4096)
        # The pattern: each 8-byte word holds its own offset, big endian.
        assert body[:8] == (4096).to_bytes(8, "big")
        status, body = call(daemon.local(), "PUT", "/images/p", b"x" * 4096)
        assert status == 500 and body == SERVER_FAILED
        delete(daemon, "p")
    finally:
        server.stop()


def test_nbdkit_without_zero(daemon, tmp_path):
    """An export that cannot WRITE_ZEROES: PATCH zero still makes the range read as zeros."""
    server = nbdkit(str(tmp_path / "z.sock"), "--filter=nozero", "memory",
                              f"size={SIZE}", "zeromode=none")
    try:
        add(daemon, server.url, "z")
        roundtrip(daemon, "z", offset=0, size=3 * MiB)
        status, _ = call(daemon.local(), "PATCH", "/images/z",
                         json.dumps({"op": "zero", "offset": 4096, "size": 2 * MiB}).encode())
        assert status == 200
        image = read_export(server.sock, 0, 3 * MiB)
        assert image[4096:4096 + 2 * MiB] == bytes(2 * MiB)
        assert image[:4096] != bytes(4096)
        delete(daemon, "z")
    finally:
        server.stop()


# Dead or missing NBD servers

REQUESTS = [
    ("OPTIONS", "/images/dead", None, {}),
    ("GET", "/images/dead", None, {}),
    ("GET", "/images/dead", None, {"Range": "bytes=0-99"}),
    ("HEAD", "/images/dead", None, {}),
    ("PUT", "/images/dead", b"x" * 4096, {}),
    ("PATCH", "/images/dead", b'{"op":"zero","size":4096}', {}),
    ("PATCH", "/images/dead", b'{"op":"flush"}', {}),
    ("GET", "/images/dead/extents", None, {}),
    ("GET", "/images/dead/checksum", None, {}),
]


@pytest.fixture
def alive(daemon, tmp_path):
    """Another ticket on a working export, to show the daemon keeps serving."""
    server = nbdkit(str(tmp_path / "alive.sock"), "memory", f"size={SIZE}")
    add(daemon, server.url, "alive")
    yield server
    delete(daemon, "alive")
    server.stop()


@pytest.mark.parametrize("url", ["nbd:unix:{tmp}/missing.sock", "nbd:127.0.0.1:{port}",
                                 "nbd+unix:///x?socket={tmp}/missing.sock"],
                         ids=["unix", "tcp", "uri"])
def test_missing_server_500(daemon, tmp_path, alive, url):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    add(daemon, url.format(tmp=tmp_path, port=port), "dead")
    log_start = len(daemon.read_log())
    for connect in (daemon.local, daemon.remote):
        conn = connect()
        for method, path, body, headers in REQUESTS:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 500, (method, path, data)
            if method != "HEAD":
                assert data == SERVER_FAILED
            if method == "PUT":
                # The NBD export failed before the body was read: the connection closes.
                assert resp.will_close
                conn.close()
            else:
                # The whole request was read: the connection stays usable.
                assert not resp.will_close
        conn.request("GET", "/images/alive", headers={"Range": "bytes=0-9"})
        resp = conn.getresponse()
        assert resp.status == 206 and resp.read() == bytes(10)
        conn.close()
    log = daemon.read_log()[log_start:]
    assert log.count("ERROR") >= len(REQUESTS) * 2
    assert "cannot open NBD export" in log
    assert "Traceback" not in log
    delete(daemon, "dead")
    roundtrip(daemon, "alive")


def test_server_killed_between_requests(daemon, tmp_path, raw_file, alive):
    """The pooled NBD connection dies with its server: 500; after a restart the ticket works."""
    sock = str(tmp_path / "k.sock")
    server = qemu_nbd(raw_file, sock, "raw")
    try:
        add(daemon, server.url, "k")
        roundtrip(daemon, "k")
        server.kill()
        for method, path, body in [("GET", "/images/k", None),
                                   ("PUT", "/images/k", b"y" * 4096),
                                   ("GET", "/images/k/extents", None)]:
            status, data = call(daemon.local(), method, path, body)
            assert status == 500, (method, path, data)
            assert data == SERVER_FAILED
        roundtrip(daemon, "alive")
        server.stop()
        server = qemu_nbd(raw_file, sock, "raw")
        data = roundtrip(daemon, "k")
        delete(daemon, "k")
    finally:
        server.stop()
    with open(raw_file, "rb") as f:
        f.seek(MiB + 512)
        assert f.read(len(data)) == data


def test_server_killed_during_download(daemon, tmp_path, alive):
    """Streaming began, then the NBD server died: the connection closes early, the daemon lives."""
    big = str(tmp_path / "big.raw")
    size = 256 * MiB
    with open(big, "wb") as f:
        f.truncate(size)
    server = qemu_nbd(big, str(tmp_path / "b.sock"), "raw")
    try:
        add(daemon, server.url, "b", size=size)
        conn = daemon.local()
        conn.request("GET", "/images/b")
        resp = conn.getresponse()
        assert resp.status == 200
        assert int(resp.getheader("Content-Length")) == size
        resp.read(MiB)
        server.kill()
        got = MiB
        while True:
            chunk = resp.read(8 * MiB)
            if not chunk:
                break
            got += len(chunk)
        conn.close()
        # The connection closed before Content-Length bytes came.
        assert got < size
        deadline = time.monotonic() + 5
        while "response failed after its head was sent" not in daemon.read_log():
            assert time.monotonic() < deadline, "no log line about the failed download"
            time.sleep(0.02)
        roundtrip(daemon, "alive", connect=daemon.remote)
        delete(daemon, "b")
    finally:
        server.stop()


def test_server_killed_during_upload(daemon, tmp_path, raw_file, alive):
    """The NBD server dies while a PUT streams: the request fails, nothing hangs."""
    big = str(tmp_path / "up.raw")
    size = 256 * MiB
    with open(big, "wb") as f:
        f.truncate(size)
    server = qemu_nbd(big, str(tmp_path / "up.sock"), "raw")
    result = {}
    try:
        add(daemon, server.url, "up", size=size, ops=["write"])
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(daemon.local_socket)
        s.sendall(f"PUT /images/up HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
                  .encode())
        chunk = b"\x01" * MiB
        for _ in range(8):
            s.sendall(chunk)
        server.kill()

        def keep_sending():
            try:
                for _ in range(size // MiB - 8):
                    s.sendall(chunk)
            except OSError as e:
                result["send"] = e

        t = threading.Thread(target=keep_sending, daemon=True)
        t.start()
        head = b""
        try:
            while b"\r\n" not in head:
                data = s.recv(4096)
                if not data:
                    break
                head += data
        except OSError:
            pass
        s.close()
        t.join(20)
        assert not t.is_alive()
        # Either an error answer came, or the connection was closed without one.
        assert head == b"" or head.startswith((b"HTTP/1.1 500 ", b"HTTP/1.1 400 ")), head
        deadline = time.monotonic() + 10
        while daemon.ticket_info("up")["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert daemon.ticket_info("up")["transferred"] < size
        roundtrip(daemon, "alive")
        delete(daemon, "up")
    finally:
        server.stop()


# 4d. /info/

def test_info_remote(daemon):
    for path in ("/info/", "/info"):
        conn = daemon.remote()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "application/json"
        assert body == json.dumps({"version": __version__}, separators=(",", ":")).encode() + b"\n"


def test_info_not_on_local(daemon):
    status, body = call(daemon.local(), "GET", "/info/")
    assert status == 404


def test_info_methods(daemon):
    status, _ = call(daemon.remote(), "PUT", "/info/", b"{}")
    assert status == 405
