"""Real processes for the tests: qemu-nbd, nbdkit and the nbdproxy daemon, and HTTP clients for them."""

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import nbd

from nbdproxy.client.connections import UnixHTTPConnection

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NBDPROXY = [sys.executable, "-m", "nbdproxy"]


def wait_for_socket(path, proc=None, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The file appears at bind(), before listen(): wait until a connection is accepted.
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        time.sleep(0.01)
    raise TimeoutError(f"no socket at {path}")


class NBDServer:
    """A qemu-nbd or nbdkit process serving one export on a unix socket."""

    def __init__(self, argv, sock):
        self.sock = sock
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_socket(sock, self.proc)
        except Exception:
            self.stop()
            raise

    @property
    def url(self):
        return f"nbd:unix:{self.sock}"

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(10)

    def stop(self, timeout=10):
        # qemu-nbd may miss a SIGTERM sent right after it started: repeat it, then SIGKILL.
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.proc.terminate()
            try:
                self.proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


def qemu_nbd(image, sock, fmt="raw", *extra):
    return NBDServer(["qemu-nbd", "--persistent", "--shared=8", "--cache=writeback",
                      "--format", fmt, "--socket", sock, *extra, image], sock)


def restart(server):
    """A new NBD server process on the same socket path (the killed one left its socket file)."""
    if os.path.exists(server.sock):
        os.unlink(server.sock)
    return type(server)(server.argv, server.sock)


def read_qcow2(image, sock, offset, length):
    """Bytes of a qcow2 image as a fresh read-only qemu-nbd on sock reads them."""
    server = qemu_nbd(image, sock, "qcow2", "--read-only")
    try:
        return read_export(server.sock, offset, length)
    finally:
        server.stop()


def nbdkit(sock, plugin, *args):
    return NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
                      plugin, *args], sock)


def read_export(url_or_sock, offset=0, length=None):
    """Read bytes of an export directly over NBD, to check what the daemon wrote."""
    h = nbd.NBD()
    h.connect_unix(url_or_sock)
    try:
        size = h.get_size()
        length = size - offset if length is None else length
        out = bytearray()
        while len(out) < length:
            n = min(32 * 1024**2, length - len(out))
            out += h.pread(n, offset + len(out))
        return bytes(out)
    finally:
        h.shutdown()


def make_cert(tmpdir):
    """A self-signed certificate for localhost; returns (cert, key) paths."""
    cert = os.path.join(tmpdir, "cert.pem")
    key = os.path.join(tmpdir, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


class Daemon:
    """A running `nbdproxy serve`, its sockets, and clients for them."""

    def __init__(self, tmpdir, cert=None, key=None, args=(), env=None):
        self.tmpdir = tmpdir
        self.control_socket = os.path.join(tmpdir, "control.sock")
        self.local_socket = os.path.join(tmpdir, "local.sock")
        self.cert, self.key = cert, key
        self.log_path = os.path.join(tmpdir, "daemon.log")
        conf_dir = os.path.join(tmpdir, "conf")
        os.makedirs(conf_dir, exist_ok=True)
        argv = NBDPROXY + ["serve", "--conf-dir", conf_dir,
                           "--control-socket", self.control_socket,
                           "--local-socket", self.local_socket,
                           "--host", "127.0.0.1", "--port", "0", "--log-level", "DEBUG"]
        argv += ["--cert-file", cert, "--key-file", key] if cert else ["--no-tls"]
        argv += list(args)
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(argv, stderr=self.log, stdout=self.log, cwd=TOP,
                                     env=dict(os.environ, **(env or {})))
        self.port = self._wait_ready()

    def _wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # The daemon's own line, not a traceback quoting the source that logs it.
            m = re.search(r"(?m)^\S+ \S+ INFO \[nbdproxy.server\] nbdproxy ready (.*)$",
                          self.read_log())
            if m:
                port = re.search(r"remote=https?://\S+:(\d+)", m[1])
                return int(port[1]) if port else None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n"
                                   + self.read_log())
            time.sleep(0.02)
        raise TimeoutError("daemon not ready:\n" + self.read_log())

    def read_log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    # Clients

    def control(self):
        return UnixHTTPConnection(self.control_socket)

    def local(self):
        return UnixHTTPConnection(self.local_socket)

    def remote(self):
        ctx = ssl.create_default_context(cafile=self.cert)
        return http.client.HTTPSConnection("localhost", self.port, context=ctx)

    def add_ticket(self, url, size, ops=("read", "write"), ticket_id="test", **extra):
        ticket = {"uuid": ticket_id, "size": size, "ops": list(ops), "timeout": 300,
                  "url": url, **extra}
        status, body = request(self.control(), "PUT", f"/tickets/{ticket_id}",
                               json.dumps(ticket).encode())
        assert status == 200, body
        return ticket_id

    def ticket_info(self, ticket_id="test"):
        status, body = request(self.control(), "GET", f"/tickets/{ticket_id}")
        assert status == 200, body
        return json.loads(body)


def request(conn, method, url, body=None, headers=None, close=True):
    """One request; (status, body bytes). The connection is closed unless close=False."""
    try:
        conn.request(method, url, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data
    finally:
        if close:
            conn.close()


def put_at(daemon, ticket_id, offset, data, flush=False):
    """PUT data at offset of a ticket on the local socket; its status."""
    headers = {"Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"}
    return request(daemon.local(), "PUT", f"/images/{ticket_id}?flush={'y' if flush else 'n'}",
                   data, headers)[0]


def patch_json(daemon, ticket_id, msg):
    """PATCH a JSON message to a ticket on the local socket; (status, body)."""
    return request(daemon.local(), "PATCH", f"/images/{ticket_id}", json.dumps(msg).encode())


def response(conn, method, url, body=None, headers=None):
    """One request on a kept connection; the http.client response with its body read as .data."""
    conn.request(method, url, body=body, headers=headers or {})
    resp = conn.getresponse()
    resp.data = resp.read()
    return resp


def raw_exchange(address, data, timeout=5):
    """Send raw bytes on a new connection and return all that comes back until it closes."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


def export_size(sock):
    h = nbd.NBD()
    h.connect_unix(sock)
    try:
        return h.get_size()
    finally:
        h.shutdown()


class exported:
    """A ticket (read-only unless ops say otherwise) for an NBD server, for the time of a with
    block; then the ticket is deleted (closing the daemon's NBD connections) and the server
    stopped. The size defaults to the export's."""

    def __init__(self, daemon, server, ticket_id="test", size=None, **ticket):
        self.daemon, self.server, self.ticket_id = daemon, server, ticket_id
        ticket.setdefault("ops", ["read"])
        try:
            if size is None:
                size = export_size(server.sock)
            daemon.add_ticket(server.url, size, ticket_id=ticket_id, **ticket)
        except BaseException:
            server.stop()
            raise

    def __enter__(self):
        return self.server

    def __exit__(self, *exc):
        try:
            status, _ = request(self.daemon.control(), "DELETE", f"/tickets/{self.ticket_id}")
            assert status == 204
        finally:
            self.server.stop()


class StubServer:
    """A TCP server whose every connection is served by self.serve(conn, rfile) on a thread of
    its own, until the peer or close() ends it: the base of the upstreams tests script. Set what
    serve() needs before calling __init__ (the accept thread starts there)."""

    def __init__(self, host="127.0.0.1"):
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            self.serve(conn, conn.makefile("rb"))
        except OSError:
            pass

    def serve(self, conn, rfile):
        raise NotImplementedError

    def close(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def read_head(rfile):
    """(request line, {lowercased name: value}) of the next request, or (None, None) at the end."""
    line = rfile.readline()
    if not line:
        return None, None
    headers = {}
    while True:
        h = rfile.readline()
        if h in (b"\r\n", b""):
            return line, headers
        k, _, v = h.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
