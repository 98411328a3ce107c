"""Defects a hostile review of issues 13-15 found (image tickets opening other host files through
a probed format, an unsafe run_dir, proxy upstreams sending interim answers or endless extents,
CORS on the 503 of a full service); each test failed before its fix."""

import json
import os
import subprocess
import threading
import time

import pytest

from support import Daemon, StubServer, raw_exchange, read_head, request

MiB = 1024**2

SECRET = b"TOPSECRET host file contents\n"


def put_ticket(daemon, tid, body):
    body = {"uuid": tid, "timeout": 300, **body}
    status, data = request(daemon.control(), "PUT", f"/tickets/{tid}", json.dumps(body).encode())
    return status, data.decode(errors="replace")


@pytest.fixture(scope="module")
def idaemon(workdir):
    d = Daemon(str(workdir / "d"), args=["--run-dir", str(workdir / "d" / "run"),
                                         "--remove-timeout", "2"])
    yield d
    d.stop()


@pytest.fixture
def secret(tmp_path):
    path = str(tmp_path / "secret")
    with open(path, "wb") as f:
        f.write(SECRET)
        f.truncate(MiB)
    return path


def _served(daemon, tid, length):
    status, data = request(daemon.local(), "GET", f"/images/{tid}",
                           headers={"Range": f"bytes=0-{length - 1}"})
    request(daemon.control(), "DELETE", f"/tickets/{tid}")
    return status, data


# Image tickets: a probed format must not open other host files (API.md 7d: "a guest can write
# a qcow2 header into a raw disk"). Only backing files are refused; these open others too.

def test_probed_qcow2_with_external_data_file_is_refused(idaemon, secret, tmp_path):
    guest = str(tmp_path / "guest.img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={secret},data_file_raw=on", guest, "1M"], check=True)
    with open(secret, "r+b") as f:     # qemu-img create zeroed it; the host file's own bytes
        f.write(SECRET)
    status, body = put_ticket(idaemon, "df", {"ops": ["read"], "image": {"path": guest}})
    if status == 200:
        _, data = _served(idaemon, "df", len(SECRET))
        assert not data.startswith(SECRET), "served another host file through the data-file"
    assert status == 400, body


def test_probed_vmdk_descriptor_is_refused(idaemon, secret, tmp_path):
    guest = str(tmp_path / "guest.img")
    with open(guest, "w") as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                f'createType="monolithicFlat"\n\nRW 2048 FLAT "{secret}" 0\n')
    os.truncate(guest, MiB)
    status, body = put_ticket(idaemon, "vmdk", {"ops": ["read"], "image": {"path": guest}})
    if status == 200:
        _, data = _served(idaemon, "vmdk", len(SECRET))
        assert not data.startswith(SECRET), "served another host file through a vmdk extent"
    assert status == 400, body


# Proxy tickets in front of a scripted upstream.

class Scripted(StubServer):
    """An HTTP/1.1 upstream on 127.0.0.1 whose answers a function writes as raw bytes:
    answer(method, path, headers, body) -> bytes, or None to close the connection."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = []
        super().__init__()

    def url(self, name="x"):
        return f"http://127.0.0.1:{self.port}/images/{name}"

    def serve(self, conn, f):
        while True:
            line, headers = read_head(f)
            if line is None:
                return
            method, path, _ = line.decode().split(" ", 2)
            body = f.read(int(headers.get("content-length", 0)))
            self.requests.append((method, path, headers))
            out = self.answer(method, path, headers, body)
            if out is None:
                conn.close()
                return
            conn.sendall(out)


def http_answer(status, body=b"", headers=()):
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode() + b"\r\n" + body


def options_answer(size, features=("extents", "zero", "flush", "checksum"), readers=4):
    return http_answer("200 OK", json.dumps({"features": list(features), "max_readers": readers,
                                              "max_writers": readers, "size": size}).encode(),
                       [("Content-Type", "application/json")])


@pytest.fixture(scope="module")
def pdaemon(workdir):
    d = Daemon(str(workdir / "proxy"), args=["--backend-timeout", "5"])
    yield d
    d.stop()


def add(daemon, tid, url, size, ops=("read",), **extra):
    status, body = put_ticket(daemon, tid, {"url": url, "size": size, "ops": list(ops), **extra})
    assert status == 200, body


def test_upstream_1xx_interim_answer_is_skipped(pdaemon):
    """An upstream that sends an interim 1xx (103 Early Hints, RFC 8297) before its answer, as
    any HTTP/1.1 server may: the final answer is the one that counts. The proxy takes the 103
    as the answer (502) and leaves the real one on the kept connection for the next request."""
    data = bytes(range(256)) * 16

    def answer(method, path, headers, body):
        hint = b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
        if method == "OPTIONS":
            return hint + options_answer(len(data))
        a, b = map(int, headers["range"][len("bytes="):].split("-"))
        return hint + http_answer("206 Partial Content", data[a:b + 1],
                                  [("Content-Range", f"bytes {a}-{b}/{len(data)}")])

    up = Scripted(answer)
    try:
        add(pdaemon, "hint", up.url(), len(data))
        conn = pdaemon.local()
        for a, b in ((0, 99), (100, 4095)):
            conn.request("GET", "/images/hint", headers={"Range": f"bytes={a}-{b}"})
            resp = conn.getresponse()
            got = resp.read()
            assert (resp.status, got) == (206, data[a:b + 1]), (resp.status, got[:80])
        conn.close()
    finally:
        request(pdaemon.control(), "DELETE", "/tickets/hint")
        up.close()


# CORS (API.md 7c): error responses (5xx) to a page's requests carry the CORS headers.

def test_503_too_many_connections_has_cors_headers(tmp_path):
    """The daemon's 503 to a connection over max_connections is written by the server, not the
    app, and has no Access-Control-Allow-Origin: the page sees an opaque network failure
    instead of a 503 it can read (and retry)."""
    path = str(tmp_path / "disk")
    with open(path, "wb") as f:
        f.truncate(MiB)
    d = Daemon(str(tmp_path / "d"), args=["--max-connections", "1"])
    try:
        add(d, "t", f"file://{path}", MiB)
        kept = d.local()
        kept.request("OPTIONS", "/images/t")
        kept.getresponse().read()
        out = raw_exchange(d.local_socket, b"GET /images/t HTTP/1.1\r\nHost: x\r\n"
                           b"Origin: https://ui.example\r\nRange: bytes=0-99\r\n\r\n", 15)
        kept.close()
        head = out.split(b"\r\n\r\n")[0].decode()
        assert head.startswith("HTTP/1.1 503"), head
        assert "access-control-allow-origin: *" in head.lower(), head
    finally:
        d.stop()


def test_upstream_extents_that_never_end_can_be_deleted(workdir):
    """An upstream whose extents answer is "[" and then whitespace without end (or any JSON
    that never completes an item): the proxy parses it forever, burning a core. check() runs
    only per extent, so neither DELETE (API.md 5: running requests stop after their current
    piece) nor backend_timeout (the upstream never stalls) ends the request."""
    stop = threading.Event()

    def answer(method, path, headers, body):
        if method == "OPTIONS":
            return options_answer(MiB)
        return None

    up = Scripted(answer)

    # Extents: an answer without a length whose body never ends.
    def endless(conn, f):
        while True:
            line, _ = read_head(f)
            if line is None:
                return
            if line.startswith(b"OPTIONS"):
                conn.sendall(options_answer(MiB))
                continue
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\n\r\n[")
            while not stop.is_set():
                conn.sendall(b" " * 65536)
                time.sleep(0.01)
            return

    up.serve = endless
    d = Daemon(str(workdir / "endless"), args=["--backend-timeout", "2", "--remove-timeout", "3"])
    try:
        add(d, "e", up.url(), MiB)
        result = {}

        def client():
            try:
                result["status"] = request(d.local(), "GET", "/images/e/extents")[0]
            except Exception as e:
                result["error"] = e

        t = threading.Thread(target=client, daemon=True)
        t.start()
        time.sleep(1)
        start = time.monotonic()
        status, body = request(d.control(), "DELETE", "/tickets/e")
        assert status == 204, (status, body, time.monotonic() - start)
        t.join(10)
        assert not t.is_alive(), "the extents request still runs after DELETE"
    finally:
        stop.set()
        up.close()
        d.stop()


def test_existing_run_dir_open_to_others_is_not_trusted(tmp_path):
    """run_dir is "created 0700" (API.md 7d), but one that existed was used as it was: with
    --run-dir on a directory others can write, another local user could swap a ticket's
    qemu-nbd socket for a server of their own. Such a run_dir is a bad setting: one line, exit
    1 (changing the mode of an operator's directory could break what else uses it)."""
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    with pytest.raises(RuntimeError) as e:
        Daemon(str(tmp_path / "d"), args=["--run-dir", str(run)])
    assert "exited with 1" in str(e.value) or "exited with" in str(e.value)
    assert f"run_dir: run_dir {run} may be written by others" in str(e.value)
    assert "Traceback" not in str(e.value)
    os.chmod(run, 0o700)
    d = Daemon(str(tmp_path / "d2"), args=["--run-dir", str(run)])
    d.stop()
