"""API.md section 0: the HTTP rules every response and connection follows, on both data services.

Each test runs over the local unix socket and over the TLS TCP service against a real daemon
and a real qemu-nbd; where data is written it is read back through NBD.
"""

import email.utils
import json
import os
import socket
import ssl
import time

import pytest

from nbdproxy import __version__
from support import qemu_nbd, read_export

SERVICES = ["local", "remote"]
SERVER_FAILED = b"Server failed to perform the request, check logs\n"
SIZE = 64 * 1024**2


@pytest.fixture(params=SERVICES)
def service(request):
    return request.param


# One daemon and one export for the whole module keep it fast; each test adds its tickets anew.

@pytest.fixture(scope="module")
def raw_export(workdir):
    path = str(workdir / "disk.raw")
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(1024**2))
    server = qemu_nbd(path, str(workdir / "nbd.sock"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def daemon(module_daemon):
    return module_daemon


@pytest.fixture
def ticket(daemon, raw_export):
    daemon.add_ticket(raw_export.url, SIZE, ticket_id="rw")
    daemon.add_ticket(raw_export.url, SIZE, ops=["read"], ticket_id="ro")
    return "rw"


def connect(daemon, service):
    return daemon.local() if service == "local" else daemon.remote()


def raw_socket(daemon, service):
    """A plain socket to the service (TLS-wrapped for remote), for byte-exact exchanges."""
    if service == "local":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(daemon.local_socket)
        return s
    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
    ctx = ssl.create_default_context(cafile=daemon.cert)
    return ctx.wrap_socket(s, server_hostname="localhost")


class Reader:
    """Reads HTTP responses from a raw socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def head(self):
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = (lines[0] + " ").split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        return int(status), headers

    def response(self, method="GET"):
        """(status, headers, body) of the next final response, skipping nothing."""
        status, headers = self.head()
        length = 0 if method == "HEAD" else int(headers["content-length"])
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self):
        """True when the server closed the connection (EOF, or a reset) with nothing more sent."""
        try:
            self._fill()
        except EOFError:
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        return False


def head_bytes(method, path, headers=(), length=None):
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def check_common_headers(status, headers, body):
    assert int(headers["content-length"]) == len(body)
    assert headers["server"] == f"nbdproxy/{__version__}"
    date = email.utils.parsedate_to_datetime(headers["date"])
    assert abs(date.timestamp() - time.time()) < 60


# A request of every kind the data services answer: (method, path, body, headers, status).
REQUESTS = [
    ("OPTIONS", "/images/rw", None, {}, 200),
    ("OPTIONS", "/images/*", None, {}, 200),
    ("GET", "/images/rw", None, {"Range": "bytes=0-4095"}, 206),
    ("HEAD", "/images/rw", None, {}, 200),
    ("PUT", "/images/rw", b"x" * 4096, {}, 200),
    ("PATCH", "/images/rw", b'{"op":"flush"}', {}, 200),
    ("PATCH", "/images/rw", b'{"op":"zero","offset":0,"size":4096}', {}, 200),
    ("GET", "/images/rw/extents", None, {}, 200),
    ("GET", "/images/rw/checksum?block_size=1048576", None, {}, 200),
    ("GET", "/images/rw/checksum/algorithms", None, {}, 200),
    ("GET", "/images/rw", None, {"Range": "bytes=5-1"}, 416),
    ("GET", "/images/rw", None, {"Range": f"bytes={SIZE}-"}, 416),
    ("PUT", "/images/rw?flush=maybe", b"", {}, 400),
    ("PATCH", "/images/rw", b"[]", {}, 400),
    ("PUT", "/images/ro", b"x", {}, 403),
    ("GET", "/images/nosuch", None, {}, 403),
    ("GET", "/nosuch", None, {}, 404),
    ("GET", "/images/rw/extents?context=dirty", None, {}, 404),
    ("DELETE", "/images/rw", None, {}, 405),
    ("BREW", "/images/rw", None, {}, 405),
]


@pytest.mark.parametrize("method,path,body,headers,status", REQUESTS,
                         ids=[f"{r[0]}-{r[1]}-{r[4]}" for r in REQUESTS])
def test_every_response_has_length_date_server(daemon, ticket, service, method, path, body,
                                               headers, status):
    conn = connect(daemon, service)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == status, data
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    if method == "HEAD":
        assert data == b""
        assert int(hdrs["content-length"]) == SIZE
        hdrs["content-length"] = "0"
    check_common_headers(resp.status, hdrs, data)
    if status in (200, 206) and method in ("PUT", "PATCH"):
        assert data == b"" and hdrs["content-length"] == "0"
    if status >= 400:
        assert hdrs["content-type"] == "text/plain; charset=UTF-8"
        text = data.decode("utf-8")
        assert text.endswith("\n") and text.count("\n") == 1 and len(text) > 1


@pytest.mark.parametrize("path", ["/images/rw", "/images/*", "/images/rw/extents",
                                  "/images/rw/checksum?block_size=1048576",
                                  "/images/x/checksum/algorithms", "/info/"])
def test_json_bodies_compact_with_newline(daemon, ticket, service, path):
    conn = connect(daemon, service)
    if path == "/info/" and service == "local":
        # /info/ is remote only.
        conn.request("GET", path)
        assert conn.getresponse().status == 404
        return
    method = "OPTIONS" if path in ("/images/rw", "/images/*") else "GET"
    conn.request(method, path)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "application/json"
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    obj = json.loads(data)
    assert data == json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def test_500_says_only_check_logs(daemon, tmp_path, service):
    missing = str(tmp_path / "no-such-nbd.sock")
    daemon.add_ticket(f"nbd:unix:{missing}", SIZE, ticket_id="dead")
    s = raw_socket(daemon, service)
    r = Reader(s)
    for method in ("OPTIONS", "GET"):
        s.sendall(head_bytes(method, "/images/dead"))
        status, headers, body = r.response()
        assert status == 500
        assert body == SERVER_FAILED
        assert headers["content-type"] == "text/plain; charset=UTF-8"
        check_common_headers(status, headers, body)
        # The whole request was read: the connection stays open for the next one.
        assert headers.get("connection", "").lower() != "close"
    s.close()
    log = daemon.read_log()
    assert "no-such-nbd.sock" in log or "cannot open NBD export" in log
    assert "cannot open NBD export" in log


def test_request_content_type_is_not_checked(daemon, ticket, raw_export, service):
    data = os.urandom(8192)
    for i, ctype in enumerate(["application/json", "text/html", "multipart/form-data",
                               "nonsense"]):
        conn = connect(daemon, service)
        conn.request("PUT", "/images/rw", body=data,
                     headers={"Content-Type": ctype, "Content-Range": f"bytes {i * 8192}-*/*"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        conn.request("PATCH", "/images/rw", body=b'{"op":"flush"}',
                     headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        conn.close()
        assert read_export(raw_export.sock, i * 8192, 8192) == data


def test_expect_100_continue_put(daemon, ticket, raw_export, service):
    payload = os.urandom(1024**2 + 5)
    s = raw_socket(daemon, service)
    r = Reader(s)
    s.sendall(head_bytes("PUT", "/images/rw", [("Expect", "100-continue"),
                                              ("Content-Range", "bytes 12345-*/*")],
                         len(payload)))
    # The interim answer comes before any byte of the body was sent.
    status, headers = r.head()
    assert status == 100
    s.sendall(payload)
    status, headers, body = r.response()
    assert status == 200 and body == b""
    # The connection is still usable.
    s.sendall(head_bytes("GET", "/images/rw", [("Range", "bytes=12345-12348")]))
    status, headers, body = r.response()
    assert status == 206 and body == payload[:4]
    s.close()
    assert read_export(raw_export.sock, 12345, len(payload)) == payload


def test_expect_100_continue_patch(daemon, ticket, raw_export, service):
    msg = json.dumps({"op": "zero", "offset": 0, "size": 65536}).encode()
    s = raw_socket(daemon, service)
    r = Reader(s)
    s.sendall(head_bytes("PATCH", "/images/rw", [("Expect", "100-continue")], len(msg)))
    assert r.head()[0] == 100
    s.sendall(msg)
    status, headers, body = r.response()
    assert status == 200
    s.close()
    assert read_export(raw_export.sock, 0, 65536) == bytes(65536)


@pytest.mark.parametrize("path,headers,status", [
    ("/images/ro", [], 403),                                   # write not allowed
    ("/images/nosuch", [], 403),                               # no such ticket
    ("/images/rw?flush=x", [], 400),                           # syntax
    ("/images/rw", [("Content-Range", "bytes 9-1/*")], 400),   # syntax
    ("/images/rw", [("Content-Range", f"bytes {SIZE}-*/*")], 416),  # past the end
])
def test_expect_100_continue_not_sent_when_refused(daemon, ticket, raw_export, service, path,
                                                   headers, status):
    before = read_export(raw_export.sock, 0, 4096)
    s = raw_socket(daemon, service)
    r = Reader(s)
    s.sendall(head_bytes("PUT", path, [("Expect", "100-continue")] + headers, 4096))
    got, hdrs, body = r.response()
    assert got == status, body
    assert b"100 Continue" not in body
    assert hdrs["connection"].lower() == "close"
    assert r.buf == b""
    # The body was never asked for and never read: the server closes the connection.
    assert r.closed()
    s.close()
    assert read_export(raw_export.sock, 0, 4096) == before


def test_request_line_too_long_414(daemon, service):
    s = raw_socket(daemon, service)
    r = Reader(s)
    line_start = b"GET /"
    line_end = b" HTTP/1.1"
    filler = b"a" * (4097 - len(line_start) - len(line_end))
    s.sendall(line_start + filler + line_end + b"\r\nHost: localhost\r\n\r\n")
    status, headers, body = r.response()
    assert status == 414
    assert headers["content-type"] == "text/plain; charset=UTF-8"
    assert body.endswith(b"\n")
    check_common_headers(status, headers, body)
    assert headers["connection"].lower() == "close"
    assert r.closed()
    s.close()


def test_request_line_of_4096_is_accepted(daemon, service):
    s = raw_socket(daemon, service)
    r = Reader(s)
    line_start = b"GET /"
    line_end = b" HTTP/1.1"
    filler = b"a" * (4096 - len(line_start) - len(line_end))
    s.sendall(line_start + filler + line_end + b"\r\nHost: localhost\r\n\r\n")
    status, headers, body = r.response()
    assert status == 404
    # A 404 for a request read whole keeps the connection.
    s.sendall(head_bytes("OPTIONS", "/images/*"))
    assert r.response()[0] == 200
    s.close()


@pytest.mark.parametrize("method", ["BREW", "FOO", "PROPFIND", "TRACE", "CONNECT"])
def test_unknown_method_405(daemon, ticket, service, method):
    s = raw_socket(daemon, service)
    r = Reader(s)
    s.sendall(head_bytes(method, "/images/rw"))
    status, headers, body = r.response()
    assert status == 405, body
    assert headers["content-type"] == "text/plain; charset=UTF-8"
    check_common_headers(status, headers, body)
    s.close()


@pytest.mark.parametrize("path", ["/", "/nosuch", "/images", "/images/", "/images/rw/extent",
                                  "/images/rw/checksum/nosuch", "/images/rw/extents/more",
                                  "/tickets/rw", "/tickets/", "/metrics", "/info/x"])
def test_unknown_path_404(daemon, ticket, service, path):
    conn = connect(daemon, service)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 404, body
    assert resp.getheader("Content-Type") == "text/plain; charset=UTF-8"
    # A 404 keeps the connection: the next request on it works.
    conn.request("OPTIONS", "/images/rw")
    resp2 = conn.getresponse()
    assert resp2.status == 200
    resp2.read()
    conn.close()


def test_keep_alive(daemon, ticket, raw_export, service):
    conn = connect(daemon, service)
    conn.request("OPTIONS", "/images/rw")
    conn.getresponse().read()
    sock = conn.sock
    payload = os.urandom(65536)
    for i in range(5):
        conn.request("PUT", "/images/rw?flush=n", body=payload,
                     headers={"Content-Range": f"bytes {i * 65536}-*/*"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
        assert not resp.will_close
        conn.request("GET", "/images/rw", headers={"Range": f"bytes={i * 65536}-{i * 65536 + 9}"})
        resp = conn.getresponse()
        assert resp.status == 206 and resp.read() == payload[:10]
        assert conn.sock is sock
    conn.close()
    assert read_export(raw_export.sock, 4 * 65536, 65536) == payload


def test_pipelined_requests(daemon, ticket, service):
    """Several requests sent at once are answered in order on the same connection."""
    s = raw_socket(daemon, service)
    r = Reader(s)
    s.sendall(head_bytes("PUT", "/images/rw", length=3) + b"abc"
              + head_bytes("GET", "/images/rw", [("Range", "bytes=0-2")])
              + head_bytes("GET", "/nosuch")
              + head_bytes("OPTIONS", "/images/*"))
    assert r.response()[0] == 200
    status, _, body = r.response()
    assert (status, body) == (206, b"abc")
    assert r.response()[0] == 404
    assert r.response()[0] == 200
    s.close()


@pytest.mark.parametrize("method,path", [("GET", "/images/nosuch"), ("GET", "/images/ro/x"),
                                         ("PUT", "/images/ro"), ("PATCH", "/images/ro"),
                                         ("OPTIONS", "/images/nosuch")])
def test_403_closes_connection(daemon, ticket, service, method, path):
    if path == "/images/ro/x":
        path = "/images/nosuch/extents"
    body = b'{"op":"flush"}' if method == "PATCH" else b"" if method == "PUT" else None
    s = raw_socket(daemon, service)
    r = Reader(s)
    s.sendall(head_bytes(method, path, length=None if body is None else len(body))
              + (body or b""))
    status, headers, data = r.response()
    assert status == 403, data
    assert headers["connection"].lower() == "close"
    assert headers["content-type"] == "text/plain; charset=UTF-8"
    assert r.closed()
    s.close()


def test_error_with_unread_body_closes(daemon, ticket, raw_export, service):
    """A PUT refused before its body was read: Connection: close, and the body is not used."""
    before = read_export(raw_export.sock, 0, 65536)
    s = raw_socket(daemon, service)
    r = Reader(s)
    body = b"G" * 65536
    s.sendall(head_bytes("PUT", "/images/rw?flush=bad", length=len(body)) + body)
    status, headers, data = r.response()
    assert status == 400
    assert headers["connection"].lower() == "close"
    assert r.closed()
    s.close()
    assert read_export(raw_export.sock, 0, 65536) == before


def test_invalid_content_length_closes(daemon, ticket, service):
    s = raw_socket(daemon, service)
    r = Reader(s)
    s.sendall(b"PUT /images/rw HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nabc")
    status, headers, data = r.response()
    assert status == 400
    assert headers["connection"].lower() == "close"
    assert r.closed()
    s.close()


@pytest.mark.parametrize("method,path,headers,body,status", [
    ("PATCH", "/images/rw", [], b'{"op":"nosuch"}', 400),
    ("PATCH", "/images/rw", [], b"not json", 400),
    ("PATCH", "/images/rw", [], b'{"op":"zero","size":-1}', 400),
    ("PATCH", "/images/rw", [], json.dumps({"op": "zero", "size": 2 * SIZE}).encode(), 416),
    ("PUT", "/images/rw?flush=bad", [], b"", 400),
    ("GET", "/images/rw", [("Range", "bytes=1-0")], None, 416),
    ("GET", "/images/rw/extents?context=bad", [], None, 400),
    ("GET", "/images/rw/checksum?block_size=1", [], None, 400),
    ("GET", "/images/rw/extents?context=dirty", [], None, 404),
    ("DELETE", "/images/rw", [], None, 405),
])
def test_error_with_body_read_keeps_connection(daemon, ticket, raw_export, service, method,
                                              path, headers, body, status):
    s = raw_socket(daemon, service)
    r = Reader(s)
    s.sendall(head_bytes(method, path, headers, None if body is None else len(body))
              + (body or b""))
    got, hdrs, data = r.response()
    assert got == status, data
    assert hdrs.get("connection", "").lower() != "close"
    # The connection still serves the next request.
    s.sendall(head_bytes("PUT", "/images/rw", length=4) + b"next")
    assert r.response()[0] == 200
    s.close()
    assert read_export(raw_export.sock, 0, 4) == b"next"


@pytest.mark.parametrize("path,status", [("/images/ro", 403), ("/images/nosuch", 403),
                                         ("/images/rw?flush=bad", 400),
                                         ("/images/rw?x=1", 416)])
def test_refused_large_put_gets_its_answer(daemon, ticket, raw_export, service, path, status):
    """A client that sends its whole body before reading (no Expect) still reads the refusal.

    The server closes after the answer, but keeps draining the unread body for a while
    (a lingering close) instead of making the client fail with a broken pipe.
    """
    before = read_export(raw_export.sock, SIZE - 4096, 4096)
    headers = {"Content-Range": f"bytes {SIZE - 4096}-*/*"} if status == 416 else {}
    conn = connect(daemon, service)
    conn.request("PUT", path, body=b"\xff" * (8 * 1024**2), headers=headers)
    resp = conn.getresponse()
    assert resp.status == status, resp.read()
    assert resp.getheader("Connection") == "close"
    resp.read()
    conn.close()
    assert read_export(raw_export.sock, SIZE - 4096, 4096) == before


def test_socket_modes(daemon):
    """The local socket file is 0660, the control socket 0600 (no group configured)."""
    import stat
    assert stat.S_ISSOCK(os.stat(daemon.local_socket).st_mode)
    assert stat.S_IMODE(os.stat(daemon.local_socket).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(daemon.control_socket).st_mode) == 0o600


def test_remote_is_tls_only(daemon):
    """With a certificate configured, the TCP service does not speak plain HTTP."""
    out = b""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
        s.sendall(head_bytes("OPTIONS", "/images/*"))
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    assert not out.startswith(b"HTTP/")
    # The same request over TLS works.
    conn = daemon.remote()
    conn.request("OPTIONS", "/images/*")
    assert conn.getresponse().status == 200
    conn.close()


@pytest.mark.parametrize("head", [
    b"OPTIONS /images/* HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"OPTIONS /images/* HTTP/1.0\r\n\r\n",
])
def test_client_asks_to_close(daemon, service, head):
    s = raw_socket(daemon, service)
    r = Reader(s)
    s.sendall(head)
    status, headers, body = r.response()
    assert status == 200
    assert headers["connection"].lower() == "close"
    assert r.closed()
    s.close()


def test_http10_keep_alive(daemon, service):
    s = raw_socket(daemon, service)
    r = Reader(s)
    for _ in range(2):
        s.sendall(b"OPTIONS /images/* HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = r.response()
        assert status == 200
        assert headers.get("connection", "").lower() != "close"
    s.close()
