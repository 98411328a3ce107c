"""The local image of a transfer: qemu-img for format and creation, a private qemu-nbd to read and
write it, and libnbd handles (one per worker) with pipelined I/O.

qemu-nbd has no --exit-with-parent, so it runs in its own process group (a Ctrl-C on the terminal
reaches only us), gets SIGTERM from the kernel if we die (PR_SET_PDEATHSIG), and is stopped in a
finally by whoever started it.
"""

import collections
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import nbd

from .image import ClientError

log = logging.getLogger("nbdproxy.client")

# I/O of one request is split into pieces of PIECE bytes with up to DEPTH of them in flight.
PIECE = 2 * 1024**2
DEPTH = 4
BUFFER_SIZE = PIECE * DEPTH

# The largest block status and zero request sent at once (NBD lengths are 32 bits).
MAX_REQUEST = 1024**3

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent):
    """A preexec_fn: SIGTERM when the process that started us exits, even by SIGKILL."""
    def preexec():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except Exception:
            pass
        if os.getppid() != parent:
            os._exit(1)     # the parent died before prctl: nobody would stop us
    return preexec


def _one_line(text):
    """qemu's messages on one line, without the program name: "qemu-img: Could not open..."."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line.split(": ", 1)[1] if line.startswith(("qemu-img: ", "qemu-nbd: ")) else line
             for line in lines]
    return " ".join(lines)


def _run(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise ClientError(f"{argv[0]} is not installed") from None
    if p.returncode != 0:
        raise ClientError(_one_line(p.stderr) or f"{argv[0]} failed with exit status {p.returncode}")
    return p.stdout


def image_info(path):
    """qemu-img info of path: format, virtual-size, backing file..."""
    if not os.path.exists(path):
        raise ClientError(f"{path}: no such file")
    return json.loads(_run(["qemu-img", "info", "--output=json", path]))


def create(path, fmt, size, backing_file=None):
    """Create an empty image; with backing_file, a qcow2 on top of it (its format detected)."""
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing_file:
        backing_fmt = image_info(backing_file)["format"]
        argv += ["-b", os.path.abspath(backing_file), "-F", backing_fmt]
    argv += [path, str(size)]
    _run(argv)


def _direct_io(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


class Server:
    """A private qemu-nbd serving path on a unix socket in a temporary directory."""

    def __init__(self, path, fmt, read_only=False, shared=8):
        self.ready = False
        self.path = path
        self.fmt = fmt
        self.tmpdir = tempfile.mkdtemp(prefix="nbdproxy-")
        self.sock = os.path.join(self.tmpdir, "nbd.sock")
        # O_DIRECT where the file system has it (not tmpfs): no copy through the page cache,
        # measured faster on these machines; qemu-nbd fails to open the image otherwise.
        cache = ["--cache=none", "--aio=native"] if _direct_io(path) else \
            ["--cache=writeback", "--aio=threads"]
        # One more client than asked: the probe of _wait_ready may not be gone yet.
        argv = ["qemu-nbd", "--persistent", f"--shared={shared + 1}", f"--socket={self.sock}",
                f"--format={fmt}", *cache]
        if read_only:
            argv.append("--read-only")
        else:
            # Zero writes become zero clusters or holes: a downloaded image stays sparse.
            argv += ["--discard=unmap", "--detect-zeroes=unmap"]
        argv.append(path)
        log.debug("starting %s", argv)
        # Its messages go to a file: a pipe nobody reads could fill up and stop it.
        self.log = os.path.join(self.tmpdir, "qemu-nbd.log")
        try:
            with open(self.log, "wb") as err:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=err,
                                             start_new_session=True,
                                             preexec_fn=_die_with_parent(os.getpid()))
        except FileNotFoundError:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise ClientError("qemu-nbd is not installed") from None
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout=30):
        """Wait until qemu-nbd accepts connections. The socket file appears at bind(), before
        listen(): a connection then is refused, so try one instead of looking for the file."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                with open(self.log, errors="replace") as f:
                    err = _one_line(f.read())
                raise ClientError(f"cannot open {self.path}: "
                                  + (err or f"qemu-nbd exited {self.proc.returncode}"))
            if os.path.exists(self.sock):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(self.sock)
                        self.ready = True
                        return
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                raise ClientError(f"cannot open {self.path}: qemu-nbd did not start")
            time.sleep(0.01)

    def connect(self):
        return Handle(self.sock, self.path)

    def stop(self):
        proc = self.proc if hasattr(self, "proc") else None
        if proc is not None and proc.poll() is None:
            # qemu-nbd loses a SIGTERM that comes while it starts; then nothing was written yet.
            proc.send_signal(signal.SIGTERM if self.ready else signal.SIGKILL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _aio_leaks_buffer():
    """True when aio_pread/aio_pwrite keep a reference to their buffer object that nothing
    drops (the Python bindings of libnbd 1.14, Debian 12's). Probed on an unconnected handle:
    the call fails after taking the reference."""
    view = memoryview(bytearray(1))
    before = sys.getrefcount(view)
    try:
        nbd.NBD().aio_pread(nbd.Buffer.from_buffer(view), 0)
    except nbd.Error:
        pass
    leaked = sys.getrefcount(view) - before == 1
    if leaked:
        ctypes.pythonapi.Py_DecRef(ctypes.py_object(view))
    return leaked


_AIO_LEAKS_BUFFER = _aio_leaks_buffer()


def _free(h):
    """Free a libnbd handle now: NBD.close() exists since libnbd 1.16; with 1.14 (Debian 12) the
    handle is freed when its last reference goes, which the caller makes sure of."""
    close = getattr(h, "close", None)
    if close is not None:
        close()


class Handle:
    """One libnbd connection to the local qemu-nbd."""

    def __init__(self, sock, name):
        self.name = name
        self.h = nbd.NBD()
        try:
            self.h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            self.h.connect_unix(sock)
            self.size = self.h.get_size()
            self.can_zero = self.h.can_zero()
            self.has_status = self.h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        except nbd.Error as e:
            _free(self.h)
            raise ClientError(f"{name}: cannot connect to qemu-nbd: {e}") from None

    def close(self):
        h, self.h = self.h, None
        if h is None:
            return
        try:
            h.shutdown()
        except nbd.Error:
            pass
        _free(h)

    def _error(self, what, e):
        if e.errnum == errno.ENOSPC:
            return ClientError(f"{self.name}: {what} failed: no space left on device")
        return ClientError(f"{self.name}: {what} failed: {e.string or e}")

    def extents(self):
        """Yield (start, length, zero) covering the image, neighbours of equal flags merged."""
        if not self.has_status:
            if self.size:
                yield 0, self.size, False
            return
        cur_start, cur_len, cur_zero = 0, 0, None
        offset = 0
        while offset < self.size:
            entries = []

            def extent(context, start, ents, err):
                if context == nbd.CONTEXT_BASE_ALLOCATION:
                    entries.extend((ents[i], bool(ents[i + 1] & nbd.STATE_ZERO))
                                   for i in range(0, len(ents), 2))
                return 0

            try:
                self.h.block_status(min(MAX_REQUEST, self.size - offset), offset, extent)
            except nbd.Error as e:
                raise self._error("block status", e) from None
            if not entries:
                raise ClientError(f"{self.name}: block status made no progress at {offset}")
            for length, zero in entries:
                length = min(length, self.size - offset)
                if length <= 0:
                    break
                offset += length
                if zero == cur_zero:
                    cur_len += length
                    continue
                if cur_len:
                    yield cur_start, cur_len, cur_zero
                cur_start, cur_len, cur_zero = cur_start + cur_len, length, zero
        if cur_len:
            yield cur_start, cur_len, cur_zero

    def read(self, buf, offset, length):
        """Yield memoryviews of buf holding [offset, offset+length) in order, DEPTH reads in flight.

        A view is valid until the next one is asked for.
        """
        view = memoryview(buf)
        piece = len(view) // DEPTH
        free = collections.deque(view[i * piece:(i + 1) * piece] for i in range(DEPTH))
        queue = collections.deque()
        pos, end = offset, offset + length
        try:
            while pos < end or queue:
                while pos < end and free:
                    whole = free.popleft()
                    slot = whole[:min(piece, end - pos)]
                    queue.append((self.h.aio_pread(nbd.Buffer.from_buffer(slot), pos), slot,
                                  whole))
                    pos += len(slot)
                # Out of the queue before the wait: a failed command is retired by the wait,
                # and waiting for it again in _drain would never end.
                cookie, slot, whole = queue.popleft()
                self._retire(cookie, slot)
                yield slot
                free.append(whole)
        except nbd.Error as e:
            raise self._error("read", e) from None
        finally:
            self._drain(queue)

    def write_from(self, readinto, buf, offset, length, on_written=None):
        """Write length bytes at offset, taken with readinto(view); DEPTH writes in flight."""
        from .image import read_fully

        view = memoryview(buf)
        piece = len(view) // DEPTH
        free = collections.deque(view[i * piece:(i + 1) * piece] for i in range(DEPTH))
        queue = collections.deque()
        pos, end = offset, offset + length
        try:
            while pos < end or queue:
                if pos < end and free:
                    whole = free.popleft()
                    slot = whole[:min(piece, end - pos)]
                    read_fully(readinto, slot)
                    queue.append((self.h.aio_pwrite(nbd.Buffer.from_buffer(slot), pos), slot,
                                  whole))
                    pos += len(slot)
                    continue
                cookie, slot, whole = queue.popleft()
                n = len(slot)
                self._retire(cookie, slot)
                free.append(whole)
                if on_written:
                    on_written(n)
        except nbd.Error as e:
            raise self._error("write", e) from None
        finally:
            self._drain(queue)

    def zero(self, offset, length):
        end = offset + length
        try:
            while offset < end:
                n = min(MAX_REQUEST, end - offset)
                if self.can_zero:
                    self.h.zero(n, offset)
                else:
                    zeros = bytes(min(n, PIECE))
                    for pos in range(offset, offset + n, len(zeros)):
                        self.h.pwrite(zeros[:min(len(zeros), offset + n - pos)], pos)
                offset += n
        except nbd.Error as e:
            raise self._error("zero", e) from None

    def flush(self):
        try:
            if self.h.can_flush():
                self.h.flush()
        except nbd.Error as e:
            raise self._error("flush", e) from None

    def _wait(self, cookie):
        while not self.h.aio_command_completed(cookie):
            if not self.h.aio_in_flight():
                return      # retired already: its error was reported
            self.h.poll(-1)

    def _retire(self, cookie, view):
        """Wait for an aio command on view; then give back the reference to view that libnbd
        1.14's bindings take and never drop (each command would leak its memoryview, and
        through it the worker's buffer)."""
        try:
            self._wait(cookie)
        finally:
            if _AIO_LEAKS_BUFFER:
                ctypes.pythonapi.Py_DecRef(ctypes.py_object(view))

    def _drain(self, queue):
        while queue:
            cookie, view, _ = queue.popleft()
            try:
                self._retire(cookie, view)
            except nbd.Error:
                pass
