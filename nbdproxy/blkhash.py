"""The block hash of API.md 4c (ovirt-imageio's blkhash), for the server's /checksum and the client.

Each block of block_size is hashed (the last may be short); the digests are hashed in order with
the same algorithm. Whole blocks inside zero extents use a precomputed digest and are not read.
"""

import hashlib

ALGORITHM = "blake2b"
BLOCK_SIZE = 4 * 1024**2


def hasher(algorithm):
    """A constructor of hash objects; blake2 digests are 32 bytes as in ovirt-imageio's blkhash."""
    if algorithm in ("blake2b", "blake2s"):
        return lambda data=b"": hashlib.new(algorithm, data, digest_size=32)
    return lambda data=b"": hashlib.new(algorithm, data)


def zero_blocks(size, zero_extents, block_size):
    """Yield (first block, count) runs of whole blocks inside the (start, length) zero extents."""
    for start, length in zero_extents:
        first = -(-start // block_size)
        end = start + length
        # A short last block counts as whole when the zero extent reaches the end of the image.
        last = end // block_size if end < size else -(-end // block_size)
        if last > first:
            yield first, last - first


def compute(size, read, zero_extents, algorithm=ALGORITHM, block_size=BLOCK_SIZE, buf=None,
            check=None):
    """The hex block hash of an image of size bytes.

    read(buf, offset, length) yields memoryviews of the data in order; zero_extents are the
    (start, length) ranges known to read as zeros; check() runs after each piece (to stop a
    canceled request).
    """
    new = hasher(algorithm)
    outer = new()
    zero_digest = new(bytes(block_size)).digest()
    blocks = -(-size // block_size)
    block = 0
    for first, count in list(zero_blocks(size, zero_extents, block_size)) + [(blocks, 0)]:
        if first > block:
            offset = block * block_size
            _hash_data(read, new, outer, buf, offset, min(first * block_size, size) - offset,
                       block_size, check)
        for i in range(first, first + count):
            n = min(block_size, size - i * block_size)
            outer.update(zero_digest if n == block_size else new(bytes(n)).digest())
        block = first + count
    return outer.hexdigest()


def _hash_data(read, new, outer, buf, offset, length, block_size, check):
    """Hash the blocks of [offset, offset+length), offset on a block boundary, into outer."""
    inner, filled = None, 0
    for view in read(buf, offset, length):
        while view:
            if inner is None:
                inner, filled = new(), 0
            take = min(len(view), block_size - filled)
            inner.update(view[:take])
            filled += take
            view = view[take:]
            if filled == block_size:
                outer.update(inner.digest())
                inner = None
        if check is not None:
            check()
    if inner is not None:
        outer.update(inner.digest())
