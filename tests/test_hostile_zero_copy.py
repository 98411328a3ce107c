"""Zero-copy downloads of file tickets against hostile clients: what the daemon logs and leaves
behind when the client goes away or stops reading in the middle of a body."""

import json
import os
import re
import socket
import subprocess
import time

import pytest

from support import Daemon, request

MiB = 1024**2
SIZE = 24 * MiB


@pytest.fixture(scope="module")
def image(workdir):
    path = str(workdir / "disk.raw")
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    return path


@pytest.fixture(scope="module", params=["buffered", "direct"])
def zc_daemon(request, workdir):
    args = ["--no-file-direct"] if request.param == "buffered" else []
    d = Daemon(str(workdir / f"daemon-{request.param}"), args=args)
    yield d
    d.stop()


def _get(daemon, ticket_id):
    """A GET on the local socket whose response head was read; the body is left unread."""
    s = socket.socket(socket.AF_UNIX)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(daemon.local_socket)
    s.sendall(f"GET /images/{ticket_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200")
    return s


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
    s = _get(zc_daemon, "gone")
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
    s = _get(zc_daemon, "stalled")
    try:
        log = _log_of(zc_daemon, "stalled", since)
    finally:
        s.close()
    assert " ERROR " not in log and "failed: None" not in log, log
    assert "client gone" in log
    status, _ = request(zc_daemon.local(), "GET", "/images/stalled",
                        headers={"Range": "bytes=0-4095"})
    assert status == 206


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
            socks.append(_get(d, f"t{i % 4}"))
        time.sleep(0.5)         # their pipes are filled and wait for the clients
        conn = d.control()
        conn.timeout = 5
        status, body = request(conn, "GET", "/tickets/t0")
        assert status == 200 and json.loads(body)["active"]
    finally:
        for s in socks:
            s.close()
        d.stop()
