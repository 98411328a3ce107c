"""What O_DIRECT reads or writes of a file cost with no socket: MiB/s and CPU-s/GiB for a piece
size and a number of pieces in flight (threads), the floor under every O_DIRECT row.

    /usr/bin/python3 bench/probes/odirect_io.py read FILE PIECE_MIB DEPTH
    /usr/bin/python3 bench/probes/odirect_io.py write FILE PIECE_MIB DEPTH   # 2 GiB, then fdatasync
"""

import collections
import concurrent.futures
import mmap
import os
import resource
import sys
import time


def main(mode, path, piece_mib, depth):
    piece, depth = int(piece_mib) << 20, int(depth)
    flags = os.O_RDONLY if mode == "read" else os.O_WRONLY | os.O_CREAT
    fd = os.open(path, flags | os.O_DIRECT)
    size = os.fstat(fd).st_size if mode == "read" else 2 << 30
    bufs = [mmap.mmap(-1, piece) for _ in range(depth)]
    if mode == "write":
        for b in bufs:
            b.write(os.urandom(piece))
    move = os.preadv if mode == "read" else os.pwritev
    pool = concurrent.futures.ThreadPoolExecutor(depth)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    inflight, offset, i = collections.deque(), 0, 0
    while offset < size or inflight:
        while offset < size and len(inflight) < depth:
            n = min(piece, size - offset)
            inflight.append(pool.submit(move, fd, [memoryview(bufs[i % depth])[:n]], offset))
            offset, i = offset + n, i + 1
        inflight.popleft().result()
    if mode == "write":
        os.fdatasync(fd)
    seconds, r1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    print(f"O_DIRECT {mode} {piece_mib} MiB x {depth}: {size / 2**20 / seconds:.0f} MiB/s, "
          f"{cpu / (size / 2**30):.3f} CPU-s/GiB")


if __name__ == "__main__":
    main(*sys.argv[1:])
