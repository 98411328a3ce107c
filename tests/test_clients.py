"""Existing clients work unchanged against nbdproxy (issue 3).

Each test runs a real client against a real daemon (TLS on TCP, plus its local unix socket) in
front of a real qemu-nbd, and checks the image with `qemu-img compare`:

1. ovirt-imageio's client library: download() and upload() through an https transfer URL, with
   the client switching to the unix socket that OPTIONS advertises; its checksum() equals ours.
2. virt-v2v's rhv-upload output: OPTIONS, a pool of 4 keep-alive connections, small PUTs with
   flush=n and PATCH zero between them, PATCH flush on every connection at the end.
3. curl over a unix socket path, an abstract unix socket and TLS: ranged GET, PUT with -T and
   Content-Range, Expect: 100-continue for large bodies.
4. contrib/examples/seed_flow.py, the documented example of the OPTIONS-then-unix-socket flow.
"""

import http.client
import json
import os
import queue
import random
import re
import ssl
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import urlparse

import pytest

from ovirt_imageio import client as imageio

from support import TOP, Daemon, qemu_nbd, request
from nbdproxy.client.connections import UnixHTTPConnection

MiB = 1024**2
SIZE = 64 * MiB
EXAMPLE = os.path.join(TOP, "contrib", "examples", "seed_flow.py")

_CLOSED = re.compile(r"connection closed id=(\d+) service=(\w+) requests=(\d+) in=(\d+) out=(\d+)")


# Helpers

def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_io(image, fmt, *commands):
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run(argv + [image], check=True, capture_output=True)


def compare(a, b):
    """qemu-img compare: same guest-visible content (formats may differ)."""
    r = subprocess.run(["qemu-img", "compare", a, b], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def make_image(path, fmt, layout):
    """A SIZE image; layout "data": 1 MiB of data at the start, middle (not MiB-aligned) and
    end, "empty": no data at all."""
    qemu_img("create", "-q", "-f", fmt, path, str(SIZE))
    if layout == "data":
        commands = []
        for offset in (0, SIZE // 2 - 3 * 4096, SIZE - MiB):
            # qemu-io writes a pattern: one per offset, and a different 4 KiB inside.
            commands.append(f"write -q -P 0x{(offset >> 12) % 251 + 1:02x} {offset} {MiB}")
            commands.append(f"write -q -P 0x5a {offset + 4096} 4096")
        qemu_io(path, fmt, *commands)
    return path


def dirty_target(path, fmt):
    """An upload target that is not zero where the sources are: garbage the upload must clear."""
    qemu_img("create", "-q", "-f", fmt, path, str(SIZE))
    qemu_io(path, fmt, "write -q -P 0xee 0 64k", f"write -q -P 0xee {8 * MiB} {4 * MiB}",
            f"write -q -P 0xee {SIZE - 128 * 1024} 64k")
    return path


def closed_connections(daemon, service, expect=None, timeout=15):
    """[(requests, bytes in, bytes out)] of the closed connections of a service, from the log.

    A connection is logged when the daemon sees it close, just after the client closed it; wait
    until expect(list) holds (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [(int(m[3]), int(m[4]), int(m[5])) for m in _CLOSED.finditer(daemon.read_log())
                 if m[2] == service]
        if expect is None or expect(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def our_checksum(daemon, ticket="test"):
    status, body = request(daemon.local(), "GET", f"/images/{ticket}/checksum")
    assert status == 200, body
    return json.loads(body)


def transfer_url(daemon, ticket="test"):
    return f"https://localhost:{daemon.port}/images/{ticket}"


def abstract_daemon(tmp_path, cert):
    """A daemon whose local data socket is an abstract name; (daemon, name without the NUL)."""
    name = f"nbdproxy-test-{uuid.uuid4().hex}"
    tmpdir = tmp_path / "abstract"
    tmpdir.mkdir()
    return Daemon(str(tmpdir), *cert, args=["--local-socket", "@" + name]), name


@pytest.fixture
def abstract(tmp_path, cert):
    d, name = abstract_daemon(tmp_path, cert)
    d.abstract_name = name
    yield d
    d.stop()


# 1. ovirt-imageio client

def assert_switched_to_unix(daemon, moved, direction):
    """The remote (TLS) service saw only OPTIONS; the data went through the local socket."""
    index = 1 if direction == "in" else 2
    local = closed_connections(daemon, "local",
                               lambda found: sum(c[index] for c in found) >= moved)
    remote = closed_connections(daemon, "remote", lambda found: len(found) >= 1)
    assert remote and all(requests == 1 for requests, _, _ in remote), remote
    assert sum(c[index] for c in local) >= moved, local
    assert sum(c[0] for c in local) >= 2, local


@pytest.mark.parametrize("src_fmt,dst_fmt", [("raw", "raw"), ("qcow2", "qcow2"), ("raw", "qcow2")])
def test_imageio_download(daemon, tmp_path, src_fmt, dst_fmt):
    src = make_image(str(tmp_path / f"src.{src_fmt}"), src_fmt, "data")
    server = qemu_nbd(src, str(tmp_path / "src.sock"), src_fmt, "--read-only")
    try:
        daemon.add_ticket(server.url, SIZE, ops=["read"])
        dst = str(tmp_path / f"dst.{dst_fmt}")
        imageio.download(transfer_url(daemon), dst, daemon.cert, fmt=dst_fmt)
        ours = our_checksum(daemon)
    finally:
        server.stop()
    compare(src, dst)
    assert imageio.checksum(dst, block_size=ours["block_size"],
                            algorithm=ours["algorithm"])["checksum"] == ours["checksum"]
    assert_switched_to_unix(daemon, 3 * MiB, "out")


@pytest.mark.parametrize("src_fmt,layout,dst_fmt", [
    ("raw", "data", "raw"),
    ("qcow2", "data", "raw"),
    ("qcow2", "data", "qcow2"),
    ("raw", "empty", "qcow2"),
    ("qcow2", "empty", "raw"),
])
def test_imageio_upload(daemon, tmp_path, src_fmt, layout, dst_fmt):
    src = make_image(str(tmp_path / f"src.{src_fmt}"), src_fmt, layout)
    dst = dirty_target(str(tmp_path / f"dst.{dst_fmt}"), dst_fmt)
    server = qemu_nbd(dst, str(tmp_path / "dst.sock"), dst_fmt)
    try:
        daemon.add_ticket(server.url, SIZE)
        imageio.upload(src, transfer_url(daemon), daemon.cert)
        ours = our_checksum(daemon)
    finally:
        server.stop()
    compare(src, dst)
    assert imageio.checksum(src)["checksum"] == ours["checksum"]
    assert_switched_to_unix(daemon, 3 * MiB if layout == "data" else 0, "in")


def test_imageio_abstract_socket(abstract, tmp_path):
    """The default local socket is an abstract name: the client uses OPTIONS' "\\0..." as is."""
    src = make_image(str(tmp_path / "src.qcow2"), "qcow2", "data")
    dst = dirty_target(str(tmp_path / "dst.raw"), "raw")
    server = qemu_nbd(dst, str(tmp_path / "dst.sock"), "raw")
    back = str(tmp_path / "back.qcow2")
    try:
        abstract.add_ticket(server.url, SIZE)
        url = transfer_url(abstract)
        imageio.upload(src, url, abstract.cert)
        imageio.download(url, back, abstract.cert)
    finally:
        server.stop()
    compare(src, dst)
    compare(src, back)
    assert_switched_to_unix(abstract, 3 * MiB, "in")
    assert_switched_to_unix(abstract, 3 * MiB, "out")


def test_imageio_client_random_io(memory_export, abstract):
    """ImageioClient, the library's random-access API: write, zero, read, extents, flush.

    (memory_export first: the daemon stops first and lets go of nbdkit, which waits for its
    clients on SIGTERM.)"""
    abstract.add_ticket(memory_export.url, SIZE)
    data = os.urandom(MiB + 4096)
    url = transfer_url(abstract)
    with imageio.ImageioClient(url, cafile=abstract.cert) as c:
        assert c._backend.server_address == "\0" + abstract.abstract_name
        assert c.max_readers >= 4 and c.max_writers >= 4
        c.write(3 * MiB, data)
        c.zero(3 * MiB + 4096, 8192)
        c.flush()
        buf = bytearray(len(data))
        c.read(3 * MiB, buf)
        assert buf == data[:4096] + bytes(8192) + data[4096 + 8192:]
    # A new client: the library caches the extents it saw first.
    with imageio.ImageioClient(url, cafile=abstract.cert) as c:
        assert c.size() == SIZE
        extents = list(c.extents())
        assert extents[0].start == 0 and extents[-1].start + extents[-1].length == SIZE
        assert any(not e.zero and e.start <= 3 * MiB < e.start + e.length for e in extents)


def test_imageio_checksum_block_sizes(daemon, raw_export, raw_image):
    daemon.add_ticket(raw_export.url, SIZE, ops=["read"])
    for algorithm, block_size in (("blake2b", MiB), ("sha1", 8 * MiB)):
        status, body = request(daemon.local(), "GET", f"/images/test/checksum?algorithm="
                                                     f"{algorithm}&block_size={block_size}")
        assert status == 200, body
        local = imageio.checksum(raw_image, block_size=block_size, algorithm=algorithm)
        assert json.loads(body) == local


# 2. virt-v2v rhv-upload output

class V2VUpload:
    """The requests of virt-v2v's rhv-upload nbdkit plugin, as it makes them."""

    def __init__(self, url, cafile, unix_socket=False):
        self.url = urlparse(url)
        self.context = ssl.create_default_context(purpose=ssl.Purpose.SERVER_AUTH, cafile=cafile)
        # after_fork(): OPTIONS on its own connection, then a pool.
        conn = self.create_http()
        conn.request("OPTIONS", self.url.path)
        r = conn.getresponse()
        assert r.status == 200
        j = json.loads(r.read())
        conn.close()
        features = j["features"]
        self.can_flush, self.can_zero = "flush" in features, "zero" in features
        self.unix_socket = j.get("unix_socket") if unix_socket else None
        count = min(j.get("max_readers", 1), j.get("max_writers", 1), 4)
        self.pool = queue.Queue(count)
        for _ in range(count):
            self.pool.put(self.create_http(self.unix_socket))

    def create_http(self, unix_socket=None):
        if unix_socket:
            return UnixHTTPConnection(unix_socket)
        return http.client.HTTPSConnection(self.url.hostname, self.url.port, context=self.context)

    def pwrite(self, buf, offset):
        conn = self.pool.get()
        try:
            conn.putrequest("PUT", self.url.path + "?flush=n")
            conn.putheader("Content-Range", "bytes %d-%d/*" % (offset, offset + len(buf) - 1))
            conn.putheader("Content-Length", str(len(buf)))
            conn.endheaders()
            try:
                conn.send(buf)
            except BrokenPipeError:
                pass
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200, (r.status, body)
        finally:
            self.pool.put(conn)

    def zero(self, count, offset):
        buf = json.dumps({"op": "zero", "offset": offset, "size": count,
                          "flush": False}).encode()
        conn = self.pool.get()
        try:
            conn.request("PATCH", self.url.path, body=buf,
                         headers={"Content-Type": "application/json",
                                  "Content-Length": str(len(buf))})
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200, (r.status, body)
        finally:
            self.pool.put(conn)

    def flush(self):
        """Take every connection out of the pool and flush on each."""
        locked = [self.pool.get() for _ in range(self.pool.maxsize)]
        try:
            buf = json.dumps({"op": "flush"}).encode()
            for conn in locked:
                conn.request("PATCH", self.url.path, body=buf,
                             headers={"Content-Type": "application/json",
                                      "Content-Length": str(len(buf))})
                r = conn.getresponse()
                body = r.read()
                assert r.status == 200, (r.status, body)
        finally:
            for conn in locked:
                self.pool.put(conn)

    def close(self):
        for _ in range(self.pool.maxsize):
            self.pool.get().close()


@pytest.mark.parametrize("via,dst_fmt", [("https", "raw"), ("unix", "qcow2")])
def test_virt_v2v_rhv_upload(daemon, tmp_path, via, dst_fmt):
    size = 48 * MiB
    rng = random.Random(3)
    target = str(tmp_path / f"dst.{dst_fmt}")
    qemu_img("create", "-q", "-f", dst_fmt, target, str(size))
    qemu_io(target, dst_fmt, f"write -q -P 0xee 0 {size}")      # garbage everywhere
    server = qemu_nbd(target, str(tmp_path / "dst.sock"), dst_fmt)
    expected = bytearray(size)
    # nbdcopy's requests: the image in order, data and zero runs mixed, served in parallel.
    work, offset, puts, zeros = [], 0, 0, 0
    while offset < size:
        n = min(rng.randrange(64 * 1024, 2 * MiB + 1, 4096), size - offset)
        if rng.random() < 0.7:
            data = rng.randbytes(n)
            expected[offset:offset + n] = data
            work.append(("pwrite", data, offset))
            puts += 1
        else:
            work.append(("zero", n, offset))
            zeros += 1
        offset += n
    try:
        daemon.add_ticket(server.url, size)
        plugin = V2VUpload(transfer_url(daemon), daemon.cert, unix_socket=via == "unix")
        assert plugin.pool.maxsize == 4
        jobs = queue.Queue()
        for item in work:
            jobs.put(item)
        errors = []

        def worker():
            while True:
                try:
                    op, arg, off = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    plugin.pwrite(arg, off) if op == "pwrite" else plugin.zero(arg, off)
                except Exception as e:
                    errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        plugin.flush()
        plugin.close()
    finally:
        server.stop()
    expected_path = str(tmp_path / "expected.raw")
    with open(expected_path, "wb") as f:
        f.write(expected)
    compare(expected_path, target)

    # One OPTIONS connection, then 4 kept-alive connections that carried every request.
    service = "local" if via == "unix" else "remote"
    total = puts + zeros + 4
    conns = closed_connections(daemon, service,
                               lambda found: sum(c[0] for c in found) >= total + (via != "unix"))
    pool = [c for c in conns if c[0] > 1 or via == "unix"]
    assert len(pool) == 4, conns
    assert sum(c[0] for c in pool) == total
    assert all(c[0] > 1 for c in pool)


# 3. curl

def curl(*args, check=True):
    r = subprocess.run(["curl", "-sS", "-v", *args], capture_output=True, timeout=30)
    if check:
        assert r.returncode == 0, r.stderr.decode()
    return r


def curl_addresses(daemon, abstract):
    """(name, curl args, base URL) for each way curl reaches the data services."""
    return [
        ("path", ["--unix-socket", daemon.local_socket], "http://localhost"),
        ("abstract", ["--abstract-unix-socket", abstract.abstract_name], "http://localhost"),
        ("tls", ["--cacert", daemon.cert], f"https://localhost:{daemon.port}"),
    ]


def http_status(stderr, code):
    return re.search(rb"^< HTTP/1.1 %d " % code, stderr, re.M) is not None


def test_curl(daemon, abstract, tmp_path, raw_export, raw_image):
    for d in (daemon, abstract):
        d.add_ticket(raw_export.url, SIZE)
    with open(raw_image, "rb") as f:
        original = f.read()
    for name, args, base in curl_addresses(daemon, abstract):
        url = base + "/images/test"
        out = str(tmp_path / f"range-{name}")

        # A ranged download across the data in the middle of the image.
        start, end = SIZE // 2 - 1000, SIZE // 2 + 70000
        r = curl(*args, "-r", f"{start}-{end}", "-o", out, url)
        assert http_status(r.stderr, 206), r.stderr.decode()
        assert f"< Content-Range: bytes {start}-{end}/{SIZE}".encode() in r.stderr
        with open(out, "rb") as f:
            assert f.read() == original[start:end + 1]

        # Upload without Expect (curl 7.88 asks for 100-continue on every -T; newer curls only
        # above 1 MiB): the body follows the head at once.
        small = str(tmp_path / f"small-{name}")
        with open(small, "wb") as f:
            f.write(os.urandom(100_000))
        offset = 5 * MiB + 512
        r = curl(*args, "-T", small, "-H", "Expect:", "-H", f"Content-Range: bytes {offset}-"
                 f"{offset + 100_000 - 1}/*", url + "?flush=y")
        assert http_status(r.stderr, 200), r.stderr.decode()
        assert b"> Expect:" not in r.stderr and not http_status(r.stderr, 100)

        # Large upload: curl sends Expect: 100-continue and waits for 100 before the body.
        large = str(tmp_path / f"large-{name}")
        with open(large, "wb") as f:
            f.write(os.urandom(3 * MiB + 4096))
        offset = 9 * MiB
        r = curl(*args, "-T", large, "-H", f"Content-Range: bytes {offset}-*/*", url)
        assert b"> Expect: 100-continue" in r.stderr, r.stderr.decode()
        assert http_status(r.stderr, 100), r.stderr.decode()
        assert http_status(r.stderr, 200), r.stderr.decode()

        # What curl uploaded is in the image; read it back with curl too.
        back = str(tmp_path / f"back-{name}")
        r = curl(*args, "-r", f"{offset}-{offset + 3 * MiB + 4096 - 1}", "-o", back, url)
        with open(large, "rb") as a, open(back, "rb") as b:
            assert a.read() == b.read()
        with open(small, "rb") as f:
            payload = f.read()
        r = curl(*args, "-r", f"{5 * MiB + 512}-{5 * MiB + 512 + 100_000 - 1}", "-o", back, url)
        with open(back, "rb") as f:
            assert f.read() == payload


def test_curl_refused_upload_skips_body(daemon, tmp_path, raw_export):
    """A large PUT refused before its body (read-only ticket): 403 instead of 100, body unsent."""
    daemon.add_ticket(raw_export.url, SIZE, ops=["read"])
    large = str(tmp_path / "large")
    with open(large, "wb") as f:
        f.write(os.urandom(8 * MiB))
    r = curl("--unix-socket", daemon.local_socket, "-T", large, "http://localhost/images/test",
             check=False)
    assert http_status(r.stderr, 403), r.stderr.decode()
    assert not http_status(r.stderr, 100)
    local = closed_connections(daemon, "local", lambda found: len(found) >= 1)
    assert local and local[-1][1] < MiB, local

    # The same for a range past the end on a writable ticket: 416 before the body.
    daemon.add_ticket(raw_export.url, SIZE, ticket_id="rw")
    r = curl("--unix-socket", daemon.local_socket, "-T", large, "-H",
             f"Content-Range: bytes {SIZE - MiB}-*/*", "http://localhost/images/rw", check=False)
    assert http_status(r.stderr, 416), r.stderr.decode()
    assert not http_status(r.stderr, 100)
    local = closed_connections(daemon, "local", lambda found: len(found) >= 2)
    assert len(local) == 2 and local[-1][1] < MiB, local


# 4. contrib/examples/seed_flow.py

def run_example(*args):
    r = subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.parametrize("local", ["path", "abstract"])
def test_seed_flow_example(daemon, abstract, tmp_path, raw_image, local):
    d = daemon if local == "path" else abstract
    src_server = qemu_nbd(raw_image, str(tmp_path / "src.sock"))
    dst = make_image(str(tmp_path / "dst.qcow2"), "qcow2", "empty")
    dst_server = qemu_nbd(dst, str(tmp_path / "dst.sock"), "qcow2")
    downloaded = str(tmp_path / "downloaded.raw")
    try:
        d.add_ticket(src_server.url, SIZE, ops=["read"], ticket_id="src")
        d.add_ticket(dst_server.url, SIZE, ticket_id="dst")
        r = run_example("--cafile", d.cert, "download", transfer_url(d, "src"), downloaded)
        want = repr(d.local_socket if local == "path" else "\0" + d.abstract_name)
        assert f"using unix socket {want}" in r.stderr, r.stderr
        r = run_example("--cafile", d.cert, "upload", downloaded, transfer_url(d, "dst"))
        assert "using unix socket" in r.stderr, r.stderr
    finally:
        src_server.stop()
        dst_server.stop()
    compare(raw_image, downloaded)
    compare(raw_image, dst)
    remote = closed_connections(d, "remote", lambda found: len(found) >= 2)
    assert [c[0] for c in remote] == [1, 1]


def test_seed_flow_example_without_unix_socket(tmp_path, cert, raw_image):
    """With the local service off, the example stays on TLS."""
    tmpdir = tmp_path / "nolocal"
    tmpdir.mkdir()
    d = Daemon(str(tmpdir), *cert, args=["--local-socket", "none"])
    server = qemu_nbd(raw_image, str(tmp_path / "src.sock"))
    try:
        d.add_ticket(server.url, SIZE, ops=["read"])
        out = str(tmp_path / "out.raw")
        r = run_example("--cafile", d.cert, "download", transfer_url(d), out)
        assert "using TLS" in r.stderr, r.stderr
        compare(raw_image, out)
    finally:
        server.stop()
        d.stop()
