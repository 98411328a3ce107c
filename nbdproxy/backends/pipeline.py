"""Pipelined reads and writes over a connection's buffer: read-ahead and write-behind.

A request larger than one piece is moved by two threads: the connection's thread does the HTTP
side, a worker keeps up to DEPTH_IN_FLIGHT pieces in flight with the backend, so the socket and
the storage work at the same time. Pieces are slots of the connection's buffer, handed between
the threads; nothing is copied. Pieces that are all zeros become zero requests.
"""

import collections
import concurrent.futures
import queue
import threading

from .. import errors

# How the data of one request is split, and how many pieces are in flight at once.
PIECE = 2 * 1024**2
DEPTH_IN_FLIGHT = 4


class Pipeline:
    """Mixin: read(), read_into() and write() for a channel whose I/O is asynchronous.

    The channel provides _submit_read(view, offset) and _submit_write(view, offset, zero,
    punch_hole), each returning a list of (cookie, time submitted); _wait(cookie, submitted);
    _drain(inflight); written(n), told the bytes of a write that succeeded; IO_ERRORS, the
    exceptions of its I/O; and _failure(what, e), the project error for one of them.
    """

    IO_ERRORS = ()

    def _failure(self, what, e):
        if isinstance(e, errors.Error):
            return e
        err = errors.BackendError(f"{what} failed: {e}")
        err.__cause__ = e
        return err

    def _slots(self, buf):
        view = memoryview(buf)
        piece = min(PIECE, len(view) // DEPTH_IN_FLIGHT)
        return [view[i * piece:(i + 1) * piece] for i in range(DEPTH_IN_FLIGHT)], piece

    def read(self, buf, offset, length):
        """Read [offset, offset+length) in pieces; yield a memoryview of buf per piece, in order.

        A yielded view is valid until the next one is asked for.
        """
        slots, piece = self._slots(buf)
        if length <= piece:
            if length:
                yield self.read_into(slots[0][:length], offset)
            return
        ready, free = queue.SimpleQueue(), queue.SimpleQueue()
        for slot in slots:
            free.put(slot)
        worker = threading.Thread(target=self._read_ahead, args=(offset, length, free, ready),
                                  name="read-ahead", daemon=True)
        worker.start()
        try:
            for _ in range(-(-length // piece)):
                item = ready.get()
                if isinstance(item, BaseException):
                    raise self._failure("read", item)
                slot, n = item
                yield slot[:n]
                free.put(slot)
        finally:
            free.put(None)
            worker.join()

    def read_into(self, view, offset):
        """Fill view with the bytes from offset, its commands all in flight at once."""
        try:
            for cookie, submitted in self._submit_read(view, offset):
                self._wait(cookie, submitted)
            return view
        except self.IO_ERRORS as e:
            raise self._failure("read", e) from e

    def _read_ahead(self, offset, length, free, ready):
        """Worker of read(): submit reads into free slots, hand completed ones over in order."""
        inflight = collections.deque()
        pos, end = offset, offset + length
        try:
            while pos < end or inflight:
                while pos < end:
                    try:
                        slot = free.get(block=not inflight)
                    except queue.Empty:
                        break
                    if slot is None:
                        return
                    n = min(len(slot), end - pos)
                    inflight.append((self._submit_read(slot[:n], pos), slot, n))
                    pos += n
                ready.put(self._retire_oldest(inflight))
        except BaseException as e:
            ready.put(e)
        finally:
            self._drain(inflight)

    def write(self, readinto, buf, offset, length, on_written, limit, punch_hole=False,
              check=None):
        """Write what readinto(view) gives at offset: length bytes, or until it returns 0 when
        length is None (a chunked body). Pieces that are all zeros become zero requests.

        on_written(n) is called as each piece is acknowledged by the server, from the worker
        thread, so that `transferred` moves while the body stalls; when it raises (a cancel),
        the write fails with that error. Nothing is written
        past limit: RangeNotSatisfiable(limit) instead. check() runs before each piece is read
        and again before it is sent: once it raises (a cancel), no new piece starts.
        """
        check = check or (lambda: None)
        slots, piece = self._slots(buf)
        if length is not None and offset + length > limit:
            raise errors.RangeNotSatisfiable(f"Writing {length} bytes at {offset} would pass the "
                                             f"end of the image, {limit}", limit)
        if length is not None and length <= piece:
            if length:
                check()
                self._write_one(readinto, slots[0][:length], offset, punch_hole)
                on_written(length)
                self.written(length)
            return
        work, free = queue.SimpleQueue(), queue.SimpleQueue()
        worker = threading.Thread(target=self._write_behind,
                                  args=(work, free, punch_hole, on_written),
                                  name="write-behind", daemon=True)
        worker.start()
        idle = list(slots)
        busy = 0
        acked = 0
        pos = offset
        end = None if length is None else offset + length
        try:
            while True:
                if idle and (end is None or pos < end):
                    check()
                    slot = idle.pop()
                    want = piece if end is None else min(piece, end - pos)
                    n = read_fully(readinto, slot[:want], exact=end is not None)
                    if n == 0:
                        end = pos
                        idle.append(slot)
                        continue
                    if pos + n > limit:
                        raise errors.RangeNotSatisfiable(
                            f"The body passes the end of the image, {limit}", limit)
                    check()     # reading a slow body may have taken long
                    work.put((slot, n, pos, is_zero(slot[:n])))
                    pos += n
                    busy += 1
                    continue
                if not busy:
                    break
                item = free.get()
                if isinstance(item, BaseException):
                    raise self._failure("write", item)
                slot, n = item
                busy -= 1
                idle.append(slot)
                acked += n
            self.written(acked)
        finally:
            work.put(None)
            worker.join()

    def _write_one(self, readinto, view, offset, punch_hole):
        read_fully(readinto, view, exact=True)
        try:
            for cookie, submitted in self._submit_write(view, offset, is_zero(view), punch_hole):
                self._wait(cookie, submitted)
        except self.IO_ERRORS as e:
            raise self._failure("write", e) from e

    def _retire_oldest(self, inflight):
        """Wait for the commands of the oldest piece in flight; (its slot, its length)."""
        for cookie, submitted in inflight[0][0]:
            self._wait(cookie, submitted)
        _, slot, n = inflight.popleft()
        return slot, n


    def _write_behind(self, work, free, punch_hole, on_written):
        """Worker of write(): submit the pieces it is given, report and return each slot once
        written."""
        inflight = collections.deque()
        try:
            while True:
                try:
                    item = work.get(block=not inflight)
                except queue.Empty:
                    item = False
                if item is None:
                    return
                if item:
                    slot, n, pos, zero = item
                    inflight.append((self._submit_write(slot[:n], pos, zero, punch_hole), slot, n))
                    if len(inflight) < DEPTH_IN_FLIGHT:
                        continue
                slot, n = self._retire_oldest(inflight)
                on_written(n)
                free.put((slot, n))
        except BaseException as e:
            free.put(e)
            # Wait for the stop sign so the caller never blocks on a queue nobody serves.
            while work.get() is not None:
                pass
        finally:
            self._drain(inflight)


def ran_here(fn, *args):
    """fn(*args) run on this thread, as a finished Future (its error kept for result(), as a
    pool's would be): for work that gains nothing from another thread."""
    future = concurrent.futures.Future()
    try:
        future.set_result(fn(*args))
    except BaseException as e:
        future.set_exception(e)
    return future


def read_fully(readinto, view, exact):
    """Fill view from readinto; return the bytes read, fewer only at the end of the body.

    With exact, the body must fill the view: ending early means the client went away.
    """
    got = 0
    while got < len(view):
        n = readinto(view[got:])
        if not n:
            if exact:
                raise errors.ClientGone(f"request body ended {len(view) - got} bytes early")
            break
        got += n
    return got


_ZERO_PROBE = bytes(4096)
_ZEROES = bytes(PIECE)


def is_zero(view):
    """True if every byte of view is zero; costs nothing measurable on data, whose first
    kilobytes are almost never all zero, and one copy at memory speed on zeroes."""
    if view[:4096] != _ZERO_PROBE[:len(view)]:
        return False
    n = len(view)
    return view.tobytes() == (_ZEROES if n == PIECE else bytes(n))



