"""Zero copy (issue 13, point 4): GET of a file ticket over a plain socket goes from the file to the
socket (sendfile from the page cache, splice of an O_DIRECT fd) with the same bytes, ranges,
progress, cancel and timeouts as the buffered path; TLS keeps the buffered path."""

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from support import Daemon, request

MiB = 1024**2
SIZE = 20 * MiB + 1000


@pytest.fixture(scope="module")
def image(workdir):
    path = str(workdir / "disk.raw")
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    return path


@pytest.fixture(scope="module", params=["buffered", "direct"])
def zc_daemon(request, workdir, cert):
    args = ["--no-file-direct"] if request.param == "buffered" else []
    d = Daemon(str(workdir / f"daemon-{request.param}"), *cert, args=args)
    d.direct = request.param == "direct"
    yield d
    d.stop()


def _cached(path):
    """Bytes of path in the page cache."""
    out = subprocess.run(["fincore", "-nb", "-o", "RES", path], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[0])


def _uncache(path):
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def content(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(SIZE if length is None else length)


@pytest.mark.parametrize("service", ["local", "remote"])
def test_whole_and_ranges(zc_daemon, image, service):
    zc_daemon.add_ticket(f"file://{image}", SIZE, ops=["read"], ticket_id="zc")
    connect = zc_daemon.local if service == "local" else zc_daemon.remote
    _uncache(image)
    status, body = request(connect(), "GET", "/images/zc")
    if zc_daemon.direct and shutil.which("fincore"):
        assert _cached(image) == 0      # splice of an O_DIRECT fd reads past the page cache
    assert status == 200 and body == content(image)
    for start, end in ((1, 4097), (2 * MiB - 1, 2 * MiB + 1), (SIZE - 1000, SIZE - 1)):
        status, body = request(connect(), "GET", "/images/zc",
                               headers={"Range": f"bytes={start}-{end}"})
        assert status == 206 and body == content(image, start, end - start + 1)
    info = zc_daemon.ticket_info("zc")
    assert info["transferred"] == SIZE and not info["active"]


def _slow_get(daemon, ticket_id):
    s = socket.socket(socket.AF_UNIX)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(daemon.local_socket)
    s.sendall(f"GET /images/{ticket_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200")
    return s


def _drain(s, timeout):
    """Bytes read until the daemon closes the connection."""
    s.settimeout(timeout)
    got = 0
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            return got
        got += len(chunk)


def test_delete_stops_a_zero_copy_download(zc_daemon, image):
    """A reader at about 4 MiB/s: DELETE answers once the piece being sent has gone, and no
    further piece is sent."""
    zc_daemon.add_ticket(f"file://{image}", SIZE, ops=["read"], ticket_id="cancel")
    s = _slow_get(zc_daemon, "cancel")
    got = [0]
    done = threading.Event()

    def read_slowly():
        s.settimeout(20)
        try:
            while True:
                chunk = s.recv(256 * 1024)
                if not chunk:
                    break
                got[0] += len(chunk)
                time.sleep(0.06)
        except OSError:
            pass
        done.set()

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        status, _ = request(zc_daemon.control(), "DELETE", "/tickets/cancel")
        assert status == 204
        assert time.monotonic() - started < 10
        assert done.wait(20)
        assert got[0] < SIZE
    finally:
        s.close()
        reader.join()


def test_stalled_reader_is_cut_at_the_inactivity_timeout(zc_daemon, image):
    zc_daemon.add_ticket(f"file://{image}", SIZE, ops=["read"], ticket_id="stall",
                         inactivity_timeout=1)
    s = _slow_get(zc_daemon, "stall")
    try:
        started = time.monotonic()
        time.sleep(3)       # reads nothing: the daemon gives up after about 1 s (or 2)
        got = _drain(s, 10)
        assert got < SIZE
        assert time.monotonic() - started < 15
        assert not zc_daemon.ticket_info("stall")["active"]
    finally:
        s.close()
    status, body = request(zc_daemon.local(), "GET", "/images/stall",
                           headers={"Range": "bytes=0-4095"})
    assert status == 206 and body == content(image, 0, 4096)
