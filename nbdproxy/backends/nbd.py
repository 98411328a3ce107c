"""The NBD backend: a Pool of libnbd Handles per ticket; a Handle connects (with a deadline),
reads and writes pipelined, zeroes, flushes and answers block status (nbd_status.py).

Nothing here knows HTTP; failures of the NBD server become errors.BackendError.
"""

import collections
import ctypes
import logging
import os
import select
import sys
import threading
import time

import nbd

from .. import errors
from . import Caps
from .nbd_status import ALLOCATION, DEPTH, BlockStatus
from .nbd_url import parse_url
from .pipeline import Pipeline
from .pool import Pool

log = logging.getLogger("nbdproxy.nbd")

BITMAP_PREFIX = "qemu:dirty-bitmap:"

# WRITE_ZEROES pieces (API.md 4).
MAX_ZERO = 128 * 1024**2
# How long one libnbd poll waits before the waiter looks at the deadline and what is in flight.
POLL_MS = 1000
# Zeroing 1 TiB with qemu-nbd in 128 MiB commands: 0.49 s one at a time, 0.18 s with 8 in flight.
ZERO_DEPTH = 8

# Each piece goes to NBD as commands of at most this size (the nbd_request_size setting).
# make bench, 2 GiB from qemu-nbd 7.2 (cache=none) over the unix socket, 1 connection, medians
# of 3: 2 MiB commands 926-946 MiB/s (0.73-0.79x nbdcopy), 1 MiB 1017, 512 KiB 1052-1237
# (0.85-0.98x), 256 KiB 1075-1107; 8 pieces in flight instead of 4 was no better.
REQUEST_SIZE = 512 * 1024


class Handle(Pipeline, BlockStatus):
    """One libnbd connection to the export, with the contexts this ticket needs."""

    IO_ERRORS = (nbd.Error,)

    def __init__(self, address, dirty=False, metrics=None, request_size=REQUEST_SIZE,
                 timeout=None, connect_timeout=None):
        self.address = address
        self.metrics = metrics
        self.request_size = request_size
        self.timeout = timeout
        self.broken = False
        self.dirty_context = None
        # Bytes the server acknowledged since the last flush of this connection: what closing
        # it without a flush could lose.
        self.unflushed = 0
        self._count_lock = threading.Lock()
        self._parts = {}    # cookie -> the memoryview an aio command reads into or writes from
        h = nbd.NBD()
        try:
            # A failed read's buffer is never sent (the request fails or its connection closes),
            # so libnbd's zeroing of every read buffer would be a memset per byte for nothing.
            h.set_pread_initialize(False)
            h.set_opt_mode(True)
            # The handshake is polled against a deadline: a peer that accepts and never greets
            # (or is no NBD server at all) must not hold the request for ever.
            deadline = connect_timeout and time.monotonic() + connect_timeout
            address.aio_connect(h)
            self._settle(h, deadline)
            if dirty:
                self.dirty_context = self._find_bitmap(h, deadline)
            h.clear_meta_contexts()
            for context in (ALLOCATION, DEPTH, self.dirty_context):
                if context:
                    h.add_meta_context(context)
            self._go(h, deadline)
            self.size = h.get_size()
            self.can_zero = h.can_zero()
            self.can_flush = h.can_flush()
            self.multi_conn = h.can_multi_conn()
            self.can_fast_zero = h.can_fast_zero()
            self.readonly = h.is_read_only()
            self.contexts = {c for c in (ALLOCATION, DEPTH, self.dirty_context)
                             if c and h.can_meta_context(c)}
        except nbd.Error as e:
            _close(h)
            raise errors.BackendError(f"cannot open NBD export {address}: {e}") from e
        except BaseException:
            _close(h)
            raise
        self.h = h
        # Idle handles are checked with one poll(2) on this fd (see alive()).
        self._idle_poller = select.poll()
        self._idle_poller.register(h.aio_get_fd(), select.POLLIN | select.POLLPRI)

    def _settle(self, h, deadline):
        """Poll until the handshake step in progress is done; 503 once the deadline passed."""
        while h.aio_is_connecting():
            timeout = -1
            if deadline:
                timeout = int((deadline - time.monotonic()) * 1000)
                if timeout <= 0:
                    log.warning("NBD server %s did not complete the handshake in time",
                                self.address)
                    raise errors.ServiceUnavailable("NBD server not answering")
            h.poll(timeout)
        if not (h.aio_is_negotiating() or h.aio_is_ready()):
            raise errors.BackendError(
                f"cannot open NBD export {self.address}: the server closed the connection")

    def _go(self, h, deadline):
        failed = []
        h.aio_opt_go(completion=lambda err: failed.append(err.value) or 0)
        self._settle(h, deadline)
        if not h.aio_is_ready():
            errno = failed[0] if failed else 0
            why = os.strerror(errno) if errno else "refused"
            raise errors.BackendError(f"cannot open NBD export {self.address}: {why}")

    def _find_bitmap(self, h, deadline):
        names = []
        try:
            h.add_meta_context(BITMAP_PREFIX)
            h.aio_opt_list_meta_context(lambda name: names.append(name) or 0)
            self._settle(h, deadline)
        except nbd.Error as e:
            log.warning("cannot list dirty bitmaps: %s", e)
        names = [n for n in names if n.startswith(BITMAP_PREFIX) and n != BITMAP_PREFIX]
        return names[0] if names else None

    def caps(self, max_connections):
        contexts = {"zero"} | ({"dirty"} if self.dirty_context in self.contexts else set())
        return Caps(zero=self.can_zero, flush=self.can_flush, extents=frozenset(contexts),
                    multi_conn=self.multi_conn, max_connections=max_connections,
                    zero_copy=False, fast_zero=self.can_fast_zero)

    def take_unflushed(self):
        """The unflushed count, now forgotten (its bytes are lost or reported)."""
        with self._count_lock:
            n, self.unflushed = self.unflushed, 0
            return n

    def written(self, n):
        """Count n bytes of a request that succeeded: the client was told they were written,
        so they must not be lost (the bytes of a failed request were never acknowledged)."""
        with self._count_lock:
            self.unflushed += n

    def close(self):
        # shutdown() waits for the server to close: not for one that stopped answering.
        if not self.broken:
            try:
                self.h.shutdown()
            except nbd.Error:
                pass
        _close(self.h)
        # Commands never retired (the server died under them): let their buffers go.
        for part in list(self._parts.values()):
            part.release()
        self._parts.clear()

    def alive(self):
        """False when the server has gone (killed, restarted): nothing is due on an idle NBD
        connection, so a readable socket means end of file or an error."""
        # A handle that saw an error is closed, never given back idle, so its fd is still its own.
        try:
            return not self._idle_poller.poll(0)
        except (OSError, ValueError):
            return False

    def _submit_read(self, view, offset):
        """Queue reads of view's bytes from offset; [(cookie, time submitted)]."""
        return self._submit_parts(self.h.aio_pread, view, offset)

    def _submit_write(self, view, offset, zero, punch_hole):
        """Queue a write of view at offset, or one WRITE_ZEROES if it is all zero."""
        if zero and self.can_zero:
            flags = 0 if punch_hole else nbd.CMD_FLAG_NO_HOLE
            return [(self.h.aio_zero(len(view), offset, flags=flags), time.monotonic())]
        return self._submit_parts(self.h.aio_pwrite, view, offset)

    def _submit_parts(self, submit, view, offset):
        """submit (aio_pread or aio_pwrite) view in commands of request_size."""
        step = self.request_size
        return [(self._aio(submit, view[i:i + step], offset + i), time.monotonic())
                for i in range(0, len(view), step)]

    def zero(self, offset, length, punch_hole, buf):
        """Zero [offset, offset+length) with WRITE_ZEROES of at most MAX_ZERO, ZERO_DEPTH of them
        in flight; yield the size of each as it completes."""
        if not self.can_zero:
            try:
                yield from self._write_zeroes(offset, length, buf)
            except nbd.Error as e:
                raise errors.BackendError(f"NBD zero failed: {e}") from e
            return
        flags = 0 if punch_hole else nbd.CMD_FLAG_NO_HOLE
        inflight = collections.deque()
        pos, end = offset, offset + length
        acked = 0
        try:
            while pos < end or inflight:
                while pos < end and len(inflight) < ZERO_DEPTH:
                    n = min(MAX_ZERO, end - pos)
                    cookie = self.h.aio_zero(n, pos, flags=flags)
                    inflight.append(([(cookie, time.monotonic())], None, n))
                    pos += n
                for cookie, submitted in inflight[0][0]:
                    self._wait(cookie, submitted)
                n = inflight.popleft()[2]
                acked += n
                yield n
            self.written(acked)
        except nbd.Error as e:
            raise errors.BackendError(f"NBD zero failed: {e}") from e
        finally:
            self._drain(inflight)

    def _write_zeroes(self, offset, length, buf):
        """For servers without WRITE_ZEROES: write zeros from buf, yielding each piece's size."""
        view = memoryview(buf)
        view[:] = bytes(len(view))
        end = offset + length
        acked = 0
        while offset < end:
            n = min(len(view), end - offset)
            self.h.pwrite(view[:n], offset)
            offset += n
            acked += n
            yield n
        self.written(acked)

    def flush(self, covers=()):
        """Flush this connection; with multi-conn, what the handles in covers wrote too."""
        pending = [(h, h.unflushed) for h in (self, *covers)]
        if self.can_flush:
            try:
                self._wait(self.h.aio_flush())
            except nbd.Error as e:
                raise errors.BackendError(f"NBD flush failed: {e}") from e
        for h, n in pending:
            with h._count_lock:
                h.unflushed -= n

    def _failure(self, what, e):
        return super()._failure(f"NBD {what}", e)

    def _aio(self, submit, part, offset):
        """Submit aio_pread or aio_pwrite on part, a memoryview that _wait() gives back."""
        try:
            cookie = submit(nbd.Buffer.from_buffer(part), offset)
        except BaseException:
            part.release()
            raise
        self._parts[cookie] = part
        return cookie

    def _give_back(self, cookie):
        """The command is retired: drop its memoryview, and the reference libnbd leaked on it."""
        part = self._parts.pop(cookie, None)
        if part is not None:
            part.release()
            # Held here, by getrefcount's argument, and by the leak; anything more (or less) and
            # this is not the leak we know: keep the reference rather than free a live object.
            if _AIO_LEAKS_BUFFER and sys.getrefcount(part) == 3:
                ctypes.pythonapi.Py_DecRef(ctypes.py_object(part))

    def _wait(self, cookie, submitted=None):
        deadline = None
        while True:
            try:
                done = self.h.aio_command_completed(cookie)
            except nbd.Error:
                self._give_back(cookie)     # retired, with an error
                raise
            if done:
                break
            # Every libnbd call releases and takes the GIL again: one poll per turn, with a
            # timeout, and the other checks only when it ran out.
            if self.h.poll(POLL_MS):
                continue
            if not self.h.aio_in_flight():
                # Retired already (a failed command whose error was raised, waited again by
                # _drain): libnbd answers False for it forever.
                return
            if self.timeout is None:
                continue
            if deadline is None:
                deadline = time.monotonic() + self.timeout
            left = deadline - time.monotonic()
            if left <= 0:
                # A server that stopped answering: this handle is given up, never polled again,
                # so libnbd will not touch the buffers of its commands.
                self.broken = True
                raise errors.BackendError(f"NBD server did not answer in {self.timeout} s")
        self._give_back(cookie)
        if submitted is not None and self.metrics is not None:
            self.metrics.nbd_latency(time.monotonic() - submitted)

    def _drain(self, inflight):
        """Wait for commands still in flight, so their buffers can be reused or freed."""
        while inflight and not self.broken:
            if not self.h.aio_in_flight():
                return
            for cookie, _ in inflight.popleft()[0]:
                try:
                    self._wait(cookie)
                except nbd.Error:
                    pass
                except Exception:
                    # The handle is unusable; the caller discards it.
                    return


def _aio_leaks_buffer():
    """True when this libnbd's aio_pread and aio_pwrite keep a reference to the buffer object
    they are given and never drop it (the Python bindings of libnbd 1.14, Debian 12's). Each
    command would then leak its memoryview, and through it the whole connection buffer: 8 MiB
    per data connection, never freed. Probed once on a handle that is not connected: the call
    fails after taking the reference."""
    view = memoryview(bytearray(1))
    before = sys.getrefcount(view)
    try:
        nbd.NBD().aio_pread(nbd.Buffer.from_buffer(view), 0)
    except nbd.Error:
        pass
    leaked = sys.getrefcount(view) - before
    if leaked == 1:
        view.release()
        ctypes.pythonapi.Py_DecRef(ctypes.py_object(view))
    return leaked == 1


_AIO_LEAKS_BUFFER = _aio_leaks_buffer()


def _close(h):
    """Free a libnbd handle now; NBD.close() exists only since libnbd 1.16 (Debian 12 has 1.14,
    whose handles are freed when collected)."""
    close = getattr(h, "close", None)
    if close is not None:
        close()


def open_backend(url, dirty, settings):
    """The backend of an nbd: ticket: a Pool of Handles to the export (no I/O here)."""
    try:
        address = parse_url(url, settings.nbd_tls_certificates)
    except ValueError as e:
        raise errors.BadRequest(f"Invalid ticket: {e}") from None

    def connect():
        return Handle(address, dirty, settings.metrics, settings.nbd_request_size,
                      settings.nbd_timeout or None, settings.nbd_connect_timeout or None)

    return Pool(connect, f"NBD server {address}", settings.nbd_connections,
                settings.nbd_idle_timeout, settings.closer)
