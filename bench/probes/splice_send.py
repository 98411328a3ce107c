"""An O_DIRECT file to a reader in another process over an AF_UNIX socket pair: pread + sendall
(PIECE_MIB pieces, DEPTH in flight, as imageio and the buffered path do) against splice through
DEPTH pipes of PIECE_MIB (what nbdproxy's zero_copy.splice_out does). The sender's MiB/s and
CPU-s/GiB; the reader recv_into a 4 MiB buffer, as the bench's client.

    /usr/bin/python3 bench/probes/splice_send.py FILE read|splice PIECE_MIB DEPTH
"""

import collections
import concurrent.futures
import fcntl
import mmap
import os
import resource
import socket
import sys
import time

F_SETPIPE_SZ = 1031


def reader(sock, size):
    buf, got = bytearray(4 << 20), 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            os._exit(0 if got == size else 1)
        got += n


def pipelined(depth, pieces, start, finish):
    """start(i, offset, n) on a pool, finish(result) in order, depth in flight."""
    pool = concurrent.futures.ThreadPoolExecutor(depth)
    inflight = collections.deque()
    for i, (offset, n) in enumerate(pieces):
        if len(inflight) == depth:
            finish(inflight.popleft().result())
        inflight.append(pool.submit(start, i % depth, offset, n))
    while inflight:
        finish(inflight.popleft().result())


def main(path, mode, piece_mib, depth):
    piece, depth = int(piece_mib) << 20, int(depth)
    size = os.stat(path).st_size
    a, b = socket.socketpair()
    if os.fork() == 0:
        a.close()
        reader(b, size)
    b.close()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    pieces = [(o, min(piece, size - o)) for o in range(0, size, piece)]
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    if mode == "read":
        bufs = [mmap.mmap(-1, piece) for _ in range(depth)]

        def start(i, offset, n):
            view = memoryview(bufs[i])[:n]
            os.preadv(fd, [view], offset)
            return view

        pipelined(depth, pieces, start, a.sendall)
    else:
        pipes = [os.pipe() for _ in range(depth)]
        for _, w in pipes:
            fcntl.fcntl(w, F_SETPIPE_SZ, piece)

        def start(i, offset, n):
            left = n
            while left:
                left -= os.splice(fd, pipes[i][1], left, offset_src=offset + n - left)
            return pipes[i][0], n

        def finish(item):
            r, left = item
            while left:
                left -= os.splice(r, a.fileno(), left)

        pipelined(depth, pieces, start, finish)
    a.shutdown(socket.SHUT_WR)
    ok = os.wait()[1] == 0
    seconds, r1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    print(f"{mode} {piece_mib} MiB x {depth}: {size / 2**20 / seconds:.0f} MiB/s, "
          f"{cpu / (size / 2**30):.3f} CPU-s/GiB (sender), reader ok: {ok}")


if __name__ == "__main__":
    main(*sys.argv[1:])
