"""The NBD backend: ticket URLs, libnbd connections pooled per ticket, pipelined reads and writes.

Nothing here knows HTTP; failures of the NBD server become errors.BackendError.
"""

import collections
import contextlib
import logging
import re
import threading
import time
import urllib.parse

import nbd

from .. import errors

log = logging.getLogger("nbdproxy.nbd")

ALLOCATION = nbd.CONTEXT_BASE_ALLOCATION
DEPTH = "qemu:allocation-depth"
BITMAP_PREFIX = "qemu:dirty-bitmap:"

# WRITE_ZEROES pieces (API.md 4) and the block status window asked per command.
MAX_ZERO = 128 * 1024**2
MAX_STATUS = 2**32 - 2**20

# How the data of one request is split into NBD commands, and how many are in flight at once.
PIECE = 2 * 1024**2
DEPTH_IN_FLIGHT = 4


class Address:
    """Where an export is: a unix socket or a TCP host and port, and an export name; or an NBD URI."""

    def __init__(self, unix=None, host=None, port=None, export="", uri=None):
        self.unix, self.host, self.port, self.export, self.uri = unix, host, port, export, uri

    def connect(self, h):
        if self.uri:
            h.connect_uri(self.uri)
            return
        h.set_export_name(self.export)
        if self.unix:
            h.connect_unix(self.unix)
        else:
            h.connect_tcp(self.host, str(self.port))


_OLD_UNIX = re.compile(r"^nbd:unix:(?P<path>[^:]+)(?::exportname=(?P<export>.*))?$")
_OLD_TCP = re.compile(r"^nbd:(?P<host>[^:/\[\]]+|\[[0-9a-fA-F:.]+\]):(?P<port>\d+)"
                      r"(?::exportname=(?P<export>.*))?$")


def parse_url(url):
    """Parse a ticket URL into an Address; ValueError says what is wrong."""
    m = _OLD_UNIX.match(url)
    if m:
        return Address(unix=m["path"], export=m["export"] or "")
    m = _OLD_TCP.match(url)
    if m:
        port = int(m["port"])
        if not 0 < port < 65536:
            raise ValueError(f"bad port in {url!r}")
        return Address(host=m["host"].strip("[]"), port=port, export=m["export"] or "")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("nbd", "nbd+unix"):
        if parts.scheme == "nbd+unix" and "socket" not in urllib.parse.parse_qs(parts.query):
            raise ValueError(f"nbd+unix URL without socket= in {url!r}")
        if parts.scheme == "nbd" and not parts.hostname:
            raise ValueError(f"nbd URL without a host in {url!r}")
        return Address(uri=url)
    raise ValueError(f"unsupported NBD URL {url!r}")


class Handle:
    """One libnbd connection to the export, with the contexts this ticket needs."""

    def __init__(self, address, dirty=False, metrics=None):
        self.metrics = metrics
        self.dirty_context = None
        h = nbd.NBD()
        try:
            h.set_opt_mode(True)
            address.connect(h)
            if dirty:
                self.dirty_context = self._find_bitmap(h)
            h.clear_meta_contexts()
            for context in (ALLOCATION, DEPTH, self.dirty_context):
                if context:
                    h.add_meta_context(context)
            h.opt_go()
            self.size = h.get_size()
            self.can_zero = h.can_zero()
            self.can_flush = h.can_flush()
            self.can_multi_conn = h.can_multi_conn()
            self.readonly = h.is_read_only()
            self.contexts = {c for c in (ALLOCATION, DEPTH, self.dirty_context)
                             if c and h.can_meta_context(c)}
        except nbd.Error as e:
            h.close()
            raise errors.BackendError(f"cannot open NBD export: {e}") from e
        self.h = h

    @staticmethod
    def _find_bitmap(h):
        names = []
        try:
            h.add_meta_context(BITMAP_PREFIX)
            h.opt_list_meta_context(lambda name: names.append(name))
        except nbd.Error as e:
            log.warning("cannot list dirty bitmaps: %s", e)
        names = [n for n in names if n.startswith(BITMAP_PREFIX) and n != BITMAP_PREFIX]
        return names[0] if names else None

    def close(self):
        try:
            self.h.shutdown()
        except nbd.Error:
            pass
        self.h.close()

    # Data. Each generator keeps up to DEPTH_IN_FLIGHT commands queued so that the NBD server
    # works while the caller moves the previous piece over HTTP.

    def read(self, buf, offset, length):
        """Read [offset, offset+length) in pieces; yield a memoryview of buf per piece, in order.

        A yielded view is valid until the next one is asked for.
        """
        view = memoryview(buf)
        piece = min(PIECE, len(view) // DEPTH_IN_FLIGHT)
        slots = collections.deque(view[i * piece:(i + 1) * piece] for i in range(DEPTH_IN_FLIGHT))
        queue = collections.deque()
        pos, end = offset, offset + length
        try:
            while pos < end or queue:
                while pos < end and slots:
                    slot = slots.popleft()
                    n = min(piece, end - pos)
                    cookie = self.h.aio_pread(nbd.Buffer.from_buffer(slot[:n]), pos)
                    queue.append((cookie, slot, n, time.monotonic()))
                    pos += n
                cookie, slot, n, submitted = queue[0]
                self._wait(cookie, submitted)
                queue.popleft()
                yield slot[:n]
                slots.append(slot)
        except nbd.Error as e:
            raise errors.BackendError(f"NBD read failed: {e}") from e
        finally:
            self._drain(queue)

    def write(self, readinto, buf, offset, length, on_written, zero_detect=None):
        """Write length bytes taken with readinto(view) to offset, a piece at a time.

        on_written(n) is called as each piece is acknowledged by the server.
        """
        view = memoryview(buf)
        piece = min(PIECE, len(view) // DEPTH_IN_FLIGHT)
        slots = collections.deque(view[i * piece:(i + 1) * piece] for i in range(DEPTH_IN_FLIGHT))
        queue = collections.deque()
        pos, end = offset, offset + length
        try:
            while pos < end or queue:
                if pos < end and slots:
                    slot = slots.popleft()
                    n = min(piece, end - pos)
                    _read_fully(readinto, slot[:n])
                    cookie = self.h.aio_pwrite(nbd.Buffer.from_buffer(slot[:n]), pos)
                    queue.append((cookie, slot, n, time.monotonic()))
                    pos += n
                    continue
                cookie, slot, n, submitted = queue[0]
                self._wait(cookie, submitted)
                queue.popleft()
                slots.append(slot)
                on_written(n)
        except nbd.Error as e:
            raise errors.BackendError(f"NBD write failed: {e}") from e
        finally:
            self._drain(queue)

    def zero(self, offset, length, punch_hole, buf):
        try:
            flags = 0 if punch_hole else nbd.CMD_FLAG_NO_HOLE
            end = offset + length
            while offset < end:
                n = min(MAX_ZERO, end - offset)
                if self.can_zero:
                    self.h.zero(n, offset, flags)
                else:
                    self._write_zeroes(offset, n, buf)
                offset += n
                yield n
        except nbd.Error as e:
            raise errors.BackendError(f"NBD zero failed: {e}") from e

    def _write_zeroes(self, offset, length, buf):
        view = memoryview(buf)
        view[:] = bytes(len(view))
        end = offset + length
        while offset < end:
            n = min(len(view), end - offset)
            self.h.pwrite(view[:n], offset)
            offset += n

    def flush(self):
        if not self.can_flush:
            return
        try:
            self.h.flush()
        except nbd.Error as e:
            raise errors.BackendError(f"NBD flush failed: {e}") from e

    def block_status(self, offset, length):
        """Yield (length, {context: flags}) runs covering [offset, offset+length) in order."""
        end = offset + length
        try:
            while offset < end:
                replies = {}

                def extent(context, start, entries, err):
                    replies[context] = [(entries[i], entries[i + 1])
                                        for i in range(0, len(entries), 2)]
                    return 0

                if ALLOCATION in self.contexts:
                    self.h.block_status(min(end - offset, MAX_STATUS), offset, extent)
                else:
                    replies = {}
                moved = 0
                for n, flags in _combine(replies, end - offset):
                    yield n, flags
                    moved += n
                if moved == 0:
                    raise errors.BackendError(f"NBD block status made no progress at {offset}")
                offset += moved
        except nbd.Error as e:
            raise errors.BackendError(f"NBD block status failed: {e}") from e

    def _wait(self, cookie, submitted=None):
        while not self.h.aio_command_completed(cookie):
            self.h.poll(-1)
        if submitted is not None and self.metrics is not None:
            self.metrics.nbd_latency(time.monotonic() - submitted)

    def _drain(self, queue):
        """Wait for commands still in flight, so their buffers can be reused or freed."""
        try:
            while queue:
                cookie = queue.popleft()[0]
                try:
                    self._wait(cookie)
                except nbd.Error:
                    pass
        except Exception:
            pass


def _read_fully(readinto, view):
    got = 0
    while got < len(view):
        n = readinto(view[got:])
        if not n:
            raise errors.ClientGone(f"request body ended {len(view) - got} bytes early")
        got += n


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


class Pool:
    """A ticket's NBD connections: reused across requests, at most `limit` open at once."""

    def __init__(self, address, dirty=False, limit=8):
        self.address = address
        self.dirty = dirty
        self.limit = limit
        self._cond = threading.Condition()
        self._idle = []
        self._all = set()
        self._closed = False
        self.metrics = None

    @classmethod
    def for_ticket(cls, fields):
        try:
            address = parse_url(fields["url"])
        except ValueError as e:
            raise errors.BadRequest(f"Invalid ticket: {e}") from None
        return cls(address, dirty=fields["dirty"])

    @contextlib.contextmanager
    def handle(self):
        """A connected Handle for one request; a handle that saw an error is closed, not reused."""
        h = self.acquire()
        try:
            yield h
        except BaseException:
            self.release(h, reuse=False)
            raise
        self.release(h)

    def acquire(self):
        with self._cond:
            while True:
                if self._closed:
                    raise errors.Canceled("Ticket was removed")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) < self.limit:
                    break
                self._cond.wait()
            placeholder = object()
            self._all.add(placeholder)
        try:
            h = Handle(self.address, self.dirty, self.metrics)
        finally:
            with self._cond:
                self._all.discard(placeholder)
                self._cond.notify()
        with self._cond:
            self._all.add(h)
        return h

    def release(self, h, reuse=True):
        """Give a handle back; reuse=False closes it (it saw an error or has commands in flight)."""
        with self._cond:
            if reuse and not self._closed:
                self._idle.append(h)
                h = None
            else:
                self._all.discard(h)
            self._cond.notify()
        if h is not None:
            h.close()

    def flush(self, current):
        """Make all data written through any connection of this ticket durable.

        libnbd handles are thread-safe, so handles busy in other requests are flushed too.
        """
        current.flush()
        if current.can_multi_conn:
            return
        with self._cond:
            others = [h for h in self._all if isinstance(h, Handle) and h is not current]
        for h in others:
            try:
                h.flush()
            except errors.BackendError:
                # A broken handle lost its unflushed writes with its connection; the request
                # that used it failed and reported that.
                log.warning("flush of another connection failed", exc_info=True)

    def close(self):
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            for h in idle:
                self._all.discard(h)
            self._cond.notify_all()
        for h in idle:
            h.close()
