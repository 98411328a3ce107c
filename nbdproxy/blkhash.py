"""The block hash of API.md 4c (ovirt-imageio's blkhash), for the server's /checksum and the client.

Each block of block_size is hashed (the last may be short); the digests are hashed in order with
the same algorithm. Blocks inside zero extents use a precomputed digest and are not read; other
blocks are read from their first data byte to their last. Blocks are hashed on HASH_THREADS
threads, since hashing, not reading, bounds a checksum (hashlib lets go of the GIL while it
hashes); each thread and the reader have a buffer of one block, an anonymous mmap.
"""

import collections
import concurrent.futures
import hashlib
import mmap
import os

ALGORITHM = "blake2b"
BLOCK_SIZE = 4 * 1024**2
HASH_THREADS = min(4, os.cpu_count() or 1)


def hasher(algorithm):
    """A constructor of hash objects; blake2 digests are 32 bytes as in ovirt-imageio's blkhash."""
    if algorithm in ("blake2b", "blake2s"):
        return lambda data=b"": hashlib.new(algorithm, data, digest_size=32)
    return lambda data=b"": hashlib.new(algorithm, data)


def data_ranges(size, zero_extents):
    """The (start, length) ranges of [0, size) outside the sorted (start, length) zero extents."""
    pos = 0
    for start, length in zero_extents:
        if start > pos:
            yield pos, min(start, size) - pos
        pos = max(pos, start + length)
        if pos >= size:
            return
    if pos < size:
        yield pos, size - pos


def data_spans(size, zero_extents, block_size):
    """(block index, start, end) for each block with data: its first to its last data byte."""
    span = None
    for start, length in data_ranges(size, zero_extents):
        end = start + length
        while start < end:
            index = start // block_size
            stop = min(end, (index + 1) * block_size)
            if span is not None and span[0] == index:
                span[2] = stop
            else:
                if span is not None:
                    yield tuple(span)
                span = [index, start, stop]
            start = stop
    if span is not None:
        yield tuple(span)


def compute(size, readinto, zero_extents, algorithm=ALGORITHM, block_size=BLOCK_SIZE,
            check=None, threads=HASH_THREADS, buffers=None):
    """The hex block hash of an image of size bytes.

    readinto(view, offset) fills view with the image's bytes from offset; zero_extents are the
    (start, length) ranges known to read as zeros, in order; check() runs after each block read
    and now and then over runs of zero blocks (to stop a canceled request). buffers (default
    threads + 1, at least 1) is how many blocks may be in memory at once.
    """
    if buffers is None:
        buffers = threads + 1
    threads = max(1, min(threads, buffers - 1))
    blocks = _Blocks(hasher(algorithm), size, block_size, buffers, check or (lambda: None))
    try:
        with concurrent.futures.ThreadPoolExecutor(threads, "blkhash") as pool:
            blocks.pool = pool
            try:
                for index, start, end in data_spans(size, zero_extents, block_size):
                    buf = blocks.open(index)
                    base = index * block_size
                    readinto(buf[start - base:end - base], start)
                    blocks.close(start - base, end - base)
                    blocks.check()
                return blocks.finish()
            finally:
                blocks.cancel()
    finally:
        # After the pool's threads ended: no hash still reads a buffer.
        blocks.free_buffers()


def _zero_digest(new, n):
    """The digest of n zero bytes, hashed from a small zero buffer: no n-byte allocation."""
    h = new()
    for _ in range(n // len(_ZEROS)):
        h.update(_ZEROS)
    h.update(_ZEROS[:n % len(_ZEROS)])
    return h.digest()


def _fill_zero(view):
    for i in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - i)
        view[i:i + n] = _ZEROS[:n]


# Zeros to hash and copy from; immutable.
_ZEROS = memoryview(bytes(1024**2))
# Zero-block digests hashed between two calls of check(): about 5 ms.
_ZERO_RUN_CHECK = 16384


class _Blocks:
    """Block digests in block order: a block with data is read into a buffer of its own (zeros
    around its data) and hashed by the pool while the next ones are read.

    The buffers are anonymous mmaps, unmapped by free_buffers(): the memory goes back to the
    system at once instead of staying in the allocator's arenas.
    """

    def __init__(self, new, size, block_size, buffers, check):
        self.new, self.size, self.block_size, self.check = new, size, block_size, check
        self.pool = None
        self.outer = new()
        self.zero_digest = _zero_digest(new, block_size)
        self.maps = [mmap.mmap(-1, block_size) for _ in range(buffers)]
        self.free = [memoryview(m) for m in self.maps]
        # In block order: (future of a data block's digest, its buffer, None, 1) or
        # (None, None, the digest of count zero blocks, count).
        self.pending = collections.deque()
        self.next = 0           # the first block not yet given a digest
        self.buf = None         # the buffer of the block being read

    def open(self, index):
        """The buffer to read block index into; blocks before it without data are zero."""
        self._zero_blocks_until(index)
        while not self.free:
            self._collect()
        self.buf = self.free.pop()
        return self.buf

    def close(self, start, end):
        """The block's data is in its buffer at [start, end): zero the rest, hash it."""
        n = min(self.block_size, self.size - self.next * self.block_size)
        buf = self.buf
        _fill_zero(buf[:start])
        _fill_zero(buf[end:n])
        view = buf[:n]
        self.pending.append((self.pool.submit(lambda: self.new(view).digest()), buf, None, 1))
        self.next += 1
        self.buf = None

    def finish(self):
        self._zero_blocks_until(-(-self.size // self.block_size))
        while self.pending:
            self._collect()
        return self.outer.hexdigest()

    def cancel(self):
        for future, _, _, _ in self.pending:
            if future is not None:
                future.cancel()

    def free_buffers(self):
        """Unmap the buffers; one still exported (a read that failed and still holds a view of
        it) is unmapped by the garbage collector when its last view goes."""
        views = self.free + [buf for _, buf, _, _ in self.pending if buf is not None]
        if self.buf is not None:
            views.append(self.buf)
        self.free, self.buf = [], None
        self.pending.clear()
        for view in views:
            try:
                view.release()
            except BufferError:
                pass
        maps, self.maps = self.maps, []
        for m in maps:
            try:
                m.close()
            except BufferError:
                pass

    def _zero_blocks_until(self, index):
        """Blocks next..index-1 have no data: their digest is known (the last may be short)."""
        if index <= self.next:
            return
        whole = min(index, self.size // self.block_size) - self.next
        if whole > 0:
            self.pending.append((None, None, self.zero_digest, whole))
        if index * self.block_size > self.size:
            short = self.size % self.block_size
            self.pending.append((None, None, _zero_digest(self.new, short), 1))
        self.next = index

    def _collect(self):
        """Hash the oldest pending digest (or run of zero-block digests) into the result."""
        future, buf, digest, count = self.pending.popleft()
        if future is not None:
            self.outer.update(future.result())
            self.free.append(buf)
            return
        # A terabyte of zeros is a million digests: a canceled request must not wait for them.
        while count > 0:
            n = min(count, _ZERO_RUN_CHECK)
            for _ in range(n):
                self.outer.update(digest)
            count -= n
            if count:
                self.check()
