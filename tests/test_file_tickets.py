"""file: tickets through the daemon (issue 13 points 2, 3 and 5; API.md 7a with sections 0-5).

Every test runs on four targets: a file in /tmp (ext4, O_DIRECT), a file on a ramfs the module
mounts (no O_DIRECT: the page cache), a loop device, and the /tmp file served by a daemon run
with --no-file-direct. Files are 8 MiB + 1000 bytes (not a multiple of 512); the loop device is
8 MiB. The bytes are checked in the file afterwards.
"""

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid

import pytest

from ovirt_imageio import client as imageio

from support import NBDPROXY, TOP, Daemon, qemu_nbd, request

MiB = 1024**2
SIZE = 8 * MiB + 1000
LOOP_SIZE = 8 * MiB
CONNECTIONS = 3         # --nbd-connections: OPTIONS max_readers/max_writers must say it
KINDS = ["ext4", "ramfs", "loop", "nodirect"]


# Daemons, filesystems, devices (module-wide)

@pytest.fixture(scope="module")
def direct_daemon(workdir, cert):
    d = Daemon(str(workdir / "direct"), *cert, args=["--nbd-connections", str(CONNECTIONS),
                                                     "--remove-timeout", "5"])
    yield d
    d.stop()


@pytest.fixture(scope="module")
def buffered_daemon(workdir, cert):
    d = Daemon(str(workdir / "buffered"), *cert,
               args=["--nbd-connections", str(CONNECTIONS), "--no-file-direct",
                     "--remove-timeout", "5"])
    yield d
    d.stop()


@pytest.fixture(scope="module")
def ramfs(workdir):
    mnt = workdir / "ramfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a ramfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture(scope="module")
def loopdev(workdir):
    if not shutil.which("losetup"):
        pytest.skip("no losetup")
    backing = str(workdir / "loop-backing")
    with open(backing, "wb") as f:
        f.truncate(LOOP_SIZE)
    r = subprocess.run(["losetup", "-f", "--show", backing], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"losetup failed: {r.stderr.strip()}")
    dev = r.stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=True)


class Target:
    """A file (or device) of random bytes and a read-write ticket on it with `size` left out."""

    def __init__(self, kind, daemon, path, size):
        self.kind, self.daemon, self.path, self.size = kind, daemon, path, size
        self.block = path.startswith("/dev/")
        self.ids = []
        self.data = bytearray(os.urandom(size))
        with open(path, "r+b" if self.block else "wb") as f:
            f.write(self.data)
            os.fsync(f.fileno())
        self.id = self.add()

    def add(self, ops=("read", "write"), **extra):
        """A new ticket on the file, its size left out; its id."""
        ticket_id = str(uuid.uuid4())
        t = {"uuid": ticket_id, "ops": list(ops), "timeout": 300, "url": "file://" + self.path,
             **extra}
        status, body = request(self.daemon.control(), "PUT", f"/tickets/{ticket_id}",
                               json.dumps(t).encode())
        assert status == 200, body
        self.ids.append(ticket_id)
        return ticket_id

    def info(self, ticket_id=None):
        status, body = request(self.daemon.control(), "GET", f"/tickets/{ticket_id or self.id}")
        assert status == 200, body
        return json.loads(body)

    def url(self, ticket_id=None, sub=""):
        return f"/images/{ticket_id or self.id}{sub}"

    def content(self, offset=0, length=None):
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(self.size - offset if length is None else length)

    def assert_content(self):
        """The file holds exactly the model, and its size never changed."""
        if not self.block:
            assert os.path.getsize(self.path) == self.size
        got = self.content()
        if got != self.data:
            first = next(i for i in range(len(got)) if got[i] != self.data[i])
            raise AssertionError(f"{self.path} differs from the model at {first}")

    def close(self):
        """Delete the tickets: then the daemon holds the file open no more."""
        for ticket_id in self.ids:
            assert request(self.daemon.control(), "DELETE", f"/tickets/{ticket_id}")[0] == 204
        wait_for(lambda: not open_fds(self.daemon, self.path), what=f"{self.path} to be closed")
        if not self.block and os.path.exists(self.path):
            os.unlink(self.path)


def open_fds(daemon, path):
    """The daemon's fds on path (a removed file shows as "path (deleted)")."""
    fds = f"/proc/{daemon.proc.pid}/fd"
    found = []
    for fd in os.listdir(fds):
        try:
            target = os.readlink(f"{fds}/{fd}")
        except OSError:
            continue
        if target == path or target == path + " (deleted)":
            found.append(fd)
    return found


@pytest.fixture(params=KINDS)
def target(request, workdir):
    kind = request.param
    if kind == "ramfs":
        path, size = str(request.getfixturevalue("ramfs") / f"{uuid.uuid4().hex}.img"), SIZE
    elif kind == "loop":
        path, size = request.getfixturevalue("loopdev"), LOOP_SIZE
    else:
        (workdir / "files").mkdir(exist_ok=True)
        path, size = str(workdir / "files" / f"{uuid.uuid4().hex}.img"), SIZE
    daemon = request.getfixturevalue("buffered_daemon" if kind == "nodirect" else "direct_daemon")
    t = Target(kind, daemon, path, size)
    yield t
    t.close()
    assert "Traceback" not in daemon.read_log()


def regular(target):
    if target.block:
        pytest.skip("a block device cannot be truncated, unlinked or sparse")


# HTTP helpers

def call(target, method, url, body=None, headers=None):
    """(status, headers, body) of one request on a new local connection."""
    conn = target.daemon.local()
    try:
        conn.request(method, url, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def put(target, offset, data, ticket_id=None, flush=None, content_range=None):
    query = "" if flush is None else f"?flush={flush}"
    headers = {"Content-Range": content_range or f"bytes {offset}-{offset + len(data) - 1}/*"}
    status, _, body = call(target, "PUT", target.url(ticket_id) + query, data, headers)
    if status == 200:
        target.data[offset:offset + len(data)] = data
    return status, body


def get(target, offset, length, ticket_id=None):
    status, headers, body = call(target, "GET", target.url(ticket_id),
                                 headers={"Range": f"bytes={offset}-{offset + length - 1}"})
    assert status == 206, body
    assert headers["Content-Range"] == f"bytes {offset}-{offset + length - 1}/{target.size}"
    return body


def patch(target, msg, ticket_id=None):
    body = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    status, _, text = call(target, "PATCH", target.url(ticket_id), body)
    if status == 200 and isinstance(msg, dict) and msg.get("op") == "zero":
        o = msg.get("offset", 0)
        target.data[o:o + msg["size"]] = bytes(msg["size"])
    return status, text


def raw(target, head, body=b"", shut=False, timeout=20):
    """Send a raw request; the whole answer until the daemon closes or answers (a head)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(target.daemon.local_socket)
        s.sendall(head.encode() + body)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return int(out.split(b" ", 2)[1]), out


def block_hash(data, algorithm="blake2b", block_size=4 * MiB):
    """API.md 4c computed here from the bytes."""
    kw = {"digest_size": 32} if algorithm.startswith("blake2") else {}
    outer = hashlib.new(algorithm, **kw)
    for i in range(0, len(data), block_size):
        outer.update(hashlib.new(algorithm, data[i:i + block_size], **kw).digest())
    return outer.hexdigest()


def wait_for(predicate, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def extents(target, query="", ticket_id=None):
    status, _, body = call(target, "GET", target.url(ticket_id, "/extents") + query)
    assert status == 200, body
    return json.loads(body)


def assert_covers(exts, start, end):
    """No gaps, in order, neighbours with equal flags merged."""
    assert exts[0]["start"] == start
    pos = start
    for a, b in zip(exts, exts[1:]):
        assert (a["zero"], a["hole"]) != (b["zero"], b["hole"]), exts
    for e in exts:
        assert e["start"] == pos and e["length"] > 0, exts
        pos += e["length"]
    assert pos == end, exts


# 1. OPTIONS, ticket size

def test_options(target):
    status, headers, body = call(target, "OPTIONS", target.url())
    assert status == 200, body
    info = json.loads(body)
    assert info["features"] == ["checksum", "extents", "flush", "zero"]
    assert info["max_readers"] == info["max_writers"] == CONNECTIONS
    assert info["size"] == target.size
    assert info["unix_socket"] == target.daemon.local_socket
    assert headers["Allow"] == "OPTIONS,GET,PUT,PATCH"
    # `size` left out of the ticket: the file's size.
    assert target.info()["size"] == target.size
    ro = target.add(ops=["read"])
    status, headers, body = call(target, "OPTIONS", target.url(ro))
    assert status == 200
    info = json.loads(body)
    assert info["features"] == ["checksum", "extents"]
    assert info["max_readers"] == CONNECTIONS and info["size"] == target.size
    assert headers["Allow"] == "OPTIONS,GET"


# 2. GET and HEAD

def test_get_ranges_and_head(target):
    status, headers, body = call(target, "GET", target.url())
    assert status == 200 and body == target.data
    assert headers["Content-Length"] == str(target.size)
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Accept-Ranges"] == "bytes"
    size = target.size
    for offset, length in [(0, 1), (1, 4097), (511, 2), (size - 1000, 1000), (size - 1, 1),
                           (size - 4097, 4097), (3, 2 * MiB + 5), (0, size)]:
        assert get(target, offset, length) == target.data[offset:offset + length]
    status, headers, body = call(target, "GET", target.url(), headers={"Range": f"bytes={size - 7}-"})
    assert status == 206 and body == target.data[-7:]
    assert headers["Content-Range"] == f"bytes {size - 7}-{size - 1}/{size}"
    for bad in (f"bytes={size}-", f"bytes=0-{size}", f"bytes={size + 5}-{size + 9}"):
        status, headers, _ = call(target, "GET", target.url(), headers={"Range": bad})
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}", bad
    for bad in ("bytes=-5", "bytes=9-3", "bytes=0-1,4-5", "items=0-1", "junk"):
        status, _, _ = call(target, "GET", target.url(), headers={"Range": bad})
        assert status == 416, bad
    status, headers, body = call(target, "HEAD", target.url())
    assert status == 200 and body == b"" and headers["Content-Length"] == str(size)
    status, headers, body = call(target, "HEAD", target.url(), headers={"Range": "bytes=1-4097"})
    assert status == 206 and body == b"" and headers["Content-Length"] == "4097"
    assert headers["Content-Range"] == f"bytes 1-4097/{size}"


# 3. PUT

def test_put(target):
    size = target.size
    # No Content-Range: offset 0; flush default y, and n.
    data = os.urandom(5000)
    status, _, body = call(target, "PUT", target.url(), data)
    assert status == 200 and body == b""
    target.data[:5000] = data
    assert put(target, 1, os.urandom(4097), flush="n")[0] == 200
    assert put(target, 3, os.urandom(513), flush="y")[0] == 200
    # Content-Range forms: B and T given, T as *, B as *.
    data = os.urandom(1000)
    assert put(target, size - 1000, data,
               content_range=f"bytes {size - 1000}-{size - 1}/{size}")[0] == 200
    data = os.urandom(700)
    assert put(target, 9000, data, content_range="bytes 9000-*/*")[0] == 200
    # Chunked: streamed as it arrives.
    pieces = [os.urandom(n) for n in (1, 4096, 70000, 3)]
    conn = target.daemon.local()
    conn.request("PUT", target.url() + "?flush=y", body=iter(pieces),
                 headers={"Content-Range": "bytes 12345-*/*", "Transfer-Encoding": "chunked"},
                 encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 200, r.read()
    conn.close()
    joined = b"".join(pieces)
    target.data[12345:12345 + len(joined)] = joined
    target.assert_content()


def test_put_errors(target):
    size = target.size
    before = bytes(target.data)
    # 400: bad Content-Range, bad flush, no Content-Length.
    for cr in ("4096-8191/*", "bytes 4096-8191", "bytes 8191-4096/*", f"bytes 0-{size}/{size}",
               "bytes */100", "bytes x-1/*"):
        status, _ = put(target, 0, b"x" * 10, content_range=cr)
        assert status == 400, cr
    assert put(target, 0, b"x", flush="maybe")[0] == 400
    status, out = raw(target, f"PUT {target.url()} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400, out
    # 403: a read-only ticket; the connection closes.
    ro = target.add(ops=["read"])
    status, headers, _ = call(target, "PUT", target.url(ro), b"x" * 10)
    assert status == 403 and headers["Connection"] == "close"
    # 416: past the ticket (the file) size, checked before the body is read.
    for offset, n in ((size - 9, 10), (size, 1)):
        status, headers, _ = call(target, "PUT", target.url(), b"y" * n,
                                  headers={"Content-Range": f"bytes {offset}-*/*"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
    # A body shorter than announced: 400, and not counted as transferred.
    wo = target.add(ops=["write"])
    assert put(target, 4096, os.urandom(4096), ticket_id=wo)[0] == 200
    before = bytes(target.data)
    status, out = raw(target, f"PUT {target.url(wo)} HTTP/1.1\r\nHost: x\r\n"
                              f"Content-Range: bytes 0-*/*\r\nContent-Length: 8192\r\n\r\n",
                      b"z" * 100, shut=True)
    assert status == 400, out
    assert target.info(wo)["transferred"] == 4096
    target.data[:] = before
    target.assert_content()


def test_unaligned_io_at_every_edge(target):
    """PUT then GET of every kind of edge; then the whole file equals the model."""
    size = target.size
    for offset, length in [(1, 4097), (0, 1), (511, 2), (4095, 8193), (size - 1000, 1000),
                           (size - 1, 1), (size - 4097, 4097), (size - 513, 513),
                           (3, 2 * MiB + 5), (0, size)]:
        data = os.urandom(length)
        assert put(target, offset, data, flush="n")[0] == 200
        assert get(target, offset, length) == data
    assert patch(target, {"op": "flush"})[0] == 200
    target.assert_content()


def test_parallel_puts_sharing_a_block_both_land(target):
    """Two connections write disjoint bytes of one 512-byte block at once, round after round;
    after every round both are there (at the head block and at the partial tail block)."""
    size = target.size
    tail = size - size % 512 if size % 512 else size - 512
    for base in (0, tail):
        for i in range(15):
            a, b = bytes([i + 1]) * 100, bytes([i + 101]) * 100
            go = threading.Barrier(2)
            results = []

            def send(offset, data):
                go.wait()
                results.append(put(target, offset, data, flush="n")[0])

            threads = [threading.Thread(target=send, args=(base, a)),
                       threading.Thread(target=send, args=(base + 200, b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert results == [200, 200]
            block = get(target, base, 300)
            assert block[:100] == a and block[200:] == b, (base, i)
    target.assert_content()


# 4. PATCH

def test_patch(target):
    size = target.size
    assert patch(target, {"op": "zero", "offset": 7, "size": MiB})[0] == 200
    assert patch(target, {"op": "zero", "offset": 3 * MiB + 1, "size": 4097, "flush": True})[0] \
        == 200
    assert patch(target, {"op": "zero", "size": 0})[0] == 200
    assert patch(target, {"op": "zero", "offset": size - 100, "size": 100})[0] == 200
    assert patch(target, {"op": "flush"})[0] == 200
    for bad in (b"[]", b"not json", {"op": "zero"}, {"op": "zero", "size": -1},
                {"op": "zero", "size": 1, "offset": -1}, {"op": "zero", "size": 1, "flush": "y"},
                {"op": "trim", "size": 1}, {"size": 1}, {"op": "zero", "size": True}):
        assert patch(target, bad)[0] == 400, bad
    ro = target.add(ops=["read"])
    for msg in ({"op": "zero", "size": 1}, {"op": "flush"}):
        assert patch(target, msg, ticket_id=ro)[0] == 403
    for offset, n in ((size - 10, 11), (size, 1)):
        status, text = patch(target, {"op": "zero", "offset": offset, "size": n})
        assert status == 416, text
    target.assert_content()
    ext = extents(target)
    assert_covers(ext, 0, size)
    # The whole blocks zeroed read as zero extents (partial blocks were written as data).
    assert any(e["zero"] and e["start"] <= 4096 and e["start"] + e["length"] >= MiB
               for e in ext) or target.kind in ("ramfs", "loop"), ext


@pytest.mark.parametrize("sparse", [False, True], ids=["allocated", "sparse"])
def test_zero_allocation(target, sparse):
    """PATCH zero on ext4: a sparse ticket punches a hole (SEEK_HOLE finds it, st_blocks drop,
    extents say hole); a non-sparse one keeps the blocks allocated (zero, not hole). PUT of
    zeros behaves the same. The size never changes."""
    if target.kind not in ("ext4", "nodirect"):
        pytest.skip("allocation is checked on ext4 only (ramfs has no holes, devices no map)")
    ticket_id = target.add(sparse=sparse)
    blocks = os.stat(target.path).st_blocks
    assert patch(target, {"op": "zero", "offset": MiB, "size": 2 * MiB, "flush": True},
                 ticket_id)[0] == 200
    assert put(target, 4 * MiB, bytes(MiB), ticket_id, flush="y")[0] == 200
    st = os.stat(target.path)
    assert st.st_size == target.size
    with open(target.path, "rb") as f:
        hole = os.lseek(f.fileno(), 0, os.SEEK_HOLE)
    if sparse:
        # (ext4 may take a block or two for its extent tree when holes split an extent)
        assert st.st_blocks * 512 <= blocks * 512 - 3 * MiB + 64 * 1024
        assert hole == MiB
    else:
        assert st.st_blocks >= blocks
    ext = extents(target, ticket_id=ticket_id)
    assert_covers(ext, 0, target.size)
    for start, length in ((MiB, 2 * MiB), (4 * MiB, MiB)):
        inside = [e for e in ext if e["start"] <= start < e["start"] + e["length"]]
        assert inside[0]["zero"] is True and inside[0]["hole"] is sparse, ext
        assert inside[0]["start"] + inside[0]["length"] >= start + length, ext
    target.assert_content()


# 4b-4c. Extents and checksum

def test_extents(target):
    size = target.size
    sparse = target.add(sparse=True)
    assert patch(target, {"op": "zero", "offset": 2 * MiB, "size": MiB}, sparse)[0] == 200
    whole = extents(target)
    assert_covers(whole, 0, size)
    for start, length in ((0, 4096), (1, MiB), (2 * MiB - 7, 3 * MiB), (size - 1000, 5000)):
        window = extents(target, f"?start={start}&length={length}")
        assert_covers(window, start, min(size, start + length))
    for e in whole:
        # Zero extents read as zeros.
        if e["zero"]:
            assert target.data[e["start"]:e["start"] + e["length"]] == bytes(e["length"])
    if target.kind in ("ext4", "nodirect"):
        assert {"start": 2 * MiB, "length": MiB, "zero": True, "hole": True} in whole
    else:
        assert whole == [{"start": 0, "length": size, "zero": False, "hole": False}]
    status, _, body = call(target, "GET", target.url(sub="/extents?context=dirty"))
    assert status == 404, body
    status, _, _ = call(target, "GET", target.url(sub="/extents?context=bogus"))
    assert status == 400
    status, headers, _ = call(target, "GET", target.url(sub=f"/extents?start={size + 1}"))
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
    target.assert_content()


def test_checksum(target):
    assert patch(target, {"op": "zero", "offset": 4 * MiB, "size": 4 * MiB})[0] == 200
    status, _, body = call(target, "GET", target.url(sub="/checksum"))
    assert status == 200, body
    assert json.loads(body) == {"algorithm": "blake2b", "block_size": 4 * MiB,
                                "checksum": block_hash(target.content())}
    status, _, body = call(target, "GET", target.url(sub="/checksum?algorithm=sha1&block_size="
                                                          f"{MiB}"))
    assert status == 200, body
    assert json.loads(body)["checksum"] == block_hash(target.content(), "sha1", MiB)
    status, _, _ = call(target, "GET", target.url(sub="/checksum?block_size=4097"))
    assert status == 400


# 5. Tickets: transferred, DELETE with requests running

def test_transferred(target):
    ro = target.add(ops=["read"])
    get(target, 0, 4096, ro)
    get(target, 2048, 8192, ro)
    call(target, "GET", target.url(ro), headers={"Range": f"bytes={MiB}-{2 * MiB - 1}"})
    assert target.info(ro)["transferred"] == 2048 + 8192 + MiB
    wo = target.add(ops=["write"])
    put(target, 1, os.urandom(4097), wo)
    patch(target, {"op": "zero", "offset": 5000, "size": 100}, wo)
    info = target.info(wo)
    assert info["transferred"] == 4097 + 100 and info["active"] is False


def test_delete_with_put_running(target):
    """DELETE while a PUT waits for its body: new requests get 403 at once; the DELETE answers
    204 once the PUT ends (403, canceled); the pieces read before the DELETE are in the file."""
    wo = target.add(ops=["write"])
    payload = os.urandom(4 * MiB)
    first = 2 * MiB + 4096      # one whole 2 MiB piece, then the daemon waits for the next
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(target.daemon.local_socket)
    try:
        s.sendall(f"PUT {target.url(wo)}?flush=n HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload[:first])
        # The first piece is written (its acknowledgement may wait until the body goes on:
        # a pipelined write collects acknowledgements when it needs their buffers).
        wait_for(lambda: target.content(0, 2 * MiB) == payload[:2 * MiB],
                 what="the first piece")
        assert target.info(wo)["active"] is True
        result = {}
        deleter = threading.Thread(target=lambda: result.update(
            status=request(target.daemon.control(), "DELETE", f"/tickets/{wo}")[0]))
        deleter.start()
        wait_for(lambda: target.info(wo)["canceled"], what="the cancel")
        assert call(target, "OPTIONS", target.url(wo))[0] == 403
        assert deleter.is_alive()
        s.sendall(payload[first:])
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        assert out.startswith(b"HTTP/1.1 403"), out[:200]
        deleter.join(10)
        assert result == {"status": 204}
    finally:
        s.close()
    assert request(target.daemon.control(), "GET", f"/tickets/{wo}")[0] == 404
    assert target.content(0, 2 * MiB) == payload[:2 * MiB]
    # The other ticket on the file still works.
    assert get(target, 0, 10) == payload[:10]


def test_delete_with_get_running(target):
    """A GET read slowly: DELETE answers 204 quickly and the body stops after the current
    piece (the connection closes)."""
    ro = target.add(ops=["read"])
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(target.daemon.local_socket)
    try:
        s.sendall(f"GET {target.url(ro)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got = len(s.recv(65536))
        result = {}

        def slow():
            nonlocal got
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return
                got += len(chunk)
                if not result:
                    time.sleep(len(chunk) / (4 * MiB))      # 4 MiB/s until the DELETE answered

        reader = threading.Thread(target=slow)
        reader.start()
        wait_for(lambda: got > 256 * 1024, what="the GET to progress")
        t0 = time.monotonic()
        result["status"] = request(target.daemon.control(), "DELETE", f"/tickets/{ro}")[0]
        assert result["status"] == 204
        assert time.monotonic() - t0 < 10       # no hang (generous: a loaded machine)
        reader.join(20)
        assert not reader.is_alive()
        assert got < target.size
    finally:
        s.close()
    assert request(target.daemon.control(), "GET", f"/tickets/{ro}")[0] == 404


# 7a. The file changes under the ticket, or is smaller than the ticket

def test_ticket_larger_than_the_file(target):
    """A ticket may say more than the file holds: the file's size bounds every request."""
    size = target.size
    big = target.add(size=size + 4096)
    status, _, body = call(target, "OPTIONS", target.url(big))
    assert json.loads(body)["size"] == size
    status, _, body = call(target, "GET", target.url(big))
    assert status == 200 and body == target.data
    status, headers, _ = call(target, "GET", target.url(big), headers={"Range": f"bytes={size}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
    status, headers, _ = call(target, "PUT", target.url(big), b"x" * 10,
                              headers={"Content-Range": f"bytes {size - 5}-*/*"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
    assert patch(target, {"op": "zero", "offset": size - 5, "size": 10}, big)[0] == 416
    assert_covers(extents(target, ticket_id=big), 0, size)
    target.assert_content()


def test_range_past_the_current_size(target):
    """Truncated under the ticket: 416 with the current size; what is left is served."""
    regular(target)
    half = 4 * MiB + 3
    os.truncate(target.path, half)
    del target.data[half:]
    status, headers, _ = call(target, "GET", target.url(), headers={"Range": f"bytes={half}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{half}"
    status, headers, _ = call(target, "PUT", target.url(), b"x" * 10,
                              headers={"Content-Range": f"bytes {half - 5}-*/*"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{half}"
    status, text = patch(target, {"op": "zero", "offset": half - 5, "size": 10})
    assert status == 416, text
    status, _, body = call(target, "GET", target.url())
    assert status == 200 and body == target.data
    status, _, body = call(target, "OPTIONS", target.url())
    assert json.loads(body)["size"] == half
    assert_covers(extents(target), 0, half)
    status, headers, _ = call(target, "GET", target.url(sub=f"/extents?start={half + 1}"))
    assert status == 416 and headers["Content-Range"] == f"bytes */{half}"
    assert put(target, half - 5, b"y" * 5)[0] == 200
    assert os.path.getsize(target.path) == half
    assert target.content() == target.data


@pytest.mark.parametrize("how", ["unlink", "replace"])
def test_file_removed_or_replaced(target, how):
    """500 for every request, a log line naming the path, and nothing hangs."""
    regular(target)
    get(target, 0, 10)      # a channel is open
    os.unlink(target.path)
    if how == "replace":
        with open(target.path, "wb") as f:
            f.write(b"other" * 1000)
    word = "removed" if how == "unlink" else "replaced"
    for method, sub, body, headers in [
            ("OPTIONS", "", None, {}),
            ("HEAD", "", None, {}),
            ("GET", "", None, {"Range": "bytes=0-9"}),
            ("GET", "", None, {}),
            ("PUT", "", b"x" * 10, {}),
            ("PATCH", "", b'{"op":"zero","size":10}', {}),
            ("PATCH", "", b'{"op":"flush"}', {}),
            ("GET", "/extents", None, {}),
            ("GET", "/checksum", None, {})]:
        status, _, text = call(target, method, target.url(sub=sub), body, headers)
        assert status == 500, (method, sub, status, text)
        assert text == (b"" if method == "HEAD" else
                        b"Server failed to perform the request, check logs\n")
    assert f"{target.path} was {word} under its ticket" in target.daemon.read_log()
    if how == "replace":
        assert open(target.path, "rb").read() == b"other" * 1000


# 7a / issue 13 point 3: refusals at PUT /tickets

def test_refusals(direct_daemon, workdir):
    d = direct_daemon
    base = workdir / "refusals"
    base.mkdir()
    fifo = str(base / "fifo")
    os.mkfifo(fifo)
    cases = [("file://relative/disk.img", "relative/disk.img", "not an absolute path"),
             ("file:disk.img", "disk.img", "not an absolute path"),
             (f"file://{base}/missing", f"{base}/missing", "No such file"),
             (f"file://{base}", str(base), "is a directory"),
             ("file:///dev/null", "/dev/null", "is a character device"),
             (f"file://{fifo}", fifo, "is a FIFO")]
    img = base / "immutable.img"
    img.write_bytes(b"x" * 4096)
    immutable = shutil.which("chattr") and \
        subprocess.run(["chattr", "+i", str(img)], capture_output=True).returncode == 0
    if immutable:
        cases.append((f"file://{img}", str(img), "cannot open for writing"))
    try:
        for url, path, reason in cases:
            t = {"uuid": "bad", "ops": ["read", "write"], "timeout": 60, "url": url}
            t0 = time.monotonic()
            status, body = request(d.control(), "PUT", "/tickets/bad", json.dumps(t).encode())
            assert time.monotonic() - t0 < 5
            assert status == 400, (url, body)
            text = body.decode()
            assert text.startswith("Invalid ticket: ") and path in text and reason in text, text
            assert request(d.control(), "GET", "/tickets/bad")[0] == 404
        if immutable:
            # Read tickets on it are fine.
            t = {"uuid": "ro", "ops": ["read"], "timeout": 60, "url": f"file://{img}"}
            status, body = request(d.control(), "PUT", "/tickets/ro", json.dumps(t).encode())
            assert status == 200, body
            assert request(d.control(), "DELETE", "/tickets/ro")[0] == 204
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(img)], check=True)
    if not immutable:
        pytest.skip("chattr +i is not available: the immutable case was not run")


# Issue 13 point 5 and the "how it is shown" list: other clients against file tickets

def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def compare(a, b):
    r = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def make_image(path, fmt, size=8 * MiB):
    qemu_img("create", "-q", "-f", fmt, str(path), str(size))
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -q -P 0x55 0 1M",
                    "-c", f"write -q -P 0xaa {3 * MiB + 4096} 64k",
                    "-c", f"write -q -P 0x11 {size - MiB} 1M", str(path)],
                   check=True, capture_output=True)
    return str(path)


def add_file_ticket(d, path, ops, ticket_id=None):
    ticket_id = ticket_id or uuid.uuid4().hex
    t = {"uuid": ticket_id, "ops": list(ops), "timeout": 300, "url": f"file://{path}"}
    status, body = request(d.control(), "PUT", f"/tickets/{ticket_id}", json.dumps(t).encode())
    assert status == 200, body
    return ticket_id


def test_checksum_file_equals_nbd(direct_daemon, workdir):
    """The same raw file through a file ticket and through qemu-nbd: the same checksum, and
    the same as ovirt-imageio's client computes for the file."""
    d = direct_daemon
    path = make_image(workdir / "same.raw", "raw", 8 * MiB + 512)
    file_id = add_file_ticket(d, path, ["read"])
    server = qemu_nbd(path, str(workdir / "same.sock"), "raw", "--read-only")
    try:
        d.add_ticket(server.url, 8 * MiB + 512, ops=["read"], ticket_id="same-nbd")
        sums = []
        for ticket_id in (file_id, "same-nbd"):
            for query in ("", f"?algorithm=sha256&block_size={MiB}"):
                status, body = request(d.local(), "GET", f"/images/{ticket_id}/checksum{query}")
                assert status == 200, body
                sums.append(json.loads(body))
        assert sums[:2] == sums[2:]
        assert imageio.checksum(path)["checksum"] == sums[0]["checksum"]
        request(d.control(), "DELETE", "/tickets/same-nbd")
    finally:
        server.stop()
        request(d.control(), "DELETE", f"/tickets/{file_id}")


@pytest.mark.parametrize("src_fmt", ["raw", "qcow2"])
def test_imageio_client_upload_and_download(direct_daemon, workdir, src_fmt):
    """ovirt-imageio's client over TLS (it switches to the unix socket) uploads into a file
    ticket and downloads from one."""
    d = direct_daemon
    work = workdir / f"imageio-{src_fmt}"
    work.mkdir()
    src = make_image(work / f"src.{src_fmt}", src_fmt)
    dst = work / "dst.raw"
    with open(dst, "wb") as f:
        f.write(b"\xee" * 8 * MiB)      # garbage the upload must clear
    wid = add_file_ticket(d, dst, ["write"])
    imageio.upload(src, f"https://localhost:{d.port}/images/{wid}", d.cert)
    compare(src, dst)
    assert os.path.getsize(dst) == 8 * MiB
    rid = add_file_ticket(d, dst, ["read"])
    for fmt in ("raw", "qcow2"):
        back = work / f"back.{fmt}"
        imageio.download(f"https://localhost:{d.port}/images/{rid}", str(back), d.cert, fmt=fmt)
        compare(src, back)
    for ticket_id in (wid, rid):
        assert request(d.control(), "DELETE", f"/tickets/{ticket_id}")[0] == 204


def cli(*args):
    p = subprocess.run(NBDPROXY + [str(a) for a in args], cwd=TOP, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("src_fmt", ["raw", "qcow2"])
def test_nbdproxy_client_upload_and_download(direct_daemon, workdir, src_fmt):
    """`nbdproxy upload` and `nbdproxy download`, unchanged, against file tickets."""
    d = direct_daemon
    work = workdir / f"cli-{src_fmt}"
    work.mkdir()
    src = make_image(work / f"src.{src_fmt}", src_fmt)
    dst = work / "dst.raw"
    with open(dst, "wb") as f:
        f.write(b"\xee" * 8 * MiB)
    wid = add_file_ticket(d, dst, ["write"])
    cli("upload", src, f"https://localhost:{d.port}/images/{wid}", "--cafile", d.cert,
        "--verify")
    compare(src, dst)
    rid = add_file_ticket(d, dst, ["read"])
    for fmt in ("raw", "qcow2"):
        back = work / f"back.{fmt}"
        cli("download", f"https://localhost:{d.port}/images/{rid}", back, "--format", fmt,
            "--cafile", d.cert, "--verify")
        compare(src, back)
    for ticket_id in (wid, rid):
        assert request(d.control(), "DELETE", f"/tickets/{ticket_id}")[0] == 204
