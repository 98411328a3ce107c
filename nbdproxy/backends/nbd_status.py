"""NBD block status: the base:allocation, qemu:allocation-depth and dirty bitmap contexts of an
export, pipelined in windows, turned into typed Extents (API.md 4b)."""

import collections

import nbd

from .. import errors
from . import Extent

ALLOCATION = nbd.CONTEXT_BASE_ALLOCATION
DEPTH = "qemu:allocation-depth"
MAX_STATUS = 2**32 - 2**20
# Block status commands in flight. make bench, extents of the 1 TiB sparse image from
# qemu-nbd (256 commands), medians of 3: 0.015 s one at a time; 0.007-0.008 s with 4, 8 or 32.
STATUS_DEPTH = 8


class BlockStatus:
    """Mixin of the NBD Handle: needs h, contexts, dirty_context, _wait() and _drain()."""

    def block_status(self, offset, length):
        """Yield (length, {context: flags}) runs covering [offset, offset+length) in order.

        One command covers at most MAX_STATUS bytes: a 1 TiB image takes 256, so STATUS_DEPTH of
        them are in flight at once. A reply that covers less than its window is followed by a
        command for the rest of that window, ahead of the later ones.
        """
        if ALLOCATION not in self.contexts:
            if length:
                yield length, {}
            return
        end = offset + length
        inflight = collections.deque()     # ([(cookie, None)], start, length, replies), in order
        try:
            while inflight or offset < end:
                while offset < end and len(inflight) < STATUS_DEPTH:
                    n = min(end - offset, MAX_STATUS)
                    inflight.append(self._submit_status(offset, n))
                    offset += n
                [(cookie, _)], start, n, replies = inflight[0]
                self._wait(cookie)
                inflight.popleft()
                moved = 0
                for run, flags in _combine(replies, n):
                    yield run, flags
                    moved += run
                if moved == 0:
                    raise errors.BackendError(f"NBD block status made no progress at {start}")
                if moved < n:
                    inflight.appendleft(self._submit_status(start + moved, n - moved))
        except nbd.Error as e:
            raise errors.BackendError(f"NBD block status failed: {e}") from e
        finally:
            self._drain(inflight)

    def extents(self, context, offset, length, check=None):
        """Yield Extents of context ("zero" or "dirty") covering [offset, offset+length), in
        order, neighbours with equal flags merged; NotFound when the export cannot answer.
        check() runs for each run block status gives, so a long walk can be stopped."""
        if context == "dirty" and self.dirty_context not in self.contexts:
            raise errors.NotFound("The export has no dirty bitmap")
        if context not in ("zero", "dirty"):
            raise errors.NotFound(f"No extents of context {context!r}")
        bitmap = self.dirty_context
        run = None
        pos = offset
        for n, flags in self.block_status(offset, length):
            if check is not None:
                check()
            zero = bool(flags.get(ALLOCATION, 0) & nbd.STATE_ZERO)
            if context == "dirty":
                hole, dirty = False, bool(flags.get(bitmap, 0) & 1)
            else:
                hole, dirty = flags.get(DEPTH) == 0, False
            if run is not None and (run.zero, run.hole, run.dirty) == (zero, hole, dirty):
                run = run._replace(length=run.length + n)
            else:
                if run is not None:
                    yield run
                run = Extent(pos, n, zero, hole, dirty)
            pos += n
        if run is not None:
            yield run

    def _submit_status(self, start, length):
        replies = {}

        def extent(context, offset, entries, err):
            replies[context] = [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]
            return 0

        return [(self.h.aio_block_status(length, start, extent), None)], start, length, replies


def _combine(replies, limit):
    """Cut the per-context extent lists at every boundary of any of them, up to limit bytes.

    Contexts may answer with different lengths; stop at the shortest answer so that every run
    has flags from every context.
    """
    if not replies:
        yield limit, {}
        return
    lists = {c: collections.deque(e) for c, e in replies.items() if e}
    if len(lists) < len(replies):
        return
    total = min(limit, min(sum(n for n, _ in e) for e in lists.values()))
    done = 0
    while done < total:
        n = min(total - done, min(e[0][0] for e in lists.values()))
        flags = {c: e[0][1] for c, e in lists.items()}
        for e in lists.values():
            head_len, head_flags = e[0]
            if head_len == n:
                e.popleft()
            else:
                e[0] = (head_len - n, head_flags)
        done += n
        yield n, flags
