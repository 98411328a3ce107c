"""Download, upload and checksum: sparse-aware, with N workers in parallel.

The main thread walks the extents (the server's for a download, the local image's for an upload)
and queues copy and zero requests; each worker has its own HTTP connection and its own NBD
connection to a private qemu-nbd serving the local image, so qcow2 and raw are handled by qemu
and a downloaded image stays sparse.
"""

import hashlib
import http.client
import logging
import os
import queue
import threading

from .. import blkhash
from ..blkhash import ALGORITHM, BLOCK_SIZE
from . import local
from .image import ClientError, ImageClient
from .progress import Progress

log = logging.getLogger("nbdproxy.client")

COPY, ZERO, SKIP = "copy", "zero", "skip"

# Large extents are split so that the work spreads over the workers and progress moves.
MAX_COPY = 64 * 1024**2
MAX_ZERO = 1024**3

DEFAULT_CONNECTIONS = 4

# A target whose extents report at most this much data is read to see whether it is empty.
PROBE_LIMIT = 1024**2


def _connections(asked, server_max):
    n = DEFAULT_CONNECTIONS if asked is None else asked
    if n < 1:
        raise ClientError("--connections must be at least 1")
    return min(n, server_max)


def _split(op, start, length):
    step = MAX_ZERO if op == ZERO else MAX_COPY
    end = start + length
    while start < end:
        n = min(step, end - start)
        yield op, start, n
        start += n


def _run(n, make_worker, plan, progress):
    """Run the (op, start, length) requests of plan on n workers; raise the first failure."""
    requests = queue.Queue(maxsize=2 * n)
    failed = threading.Event()
    failures = []

    def work(i):
        worker = None
        try:
            worker = make_worker(i)
            while True:
                item = requests.get()
                if item is None or failed.is_set():
                    break
                op, start, length = item
                if op == COPY:
                    worker.copy(start, length)
                else:
                    worker.zero(start, length)
            if not failed.is_set():
                worker.finish()
        except BaseException as e:
            failures.append(e)
            failed.set()
        finally:
            if worker is not None:
                try:
                    worker.close()
                except Exception:
                    log.debug("closing a worker failed", exc_info=True)

    def put(item):
        while not failed.is_set():
            try:
                requests.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    threads = [threading.Thread(target=work, args=(i,), name=f"worker-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    try:
        for op, start, length in plan:
            if failed.is_set():
                break
            if op == SKIP:
                progress.update(length)
                continue
            for item in _split(op, start, length):
                if not put(item):
                    break
        for _ in threads:
            put(None)
        for t in threads:
            t.join()
    except BaseException:
        failed.set()
        _stop(requests, n)
        raise
    if failures:
        raise failures[0]


def _stop(requests, n):
    """Let every worker see the end: drop queued requests, queue one None per worker."""
    try:
        while True:
            requests.get_nowait()
    except queue.Empty:
        pass
    for _ in range(n):
        try:
            requests.put_nowait(None)
        except queue.Full:
            break


class _Worker:
    def __init__(self, client, handle, progress):
        self.client = client
        self.handle = handle
        self.progress = progress
        self.buf = bytearray(local.BUFFER_SIZE)

    def close(self):
        try:
            self.handle.close()
        finally:
            self.client.close()


class _DownloadWorker(_Worker):
    def copy(self, start, length):
        resp = self.client.get(start, length)

        def readinto(view):
            try:
                return resp.readinto(view)
            except (OSError, http.client.HTTPException) as e:
                self.client.close()
                raise self.client._connection_error(e) from None

        try:
            self.handle.write_from(readinto, self.buf, start, length, self.progress.update)
        except BaseException:
            self.client.close()     # the rest of the body is not read: the connection is done
            raise

    def zero(self, start, length):
        self.handle.zero(start, length)
        self.progress.update(length)

    def finish(self):
        self.handle.flush()


class _UploadWorker(_Worker):
    def copy(self, start, length):
        pieces = self.handle.read(self.buf, start, length)
        try:
            self.client.put(start, length, self._counted(pieces))
        finally:
            pieces.close()

    def _counted(self, pieces):
        for piece in pieces:
            yield piece
            self.progress.update(len(piece))

    def zero(self, start, length):
        self.client.zero(start, length)
        self.progress.update(length)

    def finish(self):
        self.client.flush()


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def download(url, filename, fmt=None, incremental=False, backing_file=None, connections=None,
             cafile=None, secure=True, verify=False, progress=None, unix_socket=True):
    """Download the image at url into a new local image filename (raw or qcow2).

    Only data extents are read. With incremental, only the dirty extents are, onto a qcow2 whose
    backing file is backing_file (the previous backup). Returns a dict of what was done.
    """
    if fmt is None:
        fmt = "qcow2" if backing_file or filename.endswith((".qcow2", ".qcow")) else "raw"
    if fmt not in ("raw", "qcow2"):
        raise ClientError(f"unsupported format {fmt!r}: expecting raw or qcow2")
    if incremental and not backing_file:
        raise ClientError("an incremental download needs --backing-file (the previous backup)")
    if backing_file and fmt != "qcow2":
        raise ClientError("a download onto a backing file must be qcow2")
    if backing_file and not os.path.exists(backing_file):
        raise ClientError(f"{backing_file}: no such file")
    progress = progress or Progress(quiet=True)
    client = ImageClient(url, cafile, secure, unix_socket)
    try:
        if incremental and "extents" not in client.features:
            raise ClientError(f"{url}: the server does not report extents; "
                              "an incremental download is not possible")
        size = client.size()
        n = _connections(connections, client.max_readers)
        stats = {"size": size, "copied": 0, "zeroed": 0, "connections": n,
                 "transport": client.transport}

        def plan():
            if incremental:
                for e in client.extents("dirty"):
                    if not e["dirty"]:
                        yield SKIP, e["start"], e["length"]
                    elif e["zero"]:
                        yield ZERO, e["start"], e["length"]
                    else:
                        yield COPY, e["start"], e["length"]
            else:
                for e in client.extents("zero"):
                    if not e["zero"]:
                        yield COPY, e["start"], e["length"]
                    elif backing_file and not e.get("hole"):
                        # Zeros that must hide what the backing file has there.
                        yield ZERO, e["start"], e["length"]
                    else:
                        yield SKIP, e["start"], e["length"]

        local.create(filename, fmt, size, backing_file)
        ok = False
        try:
            with local.Server(filename, fmt, shared=n + 1) as server:
                progress.total = size
                _run(n, lambda i: _DownloadWorker(client.clone(), server.connect(), progress),
                     _counting(plan(), stats), progress)
                if verify:
                    stats["checksum"] = _verify(client, server, filename)
            ok = True
        finally:
            progress.close(ok)
            if not ok:
                _remove(filename)
        return stats
    finally:
        client.close()


def upload(filename, url, connections=None, cafile=None, secure=True, verify=False,
           progress=None, unix_socket=True):
    """Upload the local image filename (any format qemu reads, with its backing chain) to url.

    Data extents go as PUT, zero extents as PATCH zero unless the target is known to be empty;
    every connection flushes at the end. Returns a dict of what was done.
    """
    info = local.image_info(filename)
    fmt, vsize = info["format"], info["virtual-size"]
    progress = progress or Progress(quiet=True)
    client = ImageClient(url, cafile, secure, unix_socket)
    try:
        if client.features and not client.writable:
            raise ClientError(f"{url}: the ticket does not allow writing")
        target = client.size()
        if vsize > target:
            raise ClientError(f"{filename} is larger than the target: {vsize} bytes > {target}")
        if verify and vsize != target:
            raise ClientError(f"cannot verify: {filename} has {vsize} bytes, "
                              f"the target {target}")
        n = _connections(connections, client.max_writers)
        empty = _known_empty(client)
        stats = {"size": vsize, "copied": 0, "zeroed": 0, "connections": n,
                 "transport": client.transport, "target_empty": empty}
        with local.Server(filename, fmt, read_only=True, shared=n + 1) as server:
            h = server.connect()
            try:
                def plan():
                    for start, length, zero in h.extents():
                        if not zero:
                            yield COPY, start, length
                        elif not empty:
                            yield ZERO, start, length
                        else:
                            yield SKIP, start, length

                progress.total = vsize
                ok = False
                try:
                    _run(n, lambda i: _UploadWorker(client.clone(), server.connect(), progress),
                         _counting(plan(), stats), progress)
                    ok = True
                finally:
                    progress.close(ok)
            finally:
                h.close()
            if verify:
                stats["checksum"] = _verify(client, server, filename)
        return stats
    finally:
        client.close()


def _counting(plan, stats):
    for op, start, length in plan:
        if op == COPY:
            stats["copied"] += length
        elif op == ZERO:
            stats["zeroed"] += length
        yield op, start, length


def _known_empty(client):
    """True when the target reads as zeros everywhere: its extents say so, or the little data
    they report (qemu-img create allocates the first 4 KiB of a raw file) reads as zeros."""
    if "extents" not in client.features:
        return False
    data = []
    for e in client.extents("zero"):
        if not e["zero"]:
            data.append(e)
            if sum(d["length"] for d in data) > PROBE_LIMIT:
                return False
    for e in data:
        buf = bytearray(e["length"])
        client.readinto(e["start"], buf)
        if buf != bytes(len(buf)):
            return False
    return True


def _verify(client, server, filename):
    """Compare the local image's block hash with the server's; raise on a mismatch."""
    remote = {}

    def ask():
        try:
            remote["result"] = client.checksum(ALGORITHM, BLOCK_SIZE)
        except BaseException as e:
            remote["error"] = e

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    h = server.connect()
    try:
        mine = compute(h, ALGORITHM, BLOCK_SIZE)
    finally:
        h.close()
    asker.join()
    if "error" in remote:
        raise remote["error"]
    theirs = remote["result"]["checksum"]
    if mine != theirs:
        raise ClientError(f"checksum mismatch: {filename} has {ALGORITHM} {mine}, "
                          f"the server's image has {theirs}")
    return mine


def checksum(filename, algorithm=ALGORITHM, block_size=BLOCK_SIZE):
    """The block hash of the guest data of a local image (API.md 4c), as the server answers it."""
    if algorithm not in hashlib.algorithms_available or algorithm.startswith("shake_"):
        raise ClientError(f"unsupported algorithm {algorithm!r}")
    if block_size < 4096 or block_size % 4096:
        raise ClientError("the block size must be a multiple of 4096")
    info = local.image_info(filename)
    with local.Server(filename, info["format"], read_only=True, shared=1) as server:
        h = server.connect()
        try:
            digest = compute(h, algorithm, block_size)
        finally:
            h.close()
    return {"algorithm": algorithm, "block_size": block_size, "checksum": digest}


def compute(h, algorithm=ALGORITHM, block_size=BLOCK_SIZE):
    """blkhash of the image behind local handle h; whole zero blocks are not read."""
    zero = ((start, length) for start, length, is_zero in h.extents() if is_zero)
    return blkhash.compute(h.size, h.read_into, zero, algorithm, block_size)
