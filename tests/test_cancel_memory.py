"""Issue 12, items 4 and 5: the daemon-wide checksum memory budget, and requests that stop soon
after a cancel or a departed client (no new piece starts, long walks check often)."""

import json
import os
import socket
import threading
import time

import nbd
import pytest

from support import Daemon, nbdkit, qemu_nbd, read_export, request

MiB = 1024**2
TiB = 1024**4


def rss(pid, field="VmRSS"):
    """A field of /proc/PID/status in bytes (VmRSS now, VmHWM the peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid):
    """Start VmHWM again from the current RSS (Linux >= 4.0; we are root in the tests)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class Background:
    """A function run in a thread; .result, or the exception it raised, after join()."""

    def __init__(self, fn, *args):
        self.result = self.error = None
        self.ended = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn, args):
        try:
            self.result = fn(*args)
        except BaseException as e:      # reported by join()
            self.error = e
        self.ended = time.monotonic()

    def join(self, timeout=30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.result


def wait_until(predicate, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)
    return value


def raw_client(daemon, timeout=20):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(daemon.local_socket)
    return s


def read_head(s):
    """(status, rest of the bytes read) of the response on raw socket s."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {buf[:200]!r}")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), rest


def drain(s, rate=None, step=64 * 1024):
    """Read s until it closes (at most rate bytes/s when given); the bytes read."""
    out = bytearray()
    while True:
        try:
            chunk = s.recv(step)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        out += chunk
        if rate:
            time.sleep(len(chunk) / rate)
    return bytes(out)


def delete(daemon, ticket_id):
    """DELETE /tickets/ID: (status, seconds it took)."""
    t0 = time.monotonic()
    status, _ = request(daemon.control(), "DELETE", f"/tickets/{ticket_id}")
    return status, time.monotonic() - t0


def checksum(daemon, ticket_id, block_size=None):
    query = f"?block_size={block_size}" if block_size else ""
    return request(daemon.local(), "GET", f"/images/{ticket_id}/checksum{query}")


def slow_extents(tmp_path, name="slow", size="4T", delay="20ms"):
    """An empty export of size whose block status answers after delay: a 4 TiB walk is 1,000
    commands, 8 in flight, about 2.5 s."""
    return nbdkit(str(tmp_path / f"{name}.sock"), "--filter=delay", "memory", f"size={size}",
                  f"delay-extents={delay}")


# 4. Checksum memory

def test_parallel_checksums_stay_in_the_budget(tmp_path, cert):
    """Eight checksums of 16 MiB blocks at once: the buffers never pass checksum_memory (256 MiB)
    by more than a little, and the memory goes back to the system after them. Before the
    budget: about 100 MiB per request, so near 800 MiB at the peak, and much of it stayed."""
    size = 192 * MiB
    server = nbdkit(str(tmp_path / "pattern.sock"), "pattern", f"size={size}")
    d = Daemon(str(tmp_path), *cert)
    try:
        d.add_ticket(server.url, size, ops=["read"], ticket_id="p")
        before = rss(d.proc.pid)
        reset_peak(d.proc.pid)
        runs = [Background(checksum, d, "p", 16 * MiB) for _ in range(8)]
        results = [run.join(60) for run in runs]
        assert all(status == 200 for status, _ in results), results
        assert len({json.loads(body)["checksum"] for _, body in results}) == 1
        peak = rss(d.proc.pid, "VmHWM")
        after = rss(d.proc.pid)
        print(f"RSS before {before / MiB:.0f} MiB, peak {peak / MiB:.0f}, after {after / MiB:.0f}")
        assert peak - before <= 256 * MiB + 48 * MiB, (before, peak)
        assert after - before <= 50 * MiB, (before, after)
    finally:
        assert d.stop() == 0
        server.stop()


def test_checksum_waits_for_memory_then_503(tmp_path, cert):
    """With checksum_memory of one 16 MiB block, a second checksum waits for the first; with an
    inactivity_timeout of 1 s it gets 503 after about 1 s. Once the first ends, it runs."""
    slow = slow_extents(tmp_path)
    small = nbdkit(str(tmp_path / "small.sock"), "pattern", "size=32M")
    d = Daemon(str(tmp_path), *cert, args=["--checksum-memory", str(16 * MiB)])
    try:
        d.add_ticket(slow.url, 4 * TiB, ops=["read"], ticket_id="slow")
        d.add_ticket(small.url, 32 * MiB, ops=["read"], ticket_id="small",
                     inactivity_timeout=1)
        first = Background(checksum, d, "slow", 16 * MiB)
        assert wait_until(lambda: d.ticket_info("slow")["active"], 5)
        t0 = time.monotonic()
        status, body = checksum(d, "small", 16 * MiB)
        waited = time.monotonic() - t0
        assert status == 503, body
        assert 0.9 <= waited <= 3, waited
        assert d.ticket_info("small")["active"] is False
        # The first one is canceled; its memory is free again.
        assert delete(d, "slow")[0] == 204
        assert first.join()[0] == 403
        status, body = checksum(d, "small", 16 * MiB)
        assert status == 200, body
    finally:
        assert d.stop() == 0
        slow.stop()
        small.stop()


def test_budget_grants_and_waits():
    """Budget hands out what is free (at least one unit), then makes the next request wait
    until its timeout, and a waiting request stops when its check() raises."""
    from nbdproxy import errors
    from nbdproxy.checksum import Budget

    budget = Budget(4 * MiB)
    with budget.reserve(MiB, 3, None, lambda: None) as a:
        assert a == 3
        with budget.reserve(MiB, 5, None, lambda: None) as b:
            assert b == 1
            t0 = time.monotonic()
            with pytest.raises(errors.ServiceUnavailable):
                with budget.reserve(MiB, 1, 0.2, lambda: None):
                    pass
            assert 0.2 <= time.monotonic() - t0 < 1

            def canceled():
                raise errors.Canceled("Transfer was canceled")

            with pytest.raises(errors.Canceled):
                with budget.reserve(MiB, 1, None, canceled):
                    pass
    with budget.reserve(MiB, 8, 0, lambda: None) as c:
        assert c == 4


# 5. Requests that stop after a cancel or a departed client

def test_delete_during_checksum_of_sparse_image(tmp_path, cert):
    """A checksum of a 4 TiB empty image whose block status is slow: DELETE answers 204 within
    about 2 s (before: only after the whole walk, which checked nothing)."""
    slow = slow_extents(tmp_path, delay="40ms")
    d = Daemon(str(tmp_path), *cert)
    try:
        d.add_ticket(slow.url, 4 * TiB, ops=["read"], ticket_id="slow")
        run = Background(checksum, d, "slow", MiB)
        assert wait_until(lambda: d.ticket_info("slow")["active"], 5)
        time.sleep(0.3)
        status, seconds = delete(d, "slow")
        assert status == 204
        assert seconds < 2, seconds
        assert run.join()[0] == 403
    finally:
        assert d.stop() == 0
        slow.stop()


def test_checksum_stops_when_client_leaves(tmp_path, cert):
    """A client that closes its connection during a long checksum: the request ends within
    about a second (before: it ran to the end for nobody)."""
    slow = slow_extents(tmp_path, delay="40ms")
    d = Daemon(str(tmp_path), *cert)
    try:
        d.add_ticket(slow.url, 4 * TiB, ops=["read"], ticket_id="slow")
        s = raw_client(d)
        s.sendall(b"GET /images/slow/checksum HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_until(lambda: d.ticket_info("slow")["active"], 5)
        time.sleep(0.3)
        s.close()
        t0 = time.monotonic()
        assert wait_until(lambda: not d.ticket_info("slow")["active"], 3)
        assert time.monotonic() - t0 < 1.5
        assert delete(d, "slow")[0] == 204
    finally:
        assert d.stop() == 0
        slow.stop()


def test_checksum_with_one_buffer():
    """A checksum granted a single block of memory reads and hashes one block at a time, and
    gets the same hash as one with a buffer per thread."""
    from nbdproxy import blkhash

    block = 65536
    image = bytearray(os.urandom(20 * block + 1000))
    image[3 * block:9 * block] = bytes(6 * block)
    zero = [(3 * block, 6 * block)]

    def readinto(view, offset):
        view[:] = image[offset:offset + len(view)]

    want = blkhash.compute(len(image), readinto, zero, block_size=block, threads=3)
    assert blkhash.compute(len(image), readinto, zero, block_size=block, buffers=1) == want


def test_checksum_of_zeros_checks_cancel():
    """The digests of a long run of zero blocks (a million for 4 TiB of 4 MiB blocks) are hashed
    with check() between them, not in one go."""
    from nbdproxy import blkhash

    calls = []

    def check():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("canceled")

    with pytest.raises(RuntimeError, match="canceled"):
        blkhash.compute(4 * TiB, None, [(0, 4 * TiB)], check=check)


def test_delete_during_slow_put_writes_no_new_piece(tmp_path, cert):
    """A PUT whose body comes slowly: the pieces read before the DELETE are written, the one
    being read then and all later ones are not (before: the daemon read and wrote all four
    pieces of its buffer, 8 MiB, before it looked at the ticket)."""
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    server = qemu_nbd(path, str(tmp_path / "nbd.sock"))
    d = Daemon(str(tmp_path), *cert, args=["--remove-timeout", "10"])
    try:
        d.add_ticket(server.url, 64 * MiB, ops=["write"])
        s = raw_client(d)
        s.sendall(b"PUT /images/test?flush=n HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: %d\r\n\r\n" % (32 * MiB))
        # Two whole pieces (2 MiB each) and half of the third.
        s.sendall(b"\xab" * (5 * MiB))
        assert wait_until(lambda: read_export(server.sock, 0, 4 * MiB) == b"\xab" * (4 * MiB),
                          5)
        time.sleep(0.2)
        deleting = Background(delete, d, "test")
        assert wait_until(lambda: d.ticket_info()["canceled"], 2)
        try:
            s.sendall(b"\xab" * (27 * MiB))
        except OSError:
            pass
        assert deleting.join()[0] == 204
        s.close()
        with open(path, "rb") as f:
            data = f.read()
        assert data[:4 * MiB] == b"\xab" * (4 * MiB)
        assert data.count(0) == len(data) - 4 * MiB, "written after the cancel"
    finally:
        assert d.stop() == 0
        server.stop()


def test_delete_during_zero_of_huge_range(tmp_path, cert):
    """Zeroing 4 TiB on a slow server: DELETE answers 204 at once and no more WRITE_ZEROES go
    out (the data at the end of the disk is still there)."""
    sock = str(tmp_path / "mem.sock")
    server = nbdkit(sock, "--filter=delay", "memory", "size=4T", "delay-zero=10ms")
    d = Daemon(str(tmp_path), *cert)
    try:
        h = nbd.NBD()
        h.connect_unix(sock)
        h.pwrite(b"\x55" * MiB, 4 * TiB - MiB)
        h.shutdown()
        d.add_ticket(server.url, 4 * TiB, ops=["write"])
        body = json.dumps({"op": "zero", "size": 4 * TiB}).encode()
        run = Background(request, d.local(), "PATCH", "/images/test", body)
        assert wait_until(lambda: d.ticket_info()["transferred"] > 0, 5)
        status, seconds = delete(d, "test")
        assert status == 204
        assert seconds < 2, seconds
        assert run.join()[0] == 403
        assert read_export(sock, 4 * TiB - MiB, MiB) == b"\x55" * MiB
    finally:
        assert d.stop() == 0
        server.stop()


def test_zero_stops_when_client_leaves(tmp_path, cert):
    """The client of a zero of 4 TiB on a slow server closes its connection: the request ends
    within about a second, and the end of the disk is not zeroed (before: the daemon went on
    zeroing for about 40 s for nobody)."""
    sock = str(tmp_path / "mem.sock")
    server = nbdkit(sock, "--filter=delay", "memory", "size=4T", "delay-zero=10ms")
    d = Daemon(str(tmp_path), *cert)
    try:
        h = nbd.NBD()
        h.connect_unix(sock)
        h.pwrite(b"\x55" * MiB, 4 * TiB - MiB)
        h.shutdown()
        d.add_ticket(server.url, 4 * TiB, ops=["write"])
        body = json.dumps({"op": "zero", "size": 4 * TiB}).encode()
        s = raw_client(d)
        s.sendall(b"PATCH /images/test HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: d.ticket_info()["transferred"] > 0, 5)
        s.close()
        t0 = time.monotonic()
        assert wait_until(lambda: not d.ticket_info()["active"], 3)
        assert time.monotonic() - t0 < 1.5
        assert read_export(sock, 4 * TiB - MiB, MiB) == b"\x55" * MiB
    finally:
        assert d.stop() == 0
        server.stop()


def test_delete_during_extents_streaming(tmp_path, cert):
    """A full extents map too large to send whole, read slowly: after DELETE the stream stops
    (before: the whole map was sent, and DELETE waited for it)."""
    server = nbdkit(str(tmp_path / "sr.sock"), "sparse-random", "size=4G", "seed=1",
                    "percent=50", "runlength=16384")
    d = Daemon(str(tmp_path), *cert)
    try:
        d.add_ticket(server.url, 4 * 1024**3, ops=["read"])
        s = raw_client(d)
        s.sendall(b"GET /images/test/extents HTTP/1.1\r\nHost: x\r\n\r\n")
        status, rest = read_head(s)
        assert status == 200
        time.sleep(0.3)     # the daemon fills the socket and waits
        deleting = Background(delete, d, "test")
        assert wait_until(lambda: d.ticket_info()["canceled"], 2)
        body = rest + drain(s)
        status, seconds = deleting.join()
        assert status == 204
        assert seconds < 2, seconds
        assert not body.endswith(b"0\r\n\r\n"), "the whole map was sent"
        # Each extent is about 50 bytes of JSON; the map has about 260,000 of them.
        assert len(body) < 4 * MiB, len(body)
    finally:
        assert d.stop() == 0
        server.stop()


def test_delete_during_get(tmp_path, cert):
    """A GET read slowly: after DELETE the client gets at most the pieces read already."""
    size = 256 * MiB
    server = nbdkit(str(tmp_path / "pattern.sock"), "pattern", f"size={size}")
    d = Daemon(str(tmp_path), *cert)
    try:
        d.add_ticket(server.url, size, ops=["read"])
        s = raw_client(d)
        s.sendall(b"GET /images/test HTTP/1.1\r\nHost: x\r\n\r\n")
        status, rest = read_head(s)
        assert status == 200
        time.sleep(0.3)
        deleting = Background(delete, d, "test")
        assert wait_until(lambda: d.ticket_info()["canceled"], 2)
        body = rest + drain(s, rate=64 * MiB)
        assert deleting.join()[0] == 204
        # The buffer's four pieces (8 MiB) and what the socket held.
        assert len(body) < 12 * MiB, len(body)
    finally:
        assert d.stop() == 0
        server.stop()
