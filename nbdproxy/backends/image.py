"""Image tickets (API.md 7d): the daemon's own qemu-nbd serves the image for exactly the ticket's
life, on a private unix socket under run_dir, through the NBD backend's pool."""

import dataclasses
import logging
import os
import stat
import threading
import uuid

from .. import errors
from . import nbd, qemu_nbd
from .pool import Lending

log = logging.getLogger("nbdproxy.image")

# Formats an image ticket may name: disk image formats only. Other qemu drivers read what is not
# an image file (vvfat serves a directory, others take options or secrets). Without a format,
# only the first two are opened on a probe (a guest writes what header it likes into a raw disk).
PROBED_FORMATS = ("raw", "qcow2")
FORMATS = ("raw", "qcow2", "qed", "qcow", "vmdk", "vdi", "vhdx", "vpc", "parallels", "bochs",
           "cloop", "dmg")

# NBD commands of an image ticket are at least this large. make bench (2026-12-01, medians of 3,
# 2 GiB, 1 connection, unix socket; qemu-nbd with MALLOC_MMAP_THRESHOLD_ and
# MALLOC_TRIM_THRESHOLD_ as image tickets start it): 2 MiB was best in all four rows, 1.10-1.26x
# 512 KiB (download and upload, cache=none and writeback) and 11 of 12 run-by-run comparisons;
# with MALLOC_MMAP_THRESHOLD_ alone the two tied. nbd: tickets keep nbd_request_size (512 KiB):
# their qemu-nbd's environment is not ours, and without those settings 512 KiB measured better.
IMAGE_REQUEST_SIZE = 2 * 1024**2

# DELETE has let the ticket's requests end; channels lent outside a request (OPTIONS, HEAD) are
# given back at once. Waited for this long before qemu-nbd is stopped under them.
IDLE_WAIT = 5


def open_image(image, writable, size, sparse, settings):
    """An ImageBackend serving image ({"path", "format"?, "bitmap"?}) once its qemu-nbd greets.

    BadRequest ("Invalid ticket: ...") when it cannot be served, Conflict when another process
    holds its lock, ServiceUnavailable when qemu-nbd does not start in nbd_connect_timeout;
    nothing is left running then.
    """
    path, fmt, bitmap = image["path"], image.get("format"), image.get("bitmap")
    try:
        fmt = _check(path, fmt, settings.nbd_connect_timeout or None)
    except errors.BadRequest as e:
        raise errors.BadRequest(f"Invalid ticket: {e}") from None
    sock = os.path.join(run_dir(settings.run_dir), f"{uuid.uuid4().hex[:16]}.sock")
    backend = ImageBackend(path, sock, bool(bitmap), settings)
    try:
        backend.server = qemu_nbd.Server(
            path, fmt, sock, read_only=not writable, clients=settings.nbd_connections,
            bitmap=bitmap, discard=sparse, timeout=settings.nbd_connect_timeout or None,
            supervisor=settings.qemu_nbd, on_exit=backend.exited)
    except errors.BadRequest as e:
        raise errors.BadRequest(f"Invalid ticket: {e}") from None
    try:
        with backend.lend() as ch:
            backend.size = ch.size
        if size is not None and size > backend.size:
            raise errors.BadRequest(f"Invalid ticket: size {size} is larger than the virtual "
                                    f"size of {path} ({backend.size})")
    except BaseException:
        backend.close()
        raise
    return backend


def _check(path, fmt, timeout):
    """The format to open path with; BadRequest when the ticket cannot be served. A probe that
    does not finish in timeout (storage that stopped answering) is ServiceUnavailable."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise errors.BadRequest(f"cannot open {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise errors.BadRequest(f"{path} is not a regular file or a block device")
    if fmt is not None:
        if fmt not in FORMATS:
            raise errors.BadRequest(f"unsupported format {fmt!r}: expecting one of "
                                    f"{', '.join(FORMATS)}")
        return fmt
    # Probed: -U, since qemu-nbd's own open decides about locks (409), not this look.
    info = qemu_nbd.image_info(path, force_share=True, timeout=timeout)
    probed = info.get("format")
    # A guest can write any image header into a raw disk: one naming a host file (a qcow2
    # backing or external data file, a vmdk extent, ...) would serve that file. Only raw and
    # a self-contained qcow2 are opened on a probe; any other format must be given.
    if info.get("backing-filename"):
        raise errors.BadRequest(f"{path} names a backing file ({info['backing-filename']}) and "
                                "no format was given: give 'format' to open backing chains")
    data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
    if data_file:
        raise errors.BadRequest(f"{path} names an external data file ({data_file}) and no "
                                "format was given: give 'format' to open it")
    if probed not in PROBED_FORMATS:
        raise errors.BadRequest(f"{path} looks like {probed!r}: only "
                                f"{' and '.join(PROBED_FORMATS)} are probed, give 'format'")
    return probed


def run_dir(path):
    """run_dir, created 0700 if missing (its parent, the control socket's, keeps its mode). One
    that others may write is refused: they could put their own server on a ticket's socket."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise errors.BackendError(f"cannot create run_dir {path}: {e.strerror}") from None
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise errors.BackendError(f"run_dir {path} may be written by others (mode "
                                  f"{stat.S_IMODE(st.st_mode):o}, owner {st.st_uid}): "
                                  "it must be the daemon's own, 0700")
    return path


class ImageBackend(Lending):
    """The Backend of an image ticket: the NBD backend's pool on the socket of a qemu-nbd of its
    own, which close() stops once no channel is busy."""

    def __init__(self, path, sock, dirty, settings):
        self.path = path
        self.url = f"nbd:unix:{sock}"
        self.size = None
        self.server = None
        # Its qemu-nbd runs with our malloc settings, under which larger commands measured best.
        request_size = max(settings.nbd_request_size, IMAGE_REQUEST_SIZE)
        self.pool = nbd.open_backend(self.url, dirty,
                                     dataclasses.replace(settings, nbd_request_size=request_size))
        self._cond = threading.Condition()
        self._busy = 0
        self._closing = False

    # The Backend interface: the pool's, counting busy channels.

    def acquire(self):
        self._check_running()
        with self._cond:
            if self._closing:
                raise errors.Canceled("Ticket was removed")
            self._busy += 1
        try:
            return self.pool.acquire()
        except BaseException:
            self._given_back()
            raise

    def release(self, ch, reuse=True):
        try:
            self.pool.release(ch, reuse)
        finally:
            self._given_back()

    def caps(self, ch):
        return self.pool.caps(ch)

    def flush(self, ch):
        self.pool.flush(ch)

    @property
    def lost(self):
        return self.pool.lost

    def lose(self, why):
        self.pool.lose(why)

    def close(self):
        """No more channels; qemu-nbd stops (SIGTERM, SIGKILL after 10 s) once none is busy:
        now, or when the last one is given back."""
        with self._cond:
            self._closing = True
        self.pool.close()
        with self._cond:
            self._cond.wait_for(lambda: not self._busy, IDLE_WAIT)
            if self._busy:
                return      # the last release stops it
        self._stop()

    # qemu-nbd

    def _given_back(self):
        with self._cond:
            self._busy -= 1
            last = self._closing and not self._busy
            self._cond.notify_all()
        if last:
            # After a 409 or a long IDLE_WAIT: nobody waits for this stop.
            threading.Thread(target=self._stop, name="qemu-nbd-stop", daemon=True).start()

    def _stop(self):
        # Server.stop() runs once; a second caller waits until it is done.
        if self.server is not None and not self.server.stopping:
            log.info("stopping qemu-nbd for %s", self.path)
        if self.server is not None:
            self.server.stop()

    def _check_running(self):
        server = self.server
        if server is not None and server.returncode is not None and not server.stopping:
            raise errors.BackendError(f"qemu-nbd serving {self.path} has exited "
                                      f"({qemu_nbd.describe_status(server.returncode)})")

    def exited(self, server, status):
        """From the supervisor: qemu-nbd exited. Unless it was stopped, requests now fail (500);
        it is not restarted behind the ticket's back."""
        if not server.stopping and server.ready:
            why = server.message()
            log.error("qemu-nbd serving %s exited on its own (%s)%s; its ticket's requests fail",
                      self.path, qemu_nbd.describe_status(status), f": {why}" if why else "")
