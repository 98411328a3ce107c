"""Fuzzing (issue 6, point 6): over 10,000 generated requests against one daemon.

Request lines, headers, Range and Content-Range values, PATCH bodies and ticket JSON of every
shape, huge and negative numbers, unicode, traversal paths, raw garbage, sent on raw sockets:
 - never a 5xx (505 only for a request line that names HTTP/2 or newer, as RFC 9110 wants),
 - never a hang: each exchange half-closes its side and must be answered or closed in time,
 - never a write outside the requested range: the export starts with a known pattern, a model
   follows every answered PUT and PATCH, and the export is compared with it,
 - and afterwards the daemon still answers good requests on every service, with no traceback in
   its log.
"""

import collections
import json
import os
import re
import socket
import ssl
import urllib.parse

import nbd
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from support import Daemon, nbdkit, request

pytestmark = pytest.mark.slow

MiB = 1024**2
SIZE = 1 * MiB              # the main export, and the "rw" and "ro" tickets
SMALL = 256 * 1024          # the "small" ticket: the same export, only its first 256 KiB
SCRATCH = 512 * 1024        # the "hw" ticket on a second export of SIZE, for header fuzzing
TIMEOUT = 5                 # seconds an exchange may take: more is a hang

SERVER_FAILED = b"Server failed to perform the request"

COUNT = {"requests": 0}
STATUSES = collections.Counter()    # (test, status) of the first answers
RAN = set()                         # the fuzz tests that ran
FUZZ_TESTS = 7


def initial(size, seed):
    block = bytes((i * 7 + seed) % 251 + 1 for i in range(4096))
    return bytearray(block * (size // 4096))


class State:
    """The daemon under fuzz, its exports, and the model of the main export."""

    def __init__(self, tmp, cert):
        self.main = nbdkit(os.path.join(tmp, "main.sock"), "memory", f"size={SIZE}")
        self.scratch = nbdkit(os.path.join(tmp, "scratch.sock"), "memory", f"size={SIZE}")
        self.model = initial(SIZE, 1)
        self.scratch_data = initial(SIZE, 2)
        for server, data in ((self.main, self.model), (self.scratch, self.scratch_data)):
            h = nbd.NBD()
            h.connect_unix(server.sock)
            h.pwrite(bytes(data), 0)
            h.flush()
            h.shutdown()
        self.daemon = Daemon(tmp, *cert, args=["--log-level", "INFO"])
        d = self.daemon
        d.add_ticket(self.main.url, SIZE, ticket_id="rw")
        d.add_ticket(self.main.url, SIZE, ops=["read"], ticket_id="ro")
        d.add_ticket(self.main.url, SMALL, ticket_id="small")
        d.add_ticket(self.scratch.url, SCRATCH, ticket_id="hw")
        self.h = {}
        for name, server in (("main", self.main), ("scratch", self.scratch)):
            h = nbd.NBD()
            h.connect_unix(server.sock)
            self.h[name] = h
        self.tls = ssl.create_default_context(cafile=d.cert)
        self.log_offset = 0

    def check_log(self):
        """No traceback and no error logged since the last check (a crash in a connection
        thread closes it without an answer, and only the log tells)."""
        with open(self.daemon.log_path, "rb") as f:
            f.seek(self.log_offset)
            new = f.read()
        self.log_offset += len(new)
        assert b"Traceback" not in new and b" ERROR " not in new, new[-3000:].decode("latin-1")

    def read(self, name, offset=0, length=SIZE):
        return self.h[name].pread(length, offset)

    def check_main(self):
        assert self.read("main") == self.model, "the main export differs from the model"

    def check_scratch_tail(self):
        # Nothing may ever be written past the "hw" ticket's size.
        assert self.read("scratch", SCRATCH, SIZE - SCRATCH) == self.scratch_data[SCRATCH:]

    def close(self):
        for h in self.h.values():
            h.shutdown()
        self.daemon.stop()
        self.main.stop()
        self.scratch.stop()


@pytest.fixture(scope="module")
def state(tmp_path_factory, cert):
    s = State(str(tmp_path_factory.mktemp("fuzz")), cert)
    yield s
    s.close()


FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=False,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.filter_too_much])


# Exchanges

def current_test():
    return os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]


def exchange(state, data, service="local", timeout=TIMEOUT):
    """Send data, half-close, read until the daemon closes. A hang fails the test."""
    COUNT["requests"] += 1
    RAN.add(current_test())
    d = state.daemon
    if service == "remote":
        raw = socket.create_connection(("127.0.0.1", d.port), timeout=timeout)
        s = state.tls.wrap_socket(raw, server_hostname="localhost")
    else:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(d.control_socket if service == "control" else d.local_socket)
    out = bytearray()
    try:
        try:
            s.sendall(data)
            if service != "remote":     # (TLS requests end with Connection: close instead)
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass        # answered (and closed) before all was sent: read the answer
        while True:
            try:
                chunk = s.recv(1024 * 1024)
            except ConnectionResetError:
                break
            except (socket.timeout, TimeoutError):
                raise AssertionError(f"no answer and not closed within {timeout} s: "
                                     f"{bytes(data[:300])!r}") from None
            except ssl.SSLError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    state.check_log()
    return bytes(out)


STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def responses(raw, first_method):
    """[(status, headers, body)] of the responses in raw; the first is parsed exactly, any after
    it (answers to garbage that followed a body) by their status lines."""
    out = []
    if not raw:
        return out
    m = STATUS_LINE.match(raw)
    assert m, f"not an HTTP/1.x response: {raw[:200]!r}"
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of head: {raw[:300]!r}"
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    status = int(m[1])
    length = 0 if first_method == "HEAD" else int(headers.get("content-length", "0"))
    out.append((status, headers, rest[:length]))
    for m in STATUS_LINE.finditer(rest[length:]):
        out.append((int(m[1]), {}, b""))
    return out


def check(raw, method, version=b"HTTP/1.1"):
    """No 5xx, no 500 text anywhere; returns the first response (or None if closed silently)."""
    assert SERVER_FAILED not in raw, raw[:500]
    rs = responses(raw, method)
    for status, headers, _ in rs:
        if status == 505:
            m = re.fullmatch(rb"HTTP/(\d+)\.(\d+)", version.strip())
            assert m and int(m[1]) >= 2, raw[:300]
            continue
        assert status < 500, raw[:500]
    if rs:
        status, headers, body = rs[0]
        assert "content-length" in headers or method == "HEAD" or status == 100, raw[:300]
    STATUSES[(current_test(), rs[0][0] if rs else None)] += 1
    return rs[0] if rs else None


def build(method, target, headers=(), body=b"", version=b"HTTP/1.1"):
    enc = lambda v: v if isinstance(v, bytes) else v.encode("utf-8", "surrogateescape")
    line = enc(method) + b" " + enc(target) + (b" " + enc(version) if version else b"")
    head = b"".join(enc(n) + b": " + enc(v) + b"\r\n" for n, v in headers)
    return line + b"\r\n" + head + b"\r\n" + body


# Strategies

numbers = st.one_of(
    st.sampled_from([0, 1, 511, 512, 4095, 4096, SMALL - 1, SMALL, SMALL + 1, SIZE - 1, SIZE,
                     SIZE + 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30, -1, -4096]),
    st.integers(-2**20, 2 * SIZE),
    st.integers(-2**80, 2**80),
)

digits = st.one_of(
    numbers.map(str),
    st.sampled_from(["", " ", "+5", "-0", "0x10", "1e3", "1.5", "²", "٣", "１", "5 5", "9" * 30,
                     "9" * 5000, "0" * 100 + "1", "NaN", "inf", "*", "null"]),
    st.text(max_size=12),
)

unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=16)

header_value = st.one_of(
    unicode_text,
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", " ", "\t", "a\r\nX-Injected: 1", "\x00", "\xff" * 10]),
)

range_value = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", digits, st.one_of(digits, st.just(""))),
    st.builds(lambda a, b, c, d: f"bytes={a}-{b},{c}-{d}", numbers, numbers, numbers, numbers),
    st.builds(lambda n: f"bytes=-{n}", digits),
    st.builds(lambda u, a: f"{u}={a}-", st.sampled_from(["items", "Bytes", "BYTES", "bytes ",
                                                          " bytes", "", "bites"]), numbers),
    header_value,
)

content_range_value = st.one_of(
    st.builds(lambda a, b, t: f"bytes {a}-{b}/{t}", digits, st.one_of(digits, st.just("*")),
              st.one_of(digits, st.just("*"))),
    st.builds(lambda a: f"bytes */{a}", digits),
    st.builds(lambda a, b: f"bytes={a}-{b}", numbers, numbers),
    st.builds(lambda a, b, t: f"{a}-{b}/{t}", numbers, numbers, numbers),
    header_value,
)

json_leaf = st.one_of(st.none(), st.booleans(), numbers, st.floats(allow_nan=True),
                      unicode_text)
json_any = st.recursive(json_leaf, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(unicode_text, children, max_size=4)),
    max_leaves=12)

ticket_ids = st.one_of(
    st.sampled_from(["ro", "nope", "r", "ro ", "RO", "*", "ro/", "ro%00", "%72%6f", ""]),
    unicode_text.filter(lambda s: not s.startswith(("fz", "rw", "small", "hw"))),
)

sub_paths = st.sampled_from(["", "/", "/extents", "/extents?context=zero", "/extents?context=x",
                             "/checksum", "/checksum/algorithms", "/extent", "/..",
                             "/../tickets/x", "/checksum?block_size=99999",
                             "/checksum?algorithm=md5&block_size=1048576"])


def encode_path(s, safe):
    return urllib.parse.quote(s, safe=safe)


targets = st.one_of(
    st.builds(lambda t, safe, sub, q: "/images/" + encode_path(t, safe) + sub + q,
              ticket_ids, st.sampled_from(["", "/", "%*.?=&", "/%"]), sub_paths,
              st.one_of(st.just(""), st.builds(lambda k, v: f"?{k}={v}",
                                               st.sampled_from(["flush", "context", "start",
                                                                "length", "algorithm",
                                                                "block_size", "x"]),
                                               st.one_of(digits, st.sampled_from(
                                                   ["y", "n", "%FF", "%00", "zero", "dirty",
                                                    "%C3%A9", "a&flush=n&flush=y"]))))),
    st.sampled_from(["/images/../tickets/x", "/tickets/ro", "/tickets/", "/info/", "/info",
                     "/metrics", "*", "/", "//images/ro", "/images/%2e%2e/tickets/ro",
                     "http://x/images/ro", "https://x", "/images/*", "/images/", "/images",
                     "/images//ro", "/images/%FF", "/images/%", "/images/%zz", "/%00",
                     "/images/ro?%FF=%FF", "/images/ro#frag", "\\images\\ro"]),
    unicode_text.map(lambda s: "/" + s),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)

methods = st.one_of(
    st.sampled_from(["GET", "PUT", "PATCH", "OPTIONS", "HEAD", "DELETE", "POST", "TRACE",
                     "CONNECT", "get", "Get", "PRI", "M" * 40]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=10),
)

versions = st.one_of(
    st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/3",
                                          b"HTTP/1.1.1", b"HTTP/11", b"http/1.1", b"HTTP/1.a",
                                          b"HTTP/" + b"9" * 50 + b".1", b"", b"FOO"])
)


# 1. Request lines

@settings(max_examples=2500, **FUZZ_SETTINGS)
@given(method=methods, target=targets, version=versions,
       extra=st.sampled_from([b"", b"", b"", b" x", b"  ", b"\t"]))
def test_fuzz_request_line(state, method, target, version, extra):
    data = build(method, target, [("Host", "x"), ("Content-Length", "0")],
                 version=version + extra if version else b"")
    raw = exchange(state, data)
    check(raw, method, version + extra)


# 2. Headers, on every method, for a read-only ticket and for a writable one whose tail (past its
# size) must never change

header_names = st.one_of(
    st.sampled_from(["Range", "Content-Range", "Content-Length", "Transfer-Encoding", "Expect",
                     "Connection", "Host", "Content-Type", "range", "CONTENT-LENGTH"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"),
            min_size=1, max_size=12),
)

header_values = {
    "range": range_value,
    "content-range": content_range_value,
    "content-length": digits,
    "transfer-encoding": st.sampled_from(["chunked", "Chunked", "gzip", "chunked, gzip",
                                          "identity", "", "chunked\x00"]),
    "expect": st.sampled_from(["100-continue", "100-Continue", "200-ok", ""]),
    "connection": st.sampled_from(["close", "keep-alive", "upgrade", ""]),
}


@st.composite
def header_lists(draw):
    out = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(header_names)
        value = draw(header_values.get(name.lower(), header_value))
        out.append((name, value))
    return out


bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    st.builds(lambda n, c: bytes([c]) * n, st.integers(0, 70000), st.integers(0, 255)),
    st.sampled_from([b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"ffffffffffff\r\nx",
                     b"1;ext=1\r\nx\r\n0\r\nTrailer: y\r\n\r\n", b"-1\r\n"]),
)


@settings(max_examples=3000, **FUZZ_SETTINGS)
@given(method=st.sampled_from(["GET", "HEAD", "PUT", "PATCH", "OPTIONS"]),
       ticket=st.sampled_from(["ro", "hw", "hw", "nope"]), headers=header_lists(),
       body=bodies, flush=st.sampled_from(["", "", "?flush=y", "?flush=n", "?flush=x"]))
def test_fuzz_headers(state, method, ticket, headers, body, flush):
    data = build(method, f"/images/{ticket}{flush}", [("Host", "x")] + headers, body)
    raw = exchange(state, data)
    assert check(raw, method) is not None, "no answer"
    state.check_scratch_tail()


# 3. PUT ranges: an exact model of the main export

@settings(max_examples=2000, **FUZZ_SETTINGS)
@given(ticket=st.sampled_from(["rw", "small", "ro"]),
       start=numbers, end=st.one_of(numbers, st.just("*")), total=st.one_of(numbers,
                                                                           st.just("*")),
       form=st.sampled_from(["range", "range", "no-range", "no-unit", "star"]),
       length=st.one_of(st.integers(0, 4096), st.sampled_from([0, 1, 65536, SMALL + 1])),
       fill=st.integers(0, 255), sent=st.sampled_from(["exact", "exact", "exact", "short",
                                                       "long"]),
       flush=st.sampled_from(["", "?flush=n", "?flush=y", "?flush=N"]))
def test_fuzz_put_ranges(state, ticket, start, end, total, form, length, fill, sent, flush):
    payload = bytes([fill]) * length
    headers = [("Host", "x"), ("Content-Length", str(length))]
    if form == "range":
        headers.append(("Content-Range", f"bytes {start}-{end}/{total}"))
    elif form == "no-unit":
        headers.append(("Content-Range", f"{start}-{end}/{total}"))
    elif form == "star":
        headers.append(("Content-Range", f"bytes */{total}"))
    if sent == "short" and length == 0:
        sent = "exact"
    body = payload if sent == "exact" else payload[:length // 2] if sent == "short" else \
        payload + b"GET / HTTP/1.1\r\n\r\n"
    raw = exchange(state, build("PUT", f"/images/{ticket}{flush}", headers, body))
    first = check(raw, "PUT")
    assert first is not None, "a PUT got no answer"
    status = first[0]
    offset = start if form == "range" else 0
    limit = {"rw": SIZE, "small": SMALL, "ro": 0}[ticket]
    valid = (form in ("range", "no-range") and flush != "?flush=N" and
             (form == "no-range" or (start >= 0 and (end == "*" or (end >= start and (
                 total == "*" or end < total))) and (total == "*" or total >= 0)
                 and (end == "*" or end >= 0))))
    if status == 200:
        assert ticket != "ro" and valid and sent != "short"
        assert 0 <= offset and offset + length <= limit, (offset, length, limit)
        state.model[offset:offset + length] = payload
    else:
        # Refused requests are refused for a reason.
        assert not (valid and ticket != "ro" and sent == "exact" and
                    0 <= offset and offset + length <= limit), raw[:300]
    state.check_main()


# 4. PATCH bodies: JSON of every shape, and zero ops with every kind of number

zero_ops = st.fixed_dictionaries(
    {"op": st.sampled_from(["zero", "zero", "flush", "Zero", "", "punch"])},
    optional={"offset": st.one_of(numbers, json_leaf), "size": st.one_of(numbers, json_leaf),
              "flush": st.one_of(st.booleans(), json_leaf), "extra": json_any})

patch_bodies = st.one_of(
    zero_ops.map(lambda d: json.dumps(d).encode()),
    json_any.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"{", b"[" * 50000, b'{"op":"zero","size":1' + b"0" * 5000 + b"}",
                     b'{"op":"zero","size":1e999}', b'{"op":"zero","size":NaN}',
                     b'{"op": "zero", "size": 4096, "op": "flush"}', b"\xff\xfe{}",
                     b'{"op":"zero","size":-0}', b'"zero"', b"null", b"1" * 70000]),
    st.binary(max_size=100),
)


@settings(max_examples=2000, **FUZZ_SETTINGS)
@given(ticket=st.sampled_from(["rw", "small", "ro", "nope"]), body=patch_bodies,
       length=st.sampled_from(["exact", "exact", "exact", "none", "short", "huge", "junk"]))
def test_fuzz_patch(state, ticket, body, length):
    value = {"exact": str(len(body)), "short": str(max(0, len(body) - 1)),
             "huge": "9" * 30, "junk": "1,1"}.get(length)
    headers = [("Host", "x")] + ([("Content-Length", value)] if value is not None else [])
    raw = exchange(state, build("PATCH", f"/images/{ticket}", headers, body))
    first = check(raw, "PATCH")
    assert first is not None, "a PATCH got no answer"
    if first[0] == 200:
        msg = json.loads(body)
        assert ticket in ("rw", "small") and length == "exact"
        if msg["op"] == "zero":
            offset, size = msg.get("offset", 0), msg["size"]
            limit = SIZE if ticket == "rw" else SMALL
            assert offset >= 0 and size >= 0 and offset + size <= limit
            state.model[offset:offset + size] = bytes(size)
        else:
            assert msg["op"] == "flush"
    state.check_main()


# 5. The control API: ticket JSON and ids (ids start with "fz": the data tickets stay)

ticket_fields = {
    "uuid": st.one_of(unicode_text, json_leaf),
    "size": st.one_of(numbers, json_leaf),
    "ops": st.one_of(st.lists(st.sampled_from(["read", "write", "x", ""]), max_size=3),
                     json_any),
    "timeout": st.one_of(numbers, json_leaf),
    "url": st.one_of(st.sampled_from(["nbd:unix:/nowhere", "nbd:localhost:1", "nbd://[::1",
                                      "nbd+unix:///x?socket=/nowhere", "nbd://h:99999/x",
                                      "nbd:unix:", "nbd:h:" + "1" * 5000, "nbd://:0",
                                      "nbd+unix://", "file:///etc/passwd", "nbd:[zz]:1",
                                      "nbd:unix:/x:exportname=" + "é" * 100]), json_leaf),
    "inactivity_timeout": st.one_of(numbers, json_leaf),
    "transfer_id": json_leaf, "filename": json_leaf, "sparse": json_leaf, "dirty": json_leaf,
    "extra": json_any,
}


@st.composite
def ticket_json(draw):
    """A good ticket with a few fields changed, dropped or added."""
    ticket = {"uuid": "", "size": draw(st.integers(0, 2**40)),
              "ops": draw(st.sampled_from([["read"], ["write"], ["read", "write"]])),
              "timeout": draw(st.integers(0, 10**6)), "url": "nbd:unix:/nowhere"}
    for name in draw(st.lists(st.sampled_from(sorted(ticket_fields)), max_size=3)):
        if draw(st.integers(0, 4)) == 0:
            ticket.pop(name, None)
        else:
            ticket[name] = draw(ticket_fields[name])
    return ticket


@settings(max_examples=2000, **FUZZ_SETTINGS)
@given(suffix=unicode_text, method=st.sampled_from(["PUT", "PUT", "PUT", "PATCH", "GET",
                                                    "DELETE", "POST"]),
       body=st.one_of(ticket_json().map(lambda d: json.dumps(d).encode()),
                      json_any.map(lambda v: json.dumps(v).encode()),
                      st.sampled_from([b"[" * 60000, b'{"timeout":1' + b"0" * 400 + b"}",
                                       b'{"timeout":-1}', b'{"timeout":1e308}', b"\xff",
                                       b'{"timeout":9223372036854775808}'])),
       same_uuid=st.integers(0, 4).map(bool))
def test_fuzz_control(state, suffix, method, body, same_uuid):
    ticket_id = "fz" + suffix
    if same_uuid and method == "PUT":
        try:
            msg = json.loads(body)
        except (ValueError, RecursionError):
            msg = None
        if isinstance(msg, dict):
            msg["uuid"] = ticket_id
            body = json.dumps(msg).encode()
    target = "/tickets/" + urllib.parse.quote(ticket_id, safe="")
    headers = [("Host", "x"), ("Content-Length", str(len(body)))]
    raw = exchange(state, build(method, target, headers, body), service="control")
    first = check(raw, method)
    assert first is not None
    if method == "PUT" and first[0] == 200:
        # What was accepted reads back, and the data API refuses nothing it should not.
        status, info = request(state.daemon.control(), "GET", target)
        assert status == 200, info
        assert json.loads(info)["uuid"] == ticket_id


# 6. Garbage, and requests over TLS

@settings(max_examples=600, **FUZZ_SETTINGS)
@given(data=st.one_of(st.binary(max_size=2000),
                      st.lists(st.sampled_from([b"GET", b" ", b"/images/ro", b"\r\n", b"\n",
                                                b"HTTP/1.1", b":", b"Range", b"\x00", b"\xff",
                                                b"Content-Length: 5", b"\r\n\r\n"]),
                               max_size=30).map(b"".join)),
       service=st.sampled_from(["local", "control"]))
def test_fuzz_garbage(state, data, service):
    raw = exchange(state, data, service=service)
    assert SERVER_FAILED not in raw
    for status, _, _ in responses(raw, "GET") if raw.startswith(b"HTTP/") else []:
        assert status < 500 or status == 505


@settings(max_examples=400, **FUZZ_SETTINGS)
@given(method=st.sampled_from(["GET", "HEAD", "PUT", "PATCH", "OPTIONS"]),
       target=targets, headers=header_lists(), body=st.binary(max_size=200))
def test_fuzz_tls(state, method, target, headers, body):
    headers = [(n, v) for n, v in headers if n.lower() not in (
        "content-length", "transfer-encoding", "expect", "connection")]
    assume("/hw" not in target and "/rw" not in target and "/small" not in target)
    data = build(method, target, [("Host", "x"), ("Content-Length", str(len(body)))] + headers
                 + [("Connection", "close")], body)
    raw = exchange(state, data, service="remote")
    check(raw, method)


# Afterwards

def test_after_fuzzing(state):
    d = state.daemon
    state.check_main()
    state.check_scratch_tail()
    # Good requests on every service.
    status, data = request(d.local(), "GET", "/images/rw")
    assert status == 200 and data == bytes(state.model)
    status, data = request(d.remote(), "GET", "/images/ro", headers={"Range": "bytes=0-4095"})
    assert status == 206 and data == bytes(state.model[:4096])
    payload = os.urandom(8192)
    status, _ = request(d.local(), "PUT", "/images/rw", payload,
                        {"Content-Range": f"bytes 4096-{4096 + 8191}/*"})
    assert status == 200
    state.model[4096:4096 + 8192] = payload
    state.check_main()
    assert d.ticket_info("rw")["canceled"] is False
    status, body = request(d.control(), "GET", "/tickets/")
    assert status == 200
    log = d.read_log()
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
    assert " ERROR " not in log, [line for line in log.splitlines() if " ERROR " in line][:5]
    print(f"fuzz: {COUNT['requests']} generated requests")
    by_test = collections.defaultdict(dict)
    for (test, status), n in sorted(STATUSES.items(), key=str):
        by_test[test][status] = n
    for test, counts in by_test.items():
        print(f"  {test}: {counts}")
    if len(RAN) == FUZZ_TESTS:      # the whole module ran, not some tests of it
        assert COUNT["requests"] >= 10_000
