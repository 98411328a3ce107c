"""Proxy mode (API.md 7b, issue 14 points 1-2): an nbdproxy daemon serving https: tickets by
forwarding them to upstream daemons, nbdproxy and ovirt-imageio 2.5, on 127.0.0.2; the bytes are
checked in the upstream's image, over NBD."""

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from ovirt_imageio import client as imageio_client

from support import (TOP, Daemon, StubServer, UnixHTTPConnection, qemu_nbd, read_export,
                     read_head, request, response)

KiB = 1024
MiB = 1024**2
GiB = 1024**3
UPSTREAM_HOST = "127.0.0.2"
SIZE = 16 * MiB


# Processes

def make_cert(directory):
    """A self-signed certificate valid for the upstream's address too."""
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext",
                    f"subjectAltName=DNS:localhost,IP:127.0.0.1,IP:{UPSTREAM_HOST}",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


# ovirt-imageio's configuration as make bench starts it: the same daemon for tests and bench.
sys.path.insert(0, os.path.join(TOP, "bench"))
from systems import IMAGEIO_CONF  # noqa: E402


class Imageio:
    """An ovirt-imageio 2.5 daemon (from requirements-dev) with its own config, as make bench
    starts it (bench/systems.py), listening on UPSTREAM_HOST."""

    def __init__(self, directory, cert, key):
        os.makedirs(os.path.join(directory, "conf", "conf.d"), exist_ok=True)
        self.control_socket = os.path.join(directory, "control.sock")
        self.local_socket = os.path.join(directory, "local.sock")
        self.log_path = os.path.join(directory, "imageio.log")
        with open(os.path.join(directory, "conf", "conf.d", "50-test.conf"), "w") as f:
            f.write(IMAGEIO_CONF.format(dir=directory, key=key, cert=cert, host=UPSTREAM_HOST,
                                        local=self.local_socket, control=self.control_socket,
                                        log=self.log_path))
        self.out = open(os.path.join(directory, "out.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from ovirt_imageio._internal import server; server.main()",
             "--conf-dir", os.path.join(directory, "conf")],
            stdout=self.out, stderr=self.out, cwd=directory)
        deadline = time.monotonic() + 30
        while True:
            text = open(self.log_path).read() if os.path.exists(self.log_path) else ""
            m = re.search(r"remote\.service listening on \('[^']*', (\d+)", text)
            if m and "Ready for requests" in text:
                self.port = int(m[1])
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("ovirt-imageio did not start:\n" + text)
            time.sleep(0.05)

    def add_ticket(self, url, size, ticket_id, ops=("read", "write"), **extra):
        ticket = {"uuid": ticket_id, "size": size, "ops": list(ops), "timeout": 300, "url": url,
                  **extra}
        status, body = request(UnixHTTPConnection(self.control_socket), "PUT",
                               f"/tickets/{ticket_id}", json.dumps(ticket).encode())
        assert status == 200, body

    def remove_ticket(self, ticket_id):
        request(self.control(), "DELETE", f"/tickets/{ticket_id}")

    def control(self):
        return UnixHTTPConnection(self.control_socket)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


class NbdproxyUpstream(Daemon):
    def __init__(self, directory, cert, key):
        os.makedirs(directory, exist_ok=True)
        super().__init__(directory, cert, key, args=["--host", UPSTREAM_HOST])

    def remove_ticket(self, ticket_id):
        request(self.control(), "DELETE", f"/tickets/{ticket_id}")


def proxy_daemon(directory, cert, key, *args):
    os.makedirs(directory, exist_ok=True)
    return Daemon(directory, cert, key, args=["--backend-ca-file", cert, *args])


def vm_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def tls(workdir):
    return make_cert(str(workdir))


@pytest.fixture(scope="module")
def upstreams(workdir, tls):
    """Both kinds of upstream daemon, by name."""
    started = {}
    try:
        started["nbdproxy"] = NbdproxyUpstream(str(workdir / "up-nbdproxy"), *tls)
        started["imageio"] = Imageio(str(workdir / "up-imageio"), *tls)
        yield started
    finally:
        for d in started.values():
            d.stop()


@pytest.fixture(scope="module")
def proxy(workdir, tls):
    d = proxy_daemon(str(workdir / "proxy"), *tls)
    yield d
    d.stop()


@pytest.fixture(params=["nbdproxy", "imageio"])
def kind(request):
    return request.param


_counter = iter(range(10**6))


class Image:
    """A raw image with data at 1 MiB and 9 MiB, served by qemu-nbd, an upstream ticket on it
    and a proxy ticket for that upstream ticket."""

    def __init__(self, tmp_path, upstream, kind, proxy, ops=("read", "write"),
                 upstream_ops=("read", "write"), size=SIZE, proxy_size=None, **extra):
        self.path = str(tmp_path / "disk.raw")
        with open(self.path, "wb") as f:
            f.truncate(size)
            for offset in (1 * MiB, 9 * MiB):
                if offset < size:
                    f.seek(offset)
                    f.write(os.urandom(MiB))
        self.nbd = qemu_nbd(self.path, str(tmp_path / "nbd.sock"))
        self.id = f"{kind}-{next(_counter)}"
        self.upstream, self.proxy = upstream, proxy
        upstream.add_ticket(self.nbd.url, size, ticket_id=self.id, ops=upstream_ops, **extra)
        self.upstream_url = f"https://{UPSTREAM_HOST}:{upstream.port}/images/{self.id}"
        proxy.add_ticket(self.upstream_url, proxy_size or size, ticket_id=self.id, ops=ops,
                         **extra)
        self.url = f"/images/{self.id}"
        self.size = size

    def data(self, offset=0, length=None):
        return read_export(self.nbd.sock, offset, length)

    def close(self):
        request(self.proxy.control(), "DELETE", f"/tickets/{self.id}")
        self.upstream.remove_ticket(self.id)
        self.nbd.stop()


@pytest.fixture
def image(tmp_path, upstreams, kind, proxy):
    img = Image(tmp_path, upstreams[kind], kind, proxy)
    yield img
    img.close()


# 1. The API through the proxy

def test_options(image, proxy, kind):
    status, body = request(proxy.local(), "OPTIONS", image.url)
    assert status == 200, body
    info = json.loads(body)
    assert info["features"] == ["checksum", "extents", "flush", "zero"]
    assert info["size"] == SIZE
    assert info["unix_socket"] == proxy.local_socket      # the proxy's own, not the upstream's
    # The upstream's limits (both allow 8 readers and writers), never more.
    conn = http.client.HTTPSConnection(UPSTREAM_HOST, image.upstream.port,
                                       context=ssl.create_default_context(cafile=proxy.cert))
    status, body = request(conn, "OPTIONS", image.url)
    upstream = json.loads(body)
    assert info["max_readers"] == min(upstream["max_readers"], upstream["max_writers"])
    assert info["max_writers"] <= upstream["max_writers"]


def test_options_read_only(tmp_path, upstreams, kind, proxy):
    img = Image(tmp_path, upstreams[kind], kind, proxy, ops=("read",))
    try:
        conn = proxy.local()
        resp = response(conn, "OPTIONS", img.url)
        assert json.loads(resp.data)["features"] == ["checksum", "extents"]
        assert resp.getheader("Allow") == "OPTIONS,GET"
        resp = response(conn, "PUT", img.url, body=b"x")
        assert resp.status == 403
    finally:
        img.close()


def test_download_ranges(image, proxy, kind):
    want = image.data()
    conn = proxy.local()
    resp = response(conn, "GET", image.url)
    assert resp.status == 200 and resp.data == want
    for start, end in ((0, 0), (MiB - 7, 9 * MiB + 12345), (SIZE - 100, SIZE - 1)):
        resp = response(conn, "GET", image.url, headers={"Range": f"bytes={start}-{end}"})
        assert resp.status == 206
        assert resp.getheader("Content-Range") == f"bytes {start}-{end}/{SIZE}"
        assert resp.data == want[start:end + 1]
    resp = response(conn, "GET", image.url, headers={"Range": f"bytes={SIZE}-"})
    assert resp.status == 416
    assert resp.getheader("Content-Range") == f"bytes */{SIZE}"
    # HEAD (which ovirt-imageio lacks): the headers of GET.
    resp = response(conn, "HEAD", image.url, headers={"Range": "bytes=5-9"})
    assert resp.status == 206 and resp.getheader("Content-Length") == "5"
    conn.close()


def test_upload(image, proxy, kind):
    conn = proxy.local()
    data = os.urandom(5 * MiB + 3)
    resp = response(conn, "PUT", f"{image.url}?flush=y", body=data,
                    headers={"Content-Range": f"bytes {2 * MiB}-{7 * MiB + 2}/*"})
    assert resp.status == 200, resp.data
    assert image.data(2 * MiB, len(data)) == data
    # A chunked body goes upstream as sized PUTs (ovirt-imageio takes no chunked body).
    chunked = os.urandom(3 * MiB + 5)
    pieces = (chunked[i:i + 700 * KiB] for i in range(0, len(chunked), 700 * KiB))
    conn.request("PUT", f"{image.url}?flush=n", body=pieces,
                 headers={"Content-Range": f"bytes {12 * MiB}-*/*",
                          "Transfer-Encoding": "chunked"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    resp = response(conn, "PATCH", image.url, body=b'{"op":"flush"}')
    assert resp.status == 200
    assert image.data(12 * MiB, len(chunked)) == chunked
    # Past the end: 416 before the body is read.
    resp = response(conn, "PUT", image.url, body=b"xx",
                    headers={"Content-Range": f"bytes {SIZE - 1}-{SIZE}/*"})
    assert resp.status == 416
    conn.close()


def test_zero_and_flush(image, proxy, kind):
    conn = proxy.local()
    resp = response(conn, "PATCH", image.url,
                    body=json.dumps({"op": "zero", "offset": MiB + 4096, "size": 8 * MiB,
                                     "flush": True}).encode())
    assert resp.status == 200, resp.data
    resp = response(conn, "PATCH", image.url, body=b'{"op":"flush"}')
    assert resp.status == 200
    assert image.data(MiB + 4096, 8 * MiB) == bytes(8 * MiB)
    resp = response(conn, "PATCH", image.url,
                    body=json.dumps({"op": "zero", "offset": SIZE, "size": 1}).encode())
    assert resp.status == 416
    conn.close()


def _extents(proxy, url):
    status, body = request(proxy.local(), "GET", url)
    assert status == 200, body
    return json.loads(body)


def test_extents(image, proxy, kind):
    full = _extents(proxy, f"{image.url}/extents")
    assert full[0]["start"] == 0 and full[-1]["start"] + full[-1]["length"] == SIZE
    data = [(e["start"], e["length"]) for e in full if not e["zero"]]
    # qemu-nbd reports the two data MiBs (maybe as part of larger allocated runs).
    for offset in (MiB, 9 * MiB):
        assert any(s <= offset and offset + MiB <= s + n for s, n in data)
    # A window, clipped also for ovirt-imageio, which answers its whole map.
    window = _extents(proxy, f"{image.url}/extents?context=zero&start={MiB + 5}&length={MiB}")
    assert window[0]["start"] == MiB + 5
    assert window[-1]["start"] + window[-1]["length"] == 2 * MiB + 5
    assert all(e["zero"] is False for e in window if e["start"] < 2 * MiB)
    for e in window:
        assert set(e) == {"start", "length", "zero", "hole"}


def test_dirty_extents(tmp_path, upstreams, kind, proxy):
    img = Image(tmp_path, upstreams[kind], kind, proxy, ops=("read",), dirty=True)
    img.nbd.stop()
    # A qcow2 image with a dirty bitmap that marks the MiB at 4 MiB.
    qcow2 = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, str(SIZE)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", qcow2, "b0"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 1 4M 1M", qcow2], check=True)
    img.nbd = qemu_nbd(qcow2, img.nbd.sock, "qcow2", "-B", "b0")
    try:
        dirty = _extents(proxy, f"{img.url}/extents?context=dirty")
        marked = [(e["start"], e["length"]) for e in dirty if e["dirty"]]
        assert marked == [(4 * MiB, MiB)], dirty
        window = _extents(proxy, f"{img.url}/extents?context=dirty&start={4 * MiB}&length=4096")
        assert window == [{"start": 4 * MiB, "length": 4096, "dirty": True, "zero": False}]
    finally:
        img.close()


def test_checksum(image, proxy, kind):
    status, body = request(proxy.local(), "GET", f"{image.url}/checksum")
    assert status == 200, body
    assert json.loads(body) == imageio_client.checksum(image.path)
    url = f"{image.url}/checksum?algorithm=sha256&block_size={MiB}"
    status, body = request(proxy.local(), "GET", url)
    assert json.loads(body) == imageio_client.checksum(image.path, block_size=MiB,
                                                        algorithm="sha256")


def test_keep_alive_reused(image, proxy, kind):
    """Requests on one client connection reuse one upstream connection."""
    conn = proxy.local()
    for _ in range(5):
        assert response(conn, "GET", image.url, headers={"Range": "bytes=0-99"}).status == 206
        assert response(conn, "PUT", f"{image.url}?flush=n", body=b"x" * 100).status == 200
        assert response(conn, "GET", f"{image.url}/extents?start=0&length={SIZE}").status == 200
        assert response(conn, "GET", f"{image.url}/checksum").status == 200
    status, body = request(image.upstream.control(), "GET", f"/tickets/{image.id}")
    assert json.loads(body)["connections"] == 1
    conn.close()


def test_transferred_and_ticket_life(tmp_path, upstreams, kind, proxy):
    img = Image(tmp_path, upstreams[kind], kind, proxy, ops=("write",))
    try:
        conn = proxy.local()
        assert response(conn, "PUT", img.url, body=bytes(3 * MiB)).status == 200
        assert proxy.ticket_info(img.id)["transferred"] == 3 * MiB
        # Cancel: the proxy ticket is gone; the upstream's stays.
        status, _ = request(proxy.control(), "DELETE", f"/tickets/{img.id}")
        assert status == 204
        assert response(proxy.local(), "PUT", img.url, body=b"x").status == 403
    finally:
        img.close()


def test_delete_with_download_running(tmp_path, upstreams, kind, proxy):
    img = Image(tmp_path, upstreams[kind], kind, proxy, ops=("read",), size=256 * MiB)
    try:
        conn = proxy.local()
        conn.request("GET", img.url)
        resp = conn.getresponse()
        assert resp.status == 200
        got = []

        def read_slowly():
            try:
                while data := resp.read(MiB):
                    got.append(len(data))
                    time.sleep(0.01)
            except (http.client.IncompleteRead, OSError) as e:
                got.append(e)

        reader = threading.Thread(target=read_slowly)
        reader.start()
        while not got:
            time.sleep(0.01)
        status, _ = request(proxy.control(), "DELETE", f"/tickets/{img.id}")
        assert status == 204
        reader.join(60)
        # The download stopped short: the connection closed after the current piece (read()
        # then returns b"" or raises).
        assert sum(n for n in got if isinstance(n, int)) < img.size
        conn.close()
    finally:
        img.close()


def test_expired_ticket(tmp_path, upstreams, proxy):
    img = Image(tmp_path, upstreams["nbdproxy"], "nbdproxy", proxy)
    try:
        request(proxy.control(), "PATCH", f"/tickets/{img.id}", b'{"timeout": 0}')
        time.sleep(1.1)
        assert request(proxy.local(), "OPTIONS", img.url)[0] == 403
    finally:
        img.close()


# Errors

def test_upstream_refuses_the_ticket(tmp_path, upstreams, kind, proxy):
    img = Image(tmp_path, upstreams[kind], kind, proxy)
    try:
        img.upstream.remove_ticket(img.id)
        conn = proxy.local()
        resp = response(conn, "OPTIONS", img.url)
        assert resp.status == 403, resp.data
        assert resp.getheader("Connection") == "close"
    finally:
        img.close()


def test_upstream_refuses_after_first_use(tmp_path, upstreams, kind, proxy):
    """The upstream's 403 on GET and PUT, once the proxy knows the upstream."""
    img = Image(tmp_path, upstreams[kind], kind, proxy)
    try:
        assert request(proxy.local(), "OPTIONS", img.url)[0] == 200
        img.upstream.remove_ticket(img.id)
        assert request(proxy.local(), "GET", img.url)[0] == 403
        status, body = request(proxy.local(), "PUT", img.url, body=b"y" * 1000)
        assert status == 403, body
        status, body = request(proxy.local(), "PATCH", img.url, body=b'{"op":"flush"}')
        assert status == 403, body
    finally:
        img.close()


def test_upstream_4xx_passed_on(tmp_path, upstreams, kind, proxy):
    """A dirty proxy ticket in front of an upstream ticket that is not: the upstream's 404."""
    img = Image(tmp_path, upstreams[kind], kind, proxy)
    try:
        tid = img.id + "-dirty"
        proxy.add_ticket(img.upstream_url, SIZE, ticket_id=tid, ops=["read"], dirty=True)
        status, body = request(proxy.local(), "GET", f"/images/{tid}/extents?context=dirty")
        assert status == 404, body
        request(proxy.control(), "DELETE", f"/tickets/{tid}")
    finally:
        img.close()


def test_upstream_unreachable(proxy):
    with socket.socket() as s:
        s.bind((UPSTREAM_HOST, 0))
        port = s.getsockname()[1]       # nothing listens there
    proxy.add_ticket(f"https://{UPSTREAM_HOST}:{port}/images/x", MiB, ticket_id="unreachable")
    status, body = request(proxy.local(), "GET", "/images/unreachable")
    assert status == 502
    assert f"https://{UPSTREAM_HOST}:{port}" in body.decode() and "refused" in body.decode()


def test_upstream_5xx(tmp_path, upstreams, proxy):
    """The upstream's NBD server is gone: its 500 is the proxy's 502."""
    img = Image(tmp_path, upstreams["nbdproxy"], "nbdproxy", proxy)
    try:
        img.nbd.stop()
        status, body = request(proxy.local(), "GET", img.url)
        assert status == 502, body
        assert img.upstream_url.rsplit("/images/", 1)[0] in body.decode()
    finally:
        img.close()


def test_bad_urls(proxy):
    for url in ("https:///images/x", "https://h:99999/images/x", "https://h/other/x",
                "https://h/images/a/b", "https://h/images/x?q=1"):
        ticket = {"uuid": "bad", "size": 1, "ops": ["read"], "timeout": 10, "url": url}
        status, body = request(proxy.control(), "PUT", "/tickets/bad", json.dumps(ticket).encode())
        assert status == 400 and body.startswith(b"Invalid ticket"), (url, body)


class StallingUpstream(StubServer):
    """A TCP server on UPSTREAM_HOST that answers OPTIONS and then stalls: after the head of a
    GET (mode "body") or before any answer (mode "head")."""

    def __init__(self, mode):
        self.mode = mode
        super().__init__(UPSTREAM_HOST)

    def serve(self, conn, f):
        while True:
            line, _ = read_head(f)
            if line is None:
                return
            if line.startswith(b"OPTIONS"):
                body = b'{"features":["extents"],"max_readers":1,"max_writers":1,"size":1048576}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
            elif self.mode == "body":
                conn.sendall(b"HTTP/1.1 206 Partial\r\nContent-Length: 1048576\r\n"
                             b"Content-Range: bytes 0-1048575/1048576\r\n\r\n"
                             + b"x" * 1000)
                return      # and stall
            else:
                return


@pytest.fixture(scope="module")
def quick_proxy(workdir, tls):
    """A proxy whose upstreams may stall 2 s, its backend CA a file the tests rewrite (at first
    another CA's certificate)."""
    other = str(workdir / "other-ca")
    os.makedirs(other)
    ca = str(workdir / "backend-ca.pem")
    shutil.copy(make_cert(other)[0], ca)
    d = proxy_daemon(str(workdir / "quick-proxy"), *tls, "--backend-ca-file", ca,
                     "--backend-timeout", "2")
    d.ca = ca
    yield d
    d.stop()


@pytest.mark.parametrize("mode", ["head", "body"])
def test_stalled_upstream(quick_proxy, mode):
    up = StallingUpstream(mode)
    try:
        tid = f"stall-{mode}"
        quick_proxy.add_ticket(f"http://{UPSTREAM_HOST}:{up.port}/images/x", MiB, ticket_id=tid)
        conn = quick_proxy.local()
        start = time.monotonic()
        conn.request("GET", f"/images/{tid}")
        resp = conn.getresponse()
        if mode == "head":
            assert resp.status == 502
            assert "timed out" in resp.read().decode()
        else:
            # The body started: the connection closes short of it.
            assert resp.status == 200
            with pytest.raises(http.client.IncompleteRead):
                resp.read()
        assert 1.5 < time.monotonic() - start < 30
        conn.close()
    finally:
        up.close()


def test_tls_refused_then_sighup(quick_proxy, upstreams, tmp_path, tls):
    """The proxy does not trust the upstream (another CA): 502. SIGHUP after the right CA is
    written to backend_ca_file: the same ticket works."""
    img = Image(tmp_path, upstreams["nbdproxy"], "nbdproxy", quick_proxy)
    try:
        status, body = request(quick_proxy.local(), "OPTIONS", img.url)
        assert status == 502 and b"certificate" in body, body
        shutil.copy(tls[0], quick_proxy.ca)
        quick_proxy.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reloaded backend CA" not in quick_proxy.read_log():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, body = request(quick_proxy.local(), "OPTIONS", img.url)
        assert status == 200, body
    finally:
        img.close()


# 2. A mixed deployment: real clients through the proxy

def test_imageio_client_through_proxy(tmp_path, upstreams, kind, proxy):
    img = Image(tmp_path, upstreams[kind], kind, proxy)
    try:
        src = str(tmp_path / "src.raw")
        with open(src, "wb") as f:
            f.truncate(SIZE)
            f.seek(3 * MiB)
            f.write(os.urandom(2 * MiB))
        url = f"https://localhost:{proxy.port}/images/{img.id}"
        imageio_client.upload(src, url, proxy.cert)
        assert img.data() == open(src, "rb").read()
        dst = str(tmp_path / "dst.raw")
        imageio_client.download(url, dst, proxy.cert, fmt="raw")
        assert open(dst, "rb").read() == open(src, "rb").read()
        # The transfer URL unreachable: the client falls back to proxy_url.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"https://127.0.0.1:{s.getsockname()[1]}/images/{img.id}"
        dst2 = str(tmp_path / "dst2.raw")
        imageio_client.download(dead, dst2, proxy.cert, fmt="raw", proxy_url=url)
        assert open(dst2, "rb").read() == open(src, "rb").read()
        with open(src, "r+b") as f:
            f.seek(SIZE - MiB)
            f.write(os.urandom(MiB))
        imageio_client.upload(src, dead, proxy.cert, proxy_url=url)
        assert img.data() == open(src, "rb").read()
    finally:
        img.close()


def test_nbdproxy_client_through_proxy(tmp_path, upstreams, kind, proxy):
    img = Image(tmp_path, upstreams[kind], kind, proxy)
    try:
        src = str(tmp_path / "src.raw")
        with open(src, "wb") as f:
            f.truncate(SIZE)
            f.seek(5 * MiB)
            f.write(os.urandom(3 * MiB))
        url = f"https://localhost:{proxy.port}/images/{img.id}"
        for argv in (["upload", src, url, "--verify"],
                     ["download", url, str(tmp_path / "back.raw"), "--format", "raw"]):
            subprocess.run([sys.executable, "-m", "nbdproxy", *argv, "--cafile", proxy.cert,
                            "-q"], check=True, capture_output=True, timeout=60)
        assert img.data() == open(src, "rb").read()
        assert open(tmp_path / "back.raw", "rb").read() == open(src, "rb").read()
    finally:
        img.close()


# Memory

def test_peak_rss_1gib(tmp_path, upstreams, workdir, tls):
    """A 1 GiB upload and download through a fresh proxy: its peak RSS stays below 100 MiB."""
    proxy = proxy_daemon(str(workdir / "rss-proxy"), *tls)
    img = Image(tmp_path, upstreams["nbdproxy"], "nbdproxy", proxy, size=GiB)
    try:
        piece = os.urandom(4 * MiB)
        digest = hashlib.sha256()

        def body():
            for i in range(GiB // len(piece)):
                # Different bytes in every piece, cheaply.
                data = piece[i:] + piece[:i]
                digest.update(data)
                yield data

        conn = proxy.local()
        conn.request("PUT", img.url, body=body(), headers={"Content-Length": str(GiB)})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        conn.request("GET", img.url)
        resp = conn.getresponse()
        back = hashlib.sha256()
        while True:
            data = resp.read(8 * MiB)
            if not data:
                break
            back.update(data)
        assert back.hexdigest() == digest.hexdigest()
        peak = vm_hwm(proxy.proc.pid)
        print(f"proxy peak RSS {peak / MiB:.1f} MiB")
        assert peak < 100 * MiB
        with open(img.path, "rb") as f:
            f.seek(GiB - 4 * MiB)
            i = GiB // len(piece) - 1
            assert f.read() == piece[i:] + piece[:i]
    finally:
        img.close()
        proxy.stop()


@pytest.mark.parametrize("lie", ["shifted", "no-content-range"])
def test_upstream_sending_another_range_is_502(tmp_path, cert, lie):
    """An upstream whose 206 has the length asked but another range (or none): its bytes would
    land in the wrong place of the client's image. 502, never those bytes."""
    import http.server
    size = 1024**2
    data = os.urandom(size)

    class Lying(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_OPTIONS(self):
            body = json.dumps({"features": ["extents"], "max_readers": 1, "max_writers": 1,
                               "size": size}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            start, end = map(int, self.headers["Range"][len("bytes="):].split("-"))
            n = end - start + 1
            self.send_response(206)
            if lie == "shifted":
                self.send_header("Content-Range", f"bytes 0-{n - 1}/{size}")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            self.wfile.write(data[:n])

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Lying)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    d = Daemon(str(tmp_path / "proxy"), *cert)
    try:
        d.add_ticket(f"http://127.0.0.1:{upstream.server_address[1]}/images/x", size,
                     ops=["read"], ticket_id="x")
        status, body = request(d.local(), "GET", "/images/x", headers={"Range": "bytes=4096-8191"})
        assert status == 502, body
        assert b"Content-Range" in body or b"upstream" in body.lower()
    finally:
        d.stop()
        upstream.shutdown()
        upstream.server_close()
