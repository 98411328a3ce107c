"""API.md section 4b: GET /images/{ticket}/extents?context=zero|dirty against real exports.

The expected maps come from elsewhere: `qemu-img map` of the image file, or libnbd block status
asked directly of the export; zero extents are also checked by reading their bytes through NBD.
"""

import json
import os
import subprocess

import nbd
import pytest

import support
from support import nbdkit, qemu_nbd, read_export

MiB = 1024**2
SIZE = 8 * MiB


@pytest.fixture(scope="module")
def daemon(module_daemon):
    return module_daemon




def exported(daemon, server, ticket_id, size=SIZE, **ticket):
    return support.exported(daemon, server, ticket_id, size, **ticket)


def serve(tmp_path, image, fmt, *extra):
    return qemu_nbd(image, str(tmp_path / f"{fmt}.sock"), fmt, *extra)


def qemu_io(path, fmt, *commands):
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run(argv + [path], check=True, stdout=subprocess.DEVNULL)


def get_extents(conn, ticket, query=""):
    conn.request("GET", f"/images/{ticket}/extents{query}")
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), body


def extents_of(conn, ticket, query=""):
    status, ctype, body = get_extents(conn, ticket, query)
    assert status == 200, body
    assert ctype == "application/json"
    return json.loads(body)


def merge(runs):
    """[(start, length, flags)] with neighbours of equal flags merged."""
    out = []
    for start, length, flags in runs:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((start, length, flags))
    return out


def check_map(extents, size, keys):
    """Covers [0, size) without gaps or overlaps, with no two neighbours of equal flags."""
    assert extents, "empty map"
    pos = 0
    for e in extents:
        assert set(e) == {"start", "length"} | set(keys), e
        assert e["start"] == pos and e["length"] > 0
        for k in keys:
            assert type(e[k]) is bool
        pos += e["length"]
    assert pos == size
    for a, b in zip(extents, extents[1:]):
        assert [a[k] for k in keys] != [b[k] for k in keys], (a, b)


def as_runs(extents, keys):
    return [(e["start"], e["length"], tuple(e[k] for k in keys)) for e in extents]


def qemu_img_zero_map(path, fmt):
    """(start, length, (zero, hole)) from qemu-img map: hole = not allocated in any layer."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", fmt, path],
                         check=True, capture_output=True, text=True).stdout
    return merge([(e["start"], e["length"], (e["zero"], not e["present"]))
                  for e in json.loads(out)])


def check_zero_bytes(sock, extents):
    for e in extents:
        if e["zero"]:
            assert read_export(sock, e["start"], e["length"]) == bytes(e["length"]), e


@pytest.fixture
def raw_file(tmp_path):
    """An 8 MiB sparse raw file: data at 0 and 3 MiB, a zeroed but allocated MiB at 5 MiB."""
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(MiB))
        f.seek(3 * MiB)
        f.write(os.urandom(65536))
    subprocess.run(["fallocate", "-z", "-o", str(5 * MiB), "-l", str(MiB), path], check=True)
    return path


@pytest.fixture
def qcow2_file(tmp_path):
    """A qcow2 image: data at 0 (1 MiB) and 2 MiB (64 KiB), a zero cluster run at 5 MiB."""
    path = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE)], check=True)
    qemu_io(path, "qcow2", "write -P 1 0 1M")
    return path


@pytest.fixture
def bitmap_file(qcow2_file):
    """The qcow2 image with a bitmap "b0" made after the first write; later writes are dirty."""
    subprocess.run(["qemu-img", "bitmap", "--add", qcow2_file, "b0"], check=True)
    qemu_io(qcow2_file, "qcow2", "write -P 2 2M 64k", "write -z 5M 1M")
    return qcow2_file


# zero context

def test_zero_raw(daemon, tmp_path, raw_file, connect):
    server = serve(tmp_path, raw_file, "raw")
    with exported(daemon, server, "raw"):
        extents = extents_of(connect(), "raw", "?context=zero")
        check_map(extents, SIZE, ("zero", "hole"))
        # No allocation depth: never a hole.
        assert not any(e["hole"] for e in extents)
        assert as_runs(extents, ("zero", "hole")) == [
            (s, n, (z, False)) for s, n, (z, _) in qemu_img_zero_map(raw_file, "raw")]
        # The data extents are where the data is; the allocated zero MiB at 5 MiB (STATE_ZERO
        # without STATE_HOLE) merged with the holes around it (STATE_ZERO|STATE_HOLE).
        assert [(e["start"], e["length"]) for e in extents if not e["zero"]] == [
            (0, MiB), (3 * MiB, 65536)]
        assert {"start": 3 * MiB + 65536, "length": SIZE - 3 * MiB - 65536, "zero": True,
                "hole": False} in extents
        check_zero_bytes(server.sock, extents)
        # No context means zero.
        assert extents_of(connect(), "raw") == extents


def test_zero_raw_with_allocation_depth_has_no_holes(daemon, tmp_path, raw_file, connect):
    server = serve(tmp_path, raw_file, "raw", "--allocation-depth")
    with exported(daemon, server, "rawd"):
        extents = extents_of(connect(), "rawd")
        check_map(extents, SIZE, ("zero", "hole"))
        assert not any(e["hole"] for e in extents)
        assert [(e["start"], e["length"]) for e in extents if not e["zero"]] == [
            (0, MiB), (3 * MiB, 65536)]


def test_zero_qcow2_allocation_depth(daemon, tmp_path, bitmap_file, connect):
    server = serve(tmp_path, bitmap_file, "qcow2", "--allocation-depth")
    with exported(daemon, server, "q"):
        extents = extents_of(connect(), "q", "?context=zero")
        check_map(extents, SIZE, ("zero", "hole"))
        assert as_runs(extents, ("zero", "hole")) == qemu_img_zero_map(bitmap_file, "qcow2")
        Z = {"zero": True}
        assert extents == [
            {"start": 0, "length": MiB, "zero": False, "hole": False},
            {"start": MiB, "length": MiB, "zero": True, "hole": True},
            {"start": 2 * MiB, "length": 65536, "zero": False, "hole": False},
            {"start": 2 * MiB + 65536, "length": 3 * MiB - 65536, **Z, "hole": True},
            # Zero clusters are allocated in this layer: zero, but not a hole.
            {"start": 5 * MiB, "length": MiB, **Z, "hole": False},
            {"start": 6 * MiB, "length": 2 * MiB, **Z, "hole": True},
        ]
        check_zero_bytes(server.sock, extents)


def test_zero_qcow2_without_allocation_depth(daemon, tmp_path, bitmap_file, connect):
    with exported(daemon, serve(tmp_path, bitmap_file, "qcow2"), "q"):
        extents = extents_of(connect(), "q")
        check_map(extents, SIZE, ("zero", "hole"))
        # Without the context there are no holes; zero runs merge across the zero clusters.
        assert extents == [
            {"start": 0, "length": MiB, "zero": False, "hole": False},
            {"start": MiB, "length": MiB, "zero": True, "hole": False},
            {"start": 2 * MiB, "length": 65536, "zero": False, "hole": False},
            {"start": 2 * MiB + 65536, "length": SIZE - 2 * MiB - 65536, "zero": True,
             "hole": False},
        ]


def test_zero_qcow2_backing_chain(daemon, tmp_path, qcow2_file, connect):
    """Clusters that come from the backing file are not holes (allocation depth 2)."""
    top = str(tmp_path / "top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", qcow2_file, "-F", "qcow2",
                    top], check=True)
    qemu_io(top, "qcow2", "write -P 3 4M 1M")
    with exported(daemon, serve(tmp_path, top, "qcow2", "--allocation-depth"), "top"):
        extents = extents_of(connect(), "top")
        check_map(extents, SIZE, ("zero", "hole"))
        assert extents == [
            {"start": 0, "length": MiB, "zero": False, "hole": False},
            {"start": MiB, "length": 3 * MiB, "zero": True, "hole": True},
            {"start": 4 * MiB, "length": MiB, "zero": False, "hole": False},
            {"start": 5 * MiB, "length": 3 * MiB, "zero": True, "hole": True},
        ]


# dirty context

def test_dirty(daemon, tmp_path, bitmap_file, connect):
    server = serve(tmp_path, bitmap_file, "qcow2", "--allocation-depth", "-B", "b0")
    with exported(daemon, server, "d", dirty=True):
        extents = extents_of(connect(), "d", "?context=dirty")
        check_map(extents, SIZE, ("dirty", "zero"))
        assert extents == [
            {"start": 0, "length": MiB, "dirty": False, "zero": False},
            {"start": MiB, "length": MiB, "dirty": False, "zero": True},
            {"start": 2 * MiB, "length": 65536, "dirty": True, "zero": False},
            {"start": 2 * MiB + 65536, "length": 3 * MiB - 65536, "dirty": False, "zero": True},
            {"start": 5 * MiB, "length": MiB, "dirty": True, "zero": True},
            {"start": 6 * MiB, "length": 2 * MiB, "dirty": False, "zero": True},
        ]
        check_zero_bytes(server.sock, extents)
        assert read_export(server.sock, 2 * MiB, 65536) == b"\x02" * 65536
        # The zero context of a dirty ticket is the usual one.
        assert as_runs(extents_of(connect(), "d"), ("zero", "hole")) == qemu_img_zero_map(
            bitmap_file, "qcow2")


def test_dirty_404_when_ticket_not_dirty(daemon, tmp_path, bitmap_file, connect):
    with exported(daemon, serve(tmp_path, bitmap_file, "qcow2", "-B", "b0"), "nd"):
        status, ctype, body = get_extents(connect(), "nd", "?context=dirty")
        assert status == 404, body
        assert ctype == "text/plain; charset=UTF-8"


@pytest.mark.parametrize("has_bitmap", [False, True])
def test_dirty_404_when_export_has_no_bitmap(daemon, tmp_path, qcow2_file, connect,
                                             has_bitmap):
    # The image has no bitmap; or it has one, but qemu-nbd does not export it (no -B).
    if has_bitmap:
        subprocess.run(["qemu-img", "bitmap", "--add", qcow2_file, "b0"], check=True)
    server = serve(tmp_path, qcow2_file, "qcow2", "--allocation-depth")
    with exported(daemon, server, "nb", dirty=True):
        status, ctype, body = get_extents(connect(), "nb", "?context=dirty")
        assert status == 404, body
        # The zero context still works for this ticket.
        check_map(extents_of(connect(), "nb"), SIZE, ("zero", "hole"))


@pytest.fixture
def memory(tmp_path, daemon):
    server = nbdkit(str(tmp_path / "mem.sock"), "memory", "size=8M")
    with exported(daemon, server, "mem", ops=["read", "write"]):
        yield server


@pytest.mark.parametrize("context", ["foo", "", "ZERO", "Zero", "dirty,zero", "zero%20"])
def test_unknown_context_400(memory, connect, context):
    status, ctype, body = get_extents(connect(), "mem", f"?context={context}")
    assert status == 400, body
    assert ctype == "text/plain; charset=UTF-8"


def test_extents_unknown_ticket_403(connect):
    status, _, _ = get_extents(connect(), "nosuch")
    assert status == 403


# exports without block status

@pytest.mark.parametrize("argv", [
    ("--filter=noextents", "memory", "size=8M"),       # base:allocation says: all data
    ("--no-sr", "memory", "size=8M"),                  # no structured replies: no block status
    ("pattern", "size=8M"),                             # a plugin with no extents callback
], ids=["noextents", "no-sr", "pattern"])
def test_export_without_block_status_one_data_extent(daemon, tmp_path, connect, argv):
    with exported(daemon, nbdkit(str(tmp_path / "n.sock"), *argv), "nbs"):
        assert extents_of(connect(), "nbs") == [
            {"start": 0, "length": SIZE, "zero": False, "hole": False}]


def test_memory_after_writes(daemon, memory, connect):
    """nbdkit memory reports written pages (32 KiB) as data and the rest as zero."""
    for offset in (0, 4096, 8192, MiB, MiB + 32768, SIZE - 4096):
        conn = connect()
        conn.request("PUT", "/images/mem?flush=n", body=b"\x07" * 4096,
                     headers={"Content-Range": f"bytes {offset}-*/*"})
        assert conn.getresponse().status == 200
        conn.close()
    extents = extents_of(connect(), "mem")
    check_map(extents, SIZE, ("zero", "hole"))
    page = 32768
    assert [(e["start"], e["length"], e["zero"]) for e in extents] == [
        (0, page, False), (page, MiB - page, True), (MiB, 2 * page, False),
        (MiB + 2 * page, SIZE - MiB - 3 * page, True), (SIZE - page, page, False)]
    assert as_runs(extents, ("zero", "hole")) == libnbd_zero_map(memory.sock, SIZE)
    check_zero_bytes(memory.sock, extents)


def libnbd_zero_map(sock, size):
    """The zero map asked directly of the export with libnbd, merged by the zero flag."""
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(sock)
    runs = []
    try:
        pos = 0
        while pos < size:
            got = []

            def cb(context, offset, entries, err):
                if context == nbd.CONTEXT_BASE_ALLOCATION:
                    for i in range(0, len(entries), 2):
                        got.append((entries[i], bool(entries[i + 1] & nbd.STATE_ZERO)))
                return 0

            h.block_status(min(size - pos, 2**31), pos, cb)
            for n, zero in got:
                n = min(n, size - pos)
                runs.append((pos, n, (zero, False)))
                pos += n
    finally:
        h.shutdown()
    return merge(runs)


def test_many_extents_cover_and_merge(daemon, tmp_path, connect):
    """A map of tens of thousands of extents (streamed) covers the export and merges runs."""
    size = 160 * MiB
    server = nbdkit(str(tmp_path / "sr.sock"), "sparse-random", f"size={size}",
                              "seed=7", "percent=20", "runlength=4")
    with exported(daemon, server, "sr", size):
        conn = connect()
        conn.request("GET", "/images/sr/extents")
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "application/json"
        # A map this large is streamed (API.md 6): chunked instead of Content-Length.
        assert (resp.getheader("Transfer-Encoding") == "chunked"
                or int(resp.getheader("Content-Length")) == len(body))
        extents = json.loads(body)
        assert body == json.dumps(extents, separators=(",", ":")).encode() + b"\n"
        check_map(extents, size, ("zero", "hole"))
        assert len(extents) > 20000
        assert as_runs(extents, ("zero", "hole")) == libnbd_zero_map(server.sock, size)


def test_size_not_multiple_of_4096(daemon, tmp_path, connect):
    size = 5 * MiB + 1234
    server = nbdkit(str(tmp_path / "odd.sock"), "memory", f"size={size}")
    with exported(daemon, server, "odd", size, ops=["read", "write"]):
        conn = connect()
        conn.request("PUT", "/images/odd", body=b"\x01" * 1234,
                     headers={"Content-Range": f"bytes {5 * MiB}-*/*"})
        assert conn.getresponse().status == 200
        conn.close()
        extents = extents_of(connect(), "odd")
        check_map(extents, size, ("zero", "hole"))
        assert extents[-1]["start"] + extents[-1]["length"] == size
        assert extents[-1]["zero"] is False
        assert as_runs(extents, ("zero", "hole")) == libnbd_zero_map(server.sock, size)


# Block status of large images: many commands, several in flight (backends/nbd.py STATUS_DEPTH)

def test_extents_across_block_status_windows(daemon, tmp_path, connect):
    """One NBD block status covers at most 4 GiB - 1 MiB: a 13 GiB export takes 4 commands,
    in flight together, and data straddling their boundaries is where it is."""
    from nbdproxy.backends.nbd_status import MAX_STATUS
    size = 13 * 1024**3
    server = nbdkit(str(tmp_path / "big.sock"), "memory", f"size={size}")
    data_at = [0, MAX_STATUS - 4096, 2 * MAX_STATUS + MiB, size - 4096]
    with exported(daemon, server, "big", size, ops=["read", "write"]):
        for offset in data_at:
            conn = connect()
            conn.request("PUT", "/images/big?flush=n", body=b"\x07" * 8192 if offset < size - 4096
                         else b"\x07" * 4096, headers={"Content-Range": f"bytes {offset}-*/*"})
            assert conn.getresponse().status == 200
            conn.close()
        extents = extents_of(connect(), "big")
        want = libnbd_zero_map(server.sock, size)
    check_map(extents, size, ("zero", "hole"))
    # nbdkit's memory plugin allocates in 32 KiB pages: each write is inside one data extent.
    data = [(e["start"], e["start"] + e["length"]) for e in extents if not e["zero"]]
    assert len(data) == len(data_at)
    for (start, end), offset in zip(data, data_at):
        assert start <= offset < offset + 4096 <= end and end - start <= 64 * 1024
    assert as_runs(extents, ("zero", "hole")) == want


def test_extents_when_replies_cover_part_of_the_window(daemon, tmp_path, connect):
    """qemu-nbd answers at most 131072 extents per block status: the rest of a window is asked
    again, ahead of the windows already in flight, and the map has no gap."""
    size = 1100 * MiB
    path = str(tmp_path / "fragmented.raw")
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, 600 * MiB, 8192):     # 4 KiB of data every 8 KiB
            f.seek(offset)
            f.write(b"\x05" * 4096)
    server = qemu_nbd(path, str(tmp_path / "frag.sock"), "raw")
    # The premise: one command for the whole image gets a reply that covers only part of it.
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(server.sock)
    covered = []
    h.block_status(size, 0, lambda context, offset, entries, err: covered.append(sum(entries[::2])))
    h.shutdown()
    assert covered and covered[0] < size
    with exported(daemon, server, "frag", size):
        extents = extents_of(connect(), "frag")
        want = libnbd_zero_map(server.sock, size)
    check_map(extents, size, ("zero", "hole"))
    assert len(extents) == 2 * (600 * MiB // 8192)     # the last hole runs to the end
    assert as_runs(extents, ("zero", "hole")) == want
