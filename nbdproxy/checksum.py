"""Handlers of /images/{ticket}/checksum and /checksum/algorithms: the block hash of API.md 4c.

Each block of block_size is hashed; the digests are hashed in order. Blocks that block status
reports as zero use a precomputed digest and are not read.
"""

import hashlib

from . import errors
from .extents import iterate
from .images import authorize, json_response

ALGORITHM = "blake2b"
BLOCK_SIZE = 4 * 1024**2
MIN_BLOCK = 1024**2
MAX_BLOCK = 16 * 1024**2


def hasher(algorithm):
    """A constructor of hash objects; blake2 digests are 32 bytes as in ovirt-imageio's blkhash."""
    if algorithm in ("blake2b", "blake2s"):
        return lambda data=b"": hashlib.new(algorithm, data, digest_size=32)
    return lambda data=b"": hashlib.new(algorithm, data)


def algorithms(ctx, req, ticket_id):
    return json_response({"algorithms": sorted(hashlib.algorithms_available)})


def _params(req):
    algorithm = req.GET.get("algorithm", ALGORITHM)
    if algorithm not in hashlib.algorithms_available:
        raise errors.BadRequest(f"Unsupported algorithm {algorithm!r}")
    value = req.GET.get("block_size", str(BLOCK_SIZE))
    if not (value.isascii() and value.isdigit() and len(value) <= 20):
        raise errors.BadRequest(f"Invalid block_size {value[:30]!r}")
    block_size = int(value)
    if not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size % 4096:
        raise errors.BadRequest(
            f"block_size must be from {MIN_BLOCK} to {MAX_BLOCK}, a multiple of 4096")
    if algorithm.startswith("shake_"):
        raise errors.BadRequest(f"Unsupported algorithm {algorithm!r}: variable digest size")
    return algorithm, block_size


def get(ctx, req, ticket_id):
    algorithm, block_size = _params(req)
    ticket = authorize(ctx, ticket_id, "read")
    with ticket.backend.handle() as h:
        operation = ticket.start("checksum", 0, 0)
        ok = False
        try:
            digest = compute(h, algorithm, block_size, ctx.connection.buffer(ctx.buffer_size),
                             operation.check)
            ok = True
        finally:
            ticket.finish(operation, ok)
    return json_response({"algorithm": algorithm, "block_size": block_size, "checksum": digest})


def zero_blocks(h, block_size):
    """Yield (block_index, count) runs of whole blocks that block status says read as zero."""
    for start, length, (zero, _hole) in iterate(h, "zero", 0, h.size):
        if not zero:
            continue
        first = -(-start // block_size)
        end = start + length
        # A short last block counts as whole when the zero extent reaches the end of the image.
        last = end // block_size if end < h.size else -(-end // block_size)
        if last > first:
            yield first, last - first


def compute(h, algorithm, block_size, buf, check):
    new = hasher(algorithm)
    outer = new()
    zero_digest = new(bytes(block_size)).digest()
    size = h.size
    blocks = -(-size // block_size)
    zero_runs = list(zero_blocks(h, block_size))
    block = 0
    for first, count in zero_runs + [(blocks, 0)]:
        if first > block:
            _hash_data(h, new, outer, block * block_size,
                       min(first * block_size, size) - block * block_size, block_size, buf, check)
        for i in range(first, first + count):
            n = min(block_size, size - i * block_size)
            outer.update(zero_digest if n == block_size else new(bytes(n)).digest())
        block = first + count
    return outer.hexdigest()


def _hash_data(h, new, outer, offset, length, block_size, buf, check):
    """Hash the blocks of [offset, offset+length); reads arrive in pieces of at most a block."""
    inner = None
    filled = 0
    for view in h.read(buf, offset, length):
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
        check()
    if inner is not None:
        outer.update(inner.digest())
