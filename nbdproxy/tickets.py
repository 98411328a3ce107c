"""Tickets: which image a client may read or write, and for how long; the registry that owns them.

The registry is the only global mutable state of the daemon; it and each ticket own their locks.
"""

import bisect
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import re
import threading
import time

from . import errors

log = logging.getLogger("nbdproxy.tickets")

OPS = ("read", "write")

# Upper bounds of a ticket's numbers: larger timeouts overflow the clock's float and socket
# timeouts, and a size past 2**63 is no disk (and beyond 4300 digits int() and str() refuse).
MAX_TIMEOUT = 2**31 - 1
MAX_SIZE = 2**63 - 1

# C0 and C1 controls and DEL (API.md 5): a filename goes into a response header and ids and URLs
# into the log, where CR/LF would start forged lines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")

# glibc's malloc_trim, or None (another libc): after a bulk removal, it gives back to the system
# the heap that tens of thousands of freed tickets leave behind.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)


def clock():
    """The daemon's one clock (monotonic seconds); tests replace it to move time."""
    return time.monotonic()


def _field(data, name, kind, required=True, default=None):
    if name not in data:
        if required:
            raise errors.BadRequest(f"Invalid ticket: missing {name!r}")
        return default
    value = data[name]
    # bool is an int subclass in Python; a ticket's numbers must be real numbers.
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise errors.BadRequest(
            f"Invalid ticket: {name!r} must be {kind.__name__}, not {type(value).__name__}")
    if kind is int and value < 0:
        raise errors.BadRequest(f"Invalid ticket: {name!r} must be >= 0")
    return value


def _bad_text(text):
    """What is wrong with a ticket string, or None: control characters, or lone surrogates
    (JSON's "\ud800" parses, but no header, log line or libnbd call can encode it)."""
    if _CONTROL.search(text):
        return "a control character"
    if _SURROGATE.search(text):
        return "a lone surrogate (not Unicode text)"
    return None


def _check_strings(data):
    """BadRequest naming the first string (key or value, at any depth) that is not plain text."""
    # A loop, not recursion: a body may nest as deeply as the JSON parser allows.
    todo = [("", data)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, str):
            bad = _bad_text(value)
            if bad:
                raise errors.BadRequest(f"Invalid ticket: {where} contains {bad}")
        elif isinstance(value, dict):
            for key, item in value.items():
                bad = _bad_text(key)
                if bad:
                    raise errors.BadRequest(
                        f"Invalid ticket: a key in {where or 'the ticket'} contains {bad}")
                todo.append((f"{where}[{key!r}]" if where else repr(key), item))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", item) for i, item in enumerate(value))


def _image(data):
    """The `image` of an image ticket (API.md 7d), or None."""
    if "image" not in data:
        return None
    if "url" in data:
        raise errors.BadRequest("Invalid ticket: give 'url' or 'image', not both")
    image = _field(data, "image", dict)
    unknown = set(image) - {"path", "format", "bitmap"}
    if unknown:
        raise errors.BadRequest(f"Invalid ticket: unknown key {sorted(unknown)[0]!r} in 'image'")
    fields = {"path": _field(image, "path", str)}
    for name in ("format", "bitmap"):
        if name in image:
            fields[name] = _field(image, name, str)
            if not fields[name]:
                raise errors.BadRequest(f"Invalid ticket: empty {name!r} in 'image'")
    if not fields["path"].startswith("/"):
        raise errors.BadRequest(f"Invalid ticket: image path {fields['path']!r} is not absolute")
    return fields


def validate(data):
    """Return the ticket's fields from a JSON object, or raise BadRequest("Invalid ticket: ...")."""
    if not isinstance(data, dict):
        raise errors.BadRequest("Invalid ticket: not a JSON object")
    _check_strings(data)
    image = _image(data)
    # An image ticket's url is its qemu-nbd's socket, known once that is started.
    url = None if image else _field(data, "url", str)
    fields = {
        "uuid": _field(data, "uuid", str),
        # A file: ticket may leave the size out: it is then the file's (API.md 7a); an image
        # ticket's is the image's virtual size (7d).
        "size": _field(data, "size", int, not (image or url.startswith("file:"))),
        "ops": _field(data, "ops", list),
        "timeout": _field(data, "timeout", int),
        "url": url,
        "inactivity_timeout": _field(data, "inactivity_timeout", int, False, 60),
        "transfer_id": _field(data, "transfer_id", str, False),
        "filename": _field(data, "filename", str, False),
        "sparse": _field(data, "sparse", bool, False, False),
        "dirty": _field(data, "dirty", bool, False, False),
        "image": image,
    }
    if image and "bitmap" in image:
        fields["dirty"] = True
    for name, limit in (("size", MAX_SIZE), ("timeout", MAX_TIMEOUT),
                        ("inactivity_timeout", MAX_TIMEOUT)):
        if fields[name] is not None and fields[name] > limit:
            raise errors.BadRequest(f"Invalid ticket: {name!r} must be <= {limit}")
    if not fields["uuid"]:
        raise errors.BadRequest("Invalid ticket: empty 'uuid'")
    if "/" in fields["uuid"]:
        raise errors.BadRequest("Invalid ticket: 'uuid' may not contain '/'")
    ops = fields["ops"]
    if not ops or any(op not in OPS for op in ops):
        raise errors.BadRequest(f"Invalid ticket: 'ops' must be a non-empty list of {OPS}")
    return fields


class Ranges:
    """A set of byte ranges kept as sorted, disjoint, merged [start, end) intervals.

    add() costs a binary search and one list splice, so a ticket that served tens of thousands
    of scattered requests still records each one quickly.
    """

    def __init__(self):
        self._starts = []
        self._ends = []
        self._size = 0

    def add(self, start, end):
        if start >= end:
            return
        starts, ends = self._starts, self._ends
        # Intervals i..j-1 overlap or touch [start, end); they become one.
        i = bisect.bisect_left(ends, start)
        j = bisect.bisect_right(starts, end)
        if i < j:
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
            self._size -= sum(b - a for a, b in zip(starts[i:j], ends[i:j]))
        starts[i:j] = [start]
        ends[i:j] = [end]
        self._size += end - start

    @property
    def intervals(self):
        return list(zip(self._starts, self._ends))

    def union_size(self, extra=()):
        """Bytes covered by these ranges together with the (start, end) pairs in extra."""
        if not extra:
            return self._size
        union = Ranges()
        union._starts, union._ends, union._size = list(self._starts), list(self._ends), self._size
        for start, end in extra:
            union.add(start, end)
        return union._size


class Operation:
    """One running request on a ticket: its range and progress, for `transferred` and cancel."""

    def __init__(self, ticket, op, offset, length):
        self.ticket = ticket
        self.op = op
        self.offset = offset
        self.length = length
        self.done = 0
        self.started = time.monotonic()

    def progress(self, n):
        """Count n more bytes moved; stop here if the ticket was canceled meanwhile."""
        self.done += n
        if self.ticket.canceled:
            raise errors.Canceled("Transfer was canceled")

    def check(self):
        if self.ticket.canceled:
            raise errors.Canceled("Transfer was canceled")


class Ticket:
    def __init__(self, fields, backend, metrics=None):
        self.__dict__.update(fields)
        self.backend = backend
        self.metrics = metrics
        self._lock = threading.Condition()
        self._running = set()
        self._ranges = Ranges()
        self._connections = set()
        self.canceled = False
        self._expires = clock() + self.timeout
        self._idle_since = clock()

    def may(self, op):
        # write implies read.
        return op in self.ops or (op == "read" and "write" in self.ops)

    def authorize(self, op):
        with self._lock:
            if self.canceled:
                raise errors.Forbidden(f"Ticket {self.uuid} was canceled")
            if not self._running and clock() > self._expires:
                raise errors.Forbidden(f"Ticket {self.uuid} expired")
        if not self.may(op):
            raise errors.Forbidden(f"Ticket {self.uuid} forbids {op}")

    def touch(self):
        """Slide the expiry after a use of the ticket (a finished request or an OPTIONS)."""
        with self._lock:
            self._expires = clock() + self.timeout
            if not self._running:
                self._idle_since = clock()

    def extend(self, timeout):
        with self._lock:
            self._expires = clock() + timeout

    def start(self, op, offset=0, length=0):
        with self._lock:
            if self.canceled:
                raise errors.Canceled(f"Ticket {self.uuid} was canceled")
            operation = Operation(self, op, offset, length)
            self._running.add(operation)
            return operation

    @contextlib.contextmanager
    def running(self, op, offset=0, length=0):
        """start() an operation for the block; finish() it, failed if the block raised."""
        operation = self.start(op, offset, length)
        ok = False
        try:
            yield operation
            ok = True
        finally:
            self.finish(operation, ok)

    def finish(self, operation, ok):
        seconds = time.monotonic() - operation.started
        # A transfer is thousands of reads or writes: their lines are DEBUG (at INFO, logging
        # was a quarter of the daemon's Python time on small requests); failures, zero and
        # flush stay INFO.
        level = logging.DEBUG if ok and operation.op in ("read", "write") else logging.INFO
        log.log(level, "op=%s ticket=%s offset=%d size=%d seconds=%.3f%s", operation.op,
                self.uuid, operation.offset, operation.done, seconds, "" if ok else " failed")
        if self.metrics is not None:
            self.metrics.transferred(operation.op, operation.done)
        with self._lock:
            self._running.discard(operation)
            if ok:
                end = operation.offset + operation.done
                self._ranges.add(operation.offset, end)
            self._lock.notify_all()
        self.touch()

    def add_connection(self, conn):
        with self._lock:
            self._connections.add(conn)

    def remove_connection(self, conn):
        with self._lock:
            self._connections.discard(conn)

    @property
    def active(self):
        return bool(self._running)

    def cancel(self, timeout):
        """Refuse new requests, wait up to timeout seconds for running ones; True when idle."""
        with self._lock:
            self.canceled = True
            deadline = clock() + timeout
            while self._running:
                left = deadline - clock()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.1))
            return True

    def transferred(self):
        with self._lock:
            running = [(o.offset, o.offset + o.done) for o in self._running]
            return self._ranges.union_size(running)

    def info(self):
        with self._lock:
            active = bool(self._running)
            info = {
                "uuid": self.uuid,
                "size": self.size,
                "ops": list(self.ops),
                "timeout": self.timeout,
                "url": self.url,
                "inactivity_timeout": self.inactivity_timeout,
                "sparse": self.sparse,
                "dirty": self.dirty,
                "active": active,
                "canceled": self.canceled,
                "connections": len(self._connections),
                "expires": int(self._expires),
                "idle_time": 0 if active else int(clock() - self._idle_since),
            }
        for key in ("transfer_id", "filename", "image"):
            if getattr(self, key) is not None:
                info[key] = getattr(self, key)
        # Reading and writing the same range would count twice; report only for one-op tickets.
        if len(set(self.ops)) == 1:
            info["transferred"] = self.transferred()
        return info


class Registry:
    """All tickets, by id. open_backend(fields) makes a ticket's (unconnected) NBD backend."""

    def __init__(self, open_backend, remove_timeout=60, metrics=None, max_tickets=10_000):
        self._open_backend = open_backend
        self.metrics = metrics
        self.remove_timeout = remove_timeout
        self.max_tickets = max_tickets
        self._lock = threading.Lock()
        self._tickets = {}

    def add(self, ticket_id, data):
        fields = validate(data)
        if fields["uuid"] != ticket_id:
            raise errors.BadRequest(
                f"Invalid ticket: uuid {fields['uuid']!r} does not match the URL's {ticket_id!r}")
        self._check_room(ticket_id)     # before opening a backend for nothing
        with self._lock:
            old = self._tickets.get(ticket_id)
        if old is not None and old.image is not None:
            # Its qemu-nbd holds the image's lock: stopped before the new one starts (API.md 7d).
            self.remove(ticket_id)
        backend = self._open_backend(fields)
        if fields["size"] is None:
            fields["size"] = backend.size
        if fields["url"] is None:
            fields["url"] = backend.url
        ticket = Ticket(fields, backend, self.metrics)
        try:
            with self._lock:
                self._check_room(ticket_id)
                old = self._tickets.get(ticket_id)
                self._tickets[ticket_id] = ticket
        except errors.ServiceUnavailable:
            ticket.backend.close()
            raise
        if old is not None:
            # Its running requests stop after their current piece; the pool closes idle
            # handles now and busy ones as they are given back.
            old.canceled = True
            old.backend.close()
            # Writes lost through the old ticket stay lost for the client that goes on with
            # the same id: its flushes keep failing until the ticket is removed (API.md 4).
            if old.backend.lost:
                ticket.backend.lose(old.backend.lost)
        log.info("ticket added id=%s ops=%s size=%d url=%s%s",
                 ticket_id, ",".join(fields["ops"]), fields["size"], fields["url"],
                 f" image={fields['image']['path']}" if fields["image"] else "")
        return ticket

    def _check_room(self, ticket_id):
        """ServiceUnavailable when a new ticket would pass max_tickets; replacing one never does."""
        if len(self._tickets) >= self.max_tickets and ticket_id not in self._tickets:
            raise errors.ServiceUnavailable(
                f"Too many tickets: at most {self.max_tickets}; remove some first")

    def get(self, ticket_id):
        with self._lock:
            ticket = self._tickets.get(ticket_id)
        if ticket is None:
            raise errors.NotFound(f"No such ticket {ticket_id}")
        return ticket

    def authorize(self, ticket_id, op):
        with self._lock:
            ticket = self._tickets.get(ticket_id)
        if ticket is None:
            raise errors.Forbidden(f"No such ticket {ticket_id}")
        ticket.authorize(op)
        return ticket

    def list(self):
        with self._lock:
            return list(self._tickets.values())

    def remove(self, ticket_id, timeout=None):
        """Cancel and remove a ticket; Conflict if its requests are still running at the timeout."""
        with self._lock:
            ticket = self._tickets.get(ticket_id)
        if ticket is None:
            return
        if not ticket.cancel(self.remove_timeout if timeout is None else timeout):
            # No new request can use it: its connections (an image ticket's qemu-nbd) go as its
            # last requests end.
            threading.Thread(target=ticket.backend.close, name="close-busy", daemon=True).start()
            raise errors.Conflict(
                f"Ticket {ticket_id} is still in use after {self.remove_timeout} s; it stays canceled")
        with self._lock:
            if self._tickets.get(ticket_id) is ticket:
                del self._tickets[ticket_id]
        ticket.backend.close()
        log.info("ticket removed id=%s", ticket_id)

    def remove_all(self):
        """Cancel every ticket at once, then remove them within one remove_timeout; Conflict
        (after removing all the others) if some are still busy then."""
        tickets = self.list()
        for ticket in tickets:
            ticket.cancel(0)
        deadline = clock() + self.remove_timeout
        busy = []
        for ticket in tickets:
            try:
                self.remove(ticket.uuid, max(0, deadline - clock()))
            except errors.Conflict:
                busy.append(ticket.uuid)
        del tickets
        with self._lock:
            # A dict never shrinks as keys are deleted: a new one drops the table of them all.
            self._tickets = dict(self._tickets)
        _release_memory()
        if busy:
            raise errors.Conflict(f"Tickets {', '.join(busy)} are still in use after "
                                  f"{self.remove_timeout} s; they stay canceled")


def _release_memory():
    """Give the memory of removed tickets back to the system.

    glibc keeps freed heap for reuse: after 100,000 tickets were removed, 190 MB stayed resident.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
