"""Defects a hostile review of issues 11 and 12 found in the daemon (smuggling, lost-write state
across a ticket replaced, a stalled flush, surrogates, huge timeouts, reconnecting flooders,
signals); each test failed before its fix."""

import http.client
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from support import Daemon, patch_json as patch, put_at as put, qemu_nbd, request, restart

MiB = 1024**2


@pytest.fixture
def qcow2(tmp_path):
    image = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    return image


def test_replacing_ticket_forgets_lost_writes(tmp_path, cert, qcow2):
    """PUT ?flush=n, the NBD server dies and restarts, the operator re-adds the same ticket
    (PUT /tickets/test with the same body, e.g. to change its timeout): the old pool's close
    finds the writes lost, but the client's flush through the same ticket id answers 200."""
    server = qemu_nbd(qcow2, str(tmp_path / "nbd.sock"), "qcow2")
    d = Daemon(str(tmp_path / "d"), *cert, args=["--nbd-idle-timeout", "60"])
    try:
        d.add_ticket(server.url, 64 * MiB)
        assert put(d, "test", MiB, os.urandom(4 * MiB)) == 200
        server.kill()
        server = restart(server)
        d.add_ticket(server.url, 64 * MiB)          # same id, same URL: replaced
        assert "acknowledged bytes may be lost" in d.read_log()
        assert patch(d, "test", {"op": "flush"})[0] == 500
    finally:
        d.stop()
        server.stop()


# Client downloads from servers that do not answer the range asked.

def cli(*args, timeout=120):
    return subprocess.run(NBDPROXY + [str(a) for a in args], cwd=TOP, capture_output=True,
                          text=True, timeout=timeout)


class RangeServer:
    """Plain HTTP: OPTIONS gives size and features (no extents, so the client copies all), GET
    answers with `mode`: "ignore" (200, the whole image, chunked: a server or proxy that
    ignores Range), "shifted" (206 with the right length but the bytes and Content-Range of
    offset 0), "lying-extents" (extents that end early)."""

    def __init__(self, data, mode):
        import http.server
        fake = self
        self.data, self.mode = data, mode

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_OPTIONS(self):
                features = ["extents"] if fake.mode == "lying-extents" else []
                self._json({"features": features, "max_readers": 1, "size": len(fake.data)})

            def do_GET(self):
                if "/extents" in self.path:
                    return self._json([{"start": 0, "length": 4096, "zero": False,
                                        "hole": False}])
                a, b = map(int, self.headers["Range"][len("bytes="):].split("-"))
                if fake.mode == "ignore":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(fake.data), 65536):
                        chunk = fake.data[i:i + 65536]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                n = b - a + 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes 0-{n - 1}/{len(fake.data)}")
                self.send_header("Content-Length", str(n))
                self.end_headers()
                self.wfile.write(fake.data[:n])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/images/fake"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()



# Request framing: a Transfer-Encoding that is not chunked.

@pytest.fixture
def mem_daemon(tmp_path, cert):
    from support import nbdkit
    server = nbdkit(str(tmp_path / "mem.sock"), "memory", "size=1M")
    d = Daemon(str(tmp_path / "d"), *cert)
    d.add_ticket(server.url, MiB)
    yield d
    d.stop()
    server.stop()


def exchange(path, data, wait=1.0):
    """Send data on a new unix-socket connection; all that comes back until close or wait."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(data)
        s.settimeout(wait)
        out = b""
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    return out, True
                out += got
        except socket.timeout:
            return out, False


@pytest.mark.parametrize("method", ["PUT", "OPTIONS"])
@pytest.mark.parametrize("te", ["gzip", "identity"])
def test_transfer_encoding_not_chunked_is_refused(mem_daemon, te, method):
    """RFC 9112 6.3: a request whose Transfer-Encoding does not end in chunked has no
    determinable length: 400 and close. The daemon instead takes the body as empty, keeps the
    connection, and serves the body as a second request (request smuggling behind a proxy)."""
    inner = b"GET /images/test/extents HTTP/1.1\r\nHost: x\r\n\r\n"
    out, closed = exchange(mem_daemon.local_socket,
                           f"{method} /images/test HTTP/1.1\r\nHost: x\r\n"
                           f"Transfer-Encoding: {te}\r\n\r\n".encode() + inner)
    assert out.count(b"HTTP/1.1 ") == 1, out
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert closed


# Ticket strings that are not Unicode scalar values (JSON "\ud800"): accepted, then every
# request of the ticket is a 500 with a traceback in the log.

def put_ticket(d, ticket_id, body):
    return request(d.control(), "PUT", f"/tickets/{ticket_id}", body.encode())


@pytest.mark.parametrize("field,value", [
    ("filename", '"\\ud800disk.raw"'),
    ("url", None),
])
def test_lone_surrogate_in_ticket_string(mem_daemon, field, value):
    d = mem_daemon
    url = json.dumps(d.ticket_info()["url"])
    if field == "url":
        url = url[:-1] + '\\udc80"'
    extra = f', "{field}": {value}' if value else ""
    body = (f'{{"uuid": "s", "size": 4096, "ops": ["read"], "timeout": 60, "url": {url}'
            f'{extra}}}')
    status, _ = put_ticket(d, "s", body)
    if status == 200:
        # Accepted: then the ticket must work (or fail as a client error, not a 500).
        status, _ = request(d.local(), "GET", "/images/s", headers={"Range": "bytes=0-3"})
        assert status != 500, "accepted ticket whose every GET is a 500"
        assert "Traceback" not in d.read_log()
    else:
        assert status == 400


def test_huge_nbd_connect_timeout_breaks_every_request(tmp_path, cert):
    """nbd_connect_timeout=3000000 (35 days; any value over 2**31 ms) passes the config check,
    then libnbd's poll() gets an int that overflows: every request is a 500 with an
    OverflowError traceback. Expected: refused at start with one line, or clamped."""
    from support import nbdkit
    server = nbdkit(str(tmp_path / "mem.sock"), "memory", "size=1M")
    try:
        try:
            d = Daemon(str(tmp_path / "d"), *cert, args=["--nbd-connect-timeout", "3000000"])
        except RuntimeError:
            return      # refused at start: fine
        try:
            d.add_ticket(server.url, MiB)
            status, _ = request(d.local(), "OPTIONS", "/images/test")
            assert status == 200
        finally:
            d.stop()
    finally:
        server.stop()


def test_flooders_that_reconnect_within_the_grace_lock_out_ticket_holders(tmp_path, cert):
    """Issue 12 item 2's rule evicts only connections accepted more than 2 s ago: clients
    without a ticket that reconnect every 1.5 s (here 24 of them against max_connections=16,
    16 connections/s; 43/s against the default 64) keep every slot young, and a ticket holder
    gets 503 most of the time. Expected: a ticket holder finishes its requests."""
    from support import nbdkit
    server = nbdkit(str(tmp_path / "mem.sock"), "memory", "size=1M")
    d = Daemon(str(tmp_path / "d"), *cert, args=["--max-connections", "16"])
    stop = threading.Event()

    def flooder():
        while not stop.is_set():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(d.local_socket)
                    s.sendall(b"OPTIONS /images/* HTTP/1.1\r\nHost: x\r\n\r\n")
                    s.recv(4096)
                except OSError:
                    pass
                stop.wait(1.5)

    threads = [threading.Thread(target=flooder, daemon=True) for _ in range(24)]
    try:
        d.add_ticket(server.url, MiB)
        for t in threads:
            t.start()
            time.sleep(0.05)
        time.sleep(2)
        statuses = []
        for _ in range(8):
            statuses.append(request(d.local(), "OPTIONS", "/images/test")[0])
            time.sleep(0.2)
        assert statuses.count(200) == len(statuses), statuses
    finally:
        stop.set()
        for t in threads:
            t.join()
        d.stop()
        server.stop()


def test_one_stalled_flush_stops_idle_closing_for_every_ticket(tmp_path, cert):
    """The daemon has one IdleCloser thread, and it flushes a connection before closing it.
    A ticket whose NBD server never answers FLUSH (here an nbdkit eval plugin whose flush
    sleeps) blocks that thread for nbd_timeout: meanwhile no other ticket's idle connection
    is closed, so a second ticket on a `qemu-nbd --shared=1` export waits for the slot and
    gets 503 - the exact hang API.md 7e's nbd_idle_timeout is there to prevent."""
    from support import NBDServer
    stall_sock = str(tmp_path / "stall.sock")
    stall = NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix", stall_sock,
                       "eval", "get_size=echo 1048576", "can_write=exit 0",
                       "can_flush=exit 0", "pread=dd if=/dev/zero count=$3 iflag=count_bytes",
                       "pwrite=cat >/dev/null", "flush=sleep 60"], stall_sock)
    raw = str(tmp_path / "disk.raw")
    with open(raw, "wb") as f:
        f.truncate(MiB)
    single = qemu_nbd(raw, str(tmp_path / "single.sock"), "raw", "--shared=1")
    d = Daemon(str(tmp_path / "d"), *cert, args=["--nbd-idle-timeout", "1",
                                                  "--nbd-connect-timeout", "4",
                                                  "--nbd-timeout", "60"])
    try:
        d.add_ticket(f"nbd:unix:{stall_sock}", MiB, ticket_id="stall")
        d.add_ticket(single.url, MiB, ticket_id="one")
        d.add_ticket(single.url, MiB, ticket_id="two")
        assert put(d, "stall", 0, b"x" * 4096) == 200
        time.sleep(1.5)     # the idle closer is now flushing "stall"'s connection
        assert request(d.local(), "GET", "/images/one", headers={"Range": "bytes=0-3"})[0] == 206
        time.sleep(2)       # "one"'s connection is idle past nbd_idle_timeout
        status, body = request(d.local(), "GET", "/images/two", headers={"Range": "bytes=0-3"})
        assert status == 206, body
    finally:
        stall.kill()        # first, at once: nbdkit and the daemon would wait for its flush
        d.stop(timeout=10)
        single.stop()
        stall.stop()        # its socket and pipe


def test_sigalrm_does_not_kill_the_daemon(tmp_path):
    """Issue 12 item 6 handled HUP, USR1 and USR2; SIGALRM (likewise SIGVTALRM, SIGPROF) still
    kills the daemon at once (exit -14), transfers cut and the socket files left behind.
    Expected: ignored with a log line, as USR1/USR2."""
    import signal
    d = Daemon(str(tmp_path / "d"))
    try:
        d.proc.send_signal(signal.SIGALRM)
        time.sleep(0.5)
        assert d.proc.poll() is None, f"daemon died: {d.proc.returncode}"
    finally:
        d.stop()
    assert not os.path.exists(d.control_socket)


@pytest.mark.parametrize("query", ["start=%EF%BC%91", "start=1_0", "start=+1", "length=-1",
                                   "length=%D9%A1", "start=x"])
def test_extents_window_is_ascii_digits(mem_daemon, query):
    """int() takes '1_0', '+1' and full-width digits: the window's numbers are ASCII digits."""
    status, body = request(mem_daemon.local(), "GET", f"/images/test/extents?{query}")
    assert status == 400, body
