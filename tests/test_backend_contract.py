"""The backend interface's contract (nbdproxy/backends/__init__.py, notes/backend-interface.md):
every backend goes through the same cases, with no HTTP.

Each backend serves the same 8 MiB of random bytes. To add a backend, add one entry to
BACKENDS: a function (tmp_path, path of a raw file holding the bytes) -> (Backend, stop).
"""

import mmap
import os
import subprocess
import threading

import pytest

from nbdproxy import backends, errors
from nbdproxy.backends import Caps, Extent

from support import qemu_nbd

MiB = 1024**2
SIZE = 8 * MiB
BUFFER = 8 * MiB        # what a connection's buffer is in the daemon


def nbd_backend(tmp_path, path):
    server = qemu_nbd(path, str(tmp_path / "nbd.sock"), "raw", "--discard=unmap")
    return backends.open_backend(server.url, True, False, backends.Settings()), server.stop


def file_backend(direct):
    def make(tmp_path, path):
        settings = backends.Settings(file_direct=direct)
        return backends.open_backend("file://" + path, True, False, settings), lambda: None
    return make


BACKENDS = {
    "nbd": nbd_backend,
    "file-direct": file_backend(True),
    "file-buffered": file_backend(False),
}


class Subject:
    """A backend under test and the bytes it must hold (the model)."""

    def __init__(self, backend, data):
        self.backend, self.data = backend, data

    def read(self, ch, offset, length):
        return b"".join(bytes(v) for v in ch.read(buffer(), offset, length))

    def assert_holds(self):
        """Through a new channel, after a flush: the backend holds the model."""
        with self.backend.lend() as ch:
            self.backend.flush(ch)
            got = self.read(ch, 0, SIZE)
        assert got == self.data, next(i for i in range(SIZE) if got[i] != self.data[i])


@pytest.fixture(params=list(BACKENDS))
def subject(request, tmp_path):
    path = str(tmp_path / "disk.raw")
    data = bytearray(os.urandom(SIZE))
    with open(path, "wb") as f:
        f.write(data)
    backend, stop = BACKENDS[request.param](tmp_path, path)
    try:
        yield Subject(backend, data)
    finally:
        backend.close()
        stop()


def buffer(size=BUFFER):
    return mmap.mmap(-1, size)


class Body:
    """A request body for Channel.write: readinto() gives data, then nothing (or stops early
    when `short` bytes are left unsent)."""

    def __init__(self, data, short=0, chunk=None):
        self.data, self.pos, self.end = memoryview(data), 0, len(data) - short
        self.chunk = chunk
        self.calls = 0

    def readinto(self, view):
        self.calls += 1
        n = min(len(view), self.end - self.pos, self.chunk or len(view))
        view[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def write(ch, data, offset, limit=SIZE, punch_hole=False, length="known", **kw):
    """Channel.write of data at offset; the acknowledged counts."""
    body = Body(data, **kw)
    done = []
    ch.write(body.readinto, buffer(), offset, len(data) if length == "known" else None,
             done.append, limit, punch_hole=punch_hole)
    return done


# Cases

def test_size_and_caps(subject):
    b = subject.backend
    with b.lend() as ch:
        assert ch.size == SIZE
        caps = b.caps(ch)
    assert isinstance(caps, Caps)
    assert isinstance(caps.zero, bool) and isinstance(caps.flush, bool)
    assert isinstance(caps.multi_conn, bool) and isinstance(caps.zero_copy, bool)
    assert isinstance(caps.extents, frozenset)
    assert "zero" in caps.extents and "dirty" not in caps.extents     # opened without dirty
    assert caps.max_connections == backends.Settings().nbd_connections
    if caps.zero_copy:
        assert callable(ch.send_to) and callable(ch.recv_from)


RANGES = [(0, 1), (1, 4097), (511, 2), (4095, 8193), (SIZE - 1, 1), (SIZE - 4097, 4097),
          (3, 2 * MiB + 5), (MiB, 3 * MiB), (0, SIZE)]


def test_read_and_read_into(subject):
    data = subject.data
    with subject.backend.lend() as ch:
        for offset, length in RANGES:
            views = list(bytes(v) for v in ch.read(buffer(), offset, length))
            assert all(views) and b"".join(views) == data[offset:offset + length]
            out = memoryview(buffer(length + 4096))[1:length + 1]      # at an odd address
            assert ch.read_into(out, offset) is not None
            assert bytes(out) == data[offset:offset + length]
        assert b"".join(bytes(v) for v in ch.read(buffer(), 5, 0)) == b""


def test_write(subject):
    with subject.backend.lend() as ch:
        for offset, length in RANGES:
            data = os.urandom(length)
            done = write(ch, data, offset, chunk=70000)
            assert sum(done) == length and all(n > 0 for n in done)
            subject.data[offset:offset + length] = data
        # A chunked body (length unknown): written until the body ends.
        data = os.urandom(3 * MiB + 17)
        assert sum(write(ch, data, 12345, length=None)) == len(data)
        subject.data[12345:12345 + len(data)] = data
        subject.backend.flush(ch)
    subject.assert_holds()


@pytest.mark.parametrize("punch_hole", [False, True], ids=["allocate", "punch"])
def test_write_zero_pieces(subject, punch_hole):
    """All-zero pieces of a body read back as zeros; punched, they are zero extents (zeros
    left allocated may be reported as data: an NBD server need not know they are zeros)."""
    with subject.backend.lend() as ch:
        # Pieces are 2 MiB: [2 MiB, 6 MiB) are two pieces of zeros.
        data = os.urandom(2 * MiB) + bytes(4 * MiB) + os.urandom(MiB)
        assert sum(write(ch, data, 0, punch_hole=punch_hole)) == len(data)
        subject.data[:len(data)] = data
        subject.backend.flush(ch)
        assert subject.read(ch, 2 * MiB, 4 * MiB) == bytes(4 * MiB)
        extents = list(ch.extents("zero", 0, SIZE))
    assert_covers(extents, 0, SIZE)
    assert_zeros(subject, extents)
    if punch_hole:
        assert any(e.zero and e.start <= 2 * MiB and e.start + e.length >= 6 * MiB
                   for e in extents), extents
    subject.assert_holds()


def test_write_past_limit_and_short_body(subject):
    before = bytes(subject.data)
    with subject.backend.lend() as ch:
        with pytest.raises(errors.RangeNotSatisfiable) as e:
            write(ch, b"x" * 10, SIZE - 5)
        assert e.value.size == SIZE
        with pytest.raises(errors.RangeNotSatisfiable) as e:
            write(ch, b"x" * 4096, 0, limit=100)
        assert e.value.size == 100
        # A chunked body that runs past the limit: nothing past it is written.
        with pytest.raises(errors.RangeNotSatisfiable) as e:
            write(ch, os.urandom(3 * MiB), 3 * MiB, limit=4 * MiB, length=None)
        assert e.value.size == 4 * MiB
        assert subject.read(ch, 4 * MiB, 3 * MiB) == before[4 * MiB:7 * MiB]
    # A body that ends early with a known length: ClientGone (the channel saw an error).
    for length in (4096, 5 * MiB):
        with pytest.raises(errors.ClientGone):
            with subject.backend.lend() as ch:
                write(ch, os.urandom(length), 0, short=100)


def test_write_stops_when_check_raises(subject):
    """check() raising stops the write before a new piece: nothing is read or written after
    it, and exactly the acknowledged bytes landed."""
    data = os.urandom(6 * MiB)
    body = Body(data)
    events, done = [], []

    def check():
        if body.pos:        # once the body has started
            events.append("raised")
            raise errors.Canceled("canceled")

    def readinto(view):
        events.append("read")
        return body.readinto(view)

    def on_written(n):
        events.append("written")
        done.append(n)

    with pytest.raises(errors.Canceled):
        with subject.backend.lend() as ch:
            ch.write(readinto, buffer(), MiB, len(data), on_written, SIZE, check=check)
    assert events.count("raised") == 1 and events[-1] == "raised", events
    acked = sum(done)
    assert acked < len(data)
    subject.data[MiB:MiB + acked] = data[:acked]
    subject.assert_holds()


@pytest.mark.parametrize("punch_hole", [False, True], ids=["allocate", "punch"])
def test_zero(subject, punch_hole):
    with subject.backend.lend() as ch:
        for offset, length in [(MiB, 3 * MiB), (7, 4097), (SIZE - 100, 100), (0, 0)]:
            counts = list(ch.zero(offset, length, punch_hole, buffer()))
            assert sum(counts) == length
            subject.data[offset:offset + length] = bytes(length)
        assert ch.size == SIZE
        extents = list(ch.extents("zero", 0, SIZE))
        subject.backend.flush(ch)
    assert_zeros(subject, extents)
    if punch_hole:
        assert any(e.zero and e.start <= MiB and e.start + e.length >= 4 * MiB
                   for e in extents), extents
    subject.assert_holds()


def test_flush(subject):
    b = subject.backend
    with b.lend() as ch:
        write(ch, b"a" * 4096, 0)
        subject.data[:4096] = b"a" * 4096
        b.flush(ch)
        ch.flush()
    subject.assert_holds()


def assert_covers(extents, start, end):
    """In order, no gaps, neighbours with equal flags merged."""
    assert extents and extents[0].start == start, extents
    for a, b in zip(extents, extents[1:]):
        assert a.start + a.length == b.start, extents
        assert (a.zero, a.hole, a.dirty) != (b.zero, b.hole, b.dirty), extents
    assert extents[-1].start + extents[-1].length == end, extents
    assert all(isinstance(e, Extent) and e.length > 0 for e in extents)


def assert_zeros(subject, extents):
    """Extents that say zero read as zeros."""
    for e in extents:
        if e.zero:
            assert subject.data[e.start:e.start + e.length] == bytes(e.length), e


def test_extents(subject):
    with subject.backend.lend() as ch:
        list(ch.zero(2 * MiB, 2 * MiB, True, buffer()))
        subject.data[2 * MiB:4 * MiB] = bytes(2 * MiB)
        calls = []
        for start, length in [(0, SIZE), (1, MiB), (2 * MiB - 7, 3 * MiB), (SIZE - 1, 1)]:
            extents = list(ch.extents("zero", start, length, lambda: calls.append(1)))
            assert_covers(extents, start, start + length)
            assert_zeros(subject, extents)
            assert not any(e.dirty for e in extents)
        assert calls        # check() is called during the walk
        whole = list(ch.extents("zero", 0, SIZE))
        assert any(e.zero and e.start <= 2 * MiB and e.start + e.length >= 4 * MiB
                   for e in whole), whole
        with pytest.raises(errors.NotFound):
            list(ch.extents("dirty", 0, SIZE))


def test_lend_release_close(subject):
    b = subject.backend
    limit = b.caps(b.acquire()).max_connections     # one channel made here, then reused
    chans = [b.acquire() for _ in range(limit - 1)]
    for ch in chans:
        assert ch.size == SIZE
    # At the limit: the next acquire waits for a release.
    got = []
    t = threading.Thread(target=lambda: got.append(b.acquire()))
    t.start()
    t.join(0.2)
    assert t.is_alive()
    b.release(chans[0])
    t.join(10)
    assert got == [chans[0]]            # the idle channel is reused
    for ch in chans[1:] + got:
        b.release(ch)
    with b.lend() as ch:
        first = ch
    with b.lend() as ch:
        assert ch is first              # reused after a clean lend
    with pytest.raises(RuntimeError):
        with b.lend() as ch:
            raise RuntimeError("the request failed")
    with b.lend() as again:
        assert again is not ch          # a channel that saw an error is not reused
    busy = b.acquire()
    b.close()
    with pytest.raises(errors.Canceled):
        b.acquire()
    b.release(busy)                     # a busy channel is closed as it is released


def test_fast_zero_is_what_the_storage_does(tmp_path):
    """caps.fast_zero: a file on ext4 zeroes in the kernel; one on ramfs by writing zeros."""
    from nbdproxy.backends import file as file_backend
    path = tmp_path / "img"
    path.write_bytes(b"x" * 8192)
    b = file_backend.open_file(str(path), writable=True)
    try:
        assert b.caps().fast_zero is True
        assert os.path.getsize(path) == 8192
    finally:
        b.close()
    ramfs = tmp_path / "ramfs"
    ramfs.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ramfs)]).returncode:
        pytest.skip("cannot mount a ramfs")
    try:
        (ramfs / "img").write_bytes(b"x" * 8192)
        b = file_backend.open_file(str(ramfs / "img"), writable=True)
        assert b.caps().fast_zero is False
        b.close()
    finally:
        subprocess.run(["umount", "-l", str(ramfs)], check=True)
