"""The block hash of API.md 4c (ovirt-imageio's blkhash), for the server's /checksum and the client.

Each block of block_size is hashed (the last may be short); the digests are hashed in order with
the same algorithm. Blocks inside zero extents use a precomputed digest and are not read; the zero
parts of other blocks are not read either. Blocks are hashed on HASH_THREADS threads, since
hashing, not reading, bounds a checksum (hashlib lets go of the GIL while it hashes).
"""

import collections
import concurrent.futures
import hashlib
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


def compute(size, read, zero_extents, algorithm=ALGORITHM, block_size=BLOCK_SIZE, buf=None,
            check=None, threads=HASH_THREADS):
    """The hex block hash of an image of size bytes.

    read(buf, offset, length) yields memoryviews of the data in order; zero_extents are the
    (start, length) ranges known to read as zeros, in order; check() runs after each piece (to
    stop a canceled request).
    """
    new = hasher(algorithm)
    with concurrent.futures.ThreadPoolExecutor(threads, "blkhash") as pool:
        blocks = _Blocks(new, size, block_size, pool, threads + 1)
        try:
            for start, length in data_ranges(size, zero_extents):
                for view in read(buf, start, length):
                    blocks.add(start, view)
                    start += len(view)
                    if check is not None:
                        check()
            return blocks.finish()
        finally:
            blocks.cancel()


class _Blocks:
    """Data in, block digests out in block order: each block is filled in a buffer of its own
    (zeros where no data came) and hashed by the pool while the next ones fill."""

    def __init__(self, new, size, block_size, pool, buffers):
        self.new, self.size, self.block_size, self.pool = new, size, block_size, pool
        self.outer = new()
        self.zero_digest = new(bytes(block_size)).digest()
        self.zeros = memoryview(bytes(block_size))
        self.free = [memoryview(bytearray(block_size)) for _ in range(buffers)]
        # In block order: (future of a data block's digest, its buffer, None, 1) or
        # (None, None, the digest of count zero blocks, count).
        self.pending = collections.deque()
        self.next = 0           # the first block not yet hashed nor being filled
        self.block = None       # the block being filled: its index, buffer, bytes filled
        self.buf = None
        self.filled = 0

    def add(self, offset, view):
        """Data at offset, after all data before it."""
        while view:
            index = offset // self.block_size
            if index != self.block:
                self._close_block()
                self._open_block(index)
            at = offset - index * self.block_size
            n = min(len(view), self.block_size - at)
            self._fill(at)
            self.buf[at:at + n] = view[:n]
            self.filled = at + n
            view, offset = view[n:], offset + n

    def finish(self):
        self._close_block()
        self._zero_blocks_until(-(-self.size // self.block_size))
        while self.pending:
            self._collect()
        return self.outer.hexdigest()

    def cancel(self):
        for future, _, _, _ in self.pending:
            if future is not None:
                future.cancel()

    def _open_block(self, index):
        self._zero_blocks_until(index)
        while not self.free:
            self._collect()
        self.block, self.buf, self.filled = index, self.free.pop(), 0

    def _close_block(self):
        if self.block is None:
            return
        n = min(self.block_size, self.size - self.block * self.block_size)
        self._fill(n)
        view = self.buf[:n]
        future = self.pool.submit(lambda: self.new(view).digest())
        self.pending.append((future, self.buf, None, 1))
        self.next, self.block, self.buf = self.block + 1, None, None

    def _fill(self, upto):
        """Zeros in the block's buffer from what was filled up to upto: a zero extent's part."""
        if upto > self.filled:
            self.buf[self.filled:upto] = self.zeros[:upto - self.filled]

    def _zero_blocks_until(self, index):
        """Blocks next..index-1 have no data: their digest is known (the last may be short)."""
        if index <= self.next:
            return
        whole = min(index, self.size // self.block_size) - self.next
        if whole > 0:
            self.pending.append((None, None, self.zero_digest, whole))
        if index * self.block_size > self.size:
            short = self.size % self.block_size
            self.pending.append((None, None, self.new(bytes(short)).digest(), 1))
        self.next = index

    def _collect(self):
        """Hash the oldest pending digest (or run of zero-block digests) into the result."""
        future, buf, digest, count = self.pending.popleft()
        if future is not None:
            self.outer.update(future.result())
            self.free.append(buf)
            return
        for _ in range(count):
            self.outer.update(digest)
