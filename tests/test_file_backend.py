"""The file: backend against real files (ext4 in /tmp, a ramfs, a loop device), no daemon."""

import mmap
import os
import shutil
import socket
import subprocess
import threading

import pytest

from nbdproxy import errors
from nbdproxy.backends import Extent, fileio
from nbdproxy.backends.file import PIECE, open_file

MiB = 1024**2


def make(path, size, data=True):
    with open(path, "wb") as f:
        if data:
            f.write(os.urandom(size))
        else:
            f.truncate(size)
    return str(path)


def content(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def buffer(size=4 * MiB):
    return mmap.mmap(-1, size)


def write(ch, data, offset, punch_hole=False, limit=2**63):
    """Channel.write of data at offset from a page-aligned buffer; the bytes acknowledged."""
    body = memoryview(bytes(data))
    pos = 0

    def readinto(view):
        nonlocal pos
        n = min(len(view), len(body) - pos)
        view[:n] = body[pos:pos + n]
        pos += n
        return n

    done = []
    ch.write(readinto, buffer(), offset, len(body), done.append, limit, punch_hole)
    return sum(done)


def read(ch, offset, length):
    return b"".join(bytes(v) for v in ch.read(buffer(), offset, length))


@pytest.fixture(scope="module")
def ramfs(tmp_path_factory):
    mnt = tmp_path_factory.mktemp("ramfs")
    r = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a ramfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def loop(tmp_path):
    """A 4 MiB loop device on a file in /tmp: (device, backing file)."""
    if not shutil.which("losetup"):
        pytest.skip("no losetup")
    backing = make(tmp_path / "backing", 4 * MiB)
    r = subprocess.run(["losetup", "-f", "--show", backing], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"losetup failed: {r.stderr.strip()}")
    dev = r.stdout.strip()
    yield dev, backing
    subprocess.run(["losetup", "-d", dev], check=True)


@pytest.fixture(params=["direct", "buffered", "ramfs", "loop"])
def target(request, tmp_path):
    """(backend, path) of a 4 MiB + 1000 byte file (4 MiB on the loop device) of random bytes."""
    kind = request.param
    if kind == "ramfs":
        path = make(request.getfixturevalue("ramfs") / "img", 4 * MiB + 1000)
    elif kind == "loop":
        path = request.getfixturevalue("loop")[0]
    else:
        path = make(tmp_path / "img", 4 * MiB + 1000)
    b = open_file("file://" + path, writable=True, direct=kind != "buffered")
    assert b.direct == (kind in ("direct", "loop"))
    yield b, path
    b.close()


def test_unaligned_io_at_every_edge(target):
    b, path = target
    size = b.size
    cases = [(1, 4097), (0, 1), (511, 2), (4095, 8193), (size - 1000, 1000), (size - 1, 1),
             (size - 4097, 4097), (3, PIECE + 5), (0, size)]
    with b.lend() as ch:
        assert ch.size == size
        for offset, length in cases:
            data = os.urandom(length)
            assert write(ch, data, offset) == length
            assert read(ch, offset, length) == data
            view = memoryview(buffer(length + 4096))[1:length + 1]       # a view at an odd address
            assert bytes(ch.read_into(view, offset)) == data
        b.flush(ch)
    assert os.path.getsize(path) == size or path.startswith("/dev/")
    assert content(path, 0, size) == data


def test_write_from_an_unaligned_view(target):
    b, path = target
    data = os.urandom(3 * 4096)
    with b.lend() as ch:
        buf = buffer()
        buf[100:100 + len(data)] = data
        ch._write(memoryview(buf)[100:100 + len(data)], 4096, ch.size)
        b.flush(ch)
    assert content(path, 4096, len(data)) == data


def test_parallel_writes_to_one_block_both_land(target):
    """Two channels write disjoint bytes of one 512-byte block at the same moment, round after
    round; after every round both writes are there (on the O_DIRECT targets each write is a
    read-modify-write of the block)."""
    b, path = target
    before = content(path, 0, 512)
    a, c = b.acquire(), b.acquire()
    rounds = 100
    start, done = threading.Barrier(3), threading.Barrier(3)

    def hammer(ch, offset, byte):
        for i in range(rounds):
            start.wait()
            write(ch, bytes([(byte + i) % 256]) * 100, offset)
            done.wait()

    threads = [threading.Thread(target=hammer, args=(a, 0, 1)),
               threading.Thread(target=hammer, args=(c, 200, 101))]
    for t in threads:
        t.start()
    lost = 0
    for i in range(rounds):
        start.wait()
        done.wait()
        block = read(a, 0, 512)
        lost += block[:100] != bytes([1 + i]) * 100 or block[200:300] != bytes([101 + i]) * 100
    for t in threads:
        t.join()
    b.release(a)
    b.release(c)
    assert lost == 0
    block = content(path, 0, 512)
    assert block[100:200] == before[100:200] and block[300:] == before[300:]


def test_zero_keeps_size_and_reads_zeros(target):
    b, path = target
    size = b.size
    with b.lend() as ch:
        for punch in (False, True):
            done = sum(ch.zero(7, 3 * MiB, punch, buffer()))
            assert done == 3 * MiB
            assert read(ch, 7, 3 * MiB) == bytes(3 * MiB)
        assert sum(ch.zero(size - 100, 100, True, buffer())) == 100
        b.flush(ch)
    assert content(path, 7, 3 * MiB) == bytes(3 * MiB)
    assert content(path, size - 100) == bytes(100)
    assert content(path, 0, 7) != bytes(7)
    if not path.startswith("/dev/"):
        assert os.path.getsize(path) == size


def test_all_zero_pieces_become_holes_only_when_sparse(tmp_path):
    path = make(tmp_path / "img", 8 * MiB)
    b = open_file(path, writable=True)
    with b.lend() as ch:
        write(ch, bytes(4 * MiB), 0, punch_hole=False)
        # Still allocated, as zeros (ext4's SEEK_HOLE calls unwritten extents holes: FIEMAP
        # tells them apart).
        assert os.stat(path).st_blocks * 512 >= 8 * MiB
        assert list(ch.extents("zero", 0, 8 * MiB))[0] == Extent(0, 4 * MiB, True, False, False)
        write(ch, bytes(4 * MiB), 0, punch_hole=True)
        assert os.stat(path).st_blocks * 512 <= 4 * MiB + 65536
        assert os.lseek(ch.fd, 0, os.SEEK_HOLE) == 0
        assert list(ch.extents("zero", 0, 8 * MiB)) == [
            Extent(0, 4 * MiB, True, True, False), Extent(4 * MiB, 4 * MiB, False, False, False)]
    b.close()
    assert content(path, 0, 4 * MiB) == bytes(4 * MiB)


def test_extents_of_holes_unwritten_and_data(tmp_path):
    path = make(tmp_path / "img", 16 * MiB, data=False)
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(b"x" * MiB)
        os.posix_fallocate(f.fileno(), 4 * MiB, 2 * MiB)          # unwritten, zeros
        f.seek(15 * MiB)
        f.write(b"y" * MiB)
    b = open_file(path, writable=True, direct=False)
    with b.lend() as ch:
        extents = list(ch.extents("zero", 0, 16 * MiB))
        assert extents == [
            Extent(0, MiB, True, True, False),
            Extent(MiB, MiB, False, False, False),
            Extent(2 * MiB, 2 * MiB, True, True, False),
            Extent(4 * MiB, 2 * MiB, True, False, False),
            Extent(6 * MiB, 9 * MiB, True, True, False),
            Extent(15 * MiB, MiB, False, False, False)]
        # A window cuts the extents; data written through the cache into the unwritten range
        # is data at once (not zeros as a FIEMAP without sync would say).
        write(ch, b"z" * 4096, 5 * MiB)
        assert list(ch.extents("zero", MiB + 7, 5 * MiB)) == [
            Extent(MiB + 7, MiB - 7, False, False, False),
            Extent(2 * MiB, 2 * MiB, True, True, False),
            Extent(4 * MiB, MiB, True, False, False),
            Extent(5 * MiB, 4096, False, False, False),
            Extent(5 * MiB + 4096, MiB - 4096, True, False, False),
            Extent(6 * MiB, 7, True, True, False)]
        with pytest.raises(errors.NotFound):
            list(ch.extents("dirty", 0, MiB))
    b.close()


def test_extents_in_bounded_fiemap_calls(tmp_path, monkeypatch):
    path = make(tmp_path / "img", 64 * 8192, data=False)
    with open(path, "r+b") as f:
        for i in range(0, 64 * 8192, 8192):
            f.seek(i)
            f.write(b"d" * 4096)
    monkeypatch.setattr(fileio, "FIEMAP_BATCH", 5)
    b = open_file(path, writable=False)
    with b.lend() as ch:
        extents = list(ch.extents("zero", 0, 64 * 8192))
    b.close()
    assert len(extents) == 128
    assert extents[::2] == [Extent(i, 4096, False, False, False) for i in range(0, 64 * 8192, 8192)]


def test_extents_elsewhere(ramfs, loop):
    for path in (make(ramfs / "ext", MiB), loop[0]):
        b = open_file(path, writable=False)
        with b.lend() as ch:
            assert list(ch.extents("zero", 0, MiB)) == [Extent(0, MiB, False, False, False)]
        b.close()


def test_range_past_the_current_size(tmp_path):
    path = make(tmp_path / "img", MiB)
    b = open_file(path, writable=True)
    with b.lend() as ch:
        os.truncate(path, MiB // 2)
        for call in (lambda: read(ch, MiB // 2 - 1, 2), lambda: write(ch, b"x" * 2, MiB // 2),
                     lambda: list(ch.zero(0, MiB, False, None)),
                     lambda: list(ch.extents("zero", 0, MiB))):
            with pytest.raises(errors.RangeNotSatisfiable) as e:
                call()
            assert e.value.size == MiB // 2
        with pytest.raises(errors.RangeNotSatisfiable) as e:
            write(ch, b"x" * 10, 0, limit=5)
        assert e.value.size == 5
    b.close()
    assert os.path.getsize(path) == MiB // 2


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("new_size", [16 * MiB, 16 * MiB + 100])
def test_file_shrinks_during_a_zero_copy_send(tmp_path, direct, new_size):
    """Pieces read ahead into pipes past the new end fail the send with the new size (an
    O_DIRECT read across an unaligned end is EINVAL, still a 416); the pipes are closed and the
    bytes sent before it are the file's."""
    path = make(tmp_path / "img", 32 * MiB)
    original = content(path)
    b = open_file(path, writable=False, direct=direct)
    a, c = socket.socketpair()
    got = bytearray()
    reader = threading.Thread(target=lambda: _read_all(c, got))
    reader.start()
    try:
        with b.lend() as ch:
            fds = len(os.listdir("/proc/self/fd"))
            sending = ch.send_to(a, 0, 32 * MiB)
            first = next(sending)
            os.truncate(path, new_size)
            with pytest.raises(errors.RangeNotSatisfiable) as e:
                for n in sending:
                    first += n
            assert e.value.size == new_size and first <= new_size
            assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        a.close()
        reader.join()
        c.close()
        b.close()
    assert len(got) == first and bytes(got) == original[:first]


def _read_all(sock, out):
    while True:
        chunk = sock.recv(MiB)
        if not chunk:
            return
        out += chunk


@pytest.mark.parametrize("how", ["unlink", "replace"])
def test_file_removed_or_replaced(tmp_path, how):
    path = make(tmp_path / "img", MiB)
    b = open_file(path, writable=True)
    ch = b.acquire()
    read(ch, 0, 4096)
    os.unlink(path)
    if how == "replace":
        make(path, MiB)
    for call in (lambda: read(ch, 0, 4096), lambda: write(ch, b"x", 0),
                 lambda: b.flush(ch), lambda: list(ch.extents("zero", 0, 4096))):
        with pytest.raises(errors.BackendError, match=path):
            call()
    b.release(ch, reuse=False)
    ch2 = b.acquire()       # a new channel opens the ticket's file, not the new one
    with pytest.raises(errors.BackendError, match=path):
        read(ch2, 0, 1)
    b.release(ch2)
    b.close()


def test_refusals(tmp_path, ramfs):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    for url, reason in [("file://relative/x", "not an absolute path"),
                        ("file:relative", "not an absolute path"),
                        (f"file://{tmp_path}/missing", "No such file"),
                        (f"file://{tmp_path}", "is a directory"),
                        ("file:///dev/null", "is a character device"),
                        (f"file://{fifo}", "is a FIFO")]:
        with pytest.raises(errors.BadRequest, match=f"^Invalid ticket: .*{reason}"):
            open_file(url, writable=False)
    # As written: %20 stays in the name.
    odd = make(tmp_path / "a%20b", 4096)
    open_file(f"file://{odd}", writable=False).close()


def test_immutable_file_refused_for_writing(tmp_path):
    if not shutil.which("chattr"):
        pytest.skip("no chattr")
    path = make(tmp_path / "img", 4096)
    if subprocess.run(["chattr", "+i", path]).returncode:
        pytest.skip("chattr +i is not supported here")
    try:
        with pytest.raises(errors.BadRequest, match=f"Invalid ticket: {path}: cannot open for "
                                                    "writing: Operation not permitted"):
            open_file(path, writable=True)
        open_file(path, writable=False).close()
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


def test_read_only_filesystem_refused_for_writing(ramfs):
    path = make(ramfs / "ro", 4096)
    subprocess.run(["mount", "-o", "remount,ro", str(ramfs)], check=True)
    try:
        with pytest.raises(errors.BadRequest, match="Read-only file system"):
            open_file(path, writable=True)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(ramfs)], check=True)


def test_a_failed_flush_fails_every_later_flush(tmp_path):
    """A writeback error, provoked for real: a loop device on a sparse file in a tmpfs too small
    for it. Buffered writes to the device succeed; writeback fails with ENOSPC in the loop
    driver, fdatasync reports EIO once, and the kernel forgets it: the backend must not."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs")
    dev = None
    try:
        backing = make(mnt / "backing", 8 * MiB, data=False)
        dev = subprocess.run(["losetup", "-f", "--show", backing], capture_output=True,
                             text=True, check=True).stdout.strip()
        b = open_file(dev, writable=True, direct=False)
        with b.lend() as ch:
            write(ch, os.urandom(4 * MiB), 0)
            with pytest.raises(errors.BackendError, match="flush failed"):
                b.flush(ch)
            os.fsync(ch.fd)     # the kernel has forgotten the error
            with pytest.raises(errors.BackendError, match="an earlier flush failed"):
                b.flush(ch)
        with b.lend() as other:
            with pytest.raises(errors.BackendError, match="an earlier flush failed"):
                b.flush(other)
        b.close()
    finally:
        if dev:
            subprocess.run(["losetup", "-d", dev], check=True)
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_pool_limits_and_close(tmp_path):
    path = make(tmp_path / "img", MiB)
    b = open_file(path, writable=False, max_connections=2)
    assert b.caps(None).max_connections == 2 and b.caps(None).extents == {"zero"}
    a, c = b.acquire(), b.acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(b.acquire()))
    t.start()
    t.join(0.1)
    assert t.is_alive()                 # at the limit: waits
    b.release(a)
    t.join(5)
    assert got == [a]
    b.close()
    with pytest.raises(errors.Canceled):
        b.acquire()
    assert c.fd is not None             # busy channels close as they are released
    b.release(c)
    b.release(a)
    assert c.fd is None and a.fd is None and b._anchor is None


def _received(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("direct", [True, False])
def test_send_to_and_recv_from(tmp_path, direct):
    path = make(tmp_path / "img", 3 * MiB + 1000)
    original = content(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)     # not cached now
    b = open_file(path, writable=True, direct=direct)
    a, c = socket.socketpair()
    c.settimeout(5)
    try:
        with b.lend() as ch:
            for offset, length in [(0, 3 * MiB + 1000), (1, 4097), (511, PIECE + 3)]:
                out = []
                t = threading.Thread(target=lambda: out.append(_received(c, length)))
                t.start()
                counts = list(ch.send_to(a, offset, length))
                t.join()
                assert sum(counts) == length and max(counts) <= PIECE
                assert out[0] == original[offset:offset + length]
            if direct:
                assert _cached(path) <= 4096       # at most the page of the partial last block
            data = os.urandom(PIECE + 7)
            threading.Thread(target=lambda: a.sendall(data)).start()
            assert sum(ch.recv_from(c, 5, len(data))) == len(data)
            b.flush(ch)
    finally:
        a.close()
        c.close()
        b.close()
    assert content(path, 5, len(data)) == data


def _cached(path):
    """Bytes of path in the page cache (fincore), or 0 without fincore."""
    if not shutil.which("fincore"):
        return 0
    out = subprocess.run(["fincore", "-nb", "-o", "RES", path], capture_output=True, text=True)
    return int(out.stdout.split()[0])
