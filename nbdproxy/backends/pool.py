"""A ticket's connections to its storage: reused across requests, bounded, closed when idle,
and never closed with acknowledged writes unflushed without saying so (API.md 4, 7e)."""

import contextlib
import logging
import threading
import time

from .. import errors

log = logging.getLogger("nbdproxy.pool")


class Lending:
    """lend() for a backend with acquire() and release(): a channel for one request; one that
    saw an error is closed, not reused."""

    @contextlib.contextmanager
    def lend(self):
        ch = self.acquire()
        try:
            yield ch
        except BaseException:
            self.release(ch, reuse=False)
            raise
        self.release(ch)


class Pool(Lending):
    """A ticket's connections to one storage server: reused across requests, at most `limit`
    open at once, closed after `idle_timeout` seconds unused (0: when their request ends; None:
    never). `connect()` makes a new one; `name` says which server in the log.

    Nothing acknowledged is lost silently: a connection is flushed before it is closed, and
    when that flush (or any flush) fails, or its server was already gone, every later flush
    fails. A connection has alive(), flush(covers), close(), broken, multi_conn, unflushed and
    take_unflushed().
    """

    def __init__(self, connect, name, limit=8, idle_timeout=None, closer=None):
        self.connect = connect
        self.name = name
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.closer = closer            # the daemon's IdleCloser, which calls reap()
        self._cond = threading.Condition()
        self._idle = []         # (connection, time it became idle), most recently used last
        self._all = set()
        self._closed = False
        self._lost = None       # why acknowledged writes may be lost, once they may be

    def caps(self, h):
        return h.caps(self.limit)

    def acquire(self):
        while True:
            with self._cond:
                h = self._take()
            if h is None:
                break
            if h.alive():
                return h
            # Its server went away since it was used: a new server may be listening.
            self._retire(h, "its server went away")
        return self._connect()

    def _take(self):
        """An idle handle, or None once there is room for a new one (waits at the limit)."""
        while True:
            if self._closed:
                raise errors.Canceled("Ticket was removed")
            if self._idle:
                return self._idle.pop()[0]
            if len(self._all) < self.limit:
                return None
            self._cond.wait()

    def _connect(self):
        placeholder = _Placeholder()
        with self._cond:
            self._all.add(placeholder)
        h = None
        try:
            h = self.connect()
        finally:
            with self._cond:
                self._all.discard(placeholder)
                if h is not None:
                    self._all.add(h)
                self._cond.notify()
        return h

    def release(self, h, reuse=True):
        """Give a handle back; reuse=False closes it (it saw an error or has commands in flight)."""
        with self._cond:
            keep = reuse and not self._closed and self.idle_timeout != 0
            if keep:
                self._idle.append((h, time.monotonic()))
                self._cond.notify()
        if not keep:
            self._retire(h, "its request failed" if not reuse else "it is no longer needed")
        elif self.idle_timeout and self.closer is not None:
            self.closer.watch(self)

    def has_idle(self):
        with self._cond:
            return bool(self._idle)

    def reap(self, now):
        """Close the handles idle for idle_timeout; when the next one is due, or None."""
        with self._cond:
            expired = [h for h, since in self._idle if since + self.idle_timeout <= now]
            self._idle = [(h, since) for h, since in self._idle if h not in expired]
            due = min((since + self.idle_timeout for _, since in self._idle), default=None)
        for h in expired:
            # Its own thread: the flush before the close may wait up to nbd_timeout on a server
            # that does not answer, and the closer serves every ticket of the daemon.
            threading.Thread(target=self._retire, args=(h, f"idle for {self.idle_timeout} s"),
                             name="idle-close", daemon=True).start()
        return due

    def _retire(self, h, why):
        """Close a connection for good, flushing it first when it holds acknowledged writes."""
        if h.unflushed and not h.broken:
            try:
                h.flush()
            except errors.BackendError as e:
                log.warning("flush before closing a connection to %s failed: %s", self.name, e)
        if h.unflushed:
            self._lose(h, f"its connection was closed unflushed: {why}")
        h.close()
        with self._cond:
            self._all.discard(h)
            self._cond.notify()

    @property
    def lost(self):
        """Why acknowledged writes may be lost, or None: then every flush fails."""
        return self._lost

    def lose(self, why):
        """Take over the loss of a ticket this one replaces: its writes may be lost too."""
        with self._cond:
            self._lost = self._lost or why

    def _lose(self, h, why):
        n = h.take_unflushed()
        with self._cond:
            first = self._lost is None
            self._lost = self._lost or f"writes to {self.name} may be lost: {why}"
        log.error("%s: %d acknowledged bytes may be lost (%s)%s", self.name, n, why,
                  "; every later flush of this ticket fails" if first else "")

    def flush(self, current):
        """Make all data written through any connection of this ticket durable.

        Connections busy in other requests are flushed too (they must be thread-safe).
        """
        with self._cond:
            others = [h for h in self._all if h is not current and not _placeholder(h)]
        targets = [current] if current.multi_conn else [current, *others]
        for h in targets:
            try:
                h.flush(covers=others if h.multi_conn else ())
            except errors.BackendError as e:
                self._lose(h, str(e))
        if self._lost is not None:
            raise errors.BackendError(self._lost)

    def close(self):
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for h, _ in idle:
            self._retire(h, "the ticket was removed")


class _Placeholder:
    """Holds a place in the limit while a connection is being made."""


def _placeholder(h):
    return isinstance(h, _Placeholder)


class IdleCloser:
    """One thread for the daemon that closes pooled connections idle past their pool's
    idle_timeout (API.md 7e), so idle keep-alive clients do not hold an NBD server's slots."""

    def __init__(self):
        self._cond = threading.Condition()
        self._pools = set()
        self._changed = False
        threading.Thread(target=self._run, name="idle-closer", daemon=True).start()

    def watch(self, pool):
        """pool has idle connections now: reap it when they are due."""
        with self._cond:
            self._pools.add(pool)
            self._changed = True
            self._cond.notify()

    def _run(self):
        while True:
            with self._cond:
                pools, self._changed = list(self._pools), False
            now = time.monotonic()
            next_due = None
            for pool in pools:
                due = pool.reap(now)
                if due is None:
                    with self._cond:
                        # Unless a handle went idle since reap() looked (watch() came first).
                        if not pool.has_idle():
                            self._pools.discard(pool)
                else:
                    next_due = due if next_due is None else min(next_due, due)
            with self._cond:
                if not self._changed:
                    self._cond.wait(None if next_due is None
                                    else max(0.0, next_due - time.monotonic()))
