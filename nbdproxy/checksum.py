"""Handlers of /images/{ticket}/checksum and /checksum/algorithms: the block hash of API.md 4c.

Each block of block_size is hashed; the digests are hashed in order. Blocks that block status
reports as zero use a precomputed digest and are not read.
"""

import hashlib

from . import blkhash, errors
from .blkhash import ALGORITHM, BLOCK_SIZE
from .extents import iterate
from .images import authorize, json_response

MIN_BLOCK = 1024**2
MAX_BLOCK = 16 * 1024**2


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
    with ticket.backend.handle() as h, ticket.running("checksum") as operation:
        size = min(ticket.size, h.size)     # what the ticket grants (API.md 4c)
        zero = ((start, length) for start, length, (is_zero, _) in
                iterate(h, "zero", 0, size) if is_zero)
        digest = blkhash.compute(size, h.read_into, zero, algorithm, block_size,
                                 operation.check)
    return json_response({"algorithm": algorithm, "block_size": block_size, "checksum": digest})
