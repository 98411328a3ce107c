"""The local image of a transfer: qemu-img for format and creation, a private qemu-nbd to read and
write it (the daemon's runner, backends/qemu_nbd.py), and libnbd handles (one per worker) with
pipelined I/O.

qemu-nbd runs in its own process group (a Ctrl-C on the terminal reaches only us), gets SIGTERM
from the kernel if we die (PR_SET_PDEATHSIG), and is stopped in a finally by whoever started it.
"""

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile

from .. import errors
from ..backends import nbd as nbd_backend
from ..backends.nbd_url import Address
from ..backends import qemu_nbd
from ..backends.pipeline import DEPTH_IN_FLIGHT, PIECE
from .image import ClientError

log = logging.getLogger("nbdproxy.client")

# A worker's buffer: the backend splits it into its pieces in flight.
BUFFER_SIZE = PIECE * DEPTH_IN_FLIGHT


@contextlib.contextmanager
def _client_errors(prefix=""):
    """qemu's refusals (errors.BadRequest...) as ClientErrors."""
    try:
        yield
    except ClientError:
        raise
    except errors.Error as e:
        raise ClientError(f"{prefix}{e}") from None


def image_info(path):
    """qemu-img info of path: format, virtual-size, backing file..."""
    with _client_errors():
        return qemu_nbd.image_info(path)


def backing_chain(path):
    """The files of path's backing chain, path first."""
    with _client_errors():
        chain = json.loads(qemu_nbd.run(["qemu-img", "info", "--backing-chain",
                                         "--output=json", path]))
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
        with _client_errors():
            qemu_nbd.run(argv)
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




class Server(qemu_nbd.Server):
    """A private qemu-nbd serving path on a unix socket in a temporary directory; zero writes
    become zero clusters or holes, so a downloaded image stays sparse."""

    def __init__(self, path, fmt, read_only=False, shared=8, name=None):
        self.name = name or path    # what messages call the image (a temporary file's user name)
        self.tmpdir = tempfile.mkdtemp(prefix="nbdproxy-")
        try:
            try:
                with _client_errors():
                    super().__init__(path, fmt, os.path.join(self.tmpdir, "nbd.sock"),
                                     read_only=read_only, clients=shared, discard=True,
                                     detect_zeroes=True, timeout=30)
            except ClientError as e:
                raise ClientError(str(e).replace(path, self.name)) from None
        except BaseException:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise

    def connect(self):
        return Handle(self.sock, self.name)

    def stop(self):
        super().stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class Handle(nbd_backend.Handle):
    """A libnbd connection to the local qemu-nbd: the daemon's NBD handle (pipelined reads and
    writes, block status), with errors that name the local image."""

    def __init__(self, sock, name):
        self.name = name
        try:
            super().__init__(Address(unix=sock))
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
