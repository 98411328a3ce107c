"""Zero copy (issue 13, point 4): GET of a file ticket over a plain socket goes from the file to the
socket (sendfile from the page cache, splice of an O_DIRECT fd) with the same bytes, ranges,
progress, cancel and timeouts as the buffered path; TLS keeps the buffered path. Hostile clients:
what the daemon logs and leaves behind when one goes away or stops reading mid-body."""

import json
import os
import re
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


def _log_of(daemon, ticket_id, since):
    """The daemon's log lines after offset since, once the ticket's read operation ended."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = daemon.read_log()[since:]
        if re.search(rf"op=read ticket={ticket_id} .* failed", log):
            return log
        time.sleep(0.05)
    raise AssertionError(f"the read of {ticket_id} did not end:\n{log}")


def test_client_gone_mid_download_is_not_an_error(zc_daemon, image):
    """A client that closes the connection in the middle of a body is a client gone (one INFO
    line), as with the buffered path: no ERROR and no traceback that send an operator looking
    for a daemon bug."""
    zc_daemon.add_ticket(f"file://{image}", SIZE, ops=["read"], ticket_id="gone")
    since = len(zc_daemon.read_log())
    s = _slow_get(zc_daemon, "gone")
    s.recv(65536)
    s.close()
    log = _log_of(zc_daemon, "gone", since)
    assert " ERROR " not in log and "Traceback" not in log, log
    assert "client gone" in log


def test_stalled_client_is_not_a_storage_error(zc_daemon, image):
    """A client that reads nothing for the inactivity timeout: the send times out on the socket.
    That is the client's doing, not "read failed" on the file (an ERROR naming the image)."""
    zc_daemon.add_ticket(f"file://{image}", SIZE, ops=["read"], ticket_id="stalled",
                         inactivity_timeout=1)
    since = len(zc_daemon.read_log())
    s = _slow_get(zc_daemon, "stalled")
    try:
        log = _log_of(zc_daemon, "stalled", since)
    finally:
        s.close()
    assert " ERROR " not in log and "failed: None" not in log, log
    assert "client gone" in log
    status, _ = request(zc_daemon.local(), "GET", "/images/stalled",
                        headers={"Range": "bytes=0-4095"})
    assert status == 206


def test_file_shrinking_under_a_download_is_one_error_line(zc_daemon, image, workdir):
    """The file truncated while a GET streams it: the connection is cut and the log says why in
    one ERROR line (the new size), with no traceback, which is for bugs of the daemon."""
    path = str(workdir / f"shrinks-{zc_daemon.direct}.raw")
    shutil.copyfile(image, path)
    zc_daemon.add_ticket(f"file://{path}", SIZE, ops=["read"], ticket_id="shrinks")
    since = len(zc_daemon.read_log())
    s = _slow_get(zc_daemon, "shrinks")
    try:
        os.truncate(path, MiB)
        got = _drain(s, 10)
    finally:
        s.close()
    assert got < SIZE
    log = _log_of(zc_daemon, "shrinks", since)
    assert "past the end of the image" in log or "shrank" in log, log
    assert "Traceback" not in log, log


def test_stalled_downloads_leave_file_descriptors_for_the_control_socket(workdir, image):
    """Each zero-copy download takes pipes (two fds each) while it fills them: stalled downloads
    on several tickets must not take every fd the daemon may open, or accept() fails and the
    control socket (the way to see and remove those tickets) stops answering."""
    d = Daemon(str(workdir / "daemon-fds"))
    socks = []
    try:
        subprocess.run(["prlimit", f"--pid={d.proc.pid}", "--nofile=300:300"], check=True)
        for t in range(4):
            d.add_ticket(f"file://{image}", SIZE, ops=["read"], ticket_id=f"t{t}")
        for i in range(24):     # nbd_connections (8) on each of 3 tickets, 6 on the 4th
            socks.append(_slow_get(d, f"t{i % 4}"))
        fds = _settled_fd_count(d.proc.pid)     # their pipes are filled, waiting for clients
        assert fds < 250, fds
        conn = d.control()
        conn.timeout = 5
        status, body = request(conn, "GET", "/tickets/t0")
        assert status == 200 and json.loads(body)["active"]
    finally:
        for s in socks:
            s.close()
        d.stop()


def _settled_fd_count(pid, still=1.0, timeout=15):
    """The process's open fd count once it has not changed for `still` seconds."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        n = len(os.listdir(f"/proc/{pid}/fd"))
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= still:
            return n
        time.sleep(0.1)
    return last
