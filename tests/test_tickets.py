"""The control API (API.md 5 and 6) over a real daemon's control socket, and the ticket model.

Timing-based tests use timeouts of 0 or 1 s and sleep at most ~1.5 s.
"""

import json
import os
import socket
import threading
import time
import uuid

import pytest
from hypothesis import given, strategies as st

from nbdproxy import errors, tickets

from support import Daemon, NBDServer, read_export, request, response

MiB = 1024**2
BAD_URL = "nbd:unix:/nonexistent/nbd.sock"


# Fixtures and helpers

@pytest.fixture(scope="module")
def shared_mem(tmp_path_factory):
    """A 16 MiB nbdkit memory export for tests that move data through the shared daemon."""
    tmp = tmp_path_factory.mktemp("mem")
    server = NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix",
                        str(tmp / "nbd.sock"), "memory", "size=16M"], str(tmp / "nbd.sock"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory, cert, shared_mem):
    """One daemon for most tests; it stops before shared_mem (nbdkit waits for its clients)."""
    d = Daemon(str(tmp_path_factory.mktemp("tickets")), *cert)
    yield d
    d.stop()


def new_id():
    return str(uuid.uuid4())


def ticket(ticket_id=None, url=BAD_URL, size=16 * MiB, ops=("read", "write"), timeout=300,
           **extra):
    return {"uuid": ticket_id or new_id(), "size": size, "ops": list(ops), "timeout": timeout,
            "url": url, **extra}


def ctl(d, method, path, body=None, headers=None):
    """One request on the control socket; body: a JSON value, or bytes sent as they are."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return request(d.control(), method, path, body, headers)


def add(d, t):
    status, body = ctl(d, "PUT", f"/tickets/{t['uuid']}", t)
    assert status == 200, body
    return t["uuid"]


def info(d, ticket_id):
    status, body = ctl(d, "GET", f"/tickets/{ticket_id}")
    assert status == 200, body
    return json.loads(body)


def data_request(d, method, url, body=None, headers=None):
    return request(d.local(), method, url, body, headers)


def wait_for(predicate, timeout=5, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class StalledPut:
    """A PUT over a raw socket whose body is sent in two parts, so the request stays running."""

    def __init__(self, address, ticket_id, length, first):
        self.payload = os.urandom(length)
        self.first = first
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(address)
        head = (f"PUT /images/{ticket_id}?flush=n HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()
        self.sock.sendall(head + self.payload[:first])

    def finish(self):
        """Send the rest of the body and return (status, whole response)."""
        try:
            self.sock.sendall(self.payload[self.first:])
        except OSError:
            pass
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            out += chunk
        self.sock.close()
        return int(out.split(b" ", 2)[1]), out

    def close(self):
        self.sock.close()


class Background:
    """Run fn in a thread; result() returns its value (or raises its exception)."""

    def __init__(self, fn, *args):
        self.value = self.error = None
        self.started = time.monotonic()
        self.ended = None
        self.thread = threading.Thread(target=self._run, args=(fn,) + args, daemon=True)
        self.thread.start()

    def _run(self, fn, *args):
        try:
            self.value = fn(*args)
        except BaseException as e:
            self.error = e
        self.ended = time.monotonic()

    def done(self):
        return not self.thread.is_alive()

    def result(self, timeout=30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background call still running"
        if self.error is not None:
            raise self.error
        return self.value


# Unit tests: tickets.validate

def test_validate_defaults():
    fields = tickets.validate(ticket("a", size=0, ops=["read"], timeout=0))
    assert fields["uuid"] == "a"
    assert fields["size"] == 0
    assert fields["ops"] == ["read"]
    assert fields["timeout"] == 0
    assert fields["inactivity_timeout"] == 60
    assert fields["sparse"] is False
    assert fields["dirty"] is False
    assert fields["transfer_id"] is None
    assert fields["filename"] is None


def test_validate_optional_fields():
    fields = tickets.validate(ticket("a", inactivity_timeout=5, transfer_id="t", filename="f.raw",
                                     sparse=True, dirty=True, unknown_key=1))
    assert (fields["inactivity_timeout"], fields["transfer_id"], fields["filename"],
            fields["sparse"], fields["dirty"]) == (5, "t", "f.raw", True, True)
    assert "unknown_key" not in fields


@pytest.mark.parametrize("key", ["uuid", "size", "ops", "timeout", "url"])
def test_validate_missing_required(key):
    t = ticket("a")
    del t[key]
    with pytest.raises(errors.BadRequest) as e:
        tickets.validate(t)
    assert str(e.value).startswith("Invalid ticket: ")
    assert key in str(e.value)


BAD_FIELDS = [
    ("uuid", 1), ("uuid", None), ("uuid", ""), ("uuid", "a/b"),
    ("size", "1"), ("size", 1.5), ("size", True), ("size", False), ("size", -1), ("size", None),
    ("ops", "read"), ("ops", []), ("ops", ["delete"]), ("ops", ["read", 1]), ("ops", {"read": 1}),
    ("timeout", "1"), ("timeout", True), ("timeout", 1.0), ("timeout", -1),
    ("url", 1), ("url", None), ("url", ["nbd:unix:/x"]),
    ("inactivity_timeout", "60"), ("inactivity_timeout", False), ("inactivity_timeout", -1),
    ("transfer_id", 1), ("filename", 1), ("sparse", "yes"), ("sparse", 1), ("dirty", 0),
    ("dirty", "true"),
    # Control characters (issue 12, item 7): a filename goes into a header, the rest into logs.
    ("filename", "a\r\nSet-Cookie: x=y"), ("filename", "a\x00b"), ("transfer_id", "t\x85"),
    ("url", "nbd:unix:/x\n"), ("uuid", "a\rb"), ("ops", ["read", "write\n"]),
]


@pytest.mark.parametrize("key,value", BAD_FIELDS)
def test_validate_bad_field(key, value):
    with pytest.raises(errors.BadRequest) as e:
        tickets.validate(dict(ticket("a"), **{key: value}))
    assert str(e.value).startswith("Invalid ticket: ")


@pytest.mark.parametrize("data", [None, [], "ticket", 1, True])
def test_validate_not_an_object(data):
    with pytest.raises(errors.BadRequest, match="^Invalid ticket: "):
        tickets.validate(data)


# Unit tests: tickets.Ranges

def test_ranges_empty():
    r = tickets.Ranges()
    assert r.union_size() == 0
    r.add(5, 5)
    r.add(7, 3)
    assert r.union_size() == 0


def test_ranges_merge():
    r = tickets.Ranges()
    r.add(0, 10)
    r.add(5, 15)        # overlap
    assert r.union_size() == 15
    r.add(15, 20)       # adjacent
    assert r.union_size() == 20
    r.add(2, 4)         # contained
    assert r.union_size() == 20
    r.add(30, 40)       # disjoint
    assert r.union_size() == 30
    r.add(0, 100)       # covers all
    assert r.union_size() == 100
    assert r.intervals == [(0, 100)]


def test_ranges_union_with_extra():
    r = tickets.Ranges()
    r.add(10, 20)
    assert r.union_size([(15, 25)]) == 15
    assert r.union_size([(0, 5), (30, 30), (40, 35)]) == 15
    assert r.union_size([(0, 100), (50, 60)]) == 100
    assert r.union_size() == 10     # extra does not stay


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200)), max_size=30),
       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200)), max_size=5))
def test_ranges_model(pairs, extra):
    r = tickets.Ranges()
    covered = set()
    for a, b in pairs:
        r.add(a, b)
        covered.update(range(a, b))
    assert r.union_size() == len(covered)
    intervals = r.intervals
    assert intervals == sorted(intervals)
    assert all(a < b for a, b in intervals)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(intervals, intervals[1:]))
    with_extra = set(covered)
    for a, b in extra:
        with_extra.update(range(a, b))
    assert r.union_size(extra) == len(with_extra)


# PUT /tickets/{id}

def test_put_ticket(shared):
    t = ticket(filename="disk.raw", transfer_id="tr-1", sparse=True, inactivity_timeout=30,
               ops=["read"], url="nbd://localhost:10809/export")
    status, body = ctl(shared, "PUT", f"/tickets/{t['uuid']}", t)
    assert status == 200
    assert body == b""
    got = info(shared, t["uuid"])
    for key in ("uuid", "size", "ops", "timeout", "url", "filename", "transfer_id", "sparse",
                "inactivity_timeout"):
        assert got[key] == t[key], key
    assert got["dirty"] is False


def test_put_ticket_headers(shared):
    t = ticket()
    shared_conn = shared.control()
    resp = response(shared_conn, "PUT", f"/tickets/{t['uuid']}", json.dumps(t).encode())
    shared_conn.close()
    assert resp.status == 200
    assert resp.getheader("Content-Length") == "0"
    assert resp.getheader("Server").startswith("nbdproxy/")
    assert resp.getheader("Date")


@pytest.mark.parametrize("url", [
    "nbd:unix:/run/x.sock", "nbd:unix:/run/x.sock:exportname=sda", "nbd:localhost:10809",
    "nbd:localhost:10809:exportname=sda", "nbd:[::1]:10809", "nbd://localhost:10809/sda",
    "nbd+unix:///sda?socket=/run/x.sock", "nbd://localhost/sda", "nbd+unix://?socket=/x.sock",
])
def test_put_ticket_url_forms(shared, url):
    add(shared, ticket(url=url))


@pytest.mark.parametrize("key", ["uuid", "size", "ops", "timeout", "url"])
def test_put_ticket_missing_key(shared, key):
    t = ticket()
    ticket_id = t["uuid"]
    del t[key]
    status, body = ctl(shared, "PUT", f"/tickets/{ticket_id}", t)
    assert status == 400
    assert body.startswith(b"Invalid ticket: ")
    assert key.encode() in body
    assert ctl(shared, "GET", f"/tickets/{ticket_id}")[0] == 404


@pytest.mark.parametrize("key,value", [kv for kv in BAD_FIELDS if kv != ("uuid", "a/b")])
def test_put_ticket_bad_field(shared, key, value):
    ticket_id = new_id()
    t = dict(ticket(ticket_id), **{key: value})
    status, body = ctl(shared, "PUT", f"/tickets/{ticket_id}", t)
    assert status == 400, body
    assert body.startswith(b"Invalid ticket: ")
    assert body.endswith(b"\n")
    assert ctl(shared, "GET", f"/tickets/{ticket_id}")[0] == 404


@pytest.mark.parametrize("url", [
    "http://localhost/disk", "file:///var/tmp/disk.raw", "nbd:unix:", "nbd:", "nbd:localhost",
    "nbd:localhost:99999", "nbd+unix:///sda", "nbd://", "", "/run/x.sock",
    # Issue 12, item 11: URLs libnbd could never connect with, or that read local files.
    "NBD+UNIX:///sda?socket=/run/x.sock", "nbd://h:99999/", "nbd://h/x?socket=/run/x.sock",
    "nbd+unix:///x?socket=/s&tls-psk-file=/etc/shadow", "nbd://h/x?tls-certificates=/etc",
    "nbds://h/x",   # this daemon has no nbd_tls_certificates
])
def test_put_ticket_bad_url(shared, url):
    t = ticket(url=url)
    status, body = ctl(shared, "PUT", f"/tickets/{t['uuid']}", t)
    assert status == 400, body
    assert body.startswith(b"Invalid ticket: ")


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe", b"{'uuid': 'x'}"])
def test_put_ticket_not_json(shared, raw):
    status, body = ctl(shared, "PUT", f"/tickets/{new_id()}", raw)
    assert status == 400
    assert body.startswith(b"Invalid ticket: ")


@pytest.mark.parametrize("value", [[], ["a"], "ticket", 1, None, True])
def test_put_ticket_not_an_object(shared, value):
    status, body = ctl(shared, "PUT", f"/tickets/{new_id()}", value)
    assert status == 400
    assert body.startswith(b"Invalid ticket: ")


def test_put_ticket_uuid_mismatch(shared):
    t = ticket()
    other = new_id()
    status, body = ctl(shared, "PUT", f"/tickets/{other}", t)
    assert status == 400
    assert body.startswith(b"Invalid ticket: ")
    assert ctl(shared, "GET", f"/tickets/{other}")[0] == 404
    assert ctl(shared, "GET", f"/tickets/{t['uuid']}")[0] == 404


def test_put_ticket_keeps_connection(shared):
    """A 400 after the whole body was read keeps the connection; the next request works on it."""
    conn = shared.control()
    try:
        bad = response(conn, "PUT", f"/tickets/{new_id()}", b"{")
        assert bad.status == 400
        assert bad.getheader("Connection") != "close"
        t = ticket()
        good = response(conn, "PUT", f"/tickets/{t['uuid']}", json.dumps(t).encode())
        assert good.status == 200
    finally:
        conn.close()


def test_put_ticket_replaces(shared):
    t = ticket(size=1024)
    add(shared, t)
    add(shared, dict(t, size=2048, ops=["read"]))
    got = info(shared, t["uuid"])
    assert got["size"] == 2048
    assert got["ops"] == ["read"]
    assert got["canceled"] is False


# GET /tickets/{id}

def test_get_ticket_fields(shared):
    t = ticket(ops=["read"], timeout=100)
    before = time.monotonic()
    add(shared, t)
    got = info(shared, t["uuid"])
    assert got["active"] is False
    assert got["canceled"] is False
    assert got["connections"] == 0
    assert got["idle_time"] == 0
    assert got["transferred"] == 0
    assert got["inactivity_timeout"] == 60
    # expires is an int on the daemon's monotonic clock (the same clock as ours on Linux).
    assert isinstance(got["expires"], int)
    assert int(before) + 100 - 1 <= got["expires"] <= int(time.monotonic()) + 100 + 1
    for key in ("active", "canceled", "sparse", "dirty"):
        assert isinstance(got[key], bool), key
    for key in ("connections", "expires", "idle_time", "size", "timeout", "transferred"):
        assert type(got[key]) is int, key


def test_get_ticket_json_format(shared):
    t = ticket(ops=["write"])
    add(shared, t)
    conn = shared.control()
    try:
        resp = response(conn, "GET", f"/tickets/{t['uuid']}")
    finally:
        conn.close()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "application/json"
    assert resp.data.endswith(b"}\n")
    assert b", " not in resp.data and b": " not in resp.data     # compact
    assert int(resp.getheader("Content-Length")) == len(resp.data)


def test_transferred_only_single_op(shared):
    rw = ticket(ops=["read", "write"])
    r = ticket(ops=["read"])
    w = ticket(ops=["write"])
    for t in (rw, r, w):
        add(shared, t)
    assert "transferred" not in info(shared, rw["uuid"])
    assert info(shared, r["uuid"])["transferred"] == 0
    assert info(shared, w["uuid"])["transferred"] == 0


def test_get_unknown_ticket(shared):
    status, body = ctl(shared, "GET", f"/tickets/{new_id()}")
    assert status == 404
    assert body.endswith(b"\n")


def test_control_unknown_paths(shared):
    assert ctl(shared, "GET", "/tickets/a/b")[0] == 404
    assert ctl(shared, "GET", "/images/x")[0] == 404
    status, _ = ctl(shared, "POST", f"/tickets/{new_id()}", {})
    assert status == 405


# GET /tickets/ (API.md 6)

def test_list_tickets(tmp_path, cert):
    d = Daemon(str(tmp_path), *cert)
    try:
        status, body = ctl(d, "GET", "/tickets/")
        assert status == 200
        assert json.loads(body) == []
        a, b = ticket(ops=["read"]), ticket(filename="x")
        add(d, a)
        add(d, b)
        status, body = ctl(d, "GET", "/tickets/")
        assert status == 200
        listed = {t["uuid"]: t for t in json.loads(body)}
        assert set(listed) == {a["uuid"], b["uuid"]}
        assert listed[b["uuid"]]["filename"] == "x"
        assert listed[a["uuid"]] == info(d, a["uuid"]) | {"idle_time": listed[a["uuid"]]["idle_time"]}
    finally:
        d.stop()


# PATCH /tickets/{id}

def test_extend(shared):
    t = ticket(timeout=10)
    add(shared, t)
    expires = info(shared, t["uuid"])["expires"]
    status, body = ctl(shared, "PATCH", f"/tickets/{t['uuid']}", {"timeout": 1000})
    assert (status, body) == (200, b"")
    assert info(shared, t["uuid"])["expires"] >= expires + 989
    status, _ = ctl(shared, "PATCH", f"/tickets/{t['uuid']}", {"timeout": 0})
    assert status == 200
    assert info(shared, t["uuid"])["expires"] <= int(time.monotonic()) + 1
    # timeout is the ticket's own setting; extend does not change it.
    assert info(shared, t["uuid"])["timeout"] == 10


def test_extend_revives_expired(shared, shared_mem):
    t = ticket(url=shared_mem.url, timeout=300)
    add(shared, t)
    # PATCH timeout 0 expires the ticket at once.
    assert ctl(shared, "PATCH", f"/tickets/{t['uuid']}", {"timeout": 0})[0] == 200
    time.sleep(0.01)
    status, body = data_request(shared, "OPTIONS", f"/images/{t['uuid']}")
    assert status == 403, body
    assert b"expired" in body
    status, _ = ctl(shared, "PATCH", f"/tickets/{t['uuid']}", {"timeout": 300})
    assert status == 200
    status, body = data_request(shared, "OPTIONS", f"/images/{t['uuid']}")
    assert status == 200, body
    status, body = data_request(shared, "GET", f"/images/{t['uuid']}", headers={"Range": "bytes=0-3"})
    assert status == 206


@pytest.mark.parametrize("body", [
    b"", b"{", b"[]", b"1", b"null", b'"x"', {}, {"timeout": "1"}, {"timeout": -1},
    {"timeout": True}, {"timeout": 1.5}, {"timeout": None}, {"other": 1},
])
def test_extend_bad_body(shared, body):
    t = ticket(timeout=10)
    add(shared, t)
    expires = info(shared, t["uuid"])["expires"]
    status, _ = ctl(shared, "PATCH", f"/tickets/{t['uuid']}", body)
    assert status == 400
    assert info(shared, t["uuid"])["expires"] == expires


def test_extend_unknown(shared):
    status, _ = ctl(shared, "PATCH", f"/tickets/{new_id()}", {"timeout": 10})
    assert status == 404


# DELETE /tickets/{id} and /tickets/

def test_delete(shared, shared_mem):
    t = ticket(url=shared_mem.url)
    add(shared, t)
    assert data_request(shared, "OPTIONS", f"/images/{t['uuid']}")[0] == 200
    status, body = ctl(shared, "DELETE", f"/tickets/{t['uuid']}")
    assert (status, body) == (204, b"")
    assert ctl(shared, "GET", f"/tickets/{t['uuid']}")[0] == 404
    assert data_request(shared, "OPTIONS", f"/images/{t['uuid']}")[0] == 403
    assert data_request(shared, "GET", f"/images/{t['uuid']}")[0] == 403


def test_delete_unknown(shared):
    status, body = ctl(shared, "DELETE", f"/tickets/{new_id()}")
    assert (status, body) == (204, b"")


def test_delete_twice(shared):
    t = ticket()
    add(shared, t)
    assert ctl(shared, "DELETE", f"/tickets/{t['uuid']}")[0] == 204
    assert ctl(shared, "DELETE", f"/tickets/{t['uuid']}")[0] == 204


def test_delete_idle_connection(shared, shared_mem):
    """A connection that used the ticket and stays open does not block the DELETE."""
    t = ticket(url=shared_mem.url)
    add(shared, t)
    conn = shared.local()
    try:
        assert response(conn, "GET", f"/images/{t['uuid']}", headers={"Range": "bytes=0-99"}).status == 206
        start = time.monotonic()
        assert ctl(shared, "DELETE", f"/tickets/{t['uuid']}")[0] == 204
        assert time.monotonic() - start < 2
        resp = response(conn, "GET", f"/images/{t['uuid']}", headers={"Range": "bytes=0-99"})
        assert resp.status == 403
        assert resp.getheader("Connection") == "close"
    finally:
        conn.close()


def test_delete_all(tmp_path, cert):
    d = Daemon(str(tmp_path), *cert)
    try:
        ids = [add(d, ticket()) for _ in range(3)]
        status, body = ctl(d, "DELETE", "/tickets/")
        assert (status, body) == (204, b"")
        assert json.loads(ctl(d, "GET", "/tickets/")[1]) == []
        for ticket_id in ids:
            assert ctl(d, "GET", f"/tickets/{ticket_id}")[0] == 404
        # Also when there is nothing to delete.
        assert ctl(d, "DELETE", "/tickets/")[0] == 204
    finally:
        d.stop()


def test_delete_waits_for_running_put(shared, shared_mem):
    """DELETE while a PUT runs: new requests get 403 at once; the DELETE answers 204 when the
    PUT ends; the PUT stops with 403 (canceled)."""
    t = ticket(url=shared_mem.url, ops=["write"])
    add(shared, t)
    put = StalledPut(shared.local_socket, t["uuid"], 4 * MiB, MiB)
    try:
        wait_for(lambda: info(shared, t["uuid"])["active"], what="the PUT to start")
        delete = Background(ctl, shared, "DELETE", f"/tickets/{t['uuid']}")
        wait_for(lambda: info(shared, t["uuid"])["canceled"], what="the ticket to be canceled")
        got = info(shared, t["uuid"])
        assert got["active"] is True
        assert got["idle_time"] == 0
        assert data_request(shared, "OPTIONS", f"/images/{t['uuid']}")[0] == 403
        time.sleep(0.3)
        assert not delete.done()
        status, _ = put.finish()
        assert status == 403
        assert delete.result() == (204, b"")
        assert ctl(shared, "GET", f"/tickets/{t['uuid']}")[0] == 404
    finally:
        put.close()


def test_delete_timeout_409(tmp_path, cert, memory_export):
    """A request that outlives --remove-timeout: 409, the ticket stays canceled (403 for new
    requests), and a DELETE after the request ended removes it."""
    d = Daemon(str(tmp_path), *cert, args=["--remove-timeout", "1"])
    try:
        t = ticket(url=memory_export.url, ops=["write"])
        add(d, t)
        put = StalledPut(d.local_socket, t["uuid"], 4 * MiB, MiB)
        try:
            wait_for(lambda: info(d, t["uuid"])["active"], what="the PUT to start")
            start = time.monotonic()
            status, body = ctl(d, "DELETE", f"/tickets/{t['uuid']}")
            assert status == 409, body
            assert 0.9 <= time.monotonic() - start < 5
            got = info(d, t["uuid"])
            assert got["canceled"] is True
            assert got["active"] is True
            assert data_request(d, "OPTIONS", f"/images/{t['uuid']}")[0] == 403
            assert data_request(d, "GET", f"/images/{t['uuid']}")[0] == 403
            status, _ = put.finish()
            assert status == 403
        finally:
            put.close()
        wait_for(lambda: not info(d, t["uuid"])["active"], what="the PUT to end")
        got = info(d, t["uuid"])
        assert got["canceled"] is True
        assert data_request(d, "OPTIONS", f"/images/{t['uuid']}")[0] == 403
        assert ctl(d, "DELETE", f"/tickets/{t['uuid']}")[0] == 204
        assert ctl(d, "GET", f"/tickets/{t['uuid']}")[0] == 404
    finally:
        d.stop()


def test_delete_stops_slow_get(tmp_path, shared):
    """A GET from a slow NBD server is stopped after its current piece: the DELETE answers 204
    long before the whole image could be read, and the client gets a truncated body."""
    sock = str(tmp_path / "slow.sock")
    # 32 MiB in 2 MiB reads of 0.2 s each, 4 in flight: ~1.6 s for the whole image.
    server = NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
                        "--filter=delay", "memory", "size=32M", "rdelay=200ms"], sock)
    try:
        t = ticket(url=server.url, size=32 * MiB, ops=["read"])
        add(shared, t)
        conn = shared.local()

        def download():
            conn.request("GET", f"/images/{t['uuid']}")
            resp = conn.getresponse()
            got = 0
            try:
                while True:
                    chunk = resp.read(65536)
                    if not chunk:
                        break
                    got += len(chunk)
            except Exception:
                pass
            return resp.status, got

        get = Background(download)
        wait_for(lambda: info(shared, t["uuid"])["transferred"] > 0, what="the GET to progress")
        got = info(shared, t["uuid"])
        assert got["active"] is True
        assert 0 < got["transferred"] < 32 * MiB
        start = time.monotonic()
        status, _ = ctl(shared, "DELETE", f"/tickets/{t['uuid']}")
        assert status == 204
        assert time.monotonic() - start < 1.0
        status, received = get.result()
        assert status == 200
        assert received < 32 * MiB
        conn.close()
        assert ctl(shared, "GET", f"/tickets/{t['uuid']}")[0] == 404
    finally:
        server.stop()


# Expiry and idle time

def test_expires(shared, shared_mem):
    t = ticket(url=shared_mem.url, timeout=1)
    add(shared, t)
    assert data_request(shared, "OPTIONS", f"/images/{t['uuid']}")[0] == 200
    time.sleep(1.5)
    for method in ("OPTIONS", "GET", "PUT"):
        status, body = data_request(shared, method, f"/images/{t['uuid']}",
                                    b"x" if method == "PUT" else None)
        assert status == 403, (method, body)
        assert b"expired" in body
    got = info(shared, t["uuid"])     # an expired ticket is still there
    assert got["canceled"] is False


def test_requests_slide_expiry(shared, shared_mem):
    """Each finished request and each OPTIONS sets expires to now + timeout."""
    t = ticket(url=shared_mem.url, timeout=2)
    add(shared, t)
    first = info(shared, t["uuid"])["expires"]
    time.sleep(1.1)
    assert data_request(shared, "OPTIONS", f"/images/{t['uuid']}")[0] == 200
    second = info(shared, t["uuid"])["expires"]
    assert second >= first + 1
    time.sleep(1.1)
    # Past the first expiry (2 s) but not the one OPTIONS set.
    status, _ = data_request(shared, "GET", f"/images/{t['uuid']}", headers={"Range": "bytes=0-9"})
    assert status == 206
    third = info(shared, t["uuid"])["expires"]
    assert third >= second + 1
    status, _ = data_request(shared, "PUT", f"/images/{t['uuid']}", b"abc")
    assert status == 200
    assert info(shared, t["uuid"])["expires"] >= third


def test_failed_request_does_not_slide_unexpired(shared, shared_mem):
    """A request refused by authorization (403) is not a use of the ticket."""
    t = ticket(url=shared_mem.url, ops=["read"], timeout=100)
    add(shared, t)
    expires = info(shared, t["uuid"])["expires"]
    assert data_request(shared, "PUT", f"/images/{t['uuid']}", b"abc")[0] == 403
    assert info(shared, t["uuid"])["expires"] == expires


def test_idle_time(shared, shared_mem):
    t = ticket(url=shared_mem.url)
    add(shared, t)
    assert info(shared, t["uuid"])["idle_time"] == 0
    time.sleep(1.1)
    assert info(shared, t["uuid"])["idle_time"] >= 1
    assert data_request(shared, "OPTIONS", f"/images/{t['uuid']}")[0] == 200
    assert info(shared, t["uuid"])["idle_time"] == 0
    time.sleep(1.1)
    assert info(shared, t["uuid"])["idle_time"] >= 1
    assert data_request(shared, "GET", f"/images/{t['uuid']}", headers={"Range": "bytes=0-0"})[0] == 206
    assert info(shared, t["uuid"])["idle_time"] == 0


def test_idle_time_zero_while_active(shared, shared_mem):
    t = ticket(url=shared_mem.url, ops=["write"])
    add(shared, t)
    time.sleep(1.1)
    put = StalledPut(shared.local_socket, t["uuid"], 2 * MiB, 4096)
    try:
        wait_for(lambda: info(shared, t["uuid"])["active"], what="the PUT to start")
        got = info(shared, t["uuid"])
        assert got["idle_time"] == 0
        assert got["connections"] == 1
        status, _ = put.finish()
        assert status == 200
    finally:
        put.close()
    got = info(shared, t["uuid"])
    assert got["active"] is False
    assert got["transferred"] == 2 * MiB
    assert read_export(shared_mem.sock, 0, 2 * MiB) == put.payload


# connections

def test_connections(shared, shared_mem):
    t = ticket(url=shared_mem.url)
    add(shared, t)
    a, b, c = shared.local(), shared.local(), shared.local()
    try:
        assert response(a, "OPTIONS", f"/images/{t['uuid']}").status == 200
        assert info(shared, t["uuid"])["connections"] == 1
        # More requests on the same connection do not count again.
        assert response(a, "GET", f"/images/{t['uuid']}", headers={"Range": "bytes=0-9"}).status == 206
        assert info(shared, t["uuid"])["connections"] == 1
        assert response(b, "GET", f"/images/{t['uuid']}", headers={"Range": "bytes=0-9"}).status == 206
        assert info(shared, t["uuid"])["connections"] == 2
        # A connection that used only another ticket or none does not count.
        assert response(c, "OPTIONS", "/images/*").status == 200
        assert response(c, "OPTIONS", f"/images/{new_id()}").status == 403
        assert info(shared, t["uuid"])["connections"] == 2
        a.close()
        wait_for(lambda: info(shared, t["uuid"])["connections"] == 1, what="connections == 1")
        b.close()
        wait_for(lambda: info(shared, t["uuid"])["connections"] == 0, what="connections == 0")
    finally:
        for conn in (a, b, c):
            conn.close()


def test_connections_per_ticket(shared, shared_mem):
    t1, t2 = ticket(url=shared_mem.url), ticket(url=shared_mem.url)
    add(shared, t1)
    add(shared, t2)
    conn = shared.local()
    try:
        assert response(conn, "OPTIONS", f"/images/{t1['uuid']}").status == 200
        assert response(conn, "OPTIONS", f"/images/{t2['uuid']}").status == 200
        assert info(shared, t1["uuid"])["connections"] == 1
        assert info(shared, t2["uuid"])["connections"] == 1
    finally:
        conn.close()
    wait_for(lambda: info(shared, t1["uuid"])["connections"] == 0
             and info(shared, t2["uuid"])["connections"] == 0, what="connections == 0")


# transferred and active

def test_transferred_reads(shared, shared_mem):
    t = ticket(url=shared_mem.url, ops=["read"])
    add(shared, t)
    conn = shared.local()
    try:
        for first, last in ((0, MiB - 1), (MiB // 2, 3 * MiB // 2 - 1), (4 * MiB, 5 * MiB - 1),
                            (4 * MiB + 10, 4 * MiB + 20)):
            resp = response(conn, "GET", f"/images/{t['uuid']}",
                            headers={"Range": f"bytes={first}-{last}"})
            assert resp.status == 206
            assert len(resp.data) == last - first + 1
    finally:
        conn.close()
    got = info(shared, t["uuid"])
    assert got["transferred"] == 3 * MiB // 2 + MiB
    assert got["active"] is False
    # A failed request (416) moves nothing.
    status, _ = data_request(shared, "GET", f"/images/{t['uuid']}",
                             headers={"Range": f"bytes={32 * MiB}-"})
    assert status == 416
    assert info(shared, t["uuid"])["transferred"] == 3 * MiB // 2 + MiB


def test_transferred_whole_read(shared, shared_mem):
    t = ticket(url=shared_mem.url, ops=["read"], size=8 * MiB)
    add(shared, t)
    status, data = data_request(shared, "GET", f"/images/{t['uuid']}")
    assert status == 200
    assert len(data) == 8 * MiB
    assert info(shared, t["uuid"])["transferred"] == 8 * MiB


def test_transferred_writes(shared, shared_mem):
    t = ticket(url=shared_mem.url, ops=["write"])
    add(shared, t)
    payload = os.urandom(MiB)
    for offset in (0, MiB // 2, 8 * MiB):
        status, body = data_request(shared, "PUT", f"/images/{t['uuid']}", payload,
                                    {"Content-Range": f"bytes {offset}-{offset + MiB - 1}/*"})
        assert status == 200, body
    assert info(shared, t["uuid"])["transferred"] == 3 * MiB // 2 + MiB
    assert read_export(shared_mem.sock, 8 * MiB, MiB) == payload


def test_transferred_short_put_not_counted(shared, shared_mem):
    """A PUT whose body ends early (400) is not reported as transferred."""
    t = ticket(url=shared_mem.url, ops=["write"])
    add(shared, t)
    put = StalledPut(shared.local_socket, t["uuid"], 2 * MiB, MiB)
    wait_for(lambda: info(shared, t["uuid"])["active"], what="the PUT to start")
    put.sock.shutdown(socket.SHUT_WR)
    put.close()
    wait_for(lambda: not info(shared, t["uuid"])["active"], what="the PUT to end")
    assert info(shared, t["uuid"])["transferred"] == 0


# inactivity_timeout

def test_inactivity_timeout_closes_connection(shared, shared_mem):
    """inactivity_timeout is the idle timeout of a connection that used the ticket."""
    t = ticket(url=shared_mem.url, inactivity_timeout=1)
    add(shared, t)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(shared.local_socket)
        s.sendall(f"OPTIONS /images/{t['uuid']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert info(shared, t["uuid"])["connections"] == 1
        start = time.monotonic()
        while s.recv(65536):        # until the daemon closes the idle connection
            pass
        assert 0.8 < time.monotonic() - start < 5
    wait_for(lambda: info(shared, t["uuid"])["connections"] == 0, what="connections == 0")


# Control bodies

def test_put_ticket_body_too_large(shared):
    t = ticket(filename="x" * 70000)
    status, body = ctl(shared, "PUT", f"/tickets/{t['uuid']}", t)
    assert status == 400
    assert body.startswith(b"Invalid ticket: ")


def test_put_ticket_chunked(shared):
    """A JSON body sent with Transfer-Encoding: chunked (curl -T -) is read like any other."""
    t = ticket()
    data = json.dumps(t).encode()
    conn = shared.control()
    try:
        conn.putrequest("PUT", f"/tickets/{t['uuid']}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        half = len(data) // 2
        for part in (data[:half], data[half:]):
            conn.send(b"%x\r\n%s\r\n" % (len(part), part))
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
    finally:
        conn.close()
    assert info(shared, t["uuid"])["size"] == t["size"]


def test_delete_response_headers(shared):
    t = ticket()
    add(shared, t)
    conn = shared.control()
    try:
        resp = response(conn, "DELETE", f"/tickets/{t['uuid']}")
        assert resp.status == 204
        assert resp.getheader("Content-Length") == "0"
        assert resp.getheader("Server").startswith("nbdproxy/")
        # The connection stays usable.
        assert response(conn, "GET", f"/tickets/{t['uuid']}").status == 404
    finally:
        conn.close()


def test_delete_all_with_busy_ticket(tmp_path, cert, memory_export):
    """DELETE /tickets/ with one ticket still busy at --remove-timeout: every idle ticket is
    removed, the busy one stays canceled, and the answer is 409."""
    d = Daemon(str(tmp_path), *cert, args=["--remove-timeout", "1"])
    try:
        busy = ticket(url=memory_export.url, ops=["write"])
        idle = [ticket(url=memory_export.url) for _ in range(3)]
        for t in [busy] + idle:
            add(d, t)
        put = StalledPut(d.local_socket, busy["uuid"], 4 * MiB, MiB)
        try:
            wait_for(lambda: info(d, busy["uuid"])["active"], what="the PUT to start")
            start = time.monotonic()
            status, _ = ctl(d, "DELETE", "/tickets/")
            assert status == 409
            assert time.monotonic() - start < 3
            for t in idle:
                assert ctl(d, "GET", f"/tickets/{t['uuid']}")[0] == 404
            assert info(d, busy["uuid"])["canceled"] is True
            assert put.finish()[0] == 403
        finally:
            put.close()
        wait_for(lambda: not info(d, busy["uuid"])["active"], what="the PUT to end")
        assert ctl(d, "DELETE", "/tickets/")[0] == 204
        assert json.loads(ctl(d, "GET", "/tickets/")[1]) == []
    finally:
        d.stop()


def test_ticket_state_after_get(shared, shared_mem):
    """A client that got a whole GET body finds the ticket up to date at once: not active, the
    range transferred, the expiry slid (no window where the daemon has not yet finished it)."""
    t = ticket(url=shared_mem.url, ops=["read"], timeout=1000)
    add(shared, t)
    conn = shared.local()
    control = shared.control()
    try:
        for i in range(40):
            resp = response(conn, "GET", f"/images/{t['uuid']}",
                            headers={"Range": f"bytes={i * 65536}-{(i + 1) * 65536 - 1}"})
            assert resp.status == 206
            got = json.loads(response(control, "GET", f"/tickets/{t['uuid']}").data)
            assert got["active"] is False
            assert got["transferred"] == (i + 1) * 65536
    finally:
        conn.close()
        control.close()


def test_transferred_counts_written_pieces_while_the_body_stalls(tmp_path, cert):
    """A PUT whose body stops coming: the pieces already written are in `transferred` (they
    were counted only when the writer ran out of buffer slots)."""
    server = NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix",
                        str(tmp_path / "mem.sock"), "memory", "size=64M"],
                       str(tmp_path / "mem.sock"))
    d = Daemon(str(tmp_path / "d"), *cert)
    s = socket.socket(socket.AF_UNIX)
    try:
        d.add_ticket(server.url, 64 * MiB, ops=["write"])
        s.connect(d.local_socket)
        s.sendall(b"PUT /images/test HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % (32 * MiB))
        s.sendall(os.urandom(10 * MiB))     # then nothing
        deadline = time.monotonic() + 10
        while d.ticket_info()["transferred"] < 8 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.ticket_info()["transferred"] >= 8 * MiB
    finally:
        s.close()
        d.stop()
        server.stop()
