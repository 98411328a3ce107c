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

# checksum's block sizes, as the server's /checksum takes them (API.md 4c).
MIN_BLOCK_SIZE = 1024**2
MAX_BLOCK_SIZE = 16 * 1024**2

# qemu rounds image sizes up to this (qemu-img info, qemu-nbd, qcow2).
SECTOR = 512


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
        left = [length]

        def readinto(view):
            try:
                n = resp.readinto(view)
            except (OSError, http.client.HTTPException) as e:
                self.client.close()
                raise self.client._connection_error(e) from None
            if not n and len(view):
                # Said here: the backend would call it a request body of ours that ended.
                raise ClientError(f"{self.client.where}: the server's response to GET "
                                  f"{start}-{start + length - 1} ended {left[0]} bytes early "
                                  "(the server closed the connection)")
            left[0] -= n
            return n

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


def download(url, filename, fmt=None, incremental=False, backing_file=None, connections=None,
             cafile=None, secure=True, verify=False, progress=None, unix_socket=True):
    """Download the image at url into a local image filename (raw or qcow2), which replaces a
    file of that name only when the download succeeded.

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
    if backing_file and os.path.exists(filename):
        for name in local.backing_chain(backing_file):
            if os.path.exists(name) and os.path.samefile(name, filename):
                raise ClientError(f"{filename} is in the backing chain of the download: "
                                  "download into another file")
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

        # A new file until the end: a failure must not cost the user a file of that name.
        out = local.Output(filename)
        ok = False
        try:
            local.create(out.path, fmt, size, backing_file, name=filename)
            with local.Server(out.path, fmt, shared=n + 1, name=filename) as server:
                progress.total = size
                _run(n, lambda i: _DownloadWorker(client.clone(), server.connect(), progress),
                     _counting(plan(), stats), progress)
                if verify:
                    stats["checksum"] = _verify(client, server, filename, size)
            if fmt == "raw" and out.temporary:
                # qemu rounds a raw image up to 512 bytes; the copy has the remote size.
                os.truncate(out.path, size)
            out.commit()
            ok = True
        finally:
            progress.close(ok)
            if not ok:
                out.discard()
        return stats
    finally:
        client.close()


def upload(filename, url, connections=None, cafile=None, secure=True, verify=False,
           progress=None, unix_socket=True):
    """Upload the local image filename (any format qemu reads, with its backing chain) to url.

    Data extents go as PUT; zero extents as PATCH zero, except where the target's extents say
    it reads as zeros already. Every connection flushes at the end. Returns a dict of what was
    done.
    """
    info = local.image_info(filename)
    fmt, vsize = info["format"], info["virtual-size"]
    progress = progress or Progress(quiet=True)
    client = ImageClient(url, cafile, secure, unix_socket)
    try:
        if client.features and not client.writable:
            raise ClientError(f"{url}: the ticket does not allow writing")
        target = client.size()
        n = _connections(connections, client.max_writers)
        with local.Server(filename, fmt, read_only=True, shared=n + 1) as server:
            h = server.connect()
            try:
                size = _upload_size(h, filename, vsize, target)
                if verify and size != target:
                    raise ClientError(f"cannot verify: {filename} has {size} bytes, "
                                      f"the target {target}")
                stats = {"size": size, "copied": 0, "zeroed": 0, "connections": n,
                         "transport": client.transport}
                plan = _upload_plan(_clipped(h.zero_extents(), size), _target_data(client, size))
                progress.total = size
                ok = False
                try:
                    _run(n, lambda i: _UploadWorker(client.clone(), server.connect(), progress),
                         _counting(plan, stats), progress)
                    ok = True
                finally:
                    progress.close(ok)
            finally:
                h.close()
            if verify:
                stats["checksum"] = _verify(client, server, filename, size)
        return stats
    finally:
        client.close()


def _upload_size(h, filename, vsize, target):
    """The bytes to upload: the local image's size, or the target's when the image passes it
    only by qemu's rounding up to 512 bytes and that tail reads as zeros."""
    if vsize <= target:
        return vsize
    if vsize - target < SECTOR:
        tail = bytearray(vsize - target)
        h.read_into(memoryview(tail), target)
        if not any(tail):
            return target
    raise ClientError(f"{filename} is larger than the target: {vsize} bytes > {target}")


def _clipped(extents, size):
    """The local (start, length, zero) extents within [0, size)."""
    for start, length, zero in extents:
        if start >= size:
            return
        yield start, min(length, size - start), zero


def _counting(plan, stats):
    for op, start, length in plan:
        if op == COPY:
            stats["copied"] += length
        elif op == ZERO:
            stats["zeroed"] += length
        yield op, start, length


def _target_data(client, size):
    """(start, end) of the ranges of the target's [0, size) not known to read as zeros: where
    its extents do not say zero, or all of it when the server reports no extents."""
    if "extents" not in client.features:
        yield 0, size
        return
    for e in client.extents("zero"):
        if e["start"] >= size:
            return
        if not e["zero"]:
            yield e["start"], min(size, e["start"] + e["length"])


def _upload_plan(extents, target_data):
    """COPY the local data; ZERO the local zeros where the target may hold data, SKIP them
    where the target reads as zeros. Both inputs are in order; decided range by range."""
    data = iter(target_data)
    current = next(data, None)
    for start, length, zero in extents:
        if not zero:
            yield COPY, start, length
            continue
        pos, end = start, start + length
        while pos < end:
            while current is not None and current[1] <= pos:
                current = next(data, None)
            if current is None or current[0] >= end:
                yield SKIP, pos, end - pos
                break
            if current[0] > pos:
                yield SKIP, pos, current[0] - pos
                pos = current[0]
            stop = min(end, current[1])
            yield ZERO, pos, stop - pos
            pos = stop


def _verify(client, server, filename, size):
    """Compare the block hash of the local image's [0, size) with the server's (whose image has
    that size); raise on a mismatch."""
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
        mine = compute(h, ALGORITHM, BLOCK_SIZE, size)
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


def check_block_size(block_size):
    """None when block_size is one the server's /checksum takes, else why not."""
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size % 4096:
        return (f"the block size must be from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} bytes, "
                "a multiple of 4096")
    return None


def checksum(filename, algorithm=ALGORITHM, block_size=BLOCK_SIZE):
    """The block hash of the guest data of a local image (API.md 4c), as the server answers it.

    A raw file is hashed over its own size, not qemu's rounded one, as a server hashes an export
    of that size; other formats over their virtual size.
    """
    if algorithm not in hashlib.algorithms_available or algorithm.startswith("shake_"):
        raise ClientError(f"unsupported algorithm {algorithm!r}")
    problem = check_block_size(block_size)
    if problem:
        raise ClientError(problem)
    info = local.image_info(filename)
    size = info["virtual-size"]
    if info["format"] == "raw" and os.path.isfile(filename):
        size = os.path.getsize(filename)
    with local.Server(filename, info["format"], read_only=True, shared=1) as server:
        h = server.connect()
        try:
            digest = compute(h, algorithm, block_size, size)
        finally:
            h.close()
    return {"algorithm": algorithm, "block_size": block_size, "checksum": digest}


def compute(h, algorithm=ALGORITHM, block_size=BLOCK_SIZE, size=None):
    """blkhash of [0, size) (default: all) of the image behind local handle h; whole zero blocks
    are not read."""
    size = h.size if size is None else size
    zero = ((start, length) for start, length, is_zero in h.zero_extents() if is_zero)
    return blkhash.compute(size, h.read_into, zero, algorithm, block_size)
