"""Handlers of /images/{ticket}/checksum and /checksum/algorithms: the block hash of API.md 4c.

Each block of block_size is hashed; the digests are hashed in order. Blocks that block status
reports as zero use a precomputed digest and are not read. The block buffers of all checksums
come from one Budget, the daemon's checksum_memory.
"""

import collections
import contextlib
import hashlib
import threading
import time

from . import blkhash, errors
from .blkhash import ALGORITHM, BLOCK_SIZE, HASH_THREADS
from .images import Watch, authorize, json_response

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
    forwarded = _forwarded(ticket, algorithm, block_size)
    if forwarded is not None:
        return json_response(forwarded)
    budget = ctx.checksum_budget or Budget(None)
    # A buffer per hashing thread and one for reading; no more than the image has blocks.
    wanted = max(1, min(HASH_THREADS + 1, -(-ticket.size // block_size)))
    with ticket.running("checksum") as operation:
        check = Watch(ctx, operation)
        # The memory first: a request waiting for it holds no NBD connection.
        with budget.reserve(block_size, wanted, ticket.inactivity_timeout or None,
                            check) as buffers, ticket.backend.lend() as h:
            size = min(ticket.size, h.size)     # what the ticket grants (API.md 4c)
            zero = ((e.start, e.length) for e in h.extents("zero", 0, size, check) if e.zero)
            digest = blkhash.compute(size, h.read_into, zero, algorithm, block_size, check,
                                     buffers=buffers)
    return json_response({"algorithm": algorithm, "block_size": block_size, "checksum": digest})


def _forwarded(ticket, algorithm, block_size):
    """The checksum computed by the backend itself (a proxy's upstream), when it can compute
    it over the same bytes; else None."""
    with ticket.backend.lend() as h:
        if not ticket.backend.caps(h).checksum or ticket.size < h.size:
            return None
        with ticket.running("checksum"):
            return h.checksum(algorithm, block_size)


class Budget:
    """Memory for the block buffers of checksums, shared by all of the daemon's requests.

    A checksum takes from one block to the blocks it can use; when not even one block is free
    it waits, first come first served, up to its timeout (then ServiceUnavailable).
    """

    # How often a waiting request looks at its ticket and its client.
    CHECK_INTERVAL = 0.5

    def __init__(self, size):
        self.size = size            # bytes; None: no limit
        self._free = size
        self._cond = threading.Condition()
        self._waiting = collections.deque()

    @contextlib.contextmanager
    def reserve(self, unit, most, timeout, check):
        """Hold n units (1 <= n <= most) for the with block; n is its value."""
        if self.size is None:
            yield most
            return
        n = self._take(unit, most, timeout, check)
        try:
            yield n
        finally:
            with self._cond:
                self._free += n * unit
                self._cond.notify_all()

    def _take(self, unit, most, timeout, check):
        if unit > self.size:
            raise errors.ServiceUnavailable(f"A checksum block of {unit} bytes is more than "
                                            f"checksum_memory, {self.size}")
        deadline = None if timeout is None else time.monotonic() + timeout
        me = object()
        with self._cond:
            self._waiting.append(me)
            try:
                while self._waiting[0] is not me or self._free < unit:
                    left = self.CHECK_INTERVAL if deadline is None else \
                        deadline - time.monotonic()
                    if left <= 0:
                        raise errors.ServiceUnavailable(
                            "Checksum memory is in use by other requests; try again later")
                    self._cond.wait(min(left, self.CHECK_INTERVAL))
                    check()
                n = min(most, self._free // unit)
                self._free -= n * unit
                return n
            finally:
                self._waiting.remove(me)
                self._cond.notify_all()
