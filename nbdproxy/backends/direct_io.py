"""Any offset and length on an O_DIRECT file descriptor: the aligned middle of a range goes
straight between the caller's buffer and the disk; partial blocks at its edges go through an
aligned bounce buffer, read-modify-written under the block's lock (shared by all the channels
of a ticket, so two writes into one block both land)."""

import contextlib
import fcntl
import mmap
import os
import threading

from .. import errors
from . import fileio

PIECE = 2 * 1024**2      # the most moved per yield, and the size of a bounce buffer
PAGE = mmap.PAGESIZE


def up(n, a):
    return -(-n // a) * a


def down(n, a):
    return n // a * a


def split(offset, end, a):
    """(head, mid): [offset, head) and [mid, end) are partial blocks, [head, mid) whole ones."""
    head = min(up(offset, a), end)
    return head, max(down(end, a), head)


class AlignedIO:
    """Mixin of the file channel: needs fd, _b (align, direct, locks), check(), _bounces."""

    def _buf(self):
        key = threading.get_ident()
        bounce = self._bounces.get(key)
        if bounce is None:
            bounce = self._bounces[key] = mmap.mmap(-1, PIECE)
        return memoryview(bounce)

    def _read(self, view, offset):
        if not self._b.direct:
            return self._pread(view, offset, len(view))
        a = self._b.align
        head, mid = split(offset, offset + len(view), a)
        for s, e in ((offset, head), (head, mid), (mid, offset + len(view))):
            part = view[s - offset:e - offset]
            if not part:
                continue
            if (s | e) % a or not self._aligned(part):
                self._read_bounced(part, s)
            else:
                self._pread(part, s, len(part))

    def _aligned(self, view):
        addr = fileio.address(view)
        return addr is not None and addr % self._b.align == 0

    def _pread(self, view, offset, need):
        """Read into view from offset until need bytes came (short only at the end of file)."""
        got = 0
        while got < need:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n == 0:
                size = self.check(0, 0)
                raise errors.RangeNotSatisfiable(f"The file shrank to {size} bytes", size)
            got += n

    def _read_bounced(self, view, offset):
        """Copy through the aligned bounce buffer: reads whole blocks around the range."""
        a, b = self._b.align, self._buf()
        step = len(b) - 2 * a
        for i in range(0, len(view), step):
            s, e = offset + i, offset + min(i + step, len(view))
            blk = down(s, a)
            self._pread(b[:up(e, a) - blk], blk, e - blk)
            view[i:i + e - s] = b[s - blk:e - blk]

    def _edges(self, offset, end, size, a):
        """Split [offset, end) into (start, end, how): "rmw" partial blocks, "direct" aligned
        blocks, "buffered" for the page holding a partial last block: a whole-block O_DIRECT
        write there would grow the file, so every write to that page goes through the cache."""
        tail = size if size % a == 0 else down(size, max(a, PAGE))
        out = []
        if end > tail:
            out.append((max(offset, tail), end, "buffered"))
            end = max(offset, tail)
        head, mid = split(offset, end, a)
        out[:0] = [(offset, head, "rmw"), (head, mid, "direct"), (mid, end, "rmw")]
        return [(s, e, how) for s, e, how in out if e > s]

    def _write(self, view, offset, size):
        if not self._b.direct:
            return self._pwrite(view, offset)
        for s, e, how in self._edges(offset, offset + len(view), size, self._b.align):
            part = view[s - offset:e - offset]
            if how == "buffered":
                with self._buffered():
                    self._pwrite(part, s)
            elif how == "rmw":
                self._rmw(part, s)
            elif self._aligned(part):
                self._pwrite(part, s)
            else:
                b = self._buf()
                for i in range(0, len(part), len(b)):
                    chunk = part[i:i + len(b)]
                    b[:len(chunk)] = chunk
                    self._pwrite(b[:len(chunk)], s + i)

    def _pwrite(self, view, offset):
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done)

    def _rmw(self, view, offset):
        """Write part of one block: read it whole, patch it, write it back, holding its lock."""
        a, b = self._b.align, self._buf()
        blk = down(offset, a)
        with self._b.locks.hold(blk // a):
            self._pread(b[:a], blk, a)
            b[offset - blk:offset - blk + len(view)] = view
            self._pwrite(b[:a], blk)

    @contextlib.contextmanager
    def _buffered(self):
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        if flags & os.O_DIRECT:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        try:
            yield
        finally:
            if flags & os.O_DIRECT:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)
