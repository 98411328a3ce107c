"""Moving a file's bytes to and from a plain socket without copying them through Python: sendfile
from the page cache, splice of an O_DIRECT file through pipes, splice from a socket into a file.

An O_DIRECT fd spliced into a pipe is read by the kernel straight into new pages (no page cache),
which the pipe then hands to the socket without a copy (AF_UNIX and TCP take pipe pages on this
kernel). sendfile does the same through one internal pipe, one 64 KiB read at a time, so
splice_out keeps several 1 MiB pipes filling at once. 2 GiB O_DIRECT file to a unix socket pair,
kernel 6.18, 2 shared cores: pread + sendall (2 MiB, 4 in flight) 642-1511 MiB/s at 0.21-1.16
CPU-s/GiB; sendfile 378 MiB/s; splice, 8 pipes of 1 MiB, 812-1350 MiB/s at 0.19-0.27.
"""

import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import os
import resource
import select
import threading

from .. import errors
from .pipeline import ran_here

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
SPLICE_F_MOVE = 1

PIPE_SIZE = 1024**2         # bytes per pipe: the most an unprivileged process may ask for
IN_FLIGHT = 8 * 1024**2     # bytes read ahead into pipes per splice_out


def _wait_writable(sock):
    """For sockets with a timeout (non-blocking fds): wait until sock takes more. A blocking
    socket says EAGAIN only when its SO_SNDTIMEO ran out: the client took nothing that long.
    Either is ClientGone, not an OSError: the file channel takes OSErrors for its file's."""
    timeout = sock.gettimeout()
    if timeout is None:
        raise errors.ClientGone("the client read nothing for the inactivity timeout")
    if not select.select([], [sock], [], timeout)[1]:
        raise errors.ClientGone(f"the client took nothing for {timeout} s")


@contextlib.contextmanager
def _to_client(sock):
    try:
        yield
    except (BrokenPipeError, ConnectionResetError) as e:
        raise errors.ClientGone(f"the client went away: {e}") from e


def sendfile(sock, fd, offset, length):
    """os.sendfile the whole range to sock; a client that went away is errors.ClientGone."""
    out = sock.fileno()
    while length:
        try:
            with _to_client(sock):
                n = os.sendfile(out, fd, offset, length)
        except BlockingIOError:
            _wait_writable(sock)
            continue
        if n == 0:
            raise OSError(errno.ENODATA, "the file ended early")
        offset, length = offset + n, length - n


def send_all(sock, data):
    with _to_client(sock):
        sock.sendall(data)


class FdBudget:
    """The fds of the pipes downloads add to their first one: a quarter of the open file limit,
    shared by the daemon's downloads (Settings.pipe_fds). A stalled download keeps its pipes,
    and a daemon out of fds fails accept() on every socket, the control socket (which removes
    those tickets) too."""

    def __init__(self, limit=None):
        self._lock = threading.Lock()
        self._left = limit

    def take(self, n):
        with self._lock:
            if self._left is None:     # read at first use: after the daemon raised its limit
                self._left = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4
            if self._left < n:
                return False
            self._left -= n
            return True

    def give(self, n):
        with self._lock:
            self._left += n


def _pipe(size):
    """(read end, write end, capacity): a pipe of size bytes where allowed, else the default."""
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
    return r, w, fcntl.fcntl(w, F_GETPIPE_SZ)


def splice_out(fd, sock, offset, length, run, align, check, last=None, fds=None):
    """Send [offset, offset+length) of fd (aligned to align for O_DIRECT) to sock through pipes,
    yielding each piece's size once it is sent; last(n) is called just before the last piece.

    run(fn, *args) starts fn on another thread and returns its Future, so that IN_FLIGHT bytes
    are being read while the oldest piece is sent. check(offset, n) runs before each read: it
    raises if the range is no longer in the file. A piece never exceeds its pipe's capacity, so
    a filling thread never blocks on a full pipe. Pipes past the first are taken from fds (a
    FdBudget), when given.
    """
    fds = fds or FdBudget(float("inf"))
    r, w, cap = _pipe(PIPE_SIZE)
    made = [(r, w)]
    piece = max(align, cap // align * align)
    pipes = collections.deque(made)
    depth = max(2, min(16, IN_FLIGHT // piece))
    if length <= piece:
        run = ran_here  # one piece: a thread would only add a hand-over
    inflight = collections.deque()
    pos, end = offset, offset + length
    try:
        while pos < end or inflight:
            while pos < end and len(inflight) < depth:
                if not pipes and not _grow(made, pipes, piece, fds):
                    depth = len(inflight)
                    break
                p = pipes.popleft()
                n = min(piece, end - pos)
                inflight.append((run(_fill, fd, p[1], pos, n, check), p, n))
                pos += n
            future, p, n = inflight.popleft()
            future.result()
            if last is not None and pos == end and not inflight:
                last(n)
            _drain(p[0], sock, n)
            pipes.append(p)
            yield n
    finally:
        # Fills still running write into these pipes: wait for them before closing.
        concurrent.futures.wait([f for f, _, _ in inflight])
        for r, w in made:
            os.close(r)
            os.close(w)
        fds.give(2 * (len(made) - 1))


def _grow(made, pipes, piece, fds):
    """One more pipe, if it holds a piece: past the user's pipe-user-pages-soft the kernel
    gives small pipes only, and a piece larger than its pipe would never finish filling."""
    if not fds.take(2):
        return False
    try:
        r, w, cap = _pipe(piece)
    except OSError:         # out of file descriptors: go on with the pipes there are
        fds.give(2)
        return False
    made.append((r, w))
    if cap < piece:
        return False
    pipes.append((r, w))
    return True


def _fill(fd, w, offset, n, check):
    check(offset, n)
    while n:
        try:
            k = os.splice(fd, w, n, offset_src=offset)
        except OSError:
            check(offset, n)        # an O_DIRECT read past a new, unaligned end is EINVAL
            raise
        if k == 0:
            check(offset, n)        # the file shrank: says so as a 416 or a 500
            raise OSError(errno.ENODATA, "the file ended early")
        offset, n = offset + k, n - k


def _drain(r, sock, n):
    """Only the socket side of this splice can fail: any error is the client's."""
    out = sock.fileno()
    while n:
        try:
            n -= os.splice(r, out, n, flags=SPLICE_F_MOVE)
        except BlockingIOError:
            _wait_writable(sock)
        except OSError as e:
            raise errors.ClientGone(f"the client went away: {e}") from e


class Pipe:
    """A pipe for splice(2) from a socket into a file, sized to one piece where allowed."""

    def __init__(self, size):
        self.size = size
        self.r = self.w = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fd in (self.r, self.w):
            if fd is not None:
                os.close(fd)

    def splice(self, sock, fd, offset, length):
        """Move length bytes from sock into fd at offset; the socket side ending early is
        errors.ClientGone."""
        if self.r is None:
            self.r, self.w, _ = _pipe(self.size)
        src = sock.fileno()
        while length:
            try:
                n = os.splice(src, self.w, length, flags=SPLICE_F_MOVE)
            except BlockingIOError:
                if not select.select([sock], [], [], sock.gettimeout())[0]:
                    raise errors.ClientGone("the client sent nothing in time") from None
                continue
            if n == 0:
                raise errors.ClientGone(f"request body ended {length} bytes early")
            length -= n
            while n:
                k = os.splice(self.r, fd, n, offset_dst=offset, flags=SPLICE_F_MOVE)
                offset, n = offset + k, n - k
