"""Security (issue 6, point 9): socket modes, TLS versions, request size limits, the control API
out of reach of the data services, and ticket ids that match only themselves."""

import grp
import json
import os
import socket
import ssl
import stat

import pytest

from support import Daemon, raw_exchange, request


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def status_of(raw):
    """The status code of the first response in raw bytes (None when nothing came back)."""
    if not raw:
        return None
    line = raw.split(b"\r\n", 1)[0].split()
    assert line[0].startswith(b"HTTP/1."), raw[:200]
    return int(line[1])


@pytest.fixture
def memory_ticket(memory_export, daemon):
    # memory_export first, so that it is stopped after the daemon let go of its connections.
    daemon.add_ticket(memory_export.url, 64 * 1024**2, ticket_id="abc")
    return "abc"


# Socket modes

def test_socket_modes(daemon):
    assert stat.S_ISSOCK(os.stat(daemon.control_socket).st_mode)
    assert mode(daemon.control_socket) == 0o600
    assert mode(daemon.local_socket) == 0o660


def test_control_socket_with_group(tmp_path, cert):
    # Any group other than ours shows that the socket was given to it, not left as made.
    names = [g.gr_name for g in grp.getgrall() if g.gr_gid != os.getgid()] or \
        [grp.getgrgid(os.getgid()).gr_name]
    group = grp.getgrnam(names[0])
    d = Daemon(str(tmp_path), *cert, args=["--control-group", group.gr_name])
    try:
        st = os.stat(d.control_socket)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group.gr_gid
        assert mode(d.local_socket) == 0o660
        status, _ = request(d.control(), "GET", "/tickets/")
        assert status == 200
    finally:
        assert d.stop() == 0


def test_unknown_control_group_is_refused(tmp_path, cert):
    with pytest.raises(RuntimeError, match="no such group"):
        Daemon(str(tmp_path), *cert, args=["--control-group", "no-such-group-nbdproxy"])


# TLS

def _client_context(version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # Let this client really offer old versions, so the refusal is the server's.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def _handshake(port, ctx):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as tls:
            version = tls.version()
            tls.sendall(b"GET /info/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            out = b""
            while chunk := tls.recv(65536):
                out += chunk
            return version, out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_refused(daemon, version):
    with pytest.raises(ssl.SSLError) as e:
        _handshake(daemon.port, _client_context(version))
    # The server refused: the client did offer the version (no local "no protocols" error).
    assert "NO_PROTOCOLS_AVAILABLE" not in str(e.value)
    assert "unsupported protocol" in str(e.value) or "PROTOCOL_VERSION" in str(e.value).upper()


@pytest.mark.parametrize("version,name", [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
                                          (ssl.TLSVersion.TLSv1_3, "TLSv1.3")])
def test_tls12_and_newer_accepted(daemon, version, name):
    got, out = _handshake(daemon.port, _client_context(version))
    assert got == name
    assert status_of(out) == 200
    assert b'"version"' in out


def test_plain_http_on_tls_port_is_not_served(daemon):
    try:
        out = raw_exchange(("127.0.0.1", daemon.port),
                           b"GET /info/ HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
    except ConnectionResetError:
        out = b""
    assert b"version" not in out
    assert not out.startswith(b"HTTP/1.1 200")


# Limits on the request head

@pytest.mark.parametrize("service", ["local", "control"])
def test_request_line_limit(daemon, service):
    address = daemon.local_socket if service == "local" else daemon.control_socket
    prefix = b"GET /images/"
    suffix = b" HTTP/1.1"
    exact = prefix + b"x" * (4096 - len(prefix) - len(suffix)) + suffix
    assert len(exact) == 4096
    # At the limit: an ordinary answer (no such ticket / resource), not 414.
    out = raw_exchange(address, exact + b"\r\nConnection: close\r\n\r\n")
    assert status_of(out) in (403, 404)
    long_line = prefix + b"x" * (4097 - len(prefix) - len(suffix)) + suffix
    out = raw_exchange(address, long_line + b"\r\n\r\n")
    assert status_of(out) == 414
    assert b"Connection: close" in out
    # Far over the limit: 414 as soon as the limit is passed, without waiting for the line's end.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(address)
        s.sendall(b"GET /" + b"a" * 8192)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert status_of(out) == 414


def test_request_line_limit_tls(daemon):
    ctx = ssl.create_default_context(cafile=daemon.cert)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as tls:
            tls.sendall(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n")
            out = b""
            while chunk := tls.recv(65536):
                out += chunk
    assert status_of(out) == 414


def test_too_many_headers(memory_ticket, daemon):
    head = b"OPTIONS /images/abc HTTP/1.1\r\n"
    ok = head + b"".join(b"X-H%d: v\r\n" % i for i in range(90)) + b"Connection: close\r\n\r\n"
    assert status_of(raw_exchange(daemon.local_socket, ok)) == 200
    many = head + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n"
    out = raw_exchange(daemon.local_socket, many)
    assert status_of(out) == 431
    assert b"Connection: close" in out


def test_header_too_large(memory_ticket, daemon):
    head = b"OPTIONS /images/abc HTTP/1.1\r\n"
    ok = head + b"X-Big: " + b"v" * 60000 + b"\r\nConnection: close\r\n\r\n"
    assert status_of(raw_exchange(daemon.local_socket, ok)) == 200
    big = head + b"X-Big: " + b"v" * 70000 + b"\r\n\r\n"
    out = raw_exchange(daemon.local_socket, big)
    assert status_of(out) == 431
    out = raw_exchange(daemon.control_socket, b"GET /tickets/ HTTP/1.1\r\nX: "
                       + b"v" * 70000 + b"\r\n\r\n")
    assert status_of(out) == 431


@pytest.mark.parametrize("bad", [
    b"X-A: b\rc\r\n",              # a bare CR: the stdlib would drop every header after it
    b"NoColon\r\n",                 # a line without a colon: the same
    b"X-Name : v\r\n",              # a space before the colon
    b"X-Folded: a\r\n b\r\n",       # obsolete line folding
    b"X-Nul: a\x00b\r\n",
])
def test_malformed_header_lines_are_refused(memory_ticket, daemon, bad):
    """A Content-Length after a malformed line must not be ignored (the body would be read as a
    request of its own: request smuggling); such requests get 400 and the connection closes."""
    body = b"GET /images/abc HTTP/1.1\r\n\r\n"
    raw = (b"PUT /images/abc HTTP/1.1\r\nHost: x\r\n" + bad
           + b"Content-Length: %d\r\nContent-Range: bytes 0-%d/*\r\n\r\n"
           % (len(body), len(body) - 1)
           + body)
    out = raw_exchange(daemon.local_socket, raw)
    assert status_of(out) == 400
    assert out.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in out
    # Nothing was written.
    status, data = request(daemon.local(), "GET", "/images/abc",
                           headers={"Range": f"bytes=0-{len(body) - 1}"})
    assert status == 206 and data == bytes(len(body))


# The control API is only on the control socket

CONTROL_PATHS = [
    "/tickets/abc", "/tickets/", "/tickets", "/metrics", "/tickets/abc/",
    "/images/../tickets/abc", "/images/%2e%2e/tickets/abc", "/images/..%2Ftickets%2Fabc",
    "//tickets/abc", "/%2Ftickets/abc", "/./tickets/abc", "/%74ickets/abc",
    "http://localhost/tickets/abc", "/info/../tickets/abc", "/images/abc/../../tickets/abc",
]


def _data_requests(daemon, service):
    body = json.dumps({"uuid": "abc", "size": 1, "ops": ["read"], "timeout": 1,
                       "url": "nbd:unix:/nowhere"}).encode()
    for path in CONTROL_PATHS:
        for method, data in (("GET", b""), ("PUT", body), ("PATCH", b'{"timeout":0}'),
                             ("DELETE", b"")):
            raw = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
                   f"Connection: close\r\n\r\n").encode() + data
            yield method, path, raw


@pytest.mark.parametrize("service", ["local", "remote"])
def test_data_services_do_not_reach_control_api(memory_ticket, daemon, service):
    before = daemon.ticket_info("abc")
    ctx = ssl.create_default_context(cafile=daemon.cert)
    seen = 0
    for method, path, raw in _data_requests(daemon, service):
        if service == "local":
            out = raw_exchange(daemon.local_socket, raw)
        else:
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
                with ctx.wrap_socket(s, server_hostname="localhost") as tls:
                    tls.sendall(raw)
                    out = b""
                    while chunk := tls.recv(65536):
                        out += chunk
        assert status_of(out) in (400, 404), (method, path, out[:200])
        assert b'"uuid"' not in out and b"nbdproxy_" not in out
        seen += 1
    assert seen == len(CONTROL_PATHS) * 4
    # Nothing was changed, canceled, replaced or removed.
    after = daemon.ticket_info("abc")
    assert after["url"] == before["url"] and after["canceled"] is False
    assert after["timeout"] == before["timeout"] and after["expires"] >= before["expires"]
    status, body = request(daemon.control(), "GET", "/tickets/")
    assert status == 200 and [t["uuid"] for t in json.loads(body)] == ["abc"]
    status, _ = request(daemon.local(), "GET", "/images/abc", headers={"Range": "bytes=0-0"})
    assert status == 206


def test_control_socket_does_not_serve_images(memory_ticket, daemon):
    for method, path in (("GET", "/images/abc"), ("OPTIONS", "/images/abc"),
                         ("OPTIONS", "/images/*"), ("GET", "/info/"), ("PUT", "/images/abc")):
        status, _ = request(daemon.control(), method, path, b"x" if method == "PUT" else None)
        assert status == 404, (method, path)


# Ticket ids match only themselves

NOT_ABC = [
    "ab", "a", "abcd", "abc%20", "%20abc", "ABC", "Abc", "*", "a*", "ab*", "abc*", ".*", "a.c",
    "a.*", "[a-c]bc", "^abc$", "abc%00", "%00abc", "ab%63%00", "abc%0A", "abc\\", "ab?",
    "abc;", "abc%3B", "%2A", "a%2A", "ab%5B", "(abc)", "abc|x", "x|abc", "abc%25",
    "%E2%80%8Babc", "ab%C3%A7", "..", ".",
]


@pytest.mark.parametrize("method", ["GET", "OPTIONS", "PUT", "PATCH"])
def test_ticket_id_matches_only_itself(memory_export, daemon, method):
    for ticket_id in ("abc", "a.c.d"):
        daemon.add_ticket(memory_export.url, 64 * 1024**2, ticket_id=ticket_id)
    body = b'{"op":"flush"}' if method == "PATCH" else b"x" if method == "PUT" else b""
    for variant in NOT_ABC + ["a.c.", "a.c.d.", "a?c?d", "a%2Ec"]:
        if method == "OPTIONS" and variant in ("*", "%2A"):
            continue    # OPTIONS /images/* is the ticket-less query, checked below
        raw = (f"{method} /images/{variant} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
               f"Range: bytes=0-0\r\nConnection: close\r\n\r\n").encode() + body
        out = raw_exchange(daemon.local_socket, raw)
        assert status_of(out) in (403, 404), (variant, out[:300])
    # The id itself, and percent-encodings of exactly the same id, do match.
    for same in ("abc", "%61bc", "ab%63", "%61%62%63", "a.c.d", "a%2Ec%2Ed"):
        raw = (f"{method} /images/{same} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
               f"Range: bytes=0-0\r\nConnection: close\r\n\r\n").encode() + body
        assert status_of(raw_exchange(daemon.local_socket, raw)) in (200, 206), same
    # The star of OPTIONS /images/* gives no access to any ticket's data.
    out = raw_exchange(daemon.local_socket, b"OPTIONS /images/* HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(out) == 200 and b"max_readers" not in out and b"size" not in out


def test_control_ticket_ids_match_only_themselves(memory_ticket, daemon):
    for variant in NOT_ABC:
        out = raw_exchange(daemon.control_socket,
                           f"GET /tickets/{variant} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        assert status_of(out) in (400, 404), (variant, out[:200])
        assert b'"uuid"' not in out
        out = raw_exchange(daemon.control_socket,
                           f"PATCH /tickets/{variant} HTTP/1.1\r\nContent-Length: 13\r\n"
                           "Connection: close\r\n\r\n"
                           '{"timeout":0}'.encode())
        assert status_of(out) in (400, 404), (variant, out[:200])
        out = raw_exchange(daemon.control_socket,
                           f"DELETE /tickets/{variant} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        assert status_of(out) in (204, 400, 404), (variant, out[:200])
    info = daemon.ticket_info("abc")
    assert info["canceled"] is False and info["timeout"] == 300
    status, _ = request(daemon.local(), "GET", "/images/abc", headers={"Range": "bytes=0-0"})
    assert status == 206
