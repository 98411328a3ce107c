"""The file: backend (API.md 7a): a raw file or a block device served without an NBD server, with
O_DIRECT where the filesystem takes it and the page cache where it does not. Plain-socket
downloads are zero copy (zero_copy.py): sendfile from the page cache, splice for O_DIRECT fds.
"""

import collections
import concurrent.futures
import contextlib
import errno
import logging
import mmap
import os
import threading

from .. import errors
from . import Caps, Extent, fileio, zero_copy
from .direct_io import PIECE, AlignedIO, down, split
from .pipeline import DEPTH_IN_FLIGHT, Pipeline, ran_here, read_fully
from .pool import Pool

log = logging.getLogger("nbdproxy.file")

MAX_ZERO = 1024**3       # bytes per fallocate or BLKZEROOUT in zero()
# Pieces of a page-cache upload whose writeback runs before the oldest is waited for and dropped.
STREAM_BEHIND = 4


def parse_url(url):
    """The path of a file: URL, as written (not percent-decoded); a bare path is taken as is."""
    for prefix in ("file://", "file:"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return url


def open_file(url, writable, direct=True, max_connections=8, idle_timeout=None, closer=None,
              pipe_fds=None):
    """A FileBackend for a file: URL or path; errors.BadRequest("Invalid ticket: ...") if unusable."""
    return FileBackend(parse_url(url), writable, direct, max_connections, idle_timeout, closer,
                       pipe_fds)


class FileBackend(Pool):
    """One ticket's file: a Pool of channels (one fd each, closed when idle), the block lock
    table, and the thread pool of their pieces. A failed fdatasync is the pool's lost-writes
    verdict: the kernel reports a writeback error once, so every later flush fails."""

    def __init__(self, path, writable, direct=True, max_connections=8, idle_timeout=None,
                 closer=None, pipe_fds=None):
        if not path.startswith("/"):
            raise errors.BadRequest(f"Invalid ticket: {path}: not an absolute path")
        self.path, self.writable, self.pipe_fds = path, writable, pipe_fds
        self.locks = fileio.BlockLocks()
        self._flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            # Later channels reopen this fd: the inode the ticket was added on.
            self._anchor, self.block, self.direct = fileio.open_checked(path, self._flags, direct)
        except fileio.Refused as e:
            raise errors.BadRequest(f"Invalid ticket: {path}: {e}") from None
        try:
            self.align = fileio.dio_alignment(self._anchor, self.block) if self.direct else 1
            self.sector = fileio.blk_sector_size(self._anchor) if self.block else self.align
        except OSError as e:
            os.close(self._anchor)
            raise errors.BadRequest(f"Invalid ticket: {path}: cannot read: {e.strerror}") from None
        # Zeroing in the kernel (fallocate, BLKZEROOUT), or by writing zeros (ramfs)? A hole
        # punched past the end of the file changes nothing and says which.
        self.fast_zero = self.block or writable and _punches(self._anchor)
        super().__init__(self._open_channel, path, max_connections, idle_timeout, closer)
        # Pieces of a large request are read and written by these threads, DEPTH_IN_FLIGHT at
        # once per request, so the disk sees a queue and the socket works meanwhile.
        self.io = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(32, DEPTH_IN_FLIGHT * max_connections), thread_name_prefix="file-io")

    @property
    def max_connections(self):
        return self.limit

    @property
    def size(self):
        return fileio.blk_size(self._anchor) if self.block else os.fstat(self._anchor).st_size

    def caps(self, ch=None):
        return Caps(zero=True, flush=True, extents=frozenset({"zero"}), multi_conn=True,
                    max_connections=self.limit, zero_copy=True,
                    fast_zero=self.fast_zero)

    def _open_channel(self):
        try:
            # The inode the ticket was opened on, even if the path now names another file.
            fd = os.open(f"/proc/self/fd/{self._anchor}",
                         self._flags | (os.O_DIRECT if self.direct else 0))
        except OSError as e:
            raise errors.BackendError(f"{self.path}: cannot open: {e.strerror}") from e
        return FileChannel(self, fd)

    def run(self, fn, *args):
        """fn(*args) on the I/O threads, as a Future; a request still running when its ticket
        was closed (DELETE, or replaced) fails as one, not with the pool's RuntimeError."""
        try:
            return self.io.submit(fn, *args)
        except RuntimeError:
            raise errors.BackendError(f"{self.path}: the ticket was closed") from None

    def flush(self, ch):
        if self.lost:
            raise errors.BackendError(f"{self.path}: an earlier flush failed ({self.lost}); "
                                      "written data may be lost")
        ch.check(0, 0)
        super().flush(ch)

    def _retire(self, ch, why):
        super()._retire(ch, why)
        self._close_anchor()

    def close(self):
        super().close()
        self._close_anchor()
        # Threads end when idle; busy channels finish their pieces first.
        self.io.shutdown(wait=False)

    def _close_anchor(self):
        """The anchor fd goes with the last channel after close()."""
        with self._cond:
            if self._closed and not self._all and self._anchor is not None:
                os.close(self._anchor)
                self._anchor = None


class FileChannel(Pipeline, AlignedIO):
    """One fd of the backend's file, used by one request at a time. With O_DIRECT, the middle of
    a range goes straight between the caller's buffer and the disk; partial blocks at its edges
    are read-modify-written through an aligned bounce buffer under the block's lock.

    Large reads and writes are pipelined (pipeline.Pipeline): each piece is one task of the
    backend's thread pool, so pieces of one request are in flight together."""

    IO_ERRORS = (OSError,)

    broken = False
    multi_conn = True       # one fdatasync covers what every fd wrote

    def __init__(self, backend, fd):
        self._b, self.fd = backend, fd
        self._recv = None
        self._bounces = {}      # thread id -> its aligned bounce buffer (pieces run in parallel)
        self.unflushed = 0
        self._count_lock = threading.Lock()
        self._behind = collections.deque()     # page-cache pieces whose writeback is started

    # What the Pool asks of a channel.

    def alive(self):
        return True

    def caps(self, max_connections):
        return self._b.caps()

    def take_unflushed(self):
        with self._count_lock:
            n, self.unflushed = self.unflushed, 0
            return n

    def flush(self, covers=()):
        """fdatasync (fsync for a block device): covers what every channel wrote."""
        pending = [(ch, ch.unflushed) for ch in (self, *covers)]
        try:
            (os.fsync if self._b.block else os.fdatasync)(self.fd)
        except OSError as e:
            log.error("flush of %s failed: %s", self._b.path, e.strerror or e)
            raise errors.BackendError(f"{self._b.path}: flush failed: {e.strerror or e}") from e
        for ch, n in pending:
            with ch._count_lock:
                ch.unflushed -= n

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for m in (self._recv, *self._bounces.values()):
            if m is not None:
                m.close()
        self._bounces.clear()

    # Pipeline: a piece is a task of the backend's pool; its future is the cookie.

    def _submit_read(self, view, offset):
        return [(self._b.run(self.read_into, view, offset), None)]

    def _submit_write(self, view, offset, zero, punch_hole):
        if not self._b.direct:
            # Buffered writes of one file contend for its inode lock: parallel ones only spin
            # (make bench, --no-file-direct uploads: 2.3-3.7 CPU-s/GiB). The write-behind
            # thread writes them itself, one at a time, while the body is read.
            return [(ran_here(self._write_piece, view, offset, zero, punch_hole), None)]
        return [(self._b.run(self._write_piece, view, offset, zero, punch_hole), None)]

    def _wait(self, cookie, submitted=None):
        cookie.result()

    def _drain(self, inflight):
        concurrent.futures.wait([f for cookies, *_ in inflight for f, _ in cookies])

    def written(self, n):
        """Count n bytes of a request that succeeded, unflushed until the next fdatasync."""
        with self._count_lock:
            self.unflushed += n

    def _failure(self, what, e):
        if isinstance(e, OSError):
            return errors.BackendError(f"{self._b.path}: {what} failed: {e.strerror or e}")
        return super()._failure(what, e)

    @property
    def size(self):
        """The file's current size; BackendError if the path no longer names it. Handlers ask
        before a response's headers go out, so a GET of a removed file is a 500, not a 206
        cut short."""
        return self.check(0, 0)

    def check(self, offset, length, limit=None):
        """The file's current size, after making sure the path still names our file and that
        [offset, offset+length) is inside min(size, limit)."""
        path = self._b.path
        st = os.fstat(self.fd)
        try:
            now = os.stat(path)
        except OSError as e:
            now = e
        # Replaced first: the old inode of a replaced file is unlinked too.
        if not isinstance(now, OSError) and (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            log.error("%s was replaced under its ticket", path)
            raise errors.BackendError(f"{path} was replaced under its ticket")
        if st.st_nlink == 0 or isinstance(now, OSError):
            log.error("%s was removed under its ticket", path)
            raise errors.BackendError(f"{path} was removed under its ticket")
        size = fileio.blk_size(self.fd) if self._b.block else st.st_size
        bound = size if limit is None else min(size, limit)
        if offset + length > bound:
            raise errors.RangeNotSatisfiable(
                f"Range {offset}-{offset + length} is past the end of the image, {bound}", bound)
        return size

    @contextlib.contextmanager
    def _io(self, what, offset=0, length=0):
        """OSError -> BackendError naming the path; a removed or replaced file says so, and a
        file that shrank under [offset, offset+length) is a 416 with its new size."""
        try:
            yield
        except OSError as e:
            if e.errno == errno.EBADF and self.fd is None:
                raise errors.BackendError(f"{self._b.path}: {what} on a closed channel") from e
            self.check(offset, length)
            raise errors.BackendError(f"{self._b.path}: {what} failed: {e.strerror}") from e

    # Reading.

    def read_into(self, view, offset):
        self.check(offset, len(view))
        with self._io("read"):
            self._read(view, offset)
        return view

    # Writing.

    def write(self, readinto, buf, offset, length, on_written, limit, punch_hole=False,
              check=None):
        if length is not None:
            self.check(offset, length, limit)
        super().write(readinto, buf, offset, length, on_written, limit, punch_hole, check)

    def _write_piece(self, view, offset, zero, punch_hole):
        size = self.check(offset, len(view))
        with self._io("write"):
            if zero:
                self._zero(offset, len(view), punch_hole, view, size)
            else:
                self._write(view, offset, size)
                if not self._b.direct:
                    self._stream_out(offset, len(view))

    def _stream_out(self, offset, length):
        """A page-cache upload streams to the disk as it comes: each piece's writeback starts at
        once, and STREAM_BEHIND pieces later it is waited for and its pages dropped. Dirty pages
        left for the final flush, and pages that need reclaiming, stay a few pieces per writer
        (make bench: on a machine whose memory is full of cached files, the writer paid for the
        reclaim: 3 CPU-s/GiB). Only the write-behind thread writes a page-cache channel."""
        fileio.write_out(self.fd, offset, length)
        self._behind.append((offset, length))
        if len(self._behind) > STREAM_BEHIND:
            done, n = self._behind.popleft()
            fileio.write_out(self.fd, done, n, wait=True)
            os.posix_fadvise(self.fd, done, n, os.POSIX_FADV_DONTNEED)

    # Zeroing: never changes the size; deallocates with punch_hole, else allocates zeros.

    def zero(self, offset, length, punch_hole, buf=None):
        size = self.check(offset, length)
        zeros = memoryview(buf if buf is not None else bytearray(PIECE))[:PIECE]
        zeros[:] = bytes(len(zeros))
        end = offset + length
        while offset < end:
            n = min(end, down(offset, MAX_ZERO) + MAX_ZERO) - offset
            with self._io("zero"):
                self._zero(offset, n, punch_hole, zeros, size)
            yield n
            offset += n
            if offset < end:
                size = self.check(offset, end - offset)

    def _zero(self, offset, length, punch_hole, zeros, size):
        """Partial blocks are written from zeros (a view of zeros); whole ones in the kernel:
        fallocate, BLKZEROOUT (a block device needs whole logical blocks even when buffered)."""
        end = offset + length
        if self._b.direct or self._b.block:
            parts = self._edges(offset, end, size, self._b.sector)
        else:
            parts = [(offset, end, "direct")]
        for s, e, how in parts:
            if how == "rmw":
                self._write_zeroes(s, e - s, zeros, size)
            else:
                self._zero_range(s, e - s, punch_hole, zeros, size)

    def _write_zeroes(self, offset, length, zeros, size):
        for i in range(0, length, len(zeros)):
            self._write(zeros[:min(len(zeros), length - i)], offset + i, size)

    def _zero_range(self, offset, length, punch_hole, zeros, size):
        if not fileio.zero_range(self.fd, self._b.block, offset, length, punch_hole):
            self._write_zeroes(offset, length, zeros, size)

    def extents(self, context, offset, length, check=None):
        """The file's layout: holes are zero and hole, unwritten extents zero, the rest data.
        check() runs for each extent of the layout, so a long walk can be stopped."""
        if context != "zero":
            raise errors.NotFound(f"No {context!r} extents: a file has no dirty bitmap")
        self.check(offset, length)
        if not length:
            return
        if self._b.block:
            yield Extent(offset, length, False, False, False)
            return
        try:
            yield from fileio.merged(Extent(*e, False)
                                     for e in _checked(fileio.layout(self.fd, offset,
                                                                     offset + length), check))
        except OSError as e:
            raise errors.BackendError(f"{self._b.path}: mapping failed: {e.strerror}") from e

    # Zero copy (plain sockets only; the caller decides).

    def send_to(self, sock, offset, length, last=None):
        """Send the range to sock, yielding each piece's size once it is sent; last(n) is called
        just before the last piece goes out. Buffered fds sendfile from the page cache; O_DIRECT
        ones splice whole blocks (never through the page cache) and send partial ones read."""
        if self._b.direct:
            yield from self._splice_to(sock, offset, length, last)
            return
        end = offset + length
        while offset < end:
            n = min(PIECE, end - offset)
            self.check(offset, n)
            if last is not None and offset + n == end:
                last(n)
            with self._io("sendfile", offset, n):
                zero_copy.sendfile(sock, self.fd, offset, n)
            yield n
            offset += n

    def _splice_to(self, sock, offset, length, last):
        end = offset + length
        head, mid = split(offset, end, self._b.align)
        for s, e, whole in ((offset, head, False), (head, mid, True), (mid, end, False)):
            if e <= s:
                continue
            final = last if e == end else None
            with self._io("read"):
                if whole:
                    yield from zero_copy.splice_out(self.fd, sock, s, e - s, self._b.run,
                                                    self._b.align, self.check, final,
                                                    self._b.pipe_fds)
                    continue
                view = self.read_into(self._spare()[:e - s], s)
            if final is not None:
                final(e - s)
            zero_copy.send_all(sock, view)
            yield e - s

    def recv_from(self, source, offset, length):
        """Write length bytes from source (a socket, or a readinto callable) at offset, one piece
        a yield: spliced into the page cache for buffered fds, else received into an aligned
        buffer and written (O_DIRECT takes no pipe pages)."""
        size = self.check(offset, length)
        end = offset + length
        with zero_copy.Pipe(PIECE) as pipe:
            while offset < end:
                n = min(PIECE, end - offset)
                with self._io("write"):
                    if hasattr(source, "fileno") and not self._b.direct:
                        pipe.splice(source, self.fd, offset, n)
                    else:
                        view = self._spare()[:n]
                        read_fully(getattr(source, "recv_into", source), view, True)
                        self._write(view, offset, size)
                yield n
                offset += n
                size = self.check(offset, end - offset)

    def _spare(self):
        """recv_from's page-aligned buffer; the bounce is _write's."""
        if self._recv is None:
            self._recv = mmap.mmap(-1, PIECE)
        return memoryview(self._recv)


def _checked(items, check):
    for item in items:
        if check is not None:
            check()
        yield item


def _punches(fd):
    try:
        return fileio.try_fallocate(fd, fileio.PUNCH, os.fstat(fd).st_size + 4096, 4096)
    except OSError:
        return False
