"""The local image of a transfer: qemu-img for format and creation, a private qemu-nbd to read and
write it, and libnbd handles (one per worker) with pipelined I/O.

qemu-nbd has no --exit-with-parent, so it runs in its own process group (a Ctrl-C on the terminal
reaches only us), gets SIGTERM from the kernel if we die (PR_SET_PDEATHSIG), and is stopped in a
finally by whoever started it.
"""

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from .. import errors
from ..backends import nbd as nbd_backend
from ..backends.pipeline import DEPTH_IN_FLIGHT, PIECE
from .image import ClientError

log = logging.getLogger("nbdproxy.client")

# A worker's buffer: the backend splits it into its pieces in flight.
BUFFER_SIZE = PIECE * DEPTH_IN_FLIGHT

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


def backing_chain(path):
    """The files of path's backing chain, path first."""
    chain = json.loads(_run(["qemu-img", "info", "--backing-chain", "--output=json", path]))
    return [image["filename"] for image in chain]


def create(path, fmt, size, backing_file=None, name=None):
    """Create an empty image; with backing_file, a qcow2 on top of it (its format detected).
    Errors name the image name (default path): the user's name of a temporary file."""
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing_file:
        backing_fmt = image_info(backing_file)["format"]
        argv += ["-b", os.path.abspath(backing_file), "-F", backing_fmt]
    argv += [path, str(size)]
    try:
        _run(argv)
    except ClientError as e:
        raise ClientError(str(e).replace(path, name or path)) from None


class Output:
    """Where a download writes: a new file next to path (same directory, so same file system and
    a relative path means the same there) that commit() renames over path; until then path, a
    file the user may have had before, is untouched, and discard() removes only the new file.

    A path that exists and is not a regular file (a block device) is written in place and never
    removed. A symbolic link stays; the file it points to is replaced.
    """

    def __init__(self, path):
        self.name = path
        if os.path.exists(path) and not os.path.isfile(path):
            self.path = self.target = path
            self.temporary = False
            return
        self.target = os.path.realpath(path)
        directory, base = os.path.split(self.target)
        try:
            mode = os.stat(self.target).st_mode & 0o7777    # as rewriting it in place would
        except FileNotFoundError:
            mode = 0o666 & ~_umask()                        # as creating it would
        except OSError as e:
            raise ClientError(f"{path}: {e.strerror}") from None
        try:
            fd, self.path = tempfile.mkstemp(prefix=f".{base}.nbdproxy-", dir=directory)
        except OSError as e:
            raise ClientError(f"{path}: cannot create a file in {directory}: {e.strerror}") \
                from None
        self.temporary = True
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def commit(self):
        """Make the new file path, durably: its data, then the directory entry."""
        if not self.temporary:
            return
        try:
            _fsync(self.path)
            os.replace(self.path, self.target)
            self.temporary = False
            _fsync(os.path.dirname(self.target), os.O_DIRECTORY)
        except OSError as e:
            raise ClientError(f"{self.name}: cannot replace it with the download: "
                              f"{e.strerror}") from None

    def discard(self):
        if self.temporary:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.temporary = False


def _fsync(path, flags=0):
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask():
    """The process's umask, read without setting it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _direct_io(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


class Server:
    """A private qemu-nbd serving path on a unix socket in a temporary directory."""

    def __init__(self, path, fmt, read_only=False, shared=8, name=None):
        self.ready = False
        self.path = path
        self.name = name or path    # what messages call the image (a temporary file's user name)
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
                    err = _one_line(f.read()).replace(self.path, self.name)
                raise ClientError(f"cannot open {self.name}: "
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
                raise ClientError(f"cannot open {self.name}: qemu-nbd did not start")
            time.sleep(0.01)

    def connect(self):
        return Handle(self.sock, self.name)

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


class Handle(nbd_backend.Handle):
    """A libnbd connection to the local qemu-nbd: the daemon's NBD handle (pipelined reads and
    writes, block status), with errors that name the local image."""

    def __init__(self, sock, name):
        self.name = name
        try:
            super().__init__(nbd_backend.Address(unix=sock))
        except errors.BackendError as e:
            raise ClientError(f"{name}: cannot connect to qemu-nbd: {e}") from None

    @contextlib.contextmanager
    def _named_errors(self):
        """The backend's errors as ClientErrors that name the local image."""
        try:
            yield
        except errors.BackendError as e:
            if getattr(e.__cause__, "errnum", None) == errno.ENOSPC:
                raise ClientError(f"{self.name}: {e}: no space left on device") from None
            raise ClientError(f"{self.name}: {e}") from None

    def zero_extents(self):
        """Yield (start, length, zero) covering the image, neighbours of equal flags merged."""
        with self._named_errors():
            for e in self.extents("zero", 0, self.size):
                yield e.start, e.length, e.zero

    def read(self, buf, offset, length):
        """Yield memoryviews of buf holding [offset, offset+length) in order."""
        with self._named_errors():
            yield from super().read(buf, offset, length)

    def read_into(self, view, offset):
        with self._named_errors():
            return super().read_into(view, offset)

    def write_from(self, readinto, buf, offset, length, on_written=None):
        """Write length bytes at offset, taken with readinto(view)."""
        with self._named_errors():
            self.write(readinto, buf, offset, length, on_written or (lambda n: None), self.size)

    def zero(self, offset, length):
        with self._named_errors():
            for _ in super().zero(offset, length, True, bytearray(PIECE)):
                pass

    def flush(self):
        with self._named_errors():
            super().flush()
