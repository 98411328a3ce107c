"""Backends: where image bytes live (NBD exports, files). Extent and Caps are their common types."""

from dataclasses import dataclass
from typing import NamedTuple


class Extent(NamedTuple):
    start: int
    length: int
    zero: bool          # reads as zeros
    hole: bool          # unallocated in this layer (False when unknown)
    dirty: bool         # only meaningful for context "dirty"


@dataclass(frozen=True)
class Caps:
    zero: bool          # can write zeroes efficiently (else the backend writes zero buffers itself)
    flush: bool
    extents: frozenset  # contexts it can answer: {"zero"} or {"zero", "dirty"}
    multi_conn: bool    # a flush on one channel covers all
    max_connections: int   # OPTIONS max_readers/max_writers
    zero_copy: bool     # channel has send_to/recv_from
    fast_zero: bool = False     # zeroing costs no writing of buffers (NBD_CMD_FLAG_FAST_ZERO,
                                # fallocate, BLKZEROOUT): a caller may prefer it to skipping
    checksum: bool = False      # channel has checksum(algorithm, block_size) (a proxy's upstream)
    features: frozenset = None  # OPTIONS features it has (None: all)


@dataclass
class Settings:
    """What the daemon's configuration tells every backend it opens."""
    nbd_connections: int = 8
    nbd_request_size: int = 512 * 1024
    nbd_timeout: int = 300
    nbd_connect_timeout: int = 10
    nbd_idle_timeout: int = 5
    file_direct: bool = True
    nbd_tls_certificates: str = None    # CA directory for nbds:// tickets
    backend_timeout: int = 300          # seconds an upstream may stall (0: forever)
    backend_ssl: object = None          # the SSLContext verifying https: upstreams
    closer: object = None       # the daemon's pool.IdleCloser
    metrics: object = None
    run_dir: str = "/run/nbdproxy/images"   # the sockets of image tickets' qemu-nbd
    qemu_nbd: object = None     # the daemon's qemu_nbd.Supervisor
    pipe_fds: object = None     # the daemon's zero_copy.FdBudget (zero-copy downloads' pipes)


def open_backend(url, writable, dirty, settings, image=None, size=None, sparse=False):
    """The backend for a ticket's URL, chosen by its scheme; BadRequest("Invalid ticket: ...")
    when the URL cannot be served. nbd: opens nothing yet; file: opens and checks the file; an
    image (instead of a URL) starts its qemu-nbd (API.md 7d)."""
    if image is not None:
        from . import image as image_backend
        return image_backend.open_image(image, writable, size, sparse, settings)
    if url.startswith("file:"):
        from . import file
        return file.open_file(url, writable, settings.file_direct, settings.nbd_connections,
                              settings.nbd_idle_timeout, settings.closer, settings.pipe_fds)
    if url.startswith(("https:", "http:")):
        from . import http
        return http.open_backend(url, writable, settings)
    from . import nbd
    return nbd.open_backend(url, dirty, settings)
