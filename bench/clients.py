"""The client side of the benchmark: http.client on keep-alive connections, one thread each.

Downloads read into a reusable buffer with readinto; uploads send slices of the source image
mapped in memory (MAP_POPULATE, kept for the whole run), so the client copies nothing in user
space and is not what is measured. Every transfer checks a sample of what it moved.
"""

import hashlib
import json
import mmap
import os
import queue
import socket
import ssl
import struct
import subprocess
import threading
import time

import nbd

MiB = 1024**2
GiB = 1024**3
CLIENT_BUFFER = 4 * MiB
PIECE = 128 * MiB          # PUT size of dense uploads (as ovirt-imageio's client sends them)
SAMPLE = 64                # bytes compared per buffer of a download


class BenchError(Exception):
    pass


def run_threads(fn, args_list):
    """Run fn(*args) in one thread per args; re-raise the first failure."""
    errors = []

    def target(*args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: B902 - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=args) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def split(start, length, parts, align=MiB):
    """[start, start+length) cut into parts contiguous (offset, size) ranges aligned to align."""
    step = -(-length // parts // align) * align
    out = []
    pos, end = start, start + length
    while pos < end:
        n = min(step, end - pos)
        out.append((pos, n))
        pos += n
    return out


def check_status(resp, expected, what):
    if resp.status not in expected:
        body = resp.read()
        raise BenchError(f"{what}: HTTP {resp.status} {body[:200]!r}")


# Single requests on a connection

def get_range(conn, url, offset, length, buf, src=None):
    conn.putrequest("GET", url, skip_accept_encoding=True)
    conn.putheader("Range", f"bytes={offset}-{offset + length - 1}")
    conn.endheaders()
    resp = conn.getresponse()
    check_status(resp, (200, 206), f"GET {offset}+{length}")
    view = memoryview(buf)
    got = 0
    while got < length:
        n = resp.readinto(view[:min(len(view), length - got)])
        if not n:
            raise BenchError(f"GET {offset}+{length}: body ended after {got} bytes")
        if src is not None and view[:SAMPLE] != src[offset + got:offset + got + SAMPLE]:
            raise BenchError(f"GET {offset}+{length}: wrong data at {offset + got}")
        got += n
    if resp.read() != b"":
        raise BenchError("GET: more data than asked for")


def put_range(conn, url, offset, data, flush=False):
    conn.putrequest("PUT", url + ("?flush=y" if flush else "?flush=n"), skip_accept_encoding=True)
    conn.putheader("Content-Length", str(len(data)))
    conn.putheader("Content-Range", f"bytes {offset}-{offset + len(data) - 1}/*")
    conn.endheaders()
    conn.sock.sendall(data)
    resp = conn.getresponse()
    check_status(resp, (200,), f"PUT {offset}+{len(data)}")
    resp.read()


def patch(conn, url, msg):
    body = json.dumps(msg).encode()
    conn.request("PATCH", url, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    check_status(resp, (200,), f"PATCH {msg}")
    resp.read()


def get_json(conn, url):
    conn.request("GET", url)
    resp = conn.getresponse()
    check_status(resp, (200,), f"GET {url}")
    return json.loads(resp.read())


# Transfers

def download(endpoint, url, size, conns, src):
    """size bytes from offset 0 as conns parallel ranged GETs."""
    def worker(offset, length):
        conn = endpoint.connect()
        try:
            get_range(conn, url, offset, length, bytearray(CLIENT_BUFFER), src)
        finally:
            conn.close()
    run_threads(worker, split(0, size, conns))
    return size


def upload(endpoint, url, size, conns, src):
    """size bytes of src as conns parallel streams of PUT flush=n pieces, then PATCH flush."""
    view = memoryview(src)

    def worker(offset, length):
        conn = endpoint.connect()
        try:
            for off, n in split(offset, length, -(-length // PIECE)):
                put_range(conn, url, off, view[off:off + n])
        finally:
            conn.close()
    run_threads(worker, split(0, size, conns))
    conn = endpoint.connect()
    try:
        patch(conn, url, {"op": "flush"})
    finally:
        conn.close()
    return size


def get_extents(endpoint, url):
    conn = endpoint.connect()
    try:
        return get_json(conn, url + "/extents")
    finally:
        conn.close()


def data_extents(extents):
    return [(e["start"], e["length"]) for e in extents if not e["zero"]]


def check_extents(extents, size, layout, piece):
    """The extents cover [0, size) and their data is where the image has it."""
    if not extents or extents[0]["start"] != 0:
        raise BenchError("extents do not start at 0")
    end = 0
    for e in extents:
        if e["start"] != end:
            raise BenchError(f"gap in extents at {end}")
        end += e["length"]
    if end != size:
        raise BenchError(f"extents end at {end}, not {size}")
    data = data_extents(extents)
    covered = sum(n for _, n in data)
    if covered < len(layout) * piece or covered > len(layout) * piece * 4:
        raise BenchError(f"extents say {covered} bytes of data, the image has "
                         f"{len(layout) * piece}")


def _work_queue(endpoint, items, conns, fn):
    q = queue.Queue()
    for item in items:
        q.put(item)

    def worker():
        conn = endpoint.connect()
        buf = bytearray(CLIENT_BUFFER)
        try:
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    return
                fn(conn, buf, item)
        finally:
            conn.close()
    run_threads(worker, [() for _ in range(conns)])


def sparse_download(endpoint, url, conns, src):
    """GET /extents, then the data extents only, on conns connections; bytes moved."""
    extents = get_extents(endpoint, url)
    items = []
    for start, length in data_extents(extents):
        items += split(start, length, -(-length // (8 * MiB)))
    _work_queue(endpoint, items, conns,
                lambda conn, buf, item: get_range(conn, url, item[0], item[1], buf, src))
    return sum(n for _, n in items)


def sparse_plan(size, layout, piece):
    """("data"|"zero", offset, length) covering [0, size): the data pieces and the gaps."""
    items = []
    pos = 0
    for off in layout:
        if off > pos:
            items.append(("zero", pos, off - pos))
        items.append(("data", off, piece))
        pos = off + piece
    if pos < size:
        items.append(("zero", pos, size - pos))
    return items


def sparse_upload(endpoint, url, size, layout, piece, conns, src):
    """Data pieces as PUT flush=n, the zero ranges between them as PATCH zero; then flush."""
    view = memoryview(src)
    items = sparse_plan(size, layout, piece)

    def send(conn, buf, item):
        kind, off, n = item
        if kind == "data":
            put_range(conn, url, off, view[off:off + n])
        else:
            patch(conn, url, {"op": "zero", "offset": off, "size": n, "flush": False})
    _work_queue(endpoint, items, conns, send)
    conn = endpoint.connect()
    try:
        patch(conn, url, {"op": "flush"})
    finally:
        conn.close()
    return len(layout) * piece


SMALL_SIZES = (64 * 1024, 128 * 1024, 256 * 1024, 512 * 1024, MiB)


def small_plan(size, count, index, conns):
    """The requests of connection index of conns: count (offset, length), lengths cycling
    64 KiB..1 MiB, walking forward through the connection's own part of the image.

    That is how nbdcopy (virt-v2v's copier) feeds its connections: each takes the next part of
    the image and issues requests in order within it.
    """
    part = size // conns
    plan = []
    pos = index * part
    for i in range(count):
        n = SMALL_SIZES[(i + index) % len(SMALL_SIZES)]
        if pos + n > (index + 1) * part:
            pos = index * part
        plan.append((pos, n))
        pos += n
    return plan


def small_requests(endpoint, url, op, size, conns, per_conn, src):
    """per_conn small GETs or PUTs (flush=n) on each of conns keep-alive connections.

    Returns (requests, bytes); PUTs end with one PATCH flush, counted in the time, not in requests.
    """
    view = memoryview(src)
    plans = [small_plan(size, per_conn, i, conns) for i in range(conns)]

    def worker(plan):
        conn = endpoint.connect()
        buf = bytearray(MiB)
        try:
            for off, n in plan:
                if op == "get":
                    get_range(conn, url, off, n, buf, src)
                else:
                    put_range(conn, url, off, view[off:off + n])
        finally:
            conn.close()
    run_threads(worker, [(p,) for p in plans])
    if op == "put":
        conn = endpoint.connect()
        try:
            patch(conn, url, {"op": "flush"})
        finally:
            conn.close()
    return conns * per_conn, sum(n for p in plans for _, n in p)


def checksum(endpoint, url):
    conn = endpoint.connect()
    try:
        return get_json(conn, url + "/checksum")
    finally:
        conn.close()


# Local references

def blkhash_dense(src, size, block=4 * MiB):
    """ovirt-imageio's block hash (blake2b, 32-byte digests, 4 MiB blocks) of a buffer."""
    outer = hashlib.blake2b(digest_size=32)
    view = memoryview(src)
    for off in range(0, size, block):
        outer.update(hashlib.blake2b(view[off:off + block], digest_size=32).digest())
    return outer.hexdigest()


def blkhash_sparse(src, size, layout, piece, block=4 * MiB):
    """The same for the sparse image, zero blocks from the precomputed digest."""
    outer = hashlib.blake2b(digest_size=32)
    zero = hashlib.blake2b(bytes(block), digest_size=32).digest()
    view = memoryview(src)
    data_blocks = {off // block for off in layout} | {(off + piece - 1) // block for off in layout}
    for off in range(0, size, block):
        n = min(block, size - off)
        if off // block in data_blocks:
            outer.update(hashlib.blake2b(view[off:off + n], digest_size=32).digest())
        elif n == block:
            outer.update(zero)
        else:
            outer.update(hashlib.blake2b(bytes(n), digest_size=32).digest())
    return outer.hexdigest()


def verify_export(sock, src, samples):
    """Read (offset, length) samples of an export over NBD and compare them with src."""
    h = nbd.NBD()
    h.connect_unix(sock)
    try:
        for off, n in samples:
            if h.pread(n, off) != src[off:off + n]:
                raise BenchError(f"export differs from the source at {off}+{n}")
    finally:
        h.shutdown()


def nbdcopy(src, dst, connections, flush=False):
    argv = ["nbdcopy", f"--connections={connections}"]
    if flush:
        argv.append("--flush")
    argv += [src, dst]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def socket_copy(size, bufsize=CLIENT_BUFFER):
    """size bytes from a buffer in a child process to recv_into in this one, over AF_UNIX.

    Returns (seconds, receiver CPU seconds, sender CPU seconds).
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            data = memoryview(os.urandom(bufsize))
            left = size
            while left:
                n = min(bufsize, left)
                b.sendall(data[:n])
                left -= n
            b.shutdown(socket.SHUT_WR)
            t = os.times()
            os.write(w, f"{t.user + t.system}".encode())
        finally:
            os._exit(0)
    b.close()
    os.close(w)
    buf = bytearray(bufsize)
    view = memoryview(buf)
    got = 0
    t0 = os.times()
    start = time.perf_counter()
    while got < size:
        n = a.recv_into(view)
        if not n:
            raise BenchError("socket copy ended early")
        got += n
    elapsed = time.perf_counter() - start
    t1 = os.times()
    a.close()
    child_cpu = float(os.read(r, 100) or 0)
    os.close(r)
    os.waitpid(pid, 0)
    return elapsed, (t1.user + t1.system) - (t0.user + t0.system), child_cpu


def nbd_small(sock, op, plans, src):
    """The small-request plans straight over libnbd, one handle per plan: (seconds, bytes)."""
    view = memoryview(src)

    def worker(h, plan):
        for off, n in plan:
            if op == "get":
                h.pread(n, off)
            else:
                h.pwrite(view[off:off + n], off)
        if op == "put":
            h.flush()
    handles = []
    try:
        for _ in plans:
            h = nbd.NBD()
            h.connect_unix(sock)
            handles.append(h)
        start = time.perf_counter()
        run_threads(worker, list(zip(handles, plans)))
        seconds = time.perf_counter() - start
    finally:
        for h in handles:
            h.shutdown()
    return seconds, sum(n for p in plans for _, n in p)


def nbd_sparse_upload(sock, size, layout, piece, conns, src):
    """The sparse upload's requests straight over libnbd (zeroes in 1 GiB commands, which may
    punch holes): (seconds, bytes)."""
    view = memoryview(src)
    q = queue.Queue()
    for kind, off, n in sparse_plan(size, layout, piece):
        if kind == "data":
            q.put((kind, off, n))
        else:
            for o, m in split(off, n, -(-n // GiB)):
                q.put((kind, o, m))

    def worker(h):
        while True:
            try:
                kind, off, n = q.get_nowait()
            except queue.Empty:
                break
            if kind == "data":
                h.pwrite(view[off:off + n], off)
            else:
                h.zero(n, off)
        h.flush()
    handles = []
    try:
        for _ in range(conns):
            h = nbd.NBD()
            h.connect_unix(sock)
            handles.append(h)
        start = time.perf_counter()
        run_threads(worker, [(h,) for h in handles])
        seconds = time.perf_counter() - start
    finally:
        for h in handles:
            h.shutdown()
    return seconds, len(layout) * piece


# File limits: the bytes of a file ticket moved with no HTTP daemon (issue 13)

FILE_BUFFER = 8 * MiB      # per read or write in flight (the daemons' buffer size)
FILE_IN_FLIGHT = 4         # O_DIRECT reads or writes in flight at once


def _times():
    t = os.times()
    return t.user + t.system


def _pieces(size, n=FILE_BUFFER):
    return [(off, min(n, size - off)) for off in range(0, size, n)]


def direct_read(path, size, in_flight=FILE_IN_FLIGHT):
    """The file read with O_DIRECT: in_flight threads, os.preadv into aligned mmap buffers (the
    page cache, even where the file is cached, serves none of it). Returns (seconds, cpu)."""
    q = queue.Queue()
    for item in _pieces(size):
        q.put(item)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

    def worker():
        buf = mmap.mmap(-1, FILE_BUFFER)
        while True:
            try:
                off, n = q.get_nowait()
            except queue.Empty:
                return
            view = memoryview(buf)[:n]
            got = 0
            while got < n:
                m = os.preadv(fd, [view[got:]], off + got)
                if not m:
                    raise BenchError(f"{path}: short O_DIRECT read at {off + got}")
                got += m
    try:
        cpu0, start = _times(), time.perf_counter()
        run_threads(worker, [() for _ in range(in_flight)])
        return time.perf_counter() - start, _times() - cpu0
    finally:
        os.close(fd)


def direct_write(path, src, size, in_flight=FILE_IN_FLIGHT):
    """src written to the file with O_DIRECT from aligned buffers (each piece copied into one, as
    a daemon receives into its buffer), in_flight threads, then fdatasync: (seconds, cpu)."""
    q = queue.Queue()
    for item in _pieces(size):
        q.put(item)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    view_src = memoryview(src)

    def worker():
        buf = mmap.mmap(-1, FILE_BUFFER)
        while True:
            try:
                off, n = q.get_nowait()
            except queue.Empty:
                return
            view = memoryview(buf)[:n]
            view[:] = view_src[off:off + n]
            done = 0
            while done < n:
                done += os.pwritev(fd, [view[done:]], off + done)
    try:
        cpu0, start = _times(), time.perf_counter()
        run_threads(worker, [() for _ in range(in_flight)])
        os.fdatasync(fd)
        return time.perf_counter() - start, _times() - cpu0
    finally:
        os.close(fd)


def warm(path, size):
    """Read the file once through the page cache, so that buffered downloads find it there."""
    buf = bytearray(FILE_BUFFER)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _child(fn):
    """fork: the child runs fn() and reports its CPU seconds through a pipe; (pid, read fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            fn()
            os.write(w, f"{_times()}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _reap(pid, r):
    cpu = float(os.read(r, 100) or -1)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0 or cpu < 0:
        raise BenchError("limit: the child process failed")
    return cpu


def sendfile_copy(path, size, conns):
    """The file sent from the page cache with os.sendfile on conns unix socket pairs (a contiguous
    part each, one thread per pair) to a forked reader's recv_into: (seconds, cpu, reader cpu)."""
    parts = split(0, size, conns)
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in parts]

    def reader():
        def one(sock, length):
            view = memoryview(bytearray(CLIENT_BUFFER))
            got = 0
            while got < length:
                n = sock.recv_into(view)
                if not n:
                    raise BenchError("sendfile copy ended early")
                got += n
        for a, _ in pairs:
            a.close()
        run_threads(one, [(b, n) for (_, b), (_, n) in zip(pairs, parts)])
    pid, r = _child(reader)
    for _, b in pairs:
        b.close()
    fd = os.open(path, os.O_RDONLY)

    def sender(sock, off, length):
        end = off + length
        while off < end:
            n = os.sendfile(sock.fileno(), fd, off, min(end - off, 2 * MiB))
            if not n:
                raise BenchError("sendfile: end of file")
            off += n
        sock.close()
    try:
        cpu0, start = _times(), time.perf_counter()
        run_threads(sender, [(a, off, n) for (a, _), (off, n) in zip(pairs, parts)])
        child_cpu = _reap(pid, r)
        return time.perf_counter() - start, _times() - cpu0, child_cpu
    finally:
        os.close(fd)


def socket_to_file(path, src, size, conns):
    """src sent by a forked writer on conns unix socket pairs to threads here that recv_into a
    buffer and pwrite it into the page cache, then one fdatasync (the row's flush):
    (seconds, cpu, writer cpu)."""
    parts = split(0, size, conns)
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in parts]
    view_src = memoryview(src)

    def writer():
        def one(sock, off, length):
            sock.sendall(view_src[off:off + length])
            sock.close()
        for a, _ in pairs:
            a.close()
        run_threads(one, [(b, off, n) for (_, b), (off, n) in zip(pairs, parts)])
    pid, r = _child(writer)
    for _, b in pairs:
        b.close()
    fd = os.open(path, os.O_WRONLY)

    def receiver(sock, off, length):
        buf = bytearray(CLIENT_BUFFER)
        view = memoryview(buf)
        end = off + length
        while off < end:
            n = sock.recv_into(view[:min(len(view), end - off)])
            if not n:
                raise BenchError("socket to file: ended early")
            done = 0
            while done < n:
                done += os.pwrite(fd, view[done:n], off + done)
            off += n
    try:
        cpu0, start = _times(), time.perf_counter()
        run_threads(receiver, [(a, off, n) for (a, _), (off, n) in zip(pairs, parts)])
        os.fdatasync(fd)
        seconds = time.perf_counter() - start
        return seconds, _times() - cpu0, _reap(pid, r)
    finally:
        os.close(fd)


def verify_file(path, src, samples):
    """Read (offset, length) samples of a file (past the page cache) and compare with src."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for off, n in samples:
            if os.pread(fd, n, off) != src[off:off + n]:
                raise BenchError(f"{path} differs from the source at {off}+{n}")
    finally:
        os.close(fd)


# The TLS limit: a plain Python TLS socket copy (issue 13)

_HEAD = struct.Struct("!cQQ")   # op (D: server sends, U: client sends, E: end), offset, length


def tls_plans_stream(ranges, direction, piece=None):
    """One connection per (offset, length) range, moving it in one item (or in piece-sized items,
    as the upload client's PUTs): the plans tls_copy takes."""
    plans = []
    for off, n in ranges:
        cut = split(off, n, -(-n // piece)) if piece else [(off, n)]
        plans.append([(direction, o, m) for o, m in cut])
    return plans


def tls_copy(cert, key, cafile, plans, src):
    """The same bytes over TLS with no HTTP and no storage: one TLS connection per plan (a list of
    (op, offset, length) items: "D" the server sends src[offset:offset+length], "U" the client
    sends it and the server answers one byte), the server a forked process with a thread per
    connection and the daemons' TLS settings, the client recv_into a 4 MiB buffer. Timed from the
    first connect (handshakes included, as in the daemons' rows) to the last byte.

    Returns a dict: seconds, client_cpu, server_cpu, requests, bytes, cipher.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(len(plans))
    port = listener.getsockname()[1]
    view_src = memoryview(src)
    # Both contexts are made before the clock starts, as the daemons' are.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)     # as nbdproxy's server.py
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cafile)

    def server():
        def serve(raw):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as nbdproxy
            with ctx.wrap_socket(raw, server_side=True) as s:
                head = bytearray(_HEAD.size)
                view = memoryview(bytearray(CLIENT_BUFFER))
                while True:
                    _read_exact(s, memoryview(head))
                    op, off, n = _HEAD.unpack(head)
                    if op == b"E":
                        return
                    if op == b"D":
                        for o, m in split(off, n, -(-n // CLIENT_BUFFER), 1):
                            s.sendall(view_src[o:o + m])
                    else:
                        left = n
                        while left:
                            left -= _read_exact(s, view[:min(left, len(view))])
                        s.sendall(b"k")
        conns = [listener.accept()[0] for _ in plans]
        run_threads(serve, [(c,) for c in conns])
    pid, r = _child(server)
    listener.close()
    ciphers = []

    def client(plan):
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)     # as http.client
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            ciphers.append(s.cipher()[0])
            view = memoryview(bytearray(CLIENT_BUFFER))
            ack = memoryview(bytearray(1))
            for op, off, n in plan:
                s.sendall(_HEAD.pack(op.encode(), off, n))
                if op == "D":
                    left = n
                    while left:
                        left -= _read_exact(s, view[:min(left, len(view))])
                else:
                    s.sendall(view_src[off:off + n])
                    _read_exact(s, ack)
            s.sendall(_HEAD.pack(b"E", 0, 0))
    cpu0, start = _times(), time.perf_counter()
    run_threads(client, [(p,) for p in plans])
    seconds = time.perf_counter() - start
    cpu = _times() - cpu0
    server_cpu = _reap(pid, r)
    return {"seconds": seconds, "client_cpu": cpu, "server_cpu": server_cpu,
            "requests": sum(len(p) for p in plans),
            "bytes": sum(n for p in plans for _, _, n in p), "cipher": sorted(set(ciphers))}


def _read_exact(sock, view):
    """recv_into until view is full; its length."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise BenchError("TLS copy: connection closed early")
        got += n
    return got
