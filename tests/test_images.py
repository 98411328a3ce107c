"""API.md sections 1 to 4: OPTIONS, GET, PUT and PATCH of /images/{ticket}, line by line.

Every test runs over the local unix socket and over the TLS TCP service, against a real daemon
and real qemu-nbd / nbdkit processes; data written is read back through NBD afterwards.
"""

import json
import os
import socket
import subprocess
import time
import uuid

import pytest

from support import Daemon, nbdkit, qemu_nbd, read_export, request

SERVICES = ["local", "remote"]
SIZE = 8 * 1024**2
MiB = 1024**2
READ_FEATURES = ["checksum", "extents"]
ALL_FEATURES = ["checksum", "extents", "flush", "zero"]


# One daemon and one export (8 MiB of random data) for the module; tickets are added per test.

@pytest.fixture(scope="module")
def export(workdir):
    path = str(workdir / "disk.raw")
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    server = qemu_nbd(path, str(workdir / "nbd.sock"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def daemon(module_daemon):
    return module_daemon


@pytest.fixture(params=SERVICES)
def service(request):
    return request.param


@pytest.fixture
def connect(daemon, service):
    return daemon.local if service == "local" else daemon.remote


@pytest.fixture
def rw(daemon, export):
    return daemon.add_ticket(export.url, SIZE, ticket_id="rw", transfer_id="tr-1")


@pytest.fixture
def ro(daemon, export):
    return daemon.add_ticket(export.url, SIZE, ops=["read"], ticket_id="ro")


def call(conn, method, url, body=None, headers=None):
    """(status, headers with lower-case names, body), closing the connection."""
    try:
        conn.request(method, url, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def patch(conn, url, msg):
    body = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    return call(conn, "PATCH", url, body)




def qemu_map(path):
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "raw", path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def map_at(path, offset):
    for e in qemu_map(path):
        if e["start"] <= offset < e["start"] + e["length"]:
            return e
    raise AssertionError(f"no extent at {offset}")


# 1. OPTIONS

def test_options_read_only(daemon, ro, connect):
    status, headers, body = call(connect(), "OPTIONS", "/images/ro")
    assert status == 200
    assert headers["allow"] == "OPTIONS,GET"
    assert headers["content-type"] == "application/json"
    info = json.loads(body)
    assert info["features"] == READ_FEATURES
    assert info["unix_socket"] == daemon.local_socket
    for key in ("max_readers", "max_writers"):
        assert type(info[key]) is int and info[key] >= 1
    assert info["size"] == SIZE


@pytest.mark.parametrize("ops", [["read", "write"], ["write"]])
def test_options_writable(daemon, export, connect, ops):
    daemon.add_ticket(export.url, SIZE, ops=ops, ticket_id="w", transfer_id="tr-9")
    status, headers, body = call(connect(), "OPTIONS", "/images/w")
    assert status == 200
    assert headers["allow"] == "OPTIONS,GET,PUT,PATCH"
    info = json.loads(body)
    assert info["features"] == ALL_FEATURES
    assert info["unix_socket"] == daemon.local_socket
    for key in ("max_readers", "max_writers"):
        assert type(info[key]) is int and info[key] >= 1
    assert info["transfer_id"] == "tr-9"
    assert info["size"] == SIZE


def test_options_star_needs_no_ticket(daemon, connect):
    status, _, _ = call(daemon.control(), "DELETE", "/tickets/")
    assert status == 204
    status, headers, body = call(connect(), "OPTIONS", "/images/*")
    assert status == 200
    assert headers["allow"] == "OPTIONS,GET,PUT,PATCH"
    info = json.loads(body)
    assert info == {"features": ALL_FEATURES, "unix_socket": daemon.local_socket}


def test_options_unknown_ticket_403(daemon, connect):
    status, headers, body = call(connect(), "OPTIONS", "/images/nosuch")
    assert status == 403
    assert headers["connection"] == "close"


def test_options_slides_expiry(daemon, rw, connect):
    status, _, _ = call(daemon.control(), "PATCH", "/tickets/rw", b'{"timeout": 1}')
    assert status == 200
    short = daemon.ticket_info("rw")["expires"]
    status, _, _ = call(connect(), "OPTIONS", "/images/rw")
    assert status == 200
    info = daemon.ticket_info("rw")
    # The ticket's timeout is 300 s: OPTIONS moved expires to about now + 300.
    assert info["expires"] >= short + 250
    assert info["idle_time"] == 0


def test_options_abstract_local_socket(tmp_path, cert, export):
    name = f"nbdproxy-test-{uuid.uuid4().hex}"
    d = Daemon(str(tmp_path), *cert, args=["--local-socket", "@" + name])
    try:
        d.local_socket = "\0" + name
        d.add_ticket(export.url, SIZE, ticket_id="t")
        for conn in (d.local, d.remote):
            for target in ("/images/t", "/images/*"):
                status, _, body = call(conn(), "OPTIONS", target)
                assert status == 200
                assert json.loads(body)["unix_socket"] == "\0" + name
                assert b'"unix_socket":"\\u0000' + name.encode() + b'"' in body
    finally:
        d.stop()


def test_options_without_local_service(tmp_path, cert, export):
    d = Daemon(str(tmp_path), *cert, args=["--local-socket", "none"])
    try:
        d.add_ticket(export.url, SIZE, ticket_id="t")
        for target in ("/images/t", "/images/*"):
            status, _, body = call(d.remote(), "OPTIONS", target)
            assert status == 200
            info = json.loads(body)
            assert "unix_socket" not in info
            assert info["features"] == ALL_FEATURES
    finally:
        d.stop()


# 2. GET

@pytest.mark.parametrize("range_,start,end", [
    ("bytes=0-4095", 0, 4095),
    ("bytes=0-0", 0, 0),
    (f"bytes=12345-{3 * MiB}", 12345, 3 * MiB),
    (f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE - 1),
    (f"bytes={SIZE - 100}-", SIZE - 100, SIZE - 1),
    ("bytes=1000-", 1000, SIZE - 1),
    ("bytes=0-", 0, SIZE - 1),
])
def test_get_range_206(export, ro, connect, range_, start, end):
    status, headers, body = call(connect(), "GET", "/images/ro", headers={"Range": range_})
    assert status == 206
    assert headers["content-range"] == f"bytes {start}-{end}/{SIZE}"
    assert int(headers["content-length"]) == end - start + 1 == len(body)
    assert headers["content-type"] == "application/octet-stream"
    assert body == read_export(export.sock, start, end - start + 1)


def test_get_whole_200(export, ro, connect):
    status, headers, body = call(connect(), "GET", "/images/ro")
    assert status == 200
    assert "content-range" not in headers
    assert int(headers["content-length"]) == SIZE
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"] == "attachment"
    assert body == read_export(export.sock)


def test_get_whole_is_min_of_ticket_and_export(daemon, export, connect):
    daemon.add_ticket(export.url, SIZE - 5000, ops=["read"], ticket_id="small")
    status, headers, body = call(connect(), "GET", "/images/small")
    assert status == 200 and len(body) == SIZE - 5000
    assert body == read_export(export.sock, 0, SIZE - 5000)
    daemon.add_ticket(export.url, 2 * SIZE, ops=["read"], ticket_id="big")
    status, headers, body = call(connect(), "GET", "/images/big")
    assert status == 200 and len(body) == SIZE == int(headers["content-length"])
    assert body == read_export(export.sock)
    # An open-ended range stops at the export's end; Content-Range names the ticket's size.
    status, headers, body = call(connect(), "GET", "/images/big",
                                 headers={"Range": f"bytes={SIZE - 10}-"})
    assert status == 206 and len(body) == 10
    assert headers["content-range"] == f"bytes {SIZE - 10}-{SIZE - 1}/{2 * SIZE}"


@pytest.mark.parametrize("range_", [
    "bytes=0-1,4-5",        # several ranges
    "bytes=0-1, 10-20",
    "bytes=-100",           # a suffix
    "bytes=-0",
    "bytes=100-99",         # B < A
    "bytes=5-1",
    "items=0-100",          # another unit
    "Bytes=0-1x",
    "junk",
    "bytes=",
    "bytes=a-b",
    "bytes=1-b",
    "bytes 0-100",
    "=0-1",
    "bytes=0x10-0x20",
])
def test_get_bad_range_416(ro, connect, range_):
    status, headers, body = call(connect(), "GET", "/images/ro", headers={"Range": range_})
    assert status == 416, body
    assert headers["content-type"] == "text/plain; charset=UTF-8"


@pytest.mark.parametrize("range_", [f"bytes=0-{SIZE}", f"bytes={SIZE}-", f"bytes={SIZE}-{SIZE}",
                                    f"bytes={SIZE + 1}-", f"bytes={SIZE - 1}-{SIZE + 9}",
                                    f"bytes={10 * SIZE}-{20 * SIZE}"])
def test_get_range_past_ticket_416(ro, connect, range_):
    status, headers, body = call(connect(), "GET", "/images/ro", headers={"Range": range_})
    assert status == 416, body
    assert headers["content-range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("range_", [f"bytes={SIZE}-", f"bytes={SIZE - 1}-{SIZE}",
                                    f"bytes={SIZE + 5}-{SIZE + 10}"])
def test_get_range_past_export_416(daemon, export, connect, range_):
    daemon.add_ticket(export.url, 2 * SIZE, ops=["read"], ticket_id="big")
    status, headers, body = call(connect(), "GET", "/images/big", headers={"Range": range_})
    assert status == 416, body
    assert headers["content-range"] == f"bytes */{SIZE}"


def test_get_content_disposition_filename(daemon, export, connect):
    daemon.add_ticket(export.url, SIZE, ops=["read"], ticket_id="named", filename="disk.qcow2")
    status, headers, body = call(connect(), "GET", "/images/named",
                                 headers={"Range": "bytes=0-99"})
    assert status == 206
    assert headers["content-disposition"] == "attachment; filename=disk.qcow2"
    assert headers["content-type"] == "application/octet-stream"
    assert body == read_export(export.sock, 0, 100)


def test_get_write_only_ticket_may_read(daemon, export, connect):
    daemon.add_ticket(export.url, SIZE, ops=["write"], ticket_id="wo")
    status, _, body = call(connect(), "GET", "/images/wo", headers={"Range": "bytes=10-19"})
    assert status == 206 and body == read_export(export.sock, 10, 10)


def test_get_unknown_ticket_403(connect):
    status, headers, _ = call(connect(), "GET", "/images/nosuch")
    assert status == 403 and headers["connection"] == "close"


def test_get_pieces_at_most_buffer_size(tmp_path, cert):
    """Reads reach NBD in pieces no larger than the buffer size (here 1 MiB)."""
    log = str(tmp_path / "nbdkit.log")
    server = nbdkit(str(tmp_path / "nbd.sock"), "--filter=log", "pattern", "size=12M",
                              f"logfile={log}")
    d = Daemon(str(tmp_path / "d"), *cert, args=["--buffer-size", str(MiB)])
    try:
        d.add_ticket(server.url, 12 * MiB, ops=["read"])
        status, body = request(d.local(), "GET", "/images/test")
        assert status == 200
        with open(log) as f:
            counts = [int(line.split("count=")[1].split()[0], 16)
                      for line in f if " Read " in line and "count=" in line]
        assert body == read_export(server.sock)
    finally:
        d.stop()
        server.stop()
    assert counts and max(counts) <= MiB
    assert sum(counts) == 12 * MiB


# 3. PUT

@pytest.mark.parametrize("content_range,offset", [
    (None, 0),
    ("bytes 4096-8191/*", 4096),
    (f"bytes 4096-8191/{SIZE}", 4096),
    ("bytes 8192-*/*", 8192),
    (f"bytes 12288-*/{SIZE}", 12288),
    (f"bytes {SIZE - 4096}-{SIZE - 1}/{SIZE}", SIZE - 4096),
])
def test_put_content_range_forms(export, rw, connect, content_range, offset):
    data = os.urandom(4096)
    headers = {"Content-Range": content_range} if content_range else {}
    status, hdrs, body = call(connect(), "PUT", "/images/rw", data, headers)
    assert status == 200
    assert body == b"" and hdrs["content-length"] == "0"
    assert read_export(export.sock, offset, 4096) == data


def test_put_only_start_of_content_range_is_used(export, rw, connect):
    before = read_export(export.sock, 100, 200)
    data = os.urandom(50)
    status, _, _ = call(connect(), "PUT", "/images/rw", data,
                        {"Content-Range": "bytes 100-299/*"})
    assert status == 200
    assert read_export(export.sock, 100, 200) == data + before[50:]


@pytest.mark.parametrize("content_range", [
    "4096-8191/*",              # no unit
    "bytes 4096-8191",          # no /T
    "bytes 4096-8191/",
    "bytes x-8191/*",           # non-numbers
    "bytes 0-y/*",
    "bytes 0-10/z",
    "bytes -1-10/*",
    "bytes 10-5/*",             # B < A
    "bytes 0-100/100",          # B >= T
    "bytes 0-200/100",
    "bytes */100",              # unsatisfied-range form
    "bytes */*",
    "items 0-10/*",
    "bytes=0-10/*",
    "",
])
def test_put_bad_content_range_400(export, rw, connect, content_range):
    before = read_export(export.sock, 0, 4096)
    status, headers, body = call(connect(), "PUT", "/images/rw", b"\0" * 11,
                                 {"Content-Range": content_range})
    assert status == 400, body
    assert headers["content-type"] == "text/plain; charset=UTF-8"
    assert read_export(export.sock, 0, 4096) == before


def raw_put(daemon, service, head):
    """Send a request head (no body) on a raw socket; return the status line's code."""
    if service == "local":
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(daemon.local_socket)
    else:
        import ssl
        ctx = ssl.create_default_context(cafile=daemon.cert)
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", daemon.port), timeout=5),
                            server_hostname="localhost")
    with s:
        s.sendall(head)
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    return int(out.split(b" ", 2)[1])


@pytest.mark.parametrize("length", [None, "abc", "-1", "1.5", ""])
def test_put_content_length_missing_or_invalid_400(daemon, rw, service, length):
    head = b"PUT /images/rw HTTP/1.1\r\nHost: x\r\n"
    if length is not None:
        head += b"Content-Length: " + length.encode() + b"\r\n"
    assert raw_put(daemon, service, head + b"\r\n") == 400


def flush_count(log):
    with open(log) as f:
        return sum(1 for line in f if " Flush " in line and "..." in line and "return" not in line)


@pytest.fixture
def logged(tmp_path, daemon):
    """An nbdkit memory export logging each NBD command, and a writable ticket "logged"."""
    log = str(tmp_path / "nbdkit.log")
    server = nbdkit(str(tmp_path / "log.sock"), "--filter=log", "memory",
                              "size=400M", f"logfile={log}")
    daemon.add_ticket(server.url, 400 * MiB, ticket_id="logged")
    server.log = log
    yield server
    request(daemon.control(), "DELETE", "/tickets/logged")
    server.stop()


@pytest.mark.parametrize("query,flushes", [("", 1), ("?flush=y", 1), ("?flush=n", 0)])
def test_put_flush(logged, connect, query, flushes):
    data = os.urandom(65536)
    status, _, _ = call(connect(), "PUT", "/images/logged" + query, data,
                        {"Content-Range": "bytes 65536-*/*"})
    assert status == 200
    assert flush_count(logged.log) == flushes
    assert read_export(logged.sock, 65536, 65536) == data


@pytest.mark.parametrize("query", ["?flush=x", "?flush=yes", "?flush=Y", "?flush=", "?flush=1",
                                   "?flush=n&flush=x"])
def test_put_bad_flush_400(export, rw, connect, query):
    before = read_export(export.sock, 0, 16)
    status, headers, body = call(connect(), "PUT", "/images/rw" + query, b"x" * 16)
    assert status == 400, body
    assert read_export(export.sock, 0, 16) == before


@pytest.mark.parametrize("ticket,query,content_range,status", [
    # 400 before 403: bad syntax on a read-only or unknown ticket
    ("ro", "", "bytes 9-1/*", 400),
    ("ro", "?flush=x", None, 400),
    ("nosuch", "?flush=x", None, 400),
    ("nosuch", "", "bytes */10", 400),
    # 400 before 416: bad syntax and past the end
    ("rw", "?flush=x", f"bytes {SIZE}-*/*", 400),
    # 403 before 416: no write permission and past the end
    ("ro", "", f"bytes {SIZE}-*/*", 403),
    ("nosuch", "", f"bytes {SIZE}-*/*", 403),
    # 416 last
    ("rw", "", f"bytes {SIZE}-*/*", 416),
    ("rw", "", f"bytes {SIZE - 10}-*/*", 416),
])
def test_put_check_order(export, rw, ro, connect, ticket, query, content_range, status):
    headers = {"Content-Range": content_range} if content_range else {}
    got, hdrs, body = call(connect(), "PUT", f"/images/{ticket}{query}", b"z" * 11, headers)
    assert got == status, body
    if status == 416:
        assert hdrs["content-range"] == f"bytes */{SIZE}"
    if status == 403:
        assert hdrs["connection"] == "close"


def test_put_past_export_416(daemon, export, connect):
    daemon.add_ticket(export.url, 2 * SIZE, ticket_id="big")
    status, headers, _ = call(connect(), "PUT", "/images/big", b"z" * 4096,
                              {"Content-Range": f"bytes {SIZE - 100}-*/*"})
    assert status == 416


def test_put_short_body_400_not_transferred(daemon, export, service):
    daemon.add_ticket(export.url, SIZE, ops=["write"], ticket_id="wo")
    log_start = len(daemon.read_log().splitlines())
    before = read_export(export.sock, 0, 4096)
    announced, sent = 4 * MiB, MiB + 4096
    head = (f"PUT /images/wo?flush=n HTTP/1.1\r\nHost: x\r\nContent-Length: {announced}"
            "\r\n\r\n").encode()
    if service == "local":
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(daemon.local_socket)
        s.sendall(head + os.urandom(sent))
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
        s.close()
        assert out.startswith(b"HTTP/1.1 400 ")
    else:
        # Over TLS a half-close would end the session; the client goes away instead.
        conn = daemon.remote()
        conn.connect()
        conn.sock.sendall(head + os.urandom(sent))
        conn.close()
    # Wait for the daemon to log the end of the failed write (the client may be gone before
    # the daemon even started it).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any("op=write ticket=wo" in line and line.endswith(" failed")
               for line in daemon.read_log().splitlines()[log_start:]):
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the failed write was not logged")
    info = daemon.ticket_info("wo")
    assert not info["active"]
    assert info["transferred"] == 0
    # A complete upload afterwards counts.
    data = os.urandom(4096)
    status, _, _ = call(daemon.local(), "PUT", "/images/wo", data)
    assert status == 200
    assert daemon.ticket_info("wo")["transferred"] == 4096
    assert read_export(export.sock, 0, 4096) == data != before


def test_put_read_only_403(export, ro, connect):
    before = read_export(export.sock, 0, 100)
    status, headers, _ = call(connect(), "PUT", "/images/ro", b"q" * 100)
    assert status == 403 and headers["connection"] == "close"
    assert read_export(export.sock, 0, 100) == before


# 4. PATCH

@pytest.fixture
def sparse_export(tmp_path):
    """A fully allocated 8 MiB raw file served by qemu-nbd that honours hole punching."""
    path = str(tmp_path / "alloc.raw")
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    server = qemu_nbd(path, str(tmp_path / "alloc.sock"), "raw", "--discard=unmap")
    server.path = path
    yield server
    server.stop()


def allocated(path):
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("sparse", [False, True])
def test_patch_zero_sparse_or_not(daemon, sparse_export, connect, sparse):
    daemon.add_ticket(sparse_export.url, SIZE, ticket_id="z", sparse=sparse)
    path = sparse_export.path
    assert allocated(path) == SIZE
    after = read_export(sparse_export.sock, 3 * MiB, MiB)
    status, headers, body = patch(connect(), "/images/z",
                                  {"op": "zero", "offset": MiB, "size": 2 * MiB, "flush": True})
    assert status == 200 and body == b""
    assert read_export(sparse_export.sock, MiB, 2 * MiB) == bytes(2 * MiB)
    assert read_export(sparse_export.sock, 3 * MiB, MiB) == after
    assert map_at(path, 3 * MiB)["data"] is True
    if sparse:
        # The range was punched out of the file: fewer blocks, and qemu-img map sees a hole.
        assert allocated(path) == SIZE - 2 * MiB
        extent = map_at(path, MiB)
        assert extent["zero"] is True and extent["data"] is False
        assert extent["start"] == MiB and extent["length"] == 2 * MiB
    else:
        # NO_HOLE: the range reads as zero but keeps its blocks. (On ext4 and xfs it becomes
        # an unwritten extent, which qemu-img map reports as a hole or as data depending on
        # the page cache, so the file's allocated size is what tells.)
        assert allocated(path) == SIZE


def test_patch_zero_defaults(export, rw, connect):
    status, _, _ = call(connect(), "PUT", "/images/rw", os.urandom(8192))
    assert status == 200
    # offset defaults to 0, flush to false.
    status, _, body = patch(connect(), "/images/rw", {"op": "zero", "size": 4096})
    assert status == 200 and body == b""
    data = read_export(export.sock, 0, 8192)
    assert data[:4096] == bytes(4096) and data[4096:] != bytes(4096)


def test_patch_zero_size_0_and_to_the_end(export, rw, connect):
    before = read_export(export.sock, SIZE - 8192, 8192)
    assert patch(connect(), "/images/rw", {"op": "zero", "offset": SIZE, "size": 0})[0] == 200
    assert read_export(export.sock, SIZE - 8192, 8192) == before
    status, _, _ = patch(connect(), "/images/rw",
                         {"op": "zero", "offset": SIZE - 4096, "size": 4096})
    assert status == 200
    assert read_export(export.sock, SIZE - 8192, 8192) == before[:4096] + bytes(4096)


def test_patch_zero_unknown_keys_ignored(export, rw, connect):
    status, _, _ = patch(connect(), "/images/rw", {"op": "zero", "offset": 4096, "size": 4096,
                                                   "future": [1, 2], "sparse": "maybe"})
    assert status == 200
    assert read_export(export.sock, 4096, 4096) == bytes(4096)


@pytest.mark.parametrize("sparse,may_trim", [(False, 0), (True, 1)])
def test_patch_zero_pieces_and_no_hole(daemon, logged, connect, sparse, may_trim):
    """WRITE_ZEROES in pieces of at most 128 MiB, NO_HOLE unless the ticket is sparse."""
    daemon.add_ticket(logged.url, 400 * MiB, ticket_id="logged", sparse=sparse)
    offset, size = 4096, 300 * MiB + 4096
    status, _, _ = patch(connect(), "/images/logged",
                         {"op": "zero", "offset": offset, "size": size, "flush": False})
    assert status == 200
    zeros = []
    with open(logged.log) as f:
        for line in f:
            if " Zero " in line and "count=" in line:
                fields = dict(p.split("=", 1) for p in line.split() if "=" in p)
                zeros.append((int(fields["offset"], 16), int(fields["count"], 16),
                              int(fields["trim"])))
    assert zeros, "no WRITE_ZEROES reached nbdkit"
    assert all(n <= 128 * MiB for _, n, _ in zeros)
    assert sorted((o, n) for o, n, _ in zeros)[0][0] == offset
    assert sum(n for _, n, _ in zeros) == size
    assert {t for _, _, t in zeros} == {may_trim}
    assert flush_count(logged.log) == 0


def test_patch_zero_flush_true(logged, connect):
    status, _, _ = patch(connect(), "/images/logged", {"op": "zero", "size": 4096, "flush": True})
    assert status == 200
    assert flush_count(logged.log) == 1


def test_patch_flush(logged, connect):
    data = os.urandom(4096)
    status, _, _ = call(connect(), "PUT", "/images/logged?flush=n", data)
    assert status == 200
    assert flush_count(logged.log) == 0
    status, headers, body = patch(connect(), "/images/logged", {"op": "flush"})
    assert status == 200 and body == b"" and headers["content-length"] == "0"
    assert flush_count(logged.log) >= 1
    assert read_export(logged.sock, 0, 4096) == data


@pytest.mark.parametrize("body", [
    b"not json",
    b"",
    b"[]",
    b'"zero"',
    b"42",
    b"null",
    b'{"op":"zero","size":1',
    b"{}",                                                     # missing op
    b'{"size":4096}',
    b'{"op":"trim","size":4096}',                              # unknown op
    b'{"op":null}',
    b'{"op":1}',
    b'{"op":"zero"}',                                          # missing size
    b'{"op":"zero","size":"4096"}',                            # wrong types
    b'{"op":"zero","size":4096.0}',
    b'{"op":"zero","size":true}',
    b'{"op":"zero","size":null}',
    b'{"op":"zero","size":4096,"offset":"0"}',
    b'{"op":"zero","size":4096,"offset":1.5}',
    b'{"op":"zero","size":4096,"offset":false}',
    b'{"op":"zero","size":4096,"flush":"yes"}',
    b'{"op":"zero","size":4096,"flush":1}',
    b'{"op":"zero","size":4096,"flush":null}',
    b'{"op":"zero","size":-1}',                                # negative numbers
    b'{"op":"zero","size":4096,"offset":-4096}',
    b"\xff\xfe{}",
])
@pytest.mark.parametrize("ticket", ["rw", "ro", "nosuch"])
def test_patch_bad_body_400_before_ticket(export, rw, ro, connect, body, ticket):
    before = read_export(export.sock, 0, 4096)
    status, headers, data = patch(connect(), f"/images/{ticket}", body)
    assert status == 400, data
    assert headers["content-type"] == "text/plain; charset=UTF-8"
    assert read_export(export.sock, 0, 4096) == before


@pytest.mark.parametrize("msg", [{"op": "zero", "size": 4096}, {"op": "flush"}])
@pytest.mark.parametrize("ticket", ["ro", "nosuch"])
def test_patch_403(export, ro, connect, msg, ticket):
    before = read_export(export.sock, 0, 4096)
    status, headers, _ = patch(connect(), f"/images/{ticket}", msg)
    assert status == 403
    assert headers["connection"] == "close"
    assert read_export(export.sock, 0, 4096) == before


@pytest.mark.parametrize("offset,size", [(SIZE, 1), (0, SIZE + 1), (SIZE - 4096, 8192),
                                         (SIZE + 4096, 0), (2**62, 4096)])
def test_patch_zero_past_end_416(export, rw, connect, offset, size):
    before = read_export(export.sock, SIZE - 4096, 4096)
    status, headers, _ = patch(connect(), "/images/rw",
                               {"op": "zero", "offset": offset, "size": size})
    assert status == 416
    assert headers["content-range"] == f"bytes */{SIZE}"
    assert read_export(export.sock, SIZE - 4096, 4096) == before
