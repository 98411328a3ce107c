"""Faults (issue 6, points 1, 2, 5, 7, 8): the NBD server killed in the middle of a transfer,
clients that go away, DELETE under load, durability of a flush, and SIGTERM with transfers running.

Everything here is real: qemu-nbd processes killed with SIGKILL, the daemon as a subprocess,
clients on raw sockets.
"""

import collections
import errno
import http.client
import json
import os
import signal
import socket
import threading
import time
import warnings

import pytest

from support import Daemon, nbdkit, qemu_nbd, read_export, read_qcow2, request, restart

MiB = 1024**2

# With --buffer-size 1 MiB a request moves in pieces of 256 KiB (a quarter of the buffer, the
# daemon's default depth): small pieces make "no further than the current piece" measurable.
SMALL_BUFFER = ["--buffer-size", str(MiB)]
SMALL_PIECE = MiB // 4


# Helpers

def make_image(path, size, seed=1):
    """A sparse raw image with 1 MiB of distinct data every 8 MiB; returns its bytes' reader."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, offset in enumerate(range(0, size, 8 * MiB)):
            f.seek(offset)
            f.write(bytes([(seed * 31 + i) % 251 + 1]) * 4096 * 256)
    return path


def file_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


class Client:
    """One HTTP/1.1 connection on a raw socket, for requests that stop half way."""

    def __init__(self, address, timeout=10):
        self.sock = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buf = b""
        self.received = 0

    def send(self, method, path, headers=None, body=b""):
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)

    def head(self):
        """(status, {lower-case name: value}) of the next response."""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a response head: {self.buf[:200]!r}")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def read(self, n):
        """Up to n body bytes; fewer only if the connection closed."""
        out = bytearray(self.buf[:n])
        self.buf = self.buf[n:]
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1024 * 1024))
            if not chunk:
                break
            out += chunk
        self.received += len(out)
        return bytes(out)

    def drain(self, rate=None, step=64 * 1024):
        """Read until the connection closes; at most rate bytes/s when given. Returns the count."""
        total = len(self.buf)
        self.buf = b""
        while True:
            try:
                chunk = self.sock.recv(step)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            total += len(chunk)
            if rate:
                time.sleep(len(chunk) / rate)
        self.received += total
        return total

    def close(self):
        self.sock.close()


def exchange(daemon, method, path, body=None, headers=None):
    return request(daemon.local(), method, path, body, headers)


def threads_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])


def wait_until(predicate, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


def put_headers(offset, length, **extra):
    return {"Content-Length": str(length),
            "Content-Range": f"bytes {offset}-{offset + length - 1}/*", **extra}


def log_errors(daemon):
    return [line for line in daemon.read_log().splitlines()
            if "Traceback" in line or "connection failed" in line and "ERROR" in line]


# 1. The NBD server is killed during a GET and during a PUT

@pytest.fixture
def two_exports(tmp_path):
    """Export "a" (raw, 128 MiB, killed by the tests) and export "b" (raw, 16 MiB, left alone)."""
    a_path = make_image(str(tmp_path / "a.raw"), 128 * MiB, seed=1)
    b_path = make_image(str(tmp_path / "b.raw"), 16 * MiB, seed=2)
    servers = {"a": qemu_nbd(a_path, str(tmp_path / "a.sock")),
               "b": qemu_nbd(b_path, str(tmp_path / "b.sock"))}
    yield servers, {"a": a_path, "b": b_path}
    for server in servers.values():
        server.stop()


def check_other_ticket(daemon, path):
    status, data = exchange(daemon, "GET", "/images/b", headers={"Range": "bytes=0-2097151"})
    assert status == 206
    assert data == file_bytes(path, 0, 2 * MiB)


def warm_pool(daemon, ticket_id, n=3):
    """Leave n idle NBD handles in the ticket's pool: n GETs that overlap in time."""
    clients = [Client(daemon.local_socket) for _ in range(n)]
    for c in clients:
        c.send("GET", f"/images/{ticket_id}", {"Range": "bytes=0-8388607"})
    for c in clients:
        assert c.head()[0] == 206
    time.sleep(0.2)      # every request now holds a handle, blocked on its socket
    for c in clients:
        assert len(c.read(8 * MiB)) == 8 * MiB
        c.close()


def test_nbd_killed_during_get(tmp_path, cert, two_exports):
    servers, paths = two_exports
    d = Daemon(str(tmp_path), *cert)
    try:
        d.add_ticket(servers["a"].url, 128 * MiB, ticket_id="a")
        d.add_ticket(servers["b"].url, 16 * MiB, ticket_id="b")
        warm_pool(d, "a")
        threads = threads_of(d.proc.pid)

        c = Client(d.local_socket)
        c.send("GET", "/images/a")
        status, headers = c.head()
        assert status == 200 and int(headers["content-length"]) == 128 * MiB
        first = c.read(MiB)
        assert first == file_bytes(paths["a"], 0, MiB)
        servers["a"].kill()
        t0 = time.monotonic()
        rest = c.drain()
        # Streaming had begun: the connection is closed before the whole image was sent.
        assert MiB + rest < 128 * MiB
        assert time.monotonic() - t0 < 5
        c.close()

        # The daemon serves the other ticket, shows the broken one, which is not active.
        check_other_ticket(d, paths["b"])
        assert wait_until(lambda: not d.ticket_info("a")["active"], 1)

        # A new server on the same socket is used by the very next request (the pool still
        # holds the handles of the warm-up, connected to the dead server), and the ones after.
        servers["a"] = restart(servers["a"])
        status, data = exchange(d, "GET", "/images/a", headers={"Range": f"bytes={8 * MiB}-"
                                                                          f"{10 * MiB - 1}"})
        assert status == 206
        assert data == file_bytes(paths["a"], 8 * MiB, 2 * MiB)
        for i in range(4):
            status, data = exchange(d, "GET", "/images/a",
                                    headers={"Range": f"bytes={i * 8 * MiB}-{i * 8 * MiB + 4095}"})
            assert status == 206 and data == file_bytes(paths["a"], i * 8 * MiB, 4096)
        assert wait_until(lambda: threads_of(d.proc.pid) <= threads, 2)

        status, _ = request(d.control(), "DELETE", "/tickets/a")
        assert status == 204
        status, _ = request(d.control(), "GET", "/tickets/a")
        assert status == 404
        check_other_ticket(d, paths["b"])
        assert not log_errors(d)
    finally:
        assert d.stop() == 0


def test_nbd_killed_during_put(tmp_path, cert, two_exports):
    servers, paths = two_exports
    d = Daemon(str(tmp_path), *cert)
    try:
        d.add_ticket(servers["a"].url, 128 * MiB, ops=["write"], ticket_id="a")
        d.add_ticket(servers["b"].url, 16 * MiB, ticket_id="b")
        warm_pool(d, "a")      # reads through the write ticket count as transferred too
        threads = threads_of(d.proc.pid)
        transferred = d.ticket_info("a")["transferred"]

        length = 64 * MiB
        c = Client(d.local_socket)
        c.send("PUT", "/images/a", put_headers(0, length))
        c.sock.sendall(b"\x55" * (8 * MiB))
        time.sleep(0.2)
        servers["a"].kill()
        sent = 8 * MiB
        try:
            while sent < length:
                c.sock.sendall(b"\x55" * MiB)
                sent += MiB
        except OSError as e:
            assert e.errno in (errno.EPIPE, errno.ECONNRESET)
        try:
            status, _ = c.head()
        except (ConnectionError, OSError):
            status = None       # closed (or reset) before the answer could be read
        assert status in (None, 500)
        c.close()

        check_other_ticket(d, paths["b"])
        info = wait_until(lambda: (lambda i: not i["active"] and i)(d.ticket_info("a")), 1)
        assert info, "the ticket stayed active"
        # The failed upload is not reported as transferred.
        assert info["transferred"] == transferred

        servers["a"] = restart(servers["a"])
        data = os.urandom(4 * MiB)
        status, body = exchange(d, "PUT", "/images/a", data, put_headers(64 * MiB, len(data)))
        assert status == 200, body
        assert read_export(servers["a"].sock, 64 * MiB, len(data)) == data
        assert file_bytes(paths["a"], 64 * MiB, len(data)) == data
        assert d.ticket_info("a")["transferred"] == transferred + len(data)
        assert wait_until(lambda: threads_of(d.proc.pid) <= threads, 2)

        status, _ = request(d.control(), "DELETE", "/tickets/a")
        assert status == 204
        check_other_ticket(d, paths["b"])
        assert not log_errors(d)
    finally:
        assert d.stop() == 0


def test_nbd_dead_between_requests(tmp_path, cert, two_exports):
    """Killed between requests, with idle handles in the pool: while it is down every kind of
    request fails (500, or closed once streaming began) and none hangs; after a restart the next
    request works."""
    servers, paths = two_exports
    d = Daemon(str(tmp_path), *cert)
    try:
        d.add_ticket(servers["a"].url, 128 * MiB, ticket_id="a")
        d.add_ticket(servers["b"].url, 16 * MiB, ticket_id="b")
        # Killed and restarted between two requests: the next one works, for each kind.
        for method, body, headers, ok in (
                ("PUT", b"z" * 4096, put_headers(4096, 4096), 200),
                ("GET", None, {"Range": "bytes=0-1048575"}, 206),
                ("PATCH", b'{"op":"zero","offset":8192,"size":4096,"flush":true}', {}, 200),
                ("PATCH", b'{"op":"flush"}', {}, 200)):
            warm_pool(d, "a")
            servers["a"].kill()
            servers["a"] = restart(servers["a"])
            status, _ = exchange(d, method, "/images/a", body, headers)
            assert status == ok, method
        assert file_bytes(paths["a"], 4096, 8192) == b"z" * 4096 + bytes(4096)

        warm_pool(d, "a")
        servers["a"].kill()
        for method, body, headers in (("GET", None, {"Range": "bytes=0-1048575"}),
                                      ("PUT", b"x" * 4096, put_headers(0, 4096)),
                                      ("PATCH", b'{"op":"flush"}', {}),
                                      ("GET", None, {}),
                                      ("PATCH", b'{"op":"zero","size":4096}', {})):
            try:
                status, _ = exchange(d, method, "/images/a", body, headers)
            except (ConnectionError, http.client.HTTPException):
                status = None       # the head went out, then the connection was closed
            assert status in (None, 500), (method, status)
        check_other_ticket(d, paths["b"])
        assert d.ticket_info("a")["active"] is False
        servers["a"] = restart(servers["a"])
        status, data = exchange(d, "GET", "/images/a", headers={"Range": "bytes=0-1048575"})
        assert status == 206 and data == file_bytes(paths["a"], 0, MiB)
        status, _ = exchange(d, "PUT", "/images/a", b"y" * 4096, put_headers(0, 4096))
        assert status == 200
        assert file_bytes(paths["a"], 0, 4096) == b"y" * 4096
    finally:
        assert d.stop() == 0


# 2. The client goes away in the middle of a GET or a PUT

@pytest.fixture
def one_export(tmp_path):
    path = make_image(str(tmp_path / "disk.raw"), 64 * MiB)
    server = qemu_nbd(path, str(tmp_path / "nbd.sock"))
    yield server, path
    server.stop()


def test_client_gone_mid_get(tmp_path, cert, one_export):
    server, path = one_export
    # One NBD connection per ticket: a handle that was not given back would block the next request.
    d = Daemon(str(tmp_path), *cert, args=["--nbd-connections", "1"])
    try:
        d.add_ticket(server.url, 64 * MiB, ops=["read"])
        threads = threads_of(d.proc.pid)
        for round_ in range(3):
            c = Client(d.local_socket)
            c.send("GET", "/images/test")
            assert c.head()[0] == 200
            assert c.read(2 * MiB) == file_bytes(path, 0, 2 * MiB)
            assert d.ticket_info()["active"] is True
            c.close()
            t0 = time.monotonic()
            assert wait_until(lambda: not d.ticket_info()["active"], 1), "still active after 1 s"
            assert time.monotonic() - t0 < 1
            assert wait_until(lambda: threads_of(d.proc.pid) <= threads, 1)
            # The NBD connection was given back: the next request gets it at once.
            status, data = exchange(d, "GET", "/images/test",
                                    headers={"Range": f"bytes={8 * MiB}-{9 * MiB - 1}"})
            assert status == 206 and data == file_bytes(path, 8 * MiB, MiB)
        # Only the completed ranges count (3 x 1 MiB at the same place).
        assert d.ticket_info()["transferred"] == MiB
    finally:
        assert d.stop() == 0


def test_client_gone_mid_put(tmp_path, cert, one_export):
    server, path = one_export
    d = Daemon(str(tmp_path), *cert, args=["--nbd-connections", "1"])
    try:
        d.add_ticket(server.url, 64 * MiB, ops=["write"])
        threads = threads_of(d.proc.pid)
        c = Client(d.local_socket)
        c.send("PUT", "/images/test", put_headers(0, 32 * MiB))
        c.sock.sendall(b"\xaa" * (12 * MiB))
        # Wait until the daemon has written some of it: progress shows while it runs.
        assert wait_until(lambda: d.ticket_info()["transferred"] > 0, 5)
        assert d.ticket_info()["active"] is True
        c.close()
        info = wait_until(lambda: (lambda i: not i["active"] and i)(d.ticket_info()), 1)
        assert info, "still active 1 s after the client left"
        assert info["transferred"] == 0
        assert wait_until(lambda: threads_of(d.proc.pid) <= threads, 1)

        # A client that announces more than it sends, then half-closes: 400, nothing counted.
        c = Client(d.local_socket)
        c.send("PUT", "/images/test", put_headers(0, 4 * MiB))
        c.sock.sendall(b"\xbb" * MiB)
        c.sock.shutdown(socket.SHUT_WR)
        status, _ = c.head()
        assert status == 400
        c.close()
        assert wait_until(lambda: not d.ticket_info()["active"], 1)
        assert d.ticket_info()["transferred"] == 0

        # The NBD connection was released: a complete PUT goes through and counts.
        data = os.urandom(3 * MiB)
        status, _ = exchange(d, "PUT", "/images/test", data, put_headers(5 * MiB, len(data)))
        assert status == 200
        assert file_bytes(path, 5 * MiB, len(data)) == data
        assert d.ticket_info()["transferred"] == len(data)
    finally:
        assert d.stop() == 0


# 5. DELETE under load

def _load_worker(daemon, kind, ticket_id, seen, stop):
    """Requests of one kind in a loop until the ticket refuses (403) or stop is set."""
    from nbdproxy.client.connections import UnixHTTPConnection
    conn = UnixHTTPConnection(daemon.local_socket, timeout=20)
    data = b"\x77" * (4 * MiB)
    i = 0
    while not stop.is_set():
        i += 1
        offset = (i % 8) * 4 * MiB
        try:
            if kind == "get":
                conn.request("GET", f"/images/{ticket_id}",
                             headers={"Range": f"bytes={offset}-{offset + 16 * MiB - 1}"})
            elif kind == "put":
                conn.request("PUT", f"/images/{ticket_id}?flush=n", body=data,
                             headers=put_headers(offset, len(data)))
            elif kind == "zero":
                conn.request("PATCH", f"/images/{ticket_id}",
                             body=json.dumps({"op": "zero", "offset": offset,
                                              "size": 8 * MiB}).encode())
            elif kind == "flush":
                conn.request("PATCH", f"/images/{ticket_id}", body=b'{"op":"flush"}')
            else:
                conn.request("OPTIONS", f"/images/{ticket_id}")
            resp = conn.getresponse()
            resp.read()
            seen[resp.status] += 1
            if resp.status == 403:
                break
        except Exception as e:      # a request cut by the cancel: closed connection
            seen[type(e).__name__] += 1
            conn.close()
    conn.close()


def test_delete_under_load(tmp_path, cert, one_export):
    server, path = one_export
    d = Daemon(str(tmp_path), *cert, args=["--remove-timeout", "2"])
    seen = collections.Counter()
    deletes = collections.Counter()
    try:
        for round_ in range(3):
            d.add_ticket(server.url, 64 * MiB)
            stop = threading.Event()
            workers = [threading.Thread(target=_load_worker, args=(d, kind, "test", seen, stop))
                       for kind in ("get", "get", "get", "put", "put", "zero", "flush",
                                    "options")]
            for w in workers:
                w.start()
            time.sleep(0.4)
            status, body = request(d.control(), "DELETE", "/tickets/test")
            deletes[status] += 1
            assert status in (204, 409), body
            if status == 204:
                status, _ = request(d.control(), "GET", "/tickets/test")
                assert status == 404
            for w in workers:
                w.join(20)
                assert not w.is_alive(), "a client is stuck after the DELETE"
            stop.set()
            status, _ = request(d.control(), "DELETE", "/tickets/test")
            assert status == 204
        # Nothing failed on the server side: only successes, 403 after the cancel, and
        # connections closed by the cancel in the middle of a response.
        assert not any(isinstance(k, int) and k >= 500 for k in seen), seen
        assert set(k for k in seen if isinstance(k, int)) <= {200, 206, 403}, seen
        assert seen[200] + seen[206] > 10, seen
        assert not log_errors(d)
    finally:
        assert d.stop() == 0
    print(f"DELETE under load: deletes={dict(deletes)} requests={dict(seen)}")


@pytest.mark.parametrize("stalled", [False, True], ids=["reading", "stalled"])
def test_delete_stops_get_after_current_piece(tmp_path, cert, one_export, stalled):
    """A GET canceled while its client reads (DELETE answers 204), or while its client has stopped
    reading so the current piece cannot go out (409 at --remove-timeout, the ticket stays
    canceled): either way the client gets no more than the rest of the current piece."""
    server, path = one_export
    d = Daemon(str(tmp_path), *cert, args=["--remove-timeout", "1"] + SMALL_BUFFER)
    try:
        d.add_ticket(server.url, 64 * MiB)
        c = Client(d.local_socket, timeout=20)
        c.send("GET", "/images/test")
        assert c.head()[0] == 200
        assert c.read(2 * MiB) == file_bytes(path, 0, 2 * MiB)
        result = {}
        if stalled:
            time.sleep(0.3)     # the daemon fills the socket and blocks inside a piece
            reader = threading.Thread(target=lambda: (time.sleep(1.5),
                                                      result.update(n=c.drain())))
        else:
            reader = threading.Thread(target=lambda: result.update(n=c.drain(rate=4 * MiB)))
        before = c.received
        reader.start()
        t0 = time.monotonic()
        status, _ = request(d.control(), "DELETE", "/tickets/test")
        assert status == (409 if stalled else 204)
        assert time.monotonic() - t0 < 1.5
        reader.join(30)
        assert not reader.is_alive()
        after = result["n"]
        # What came after the cancel: the rest of the current piece and what the sockets held.
        assert after <= SMALL_PIECE + MiB, after
        assert before + after < 64 * MiB
        if stalled:
            assert d.ticket_info()["canceled"] is True
            status, _ = exchange(d, "GET", "/images/test", headers={"Range": "bytes=0-0"})
            assert status == 403
            assert wait_until(lambda: request(d.control(), "DELETE", "/tickets/test")[0] == 204,
                              5)
        status, _ = request(d.control(), "GET", "/tickets/test")
        assert status == 404
        assert not log_errors(d)
    finally:
        assert d.stop() == 0


def test_delete_stops_put_after_current_piece(tmp_path, cert, one_export):
    server, path = one_export
    # A zeroed image, and an upload of a non-zero pattern that is canceled after 4 MiB.
    with open(path, "r+b") as f:
        f.truncate(0)
        f.truncate(64 * MiB)
    d = Daemon(str(tmp_path), *cert, args=["--remove-timeout", "5"] + SMALL_BUFFER)
    try:
        d.add_ticket(server.url, 64 * MiB, ops=["write"])
        c = Client(d.local_socket, timeout=20)
        c.send("PUT", "/images/test?flush=n", put_headers(0, 32 * MiB))
        c.sock.sendall(b"\xab" * (4 * MiB))
        # Most of it is acknowledged (the last pieces may still be in flight), and the daemon is
        # waiting for the next piece of the body.
        assert wait_until(lambda: d.ticket_info()["transferred"] >= 3 * MiB, 5)
        time.sleep(0.2)
        result = {}
        deleter = threading.Thread(
            target=lambda: result.update(status=request(d.control(), "DELETE",
                                                        "/tickets/test")[0]))
        deleter.start()
        assert wait_until(lambda: d.ticket_info()["canceled"], 2)
        # The client goes on sending as fast as it can.
        sent = 4 * MiB
        try:
            while sent < 32 * MiB:
                c.sock.sendall(b"\xab" * SMALL_PIECE)
                sent += SMALL_PIECE
        except OSError:
            pass
        deleter.join(10)
        assert result["status"] == 204
        try:
            status = c.head()[0]
        except (ConnectionError, OSError):
            status = None
        assert status in (None, 403)
        c.close()
        with open(path, "rb") as f:
            data = f.read()
        written = len(data) - data.count(0)
        # The bytes before the cancel, and at most the piece the daemon was reading then.
        assert 4 * MiB <= written <= 4 * MiB + SMALL_PIECE, (written, sent)
        assert data[:written] == b"\xab" * written
    finally:
        assert d.stop() == 0


# 7. Durability: an answered flush survives a SIGKILL of qemu-nbd

def test_flushed_data_survives_kill(tmp_path, cert):
    import subprocess
    image = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    sock = str(tmp_path / "nbd.sock")
    check_sock = str(tmp_path / "check.sock")
    server = qemu_nbd(image, sock, "qcow2")
    d = Daemon(str(tmp_path), *cert)
    kills = 0
    try:
        d.add_ticket(server.url, 64 * MiB)

        # PUT with flush=y (the default), then SIGKILL right after the 200.
        a = os.urandom(4 * MiB)
        status, _ = exchange(d, "PUT", "/images/test", a, put_headers(MiB, len(a)))
        assert status == 200
        server.kill()
        kills += 1
        assert read_qcow2(image, check_sock, MiB, len(a)) == a
        server = restart(server)

        # PUT with flush=n on one connection (left open), PATCH flush on another.
        b = os.urandom(4 * MiB)
        keep = d.local()
        keep.request("PUT", "/images/test?flush=n", body=b, headers=put_headers(16 * MiB, len(b)))
        resp = keep.getresponse()
        resp.read()
        assert resp.status == 200
        status, _ = exchange(d, "PATCH", "/images/test", b'{"op":"flush"}')
        assert status == 200
        server.kill()
        kills += 1
        keep.close()
        assert read_qcow2(image, check_sock, 16 * MiB, len(b)) == b
        assert read_qcow2(image, check_sock, MiB, len(a)) == a
        server = restart(server)

        # PATCH zero with flush: the zeros are there after a kill.
        status, _ = exchange(d, "PATCH", "/images/test",
                             b'{"op":"zero","offset":2097152,"size":1048576,"flush":true}')
        assert status == 200
        server.kill()
        kills += 1
        got = read_qcow2(image, check_sock, MiB, len(a))
        assert got == a[:MiB] + bytes(MiB) + a[2 * MiB:]
        server = restart(server)

        # The check can see a loss: without a flush, qemu-nbd keeps qcow2 metadata in memory.
        c = os.urandom(MiB)
        status, _ = exchange(d, "PUT", "/images/test?flush=n", c, put_headers(40 * MiB, len(c)))
        assert status == 200
        server.kill()
        kills += 1
        if read_qcow2(image, check_sock, 40 * MiB, len(c)) == c:
            warnings.warn("an unflushed qcow2 write survived SIGKILL; this run could not have "
                          "told a missing flush")
        server = restart(server)
        assert not log_errors(d)
    finally:
        assert d.stop() == 0
        server.stop()
    assert kills == 4


# 8. SIGTERM while transfers run

def test_sigterm_with_transfers_running(tmp_path, cert, one_export):
    server, path = one_export
    d = Daemon(str(tmp_path), *cert, args=["--stop-timeout", "3"] + SMALL_BUFFER)
    try:
        d.add_ticket(server.url, 64 * MiB)
        # A download read at ~24 MiB/s (1.3 s in all): finishes within the stop timeout.
        fast = Client(d.local_socket, timeout=20)
        fast.send("GET", "/images/test", {"Range": f"bytes=0-{32 * MiB - 1}"})
        assert fast.head()[0] == 206
        # An upload sent over ~1 s: finishes, and its data is written.
        upload = os.urandom(16 * MiB)
        up = Client(d.local_socket, timeout=20)
        up.send("PUT", "/images/test", put_headers(32 * MiB, len(upload)))
        up.sock.sendall(upload[:MiB])
        # A download read at 256 KiB/s (4 minutes): cut at the stop timeout.
        slow = Client(d.local_socket, timeout=20)
        slow.send("GET", "/images/test")
        assert slow.head()[0] == 200
        # An idle keep-alive connection, and one on the TLS port.
        idle = Client(d.local_socket)
        idle.send("OPTIONS", "/images/test")
        assert idle.head()[0] == 200
        idle.buf = b""

        results = {}

        def run_fast():
            data = bytearray()
            while len(data) < 32 * MiB:
                data += fast.read(MiB)
                time.sleep(1 / 24)
            results["fast"] = data == file_bytes(path, 0, 32 * MiB)

        def run_upload():
            for i in range(1, 16):
                up.sock.sendall(upload[i * MiB:(i + 1) * MiB])
                time.sleep(0.06)
            results["upload"] = up.head()[0]

        def run_slow():
            results["slow"] = slow.drain(rate=256 * 1024)

        threads = [threading.Thread(target=f) for f in (run_fast, run_upload, run_slow)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        # No new connections: the socket file goes and the TCP port refuses.
        assert wait_until(lambda: not os.path.exists(d.local_socket), 2)
        with pytest.raises(OSError):
            Client(d.local_socket)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", d.port), timeout=2).close()
        # The idle connection is closed at once.
        assert idle.drain() == 0
        assert time.monotonic() - t0 < 1.5
        rc = d.proc.wait(10)
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        assert rc == 0
        # Running requests had up to --stop-timeout (3 s); then the daemon exits.
        assert elapsed < 3 + 2, elapsed
        assert results["fast"] is True
        assert results["upload"] == 200
        assert file_bytes(path, 32 * MiB, len(upload)) == upload
        assert results["slow"] < 64 * MiB - MiB
        assert elapsed >= 2.5     # it did wait for the slow one, up to the bound
        log = d.read_log()
        assert "still running after 3 s" in log and "stopped" in log
        assert "Traceback" not in log
    finally:
        d.stop()


def test_hung_nbd_server_fails_the_request_at_nbd_timeout(tmp_path, cert):
    """A server that stops answering (not dead: its socket stays open) costs a request its
    --nbd-timeout, then a 500 and a log line; nothing hangs, other tickets go on."""
    d = Daemon(str(tmp_path / "d"), *cert, args=["--nbd-timeout", "2"])
    slow = nbdkit(str(tmp_path / "slow.sock"), "--filter=delay", "memory", "size=16M",
                  "delay-write=60", "delay-read=60")
    good = nbdkit(str(tmp_path / "good.sock"), "memory", "size=16M")
    try:
        d.add_ticket(slow.url, 16 * MiB, ticket_id="slow")
        d.add_ticket(good.url, 16 * MiB, ticket_id="good")
        started = time.monotonic()
        status, body = request(d.local(), "PUT", "/images/slow", os.urandom(MiB))
        assert status == 500
        assert 1.5 < time.monotonic() - started < 20
        assert "did not answer in 2 s" in d.read_log()
        # A GET fails too: cut short when its head went out (the connection closes early),
        # else a 500.
        conn = d.local()
        conn.request("GET", "/images/slow", headers={"Range": "bytes=0-1048575"})
        resp = conn.getresponse()
        if resp.status == 206:
            with pytest.raises(http.client.IncompleteRead):
                resp.read()
        else:
            assert resp.status == 500, resp.read()
        payload = os.urandom(MiB)
        assert request(d.local(), "PUT", "/images/good", payload)[0] == 200
        assert read_export(good.sock, 0, MiB) == payload
        info = d.ticket_info("slow")
        assert not info["active"]
        assert request(d.control(), "DELETE", "/tickets/slow")[0] == 204
    finally:
        assert d.stop() == 0
        slow.kill()
        good.stop()
