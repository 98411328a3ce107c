"""Issue 11 (defects 1, 3, 4) and issue 12 (items 13, 14), client side: nothing the client
reports as done is wrong, whatever the target held before and whatever a server answers.

Uploads go onto targets holding old data; downloads come from a small fake HTTP server whose
OPTIONS and extents say what each test tells them to (GET data is a real image's bytes); images
of odd size come from nbdkit through the real daemon. Every success is checked with
`qemu-img compare` or the bytes, every failure is one line and exit status 1.
"""

import http.server
import json
import os
import re
import subprocess
import threading
import urllib.parse
import uuid

import pytest

from support import NBDPROXY, TOP, exported, nbdkit, qemu_nbd

from nbdproxy.client import image, transfer

KiB = 1024
MiB = 1024**2


@pytest.fixture
def daemon(module_daemon):
    return module_daemon


def cli(*args, timeout=120):
    return subprocess.run(NBDPROXY + [str(a) for a in args], cwd=TOP, capture_output=True,
                          text=True, timeout=timeout)


def assert_ok(p):
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", p.stderr


def assert_one_line_error(p, *words):
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("nbdproxy: "), p.stderr
    for word in words:
        assert word in lines[0], p.stderr
    return lines[0]


def compare(a, b):
    p = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def virtual_size(path):
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["virtual-size"]


def write_raw(path, size, blocks):
    """A sparse raw file of size bytes with random data in the (offset, length) blocks."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in blocks:
            f.seek(offset)
            f.write(os.urandom(length))
    return str(path)


def as_format(raw, fmt):
    """raw itself, or a qcow2 with the same content (data clusters only where raw has data)."""
    if fmt == "raw":
        return raw
    out = raw[:-len(".raw")] + ".qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, out],
                   check=True)
    os.unlink(raw)
    return out


# Defect 1: an upload onto a target that holds old data where the source has zeros.

TARGET_SIZE = 10 * MiB + 512        # not a multiple of 4096
AMOUNTS = {"4k": 4 * KiB, "1m-4k": MiB - 4 * KiB, "1m+4k": MiB + 4 * KiB, "4m": 4 * MiB}
PLACES = ("start", "middle", "scattered", "tail")
# (target format, source format, --verify): each amount and each place meets both values of
# each, and all eight combinations occur, in 16 uploads instead of 128.
COMBOS = [(t, s, v) for v in (False, True) for s in ("raw", "qcow2") for t in ("raw", "qcow2")]
UPLOAD_CASES = [pytest.param(amount, place, *COMBOS[(a + 3 * p) % 8],
                             id=f"{amount}-{place}-{'-'.join(map(str, COMBOS[(a + 3 * p) % 8]))}")
                for a, amount in enumerate(AMOUNTS) for p, place in enumerate(PLACES)]


def old_data(amount, place, size):
    """The (offset, length) blocks of old data in the target."""
    if place == "start":
        return [(0, amount)]
    if place == "middle":
        return [((size // 2) // 4096 * 4096, amount)]
    if place == "tail":         # up to the target's last byte: its 512-byte tail included
        return [(size - amount, amount)]
    count = amount // 4096
    stride = max(8192, (size - 4096) // count // 4096 * 4096)
    return [(i * stride, 4096) for i in range(count)]


@pytest.mark.parametrize("amount,place,target_fmt,source_fmt,verify", UPLOAD_CASES)
def test_upload_over_old_data(daemon, tmp_path, amount, place, target_fmt, source_fmt, verify):
    size = TARGET_SIZE
    # The target: what qemu-img create makes (raw: its first 4 KiB allocated), then old data.
    raw = str(tmp_path / "target.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", raw, str(size)], check=True)
    with open(raw, "r+b") as f:
        for offset, length in old_data(AMOUNTS[amount], place, size):
            f.seek(offset)
            f.write(os.urandom(length))
    target = as_format(raw, target_fmt)
    # The source: a little data of its own; zeros wherever most of the old data is.
    src = as_format(write_raw(tmp_path / "src.raw", size, [(64 * KiB, 4 * KiB),
                                                          (6 * MiB, 64 * KiB)]), source_fmt)
    server = qemu_nbd(target, str(tmp_path / "nbd.sock"), target_fmt)
    ticket = uuid.uuid4().hex
    with exported(daemon, server, ticket, size=size, ops=["write"]):
        p = cli("upload", src, f"https://localhost:{daemon.port}/images/{ticket}",
                "--cafile", daemon.cert, *(["--verify"] if verify else []))
    assert_ok(p)
    compare(src, target)


def test_upload_skips_only_known_zeros(daemon, tmp_path):
    """Zeros are skipped exactly where the target's extents say zero: onto a target with one
    old 4 KiB block, an empty source costs one PATCH zero of that block, nothing more."""
    size = TARGET_SIZE
    target = write_raw(tmp_path / "target.raw", size, [(5 * MiB, 4096)])
    src = write_raw(tmp_path / "src.raw", size, [])
    server = qemu_nbd(target, str(tmp_path / "nbd.sock"))
    ticket = uuid.uuid4().hex
    with exported(daemon, server, ticket, size=size, ops=["write"]):
        stats = transfer.upload(src, f"https://localhost:{daemon.port}/images/{ticket}",
                                cafile=daemon.cert)
        assert daemon.ticket_info(ticket)["transferred"] == 4096
    assert (stats["copied"], stats["zeroed"]) == (0, 4096)
    compare(src, target)


# Defect 3 and item 13: a fake server whose OPTIONS and extents answer as told.

FAKE_SIZE = 3 * MiB + 4096
# The fake image's true map: data, zeros, data.
TRUE_MAP = [{"start": 0, "length": MiB, "zero": False, "hole": False},
            {"start": MiB, "length": MiB, "zero": True, "hole": True},
            {"start": 2 * MiB, "length": MiB + 4096, "zero": False, "hole": False}]


def window(full_map, start, length):
    """The extents of full_map in [start, start+length), clipped: an honest nbdproxy answer."""
    end = FAKE_SIZE if length is None else start + length
    out = []
    for e in full_map:
        a, b = max(e["start"], start), min(e["start"] + e["length"], end)
        if a < b:
            out.append(dict(e, start=a, length=b - a))
    return out


class FakeServer:
    """Plain HTTP on 127.0.0.1: OPTIONS answers options; GET .../extents answers
    extents(context, start, length) (JSON, or bytes sent as they are); GET .../checksum answers
    checksum; GET ranges serve data as ranges says (RANGES), the first GET cut after drop_after
    bytes when set; PUT and PATCH zero write into data."""

    def __init__(self, data, options, extents, drop_after=None, checksum=None, ranges="exact"):
        self.data = bytearray(data)
        self.ranges = ranges
        self.checksum = checksum
        self.options = options
        self.extents = extents
        self.drop_after = drop_after
        self.requests = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/images/fake"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self, status, body=b"", ctype="application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_OPTIONS(self):
        fake = self.server.fake
        fake.requests.append(("OPTIONS", self.path))
        self._answer(200, json.dumps(fake.options).encode())

    def do_GET(self):
        fake = self.server.fake
        fake.requests.append(("GET", self.path))
        url = urllib.parse.urlsplit(self.path)
        if url.path.endswith("/extents"):
            q = dict(urllib.parse.parse_qsl(url.query))
            length = int(q["length"]) if "length" in q else None
            answer = fake.extents(q.get("context", "zero"), int(q.get("start", 0)), length)
            body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            return self._answer(200, body)
        if url.path.endswith("/checksum"):
            return self._answer(200, json.dumps(fake.checksum).encode())
        a, b = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers["Range"]).groups())
        fake.requests.append(("RANGE", a, b + 1))
        data = bytes(fake.data[a:b + 1])
        if fake.ranges == "chunked":
            return self._chunked(bytes(fake.data))
        if fake.drop_after is None:
            status, data, headers = RANGES[fake.ranges](fake.data, a, b)
            return self._answer(status, data, "application/octet-stream", headers)
        # Announce the whole range, send a part, close: a server that died mid-body.
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {a}-{b}/{len(fake.data)}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:fake.drop_after])
        fake.drop_after = None
        self.close_connection = True

    def _chunked(self, data):
        """200 and the whole image in chunks, no length: a server or proxy that ignores Range."""
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(data), 65536):
            chunk = data[i:i + 65536]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def do_PUT(self):
        fake = self.server.fake
        offset = int(re.match(r"bytes (\d+)-", self.headers["Content-Range"])[1])
        body = self._body()
        fake.requests.append(("PUT", offset, len(body)))
        fake.data[offset:offset + len(body)] = body
        self._answer(200)

    def do_PATCH(self):
        fake = self.server.fake
        msg = json.loads(self._body())
        fake.requests.append(("PATCH", msg))
        if msg["op"] == "zero":
            fake.data[msg["offset"]:msg["offset"] + msg["size"]] = bytes(msg["size"])
        self._answer(200)


def _range(data, a, b, shown=None, total=None):
    """206 with data[a:b+1], its Content-Range saying shown (default: that range) and total."""
    headers = [("Content-Range", shown or f"bytes {a}-{b}/{len(data) if total is None else total}")]
    return 206, bytes(data[a:b + 1]), headers


# How the fake answers GET bytes=a-b: (status, body, headers) from (data, a, b).
RANGES = {
    "exact": _range,
    "star": lambda data, a, b: _range(data, a, b, total="*"),
    "whole": lambda data, a, b: (200, bytes(data), []),
    # Defects: the right length, but another range (offset 0's), or no range said.
    "shifted": lambda data, a, b: _range(data, 0, b - a),
    "no-content-range": lambda data, a, b: (206, bytes(data[a:b + 1]), []),
    "no-total": lambda data, a, b: _range(data, a, b, shown=f"bytes {a}-{b}"),
    "other-end": lambda data, a, b: _range(data, a, b, shown=f"bytes {a}-{b + 1}/*"),
}


@pytest.fixture
def fake_image(tmp_path):
    """A raw file with the content TRUE_MAP describes."""
    return write_raw(tmp_path / "fake.raw", FAKE_SIZE, [(0, MiB), (2 * MiB, MiB + 4096)])


@pytest.fixture
def fake(fake_image):
    made = []

    def make(options, extents, **kw):
        with open(fake_image, "rb") as f:
            made.append(FakeServer(f.read(), options, extents, **kw))
        return made[-1]

    yield make
    for server in made:
        server.stop()


READ = {"features": ["extents", "checksum"], "max_readers": 2, "max_writers": 2}
WRITE = dict(READ, features=["extents", "checksum", "zero", "flush"])
def HONEST(context, start, length):
    """nbdproxy's answer: the true map of the window asked."""
    return window(TRUE_MAP, start, length)


def fixed(answer):
    """A server that answers the same map to every window (as ovirt-imageio does)."""
    return lambda context, start, length: answer


def ext(start, length, zero=False):
    return {"start": start, "length": length, "zero": zero, "hole": zero}


S = FAKE_SIZE
LYING_MAPS = {
    "empty": [],
    "ends-early": [ext(0, S - MiB)],
    "negative-length": [ext(0, 2 * MiB), ext(2 * MiB, -MiB), ext(MiB, S - MiB)],
    "zero-length": [ext(0, 0), ext(0, S)],
    "overlap": [ext(0, 2 * MiB), ext(MiB, S - MiB)],
    "gap": [ext(0, MiB), ext(2 * MiB, S - 2 * MiB)],
    "out-of-order": [ext(MiB, S - MiB), ext(0, MiB)],
    "past-the-end": [ext(0, S + 4096)],
    "starts-late": [ext(4096, S - 4096)],
    # Item 13: not the shape of API.md 4b at all.
    "not-a-list": {"extents": [ext(0, S)]},
    "not-objects": [[0, S, False]],
    "string-start": [{"start": "0", "length": S, "zero": False}],
    "float-length": [{"start": 0, "length": S + 0.5, "zero": False}],
    "no-zero-flag": [{"start": 0, "length": S}],
    "not-json": b"[{\"start\": 0,",
}


@pytest.mark.parametrize("name", LYING_MAPS)
def test_download_refuses_lying_extents(fake, tmp_path, name):
    server = fake(dict(READ, size=S), fixed(LYING_MAPS[name]))
    out = tmp_path / "out.raw"
    p = cli("download", server.url, out)
    assert_one_line_error(p, "extents")
    assert not out.exists()     # the partial download is removed


@pytest.mark.parametrize("name", ["empty-but-data", "gap", "negative-length", "starts-late"])
def test_size_from_lying_extents(fake, tmp_path, name):
    """Without a size in OPTIONS the extents give it: they too must tile [0, end)."""
    maps = dict(LYING_MAPS, **{"empty-but-data": [ext(0, S), ext(S, 0)]})
    server = fake(READ, fixed(maps[name]))
    out = tmp_path / "out.raw"
    p = cli("download", server.url, out)
    assert_one_line_error(p, "extents")
    assert not out.exists()


def test_incremental_refuses_lying_dirty_extents(fake, tmp_path):
    backing = tmp_path / "full.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(backing), str(S)], check=True)
    dirty = [{"start": 0, "length": MiB, "dirty": True, "zero": False}]     # ends early
    server = fake(dict(READ, size=S), fixed(dirty))
    out = tmp_path / "incr.qcow2"
    p = cli("download", server.url, out, "--incremental", "--backing-file", backing)
    assert_one_line_error(p, "extents end at")
    assert not out.exists()


def test_upload_refuses_lying_target_extents(fake, tmp_path):
    """The map that says where the target reads as zeros is checked too: one that ends early
    must not make the client skip the zeros past its end."""
    server = fake(dict(WRITE, size=S), fixed([ext(0, MiB, zero=True)]))
    src = write_raw(tmp_path / "src.raw", S, [(0, 4096)])
    p = cli("upload", src, server.url)
    assert_one_line_error(p, "extents end at")


@pytest.mark.parametrize("options", ["sized", "unsized"])
def test_download_from_honest_fake(fake, tmp_path, options):
    """The checks take what a server may answer: nbdproxy's exact windows, or the whole map
    again for every window (ovirt-imageio), with or without a size in OPTIONS."""
    sized = options == "sized"
    server = fake(dict(READ, size=S) if sized else READ, fixed(TRUE_MAP))
    old, image.EXTENTS_WINDOW = image.EXTENTS_WINDOW, MiB + 4096     # windows cut extents
    try:
        out = tmp_path / "out.raw"
        stats = transfer.download(server.url, str(out))
        honest = fake(dict(READ, size=S), HONEST)
        transfer.download(honest.url, str(tmp_path / "honest.raw"))
        windows = [r[1] for r in honest.requests if r[0] == "GET" and "/extents" in r[1]]
    finally:
        image.EXTENTS_WINDOW = old
    with open(out, "rb") as f:
        assert f.read() == bytes(server.data)
    with open(tmp_path / "honest.raw", "rb") as f:
        assert f.read() == bytes(server.data)
    assert stats["copied"] == S - MiB
    assert len(windows) == 3        # the windows were asked and answered one by one
    # Only the data moved, each byte once, though the answers overlapped the windows.
    ranges = sorted(r[1:] for r in server.requests if r[0] == "RANGE")
    assert ranges == [(0, MiB), (2 * MiB, S)]


def test_upload_zeroes_what_target_extents_call_data(fake, tmp_path):
    """An honest target map with data where the source has zeros: zeroed exactly there."""
    server = fake(dict(WRITE, size=S), HONEST)
    src = write_raw(tmp_path / "src.raw", S, [(2 * MiB, 4096)])
    assert_ok(cli("upload", src, server.url))
    with open(src, "rb") as f:
        assert bytes(server.data) == f.read()
    zeroed = sorted((r[1]["offset"], r[1]["size"]) for r in server.requests if r[0] == "PATCH"
                    and r[1]["op"] == "zero")
    assert zeroed == [(0, MiB), (2 * MiB + 4096, MiB)]


# Item 13: OPTIONS that is not what API.md 1 says.

BAD_OPTIONS = {
    "a-list": [READ],
    "a-string": "extents",
    "max-readers-string": dict(READ, max_readers="4", size=S),
    "max-readers-float": dict(READ, max_readers=2.5, size=S),
    "size-string": dict(READ, size="big"),
    "size-float": dict(READ, size=S + 0.5),
    "size-negative": dict(READ, size=-1),
    "features-string": dict(READ, features="extents", size=S),
}


@pytest.mark.parametrize("name", BAD_OPTIONS)
@pytest.mark.parametrize("command", ["download", "upload"])
def test_unexpected_options(fake, tmp_path, name, command):
    server = fake(BAD_OPTIONS[name], HONEST)
    out = tmp_path / "out.raw"
    if command == "download":
        p = cli("download", server.url, out)
    else:
        p = cli("upload", write_raw(tmp_path / "src.raw", S, [(0, 4096)]), server.url)
    assert_one_line_error(p, "OPTIONS")
    assert not out.exists()
    assert [r[0] for r in server.requests] == ["OPTIONS"]


@pytest.mark.parametrize("answer", [["blake2b", "00"], {"checksum": 17}, {}])
def test_unexpected_checksum_answer(fake, tmp_path, answer):
    server = fake(dict(READ, size=S), HONEST, checksum=answer)
    assert_one_line_error(cli("checksum", server.url), "checksum")
    # --verify asks the same: a download that cannot be verified is not kept.
    out = tmp_path / "out.raw"
    assert_one_line_error(cli("download", server.url, out, "--verify"), "checksum")
    assert not out.exists()


# Item 14: a download from a server that drops mid-body.

def test_download_response_ends_early(fake, tmp_path):
    server = fake(dict(READ, size=S), HONEST, drop_after=100 * KiB)
    out = tmp_path / "out.raw"
    p = cli("download", server.url, out, "--connections", "1")
    line = assert_one_line_error(p, "the server's response", "ended", "early")
    assert "request body" not in line
    assert not out.exists()


# Review 1: a download takes only the range it asked for.

def leftovers(directory):
    """Temporary files of a download left in directory."""
    return [name for name in os.listdir(directory) if ".nbdproxy-" in name]


@pytest.mark.parametrize("ranges", ["chunked", "whole", "shifted", "no-content-range",
                                    "no-total", "other-end"])
def test_download_checks_the_range_it_gets(fake, tmp_path, ranges):
    """GETs of [0, 1M) and [2M, end): a server that answers another range (200 and the whole
    image, or a 206 of other bytes) fails the download; it never writes the bytes of one
    offset at another and exits 0."""
    server = fake(dict(READ, size=S), HONEST, ranges=ranges)
    out = tmp_path / "out.raw"
    p = cli("download", "--connections", "1", server.url, out)
    if p.returncode == 0:
        assert out.read_bytes() == bytes(server.data), "download exited 0 with wrong bytes"
    line = assert_one_line_error(p, "asked for bytes", "the server sends")
    assert ("(200)" if ranges in ("chunked", "whole") else "(206)") in line
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("ranges", ["star", "whole"])
def test_download_takes_a_range_said_another_way(fake, tmp_path, ranges):
    """A 206 whose total is "*", and a 200 of the whole image when the whole image was asked
    (a server may ignore Range, RFC 9110 14.2): the bytes are the ones asked."""
    server = fake(dict(READ, size=S), fixed([ext(0, S)]), ranges=ranges)
    out = tmp_path / "out.raw"
    assert_ok(cli("download", server.url, out))
    assert out.read_bytes() == bytes(server.data)
    assert [r[1:] for r in server.requests if r[0] == "RANGE"] == [(0, S)]


# Review 2: a download that fails leaves a FILE the user had as it was.

FAILURES = {
    "extents": dict(extents=fixed(LYING_MAPS["ends-early"])),
    "range": dict(ranges="shifted"),
    "verify": dict(checksum={"algorithm": "blake2b", "block_size": 4 * MiB, "checksum": "00"}),
}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("name", ["backup.raw", "backup.qcow2"])
def test_failed_download_keeps_the_users_existing_file(fake, tmp_path, failure, name):
    kw = {"extents": HONEST, **FAILURES[failure]}
    server = fake(dict(READ, size=S), kw.pop("extents"), **kw)
    out = tmp_path / name
    out.write_bytes(b"precious" * 4096)
    p = cli("download", server.url, out, "--verify", "--connections", "1")
    line = assert_one_line_error(p)
    assert ".nbdproxy-" not in line         # the error names the user's file, if any
    assert out.read_bytes() == b"precious" * 4096
    assert not leftovers(tmp_path)


def test_download_replaces_an_existing_file(fake, fake_image, tmp_path):
    """Success replaces FILE (a larger one, an image of another format) with exactly the
    download, verified; its permissions stay; a symbolic link stays a link to the new file."""
    server = fake(dict(READ, size=S), HONEST, checksum=transfer.checksum(fake_image))
    out = tmp_path / "backup.raw"
    write_raw(out, 4 * S, [(0, 4 * S)])
    os.chmod(out, 0o640)
    assert_ok(cli("download", server.url, out, "--verify"))
    assert out.read_bytes() == bytes(server.data)
    assert os.stat(out).st_mode & 0o777 == 0o640
    qcow2 = tmp_path / "backup.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "1G"], check=True)
    link = tmp_path / "latest.qcow2"
    link.symlink_to("backup.qcow2")
    assert_ok(cli("download", server.url, link, "--verify"))
    assert link.is_symlink()
    assert virtual_size(qcow2) == S
    compare(out, qcow2)
    assert not leftovers(tmp_path)


def test_download_onto_its_backing_file_is_refused(fake, tmp_path):
    """FILE in the chain of --backing-file would be replaced by an image on top of itself."""
    server = fake(dict(READ, size=S), HONEST)
    full = tmp_path / "full.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(full), str(S)], check=True)
    incr = tmp_path / "incr.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2",
                    str(incr)], check=True)
    before = full.read_bytes()
    for backing in (full, incr):
        p = cli("download", server.url, full, "--backing-file", backing)
        assert_one_line_error(p, "backing chain")
    assert full.read_bytes() == before
    assert not leftovers(tmp_path)


# Defect 4: sizes that are not a multiple of 512.

ODD = 100001


@pytest.fixture
def odd_file(tmp_path):
    """A 100001-byte raw file: data at the start, a hole, data up to its last byte."""
    return write_raw(tmp_path / "odd.raw", ODD, [(0, 20000), (65536, ODD - 65536)])


def odd_export(daemon, tmp_path, path, ops):
    server = nbdkit(str(tmp_path / f"nbdkit-{uuid.uuid4().hex[:6]}.sock"), "file", path)
    ticket = uuid.uuid4().hex
    return exported(daemon, server, ticket, size=ODD, ops=ops), \
        f"https://localhost:{daemon.port}/images/{ticket}"


def test_odd_size_round_trip(daemon, tmp_path, odd_file):
    export, url = odd_export(daemon, tmp_path, odd_file, ["read"])
    raw, qcow2 = tmp_path / "down.raw", tmp_path / "down.qcow2"
    with export:
        assert_ok(cli("download", url, raw, "--cafile", daemon.cert, "--verify"))
        assert_ok(cli("download", url, qcow2, "--cafile", daemon.cert, "--verify"))
        remote = json.loads(cli("checksum", url, "--cafile", daemon.cert).stdout)
    # raw: exactly the remote size and bytes; qcow2: qemu's rounded size with a zero tail.
    assert os.path.getsize(raw) == ODD
    with open(raw, "rb") as a, open(odd_file, "rb") as b:
        assert a.read() == b.read()
    assert virtual_size(qcow2) == 100352
    compare(odd_file, qcow2)
    # checksum FILE of the raw copy hashes its 100001 bytes, as the server does.
    assert json.loads(cli("checksum", raw).stdout) == remote

    # Back up onto an odd-size target, from the raw and from the qcow2, verified.
    for local in (raw, qcow2):
        target = write_raw(tmp_path / "target.raw", ODD, [(0, ODD)])     # old data everywhere
        export, url = odd_export(daemon, tmp_path, target, ["write"])
        with export:
            assert_ok(cli("upload", local, url, "--cafile", daemon.cert, "--verify"))
        assert os.path.getsize(target) == ODD
        with open(target, "rb") as a, open(odd_file, "rb") as b:
            assert a.read() == b.read()


def test_odd_size_tail_with_data_is_refused(daemon, tmp_path, odd_file):
    """Larger than the target by less than 512 bytes, but with data there: still refused."""
    local = write_raw(tmp_path / "local.raw", 100352, [(0, 4096)])
    with open(local, "r+b") as f:
        f.seek(ODD + 100)
        f.write(b"\x01")
    target = write_raw(tmp_path / "target.raw", ODD, [])
    export, url = odd_export(daemon, tmp_path, target, ["write"])
    with export:
        p = cli("upload", local, url, "--cafile", daemon.cert)
    assert_one_line_error(p, "larger than the target", "100352", str(ODD))
    with open(target, "rb") as f:
        assert f.read() == bytes(ODD)       # nothing written
