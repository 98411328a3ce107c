"""Issue 12, the server's part: connection slots, descriptors, signals, a client gone before
100 Continue, request framing, and smaller limits of the request head."""

import http.client
import os
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

from nbdproxy.client.connections import UnixHTTPConnection

from support import NBDPROXY, TOP, Daemon, make_cert, nbdkit, raw_exchange, read_export, request

MiB = 1024**2


def wait_until(predicate, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def metrics(daemon):
    status, body = request(daemon.control(), "GET", "/metrics")
    assert status == 200
    return body.decode()


def metric(daemon, name):
    for line in metrics(daemon).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def https(daemon, timeout=10):
    ctx = ssl.create_default_context(cafile=daemon.cert)
    return http.client.HTTPSConnection("localhost", daemon.port, context=ctx, timeout=timeout)


def status_of(data):
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    assert m, data[:200]
    return int(m[1])


@pytest.fixture
def mem(tmp_path):
    server = nbdkit(str(tmp_path / "mem.sock"), "memory", "size=64M")
    yield server
    server.stop()


# 2. Slots held by clients without a ticket

class Flood:
    """Connections to the TLS service that keep sending requests needing no ticket (GET /info/,
    OPTIONS /images/*, a 404), each reconnecting when the daemon closes it, as an attacker
    would."""

    REQUESTS = [("GET", "/info/"), ("OPTIONS", "/images/*"), ("GET", "/nothing/here")]

    def __init__(self, daemon, n):
        self.daemon = daemon
        self.conns = [https(daemon, timeout=5) for _ in range(n)]
        for conn in self.conns:
            self._ask(conn, 0)
        self.closed = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _ask(self, conn, i):
        method, path = self.REQUESTS[i % len(self.REQUESTS)]
        conn.request(method, path)
        resp = conn.getresponse()
        resp.read()
        return resp.status

    def _run(self):
        i = 0
        while not self.stopping:
            for k, conn in enumerate(self.conns):
                if self.stopping:
                    break
                i += 1
                try:
                    self._ask(conn, i)
                except (OSError, http.client.HTTPException):
                    self.closed += 1
                    conn.close()
                    self.conns[k] = https(self.daemon, timeout=5)
            time.sleep(0.05)

    def stop(self):
        self.stopping = True
        self.thread.join(30)
        for conn in self.conns:
            conn.close()


def transfer(conn, ticket_id, offset, size=MiB):
    """A PUT and the GET of the same bytes on one connection; the bytes written."""
    data = os.urandom(size)
    conn.request("PUT", f"/images/{ticket_id}", data,
                 {"Content-Range": f"bytes {offset}-{offset + size - 1}/*"})
    resp = conn.getresponse()
    assert resp.status == 200, (resp.status, resp.read())
    resp.read()
    conn.request("GET", f"/images/{ticket_id}",
                 headers={"Range": f"bytes={offset}-{offset + size - 1}"})
    resp = conn.getresponse()
    assert resp.status == 206
    assert resp.read() == data
    return data


def test_ticketless_flood_does_not_stop_ticket_holders(tmp_path, cert, mem):
    """64 TLS connections (the default max_connections) that keep sending GET /info/, OPTIONS
    /images/* and 404s: a ticket holder on the TCP service takes the place of one of them, and
    one on the local socket, which has slots of its own, is not affected at all."""
    d = Daemon(str(tmp_path), *cert)
    flood = None
    try:
        d.add_ticket(mem.url, 64 * MiB, ticket_id="t")
        flood = Flood(d, 64)
        time.sleep(2.2)     # server.PENDING_GRACE
        written = {}
        for i, connect in enumerate([d.local, lambda: https(d), d.local, lambda: https(d)]):
            conn = connect()
            try:
                written[i * MiB] = transfer(conn, "t", i * MiB)
                time.sleep(0.3)     # the flood keeps going meanwhile
                # A connection that used a valid ticket is never closed to make room.
                written[(i + 8) * MiB] = transfer(conn, "t", (i + 8) * MiB)
            finally:
                conn.close()
        assert flood.closed >= 2    # both TCP ticket holders took the place of one each
        assert "to make room" in d.read_log()
    finally:
        if flood is not None:
            flood.stop()
        assert d.stop() == 0
    for offset, data in written.items():
        assert read_export(mem.sock, offset, len(data)) == data


def test_ticket_holders_are_never_closed_to_make_room(tmp_path, cert, mem):
    """At the limit with only ticket holders, a new connection gets 503: none of them is closed
    to make room, however old and idle."""
    d = Daemon(str(tmp_path), *cert, args=["--max-connections", "2"])
    try:
        d.add_ticket(mem.url, 64 * MiB, ticket_id="t")
        holders = [d.local(), d.local()]
        for conn in holders:
            conn.request("OPTIONS", "/images/t")
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
        time.sleep(2.2)     # server.PENDING_GRACE
        assert request(d.local(), "GET", "/images/t",
                       headers={"Range": "bytes=0-99"})[0] == 503
        for i, conn in enumerate(holders):
            transfer(conn, "t", i * MiB, 65536)
            conn.close()
        assert "to make room" not in d.read_log()
    finally:
        assert d.stop() == 0


# 3. Out of file descriptors

class LimitedDaemon:
    """`nbdproxy serve` (local socket and control socket only) under a RLIMIT_NOFILE of its own."""

    def __init__(self, tmpdir, soft, hard, args=()):
        self.control_socket = os.path.join(tmpdir, "control.sock")
        self.local_socket = os.path.join(tmpdir, "local.sock")
        self.log_path = os.path.join(tmpdir, "daemon.log")
        os.makedirs(os.path.join(tmpdir, "conf"), exist_ok=True)
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            NBDPROXY + ["serve", "--conf-dir", os.path.join(tmpdir, "conf"),
                        "--control-socket", self.control_socket,
                        "--local-socket", self.local_socket, "--port", "-1", *args],
            stdout=self.log, stderr=self.log, cwd=TOP,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
        assert wait_until(lambda: "nbdproxy ready" in self.read_log()
                          or self.proc.poll() is not None, 15)
        assert self.proc.poll() is None, self.read_log()

    def read_log(self):
        with open(self.log_path) as f:
            return f.read()

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def unix_connection(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def test_accept_out_of_descriptors_backs_off(tmp_path):
    """With every descriptor in use, accept() fails with EMFILE: the daemon pauses accepting
    (logging it once) instead of spinning on a core, and serves again once some close."""
    d = LimitedDaemon(str(tmp_path), 40, 40, ["--max-connections", "200"])
    held = []
    try:
        for _ in range(40):      # about 20 descriptors are the daemon's own
            held.append(unix_connection(d.local_socket))
        assert wait_until(lambda: "accept failed" in d.read_log(), 5), d.read_log()
        time.sleep(0.2)
        lines, cpu, t0 = d.read_log().count("\n"), d.cpu_seconds(), time.monotonic()
        time.sleep(1.5)
        elapsed = time.monotonic() - t0
        cpu = d.cpu_seconds() - cpu
        lines = d.read_log().count("\n") - lines
        assert cpu < 0.25 * elapsed, f"{cpu:.2f} s of CPU in {elapsed:.2f} s"
        assert lines <= 2, d.read_log()[-2000:]
        assert d.read_log().count("accept failed") == 1
        for s in held:
            s.close()
        held = []
        # The connections left in the backlog are accepted (and closed), then new ones served.
        def served():
            try:
                return request(UnixHTTPConnection(d.local_socket, timeout=5), "OPTIONS",
                               "/images/*")[0] == 200
            except OSError:
                return False
        assert wait_until(served, 10, 0.2)
        assert "accepting connections again" in d.read_log()
    finally:
        for s in held:
            s.close()
        assert d.stop() == 0
    assert "Traceback" not in d.read_log()


def test_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path):
    d = LimitedDaemon(str(tmp_path), 256, 4096)
    try:
        with open(f"/proc/{d.proc.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        assert d.stop() == 0


def test_control_connections_are_limited(tmp_path):
    """At most 16 control connections at once; the ones beyond are closed at once, and the
    control API works again once some close."""
    d = LimitedDaemon(str(tmp_path), 1024, 1024)
    conns = []
    try:
        for _ in range(20):
            conns.append(unix_connection(d.control_socket))
        time.sleep(0.5)
        closed = [s for s in conns if select.select([s], [], [], 0)[0] and not s.recv(1)]
        assert len(closed) == 4
        for s in conns:
            s.close()
        conns = []

        def control_answers():
            # Until the daemon has seen the 16 close, a new one is still closed at once.
            try:
                return request(UnixHTTPConnection(d.control_socket), "GET", "/tickets/")[0] == 200
            except OSError:
                return False

        assert wait_until(control_answers, 5)
    finally:
        for s in conns:
            s.close()
        assert d.stop() == 0


# 6. Signals

def peer_certificate(daemon):
    ctx = ssl.create_default_context(cafile=None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def der(cert_path):
    with open(cert_path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def test_sighup_reloads_certificate_while_transfer_runs(tmp_path, mem):
    first = make_cert(str(tmp_path))
    os.makedirs(tmp_path / "next")
    second = make_cert(str(tmp_path / "next"))
    cert, key = str(tmp_path / "live-cert.pem"), str(tmp_path / "live-key.pem")
    shutil.copy(first[0], cert)
    shutil.copy(first[1], key)
    d = Daemon(str(tmp_path / "d"), cert, key)
    try:
        d.add_ticket(mem.url, 64 * MiB, ticket_id="t")
        assert peer_certificate(d) == der(first[0])
        # A TLS upload in progress: head and 1 MiB of its 4 MiB sent.
        payload = os.urandom(4 * MiB)
        put = ssl.create_default_context(cafile=first[0]).wrap_socket(
            socket.create_connection(("127.0.0.1", d.port), timeout=30),
            server_hostname="localhost")
        put.sendall(b"PUT /images/t HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                    % len(payload) + payload[:MiB])
        assert wait_until(lambda: d.ticket_info("t")["active"], 5)
        # Rotate the files, and SIGHUP.
        shutil.copy(second[0], cert)
        shutil.copy(second[1], key)
        d.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded certificate" in d.read_log(), 5), d.read_log()
        assert peer_certificate(d) == der(second[0])
        # The transfer started before goes on to its end.
        put.sendall(payload[MiB:])
        answer = put.recv(65536)
        put.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert read_export(mem.sock, 0, len(payload)) == payload
        # A pair that cannot be loaded keeps the current one in use, with an error logged.
        with open(key, "w") as f:
            f.write("not a key\n")
        d.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "keeping the current certificate" in d.read_log(), 5)
        assert peer_certificate(d) == der(second[0])
        # SIGUSR1 and SIGUSR2 are ignored, with a line each.
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            d.proc.send_signal(sig)
        assert wait_until(lambda: "ignoring SIGUSR2" in d.read_log(), 5)
        assert "ignoring SIGUSR1" in d.read_log()
        assert request(d.remote(), "GET", "/info/")[0] == 200   # d.cert holds the second
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0
    assert not os.path.exists(d.control_socket) and not os.path.exists(d.local_socket)
    assert "Traceback" not in d.read_log()


def test_sighup_without_tls_changes_nothing(tmp_path):
    d = Daemon(str(tmp_path))
    try:
        d.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "no TLS certificate to reload" in d.read_log(), 5)
        assert request(d.control(), "GET", "/tickets/")[0] == 200
    finally:
        assert d.stop() == 0


# 9. A client gone before 100 Continue

def server_errors(daemon):
    text = metrics(daemon)
    fives = sum(int(m[1]) for m in re.finditer(r'status="5\d\d"\} (\d+)', text))
    return fives, metric(daemon, "nbdproxy_errors_total")


@pytest.mark.parametrize("service", ["local", "remote"])
def test_client_gone_before_100_continue_is_not_a_server_error(tmp_path, cert, service):
    # The NBD server takes 0.5 s to open: the client is gone before the daemon, having
    # authorized the PUT, answers 100 Continue.
    slow = nbdkit(str(tmp_path / "slow.sock"), "--filter=delay", "memory", "size=64M",
                  "delay-open=500ms")
    d = Daemon(str(tmp_path), *cert)
    try:
        d.add_ticket(slow.url, 64 * MiB, ticket_id="t")
        assert server_errors(d) == (0, 0)
        if service == "local":
            s = unix_connection(d.local_socket)
        else:
            s = ssl.create_default_context(cafile=cert[0]).wrap_socket(
                socket.create_connection(("127.0.0.1", d.port), timeout=10),
                server_hostname="localhost")
        s.sendall(b"PUT /images/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert wait_until(lambda: d.ticket_info("t")["connections"] == 1, 5)
        # Gone, with a reset on TCP: the daemon's 100 Continue finds no one.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        assert wait_until(lambda: "client gone" in d.read_log(), 5), d.read_log()
        assert wait_until(lambda: f"service={service} requests=1" in d.read_log(), 5)
        assert server_errors(d) == (0, 0)
        log = d.read_log()
        assert " ERROR " not in log and "Traceback" not in log, log
        assert log.count("client gone") == 1
        assert "sending the response failed" not in log
        # The ticket still works.
        assert request(d.local(), "PUT", "/images/t", b"x" * 4096)[0] == 200
    finally:
        assert d.stop() == 0
        slow.stop()


# 10. Request framing

@pytest.fixture
def framing(tmp_path, cert, mem):
    d = Daemon(str(tmp_path), *cert)
    d.add_ticket(mem.url, 64 * MiB, ticket_id="t")
    yield d
    assert d.stop() == 0


@pytest.mark.parametrize("te", ["chunked", "Chunked", "gzip, chunked"])
def test_content_length_and_transfer_encoding_together(framing, mem, te):
    """Two framings in one request: 400, Connection: close, and the connection closes; what
    either framing would have read as a body, or as a next request, is never served."""
    smuggled = b"PUT /images/t HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nEVIL"
    body = b"5\r\nhello\r\n0\r\n\r\n" + smuggled
    raw = (b"PUT /images/t HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
           b"Transfer-Encoding: %s\r\n\r\n" % (len(body), te.encode()) + body)
    out = raw_exchange(framing.local_socket, raw)   # returns once the daemon closed
    assert status_of(out) == 400
    assert out.count(b"HTTP/1.1 ") == 1
    assert b"\r\nConnection: close\r\n" in out
    assert read_export(mem.sock, 0, 8) == bytes(8)


@pytest.mark.parametrize("size", [b"0x5", b"+5", b"0_5", b"-0", b" 5 5", b"5 5", b"\xd9\xa5"])
def test_chunk_size_is_hexdig_only(framing, mem, size):
    raw = (b"PUT /images/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           + size + b"\r\nhello\r\n0\r\n\r\n")
    out = raw_exchange(framing.local_socket, raw)
    assert status_of(out) == 400
    assert b"Invalid chunk size" in out
    assert read_export(mem.sock, 0, 8) == bytes(8)


def test_chunk_sizes_in_hexdig_are_served(framing, mem):
    raw = (b"PUT /images/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n"
           b"0000A\r\n0123456789\r\na;ext=1\r\nabcdefghij\r\n00\r\n\r\n")
    out = raw_exchange(framing.local_socket, raw)
    assert status_of(out) == 200, out
    assert read_export(mem.sock, 0, 20) == b"0123456789abcdefghij"


# 14. Smaller ones: HEAD errors, an empty abstract name, the size of a request head

def test_400_to_head_has_no_body(framing):
    for raw in [b"HEAD /images/t HTTP/1.1\r\nBad header\r\n\r\n",
                b"HEAD /images/t HTTP/1.1\r\nContent-Length: 1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"]:
        out = raw_exchange(framing.local_socket, raw)
        assert status_of(out) == 400
        head, sep, rest = out.partition(b"\r\n\r\n")
        assert sep and rest == b"", out
    # A 431 to HEAD neither.
    out = raw_exchange(framing.local_socket,
                       b"HEAD /images/t HTTP/1.1\r\nX: " + b"v" * 70000 + b"\r\n\r\n")
    assert status_of(out) == 431 and out.endswith(b"\r\n\r\n")


def test_empty_abstract_name_is_refused(tmp_path):
    os.makedirs(tmp_path / "conf")
    proc = subprocess.run(NBDPROXY + ["serve", "--conf-dir", str(tmp_path / "conf"),
                                      "--control-socket", str(tmp_path / "control.sock"),
                                      "--local-socket", "@", "--port", "-1"],
                          cwd=TOP, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "local_socket" in lines[0] and "@" in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "control.sock")


def test_request_head_is_at_most_64_kib(framing):
    line = b"OPTIONS /images/t HTTP/1.1\r\n"
    end = b"Connection: close\r\n\r\n"
    # Two header lines of 40 KiB: each within the old per-line limit, 80 KiB in all.
    big = line + b"X-A: " + b"a" * 40960 + b"\r\nX-B: " + b"b" * 40960 + b"\r\n" + end
    out = raw_exchange(framing.local_socket, big)
    assert status_of(out) == 431
    assert b"Connection: close" in out
    # 64 KiB in all, the request line and the blank line included, is served.
    filler = 65536 - len(line) - len(end) - len(b"X-A: \r\n")
    exact = line + b"X-A: " + b"a" * filler + b"\r\n" + end
    assert len(exact) == 65536
    assert status_of(raw_exchange(framing.local_socket, exact)) == 200
    over = line + b"X-A: " + b"a" * (filler + 1) + b"\r\n" + end
    assert status_of(raw_exchange(framing.local_socket, over)) == 431
    # Many small lines add up too (70 lines of 1 KiB).
    many = line + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70)) + end
    assert status_of(raw_exchange(framing.local_socket, many)) == 431
    # The request line limit stays 4096 (414).
    long_line = b"GET /images/" + b"t" * 5000 + b" HTTP/1.1\r\n\r\n"
    assert status_of(raw_exchange(framing.local_socket, long_line)) == 414


def test_503_to_head_has_no_body(tmp_path, cert, mem):
    """The one place is held by a ticket holder (never closed to make room): after waiting in
    line, the 503 to HEAD has no body."""
    d = Daemon(str(tmp_path), *cert, args=["--max-connections", "1"])
    try:
        d.add_ticket(mem.url, MiB)
        kept = d.local()
        kept.request("OPTIONS", "/images/test")
        kept.getresponse().read()
        out = raw_exchange(d.local_socket, b"HEAD /images/t HTTP/1.1\r\nHost: x\r\n\r\n", 15)
        assert status_of(out) == 503 and out.endswith(b"\r\n\r\n"), out
        kept.close()
    finally:
        assert d.stop() == 0
