"""`nbdproxy serve`: its flags and INI files, its sockets, its errors, its signals and its logs."""

import grp
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import time
import uuid

import pytest

from nbdproxy.client.connections import UnixHTTPConnection

from support import (NBDPROXY, TOP, Daemon, NBDServer, read_export, request, response,
                     wait_for_socket)

MiB = 1024**2


class Serve:
    """`nbdproxy serve` with exactly the given arguments (besides --conf-dir)."""

    def __init__(self, tmpdir, args, conf_dir=None, ready=True):
        self.tmpdir = str(tmpdir)
        self.conf_dir = conf_dir or os.path.join(self.tmpdir, "conf")
        os.makedirs(self.conf_dir, exist_ok=True)
        self.log_path = os.path.join(self.tmpdir, f"serve-{uuid.uuid4().hex[:8]}.log")
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(NBDPROXY + ["serve", "--conf-dir", self.conf_dir, *args],
                                     stdout=self.log, stderr=self.log, cwd=TOP)
        if ready:
            self.wait_log("nbdproxy ready")

    def read_log(self):
        with open(self.log_path) as f:
            return f.read()

    def wait_log(self, pattern, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.read_log())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n"
                                     + self.read_log())
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in the log:\n" + self.read_log())

    @property
    def ready_line(self):
        return re.search(r"nbdproxy ready.*", self.read_log())[0]

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path):
    """serve(args, ...) starts a daemon that is stopped at the end of the test."""
    started = []

    def start(args, **kw):
        s = Serve(tmp_path, args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
        s.log.close()


def base_args(tmp_path, **overrides):
    """Control socket in tmp_path, no local socket, TCP off: a daemon that touches nothing else."""
    args = {"--control-socket": str(tmp_path / "control.sock"), "--local-socket": "none",
            "--port": "-1", **overrides}
    return [x for k, v in args.items() if v is not None for x in (k, v)]


def fail(tmp_path, args, conf_dir=None):
    """Run `nbdproxy serve` that must fail; return its one error line."""
    conf_dir = conf_dir or str(tmp_path / "conf")
    os.makedirs(conf_dir, exist_ok=True)
    proc = subprocess.run(NBDPROXY + ["serve", "--conf-dir", conf_dir, *args], cwd=TOP,
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode not in (0, None), proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return lines[0]


def abstract_name():
    return f"@nbdproxy-test-{uuid.uuid4().hex}"


def options_star(conn):
    resp = response(conn, "OPTIONS", "/images/*")
    conn.close()
    assert resp.status == 200
    return json.loads(resp.data)


def add_ticket(control_path, url, size, ops=("read", "write"), ticket_id="test", **extra):
    body = {"uuid": ticket_id, "size": size, "ops": list(ops), "timeout": 300, "url": url,
            **extra}
    status, data = request(UnixHTTPConnection(control_path), "PUT", f"/tickets/{ticket_id}",
                           json.dumps(body).encode())
    assert status == 200, data


def ticket_info(control_path, ticket_id="test"):
    status, data = request(UnixHTTPConnection(control_path), "GET", f"/tickets/{ticket_id}")
    assert status == 200, data
    return json.loads(data)


def connect_refused(address, family=socket.AF_UNIX):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
    return False


def nbdkit_memory(tmp_path, size="16M", *extra):
    sock = str(tmp_path / f"mem-{uuid.uuid4().hex[:6]}.sock")
    return NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock, *extra,
                      "memory", f"size={size}"], sock)


@pytest.fixture
def mem(tmp_path):
    server = nbdkit_memory(tmp_path)
    yield server
    server.stop()


def start_put(address, ticket_id, payload, first, family=socket.AF_UNIX):
    """A PUT whose body is only partly sent; returns the socket."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(address)
    s.sendall(f"PUT /images/{ticket_id}?flush=y HTTP/1.1\r\nHost: x\r\n"
              f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload[:first])
    return s


def read_answer(s):
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


# The ready line, and the sockets

def test_ready_line(daemon):
    line = re.search(r"nbdproxy ready.*", daemon.read_log())[0]
    assert f"control={daemon.control_socket}" in line
    assert f"local={daemon.local_socket}" in line
    assert f"remote=https://127.0.0.1:{daemon.port}" in line
    assert daemon.read_log().count("nbdproxy ready") == 1


def test_control_socket_mode(daemon):
    st = os.stat(daemon.control_socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert options_star(daemon.local())["unix_socket"] == daemon.local_socket
    status, body = request(daemon.control(), "GET", "/tickets/")
    assert status == 200 and json.loads(body) == []


def test_control_group(tmp_path, serve):
    group = grp.getgrnam("daemon")
    s = serve(base_args(tmp_path) + ["--control-group", "daemon"])
    st = os.stat(tmp_path / "control.sock")
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == group.gr_gid
    assert s.stop() == 0


def test_control_group_unknown(tmp_path):
    line = fail(tmp_path, base_args(tmp_path) + ["--control-group", "no-such-group-xyz"])
    assert "no-such-group-xyz" in line
    assert not os.path.exists(tmp_path / "control.sock")


def test_control_socket_dir_created(tmp_path, serve):
    path = tmp_path / "run" / "nbdproxy" / "control.sock"
    s = serve(base_args(tmp_path, **{"--control-socket": str(path)}))
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert s.stop() == 0
    assert not os.path.exists(path)


def test_local_socket_path(daemon):
    st = os.stat(daemon.local_socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_local_socket_abstract(tmp_path, serve):
    name = abstract_name()
    s = serve(base_args(tmp_path, **{"--local-socket": name}))
    assert f"local={name}" in s.ready_line
    info = options_star(UnixHTTPConnection("\0" + name[1:]))
    assert info["unix_socket"] == "\0" + name[1:]
    assert not os.path.exists(name)
    assert not os.path.exists(name[1:])
    assert s.stop() == 0
    assert connect_refused("\0" + name[1:])


def test_local_socket_none(tmp_path, serve):
    s = serve(base_args(tmp_path, **{"--port": "0", "--host": "127.0.0.1"}) + ["--no-tls"])
    assert "local=" not in s.ready_line
    port = int(re.search(r"remote=http://127\.0\.0\.1:(\d+)", s.ready_line)[1])
    import http.client
    info = options_star(http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    assert "unix_socket" not in info
    assert s.stop() == 0


def test_stale_socket_replaced(tmp_path, serve):
    """A socket file nobody listens on (a daemon that was killed) is replaced."""
    path = str(tmp_path / "control.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    s = serve(base_args(tmp_path))
    status, _ = request(UnixHTTPConnection(path), "GET", "/tickets/")
    assert status == 200
    assert s.stop() == 0


def test_socket_path_not_a_socket(tmp_path):
    """A path that holds a regular file is an error, and the file is left alone."""
    path = tmp_path / "control.sock"
    path.write_text("precious\n")
    line = fail(tmp_path, base_args(tmp_path))
    assert str(path) in line
    assert path.read_text() == "precious\n"


# TCP and TLS

def test_port_zero_logs_port(daemon, cert):
    assert daemon.port and daemon.port > 0
    status, body = request(daemon.remote(), "GET", "/info/")
    assert status == 200
    assert "version" in json.loads(body)


def test_tls_only(daemon):
    """The TLS port does not speak plain HTTP."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
        s.sendall(b"GET /info/ HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
    assert not data.startswith(b"HTTP/1.1 200")


def test_no_tls(tmp_path, serve):
    s = serve(base_args(tmp_path, **{"--port": "0", "--host": "127.0.0.1"}) + ["--no-tls"])
    port = int(re.search(r"remote=http://127\.0\.0\.1:(\d+)", s.ready_line)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"GET /info/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_answer(c).startswith(b"HTTP/1.1 200 ")
    assert s.stop() == 0


def test_host_dual_stack(tmp_path, serve, cert):
    """--host :: (the default) serves IPv6 and IPv4."""
    s = serve(base_args(tmp_path, **{"--port": "0", "--host": "::"})
              + ["--cert-file", cert[0], "--key-file", cert[1]])
    port = int(re.search(r"remote=https://\[::\]:(\d+)", s.ready_line)[1])
    ctx = ssl.create_default_context(cafile=cert[0])
    import http.client
    for host in ("127.0.0.1", "::1"):
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
        status, _ = request(conn, "GET", "/info/")
        assert status == 200, host
    assert s.stop() == 0


def test_port_off(tmp_path, serve):
    """--port -1 turns TCP off; then no certificate is needed."""
    s = serve(base_args(tmp_path))
    assert "remote=" not in s.ready_line
    assert f"control={tmp_path / 'control.sock'}" in s.ready_line
    assert s.stop() == 0


def test_tcp_needs_tls(tmp_path):
    line = fail(tmp_path, base_args(tmp_path, **{"--port": "0", "--host": "127.0.0.1"}))
    assert "cert_file" in line and "no_tls" in line
    assert not os.path.exists(tmp_path / "control.sock")


def test_cert_without_key(tmp_path, cert):
    line = fail(tmp_path, base_args(tmp_path, **{"--port": "0", "--host": "127.0.0.1",
                                                 "--cert-file": cert[0]}))
    assert "key_file" in line


@pytest.mark.parametrize("which", ["missing-cert", "missing-key", "garbage-cert", "wrong-key"])
def test_bad_certificate(tmp_path, cert, which):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other_key = tmp_path / "other-key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(other_key), "2048"], check=True,
                   capture_output=True)
    cert_file, key_file = {
        "missing-cert": (str(tmp_path / "nope.pem"), cert[1]),
        "missing-key": (cert[0], str(tmp_path / "nope.pem")),
        "garbage-cert": (str(garbage), cert[1]),
        "wrong-key": (cert[0], str(other_key)),
    }[which]
    local = str(tmp_path / "local.sock")
    line = fail(tmp_path, base_args(tmp_path, **{"--port": "0", "--host": "127.0.0.1",
                                                 "--cert-file": cert_file, "--key-file": key_file,
                                                 "--local-socket": local}))
    assert "certificate" in line
    # Sockets bound before the certificate was loaded are not left behind.
    assert not os.path.exists(tmp_path / "control.sock")
    assert not os.path.exists(local)


# Bad settings

@pytest.mark.parametrize("flags,words", [
    (["--port", "70000"], "port"),
    (["--port", "-2"], "port"),
    (["--buffer-size", "7"], "buffer_size"),
    (["--buffer-size", str(2 * 1024**3)], "buffer_size"),
    (["--log-level", "LOUD"], "log_level"),
    (["--max-connections", "0"], "max_connections"),
    (["--nbd-connections", "0"], "nbd_connections"),
    (["--remove-timeout", "-1"], "remove_timeout"),
    (["--stop-timeout", "-1"], "stop_timeout"),
])
def test_bad_value(tmp_path, flags, words):
    line = fail(tmp_path, base_args(tmp_path) + flags)
    assert line.startswith("nbdproxy: ")
    assert words in line
    assert not os.path.exists(tmp_path / "control.sock")


@pytest.mark.parametrize("text,words", [
    ("[nbdproxy]\nno_such_key = 1\n", "no_such_key"),
    ("[nbdproxy]\nport = eighty\n", "port"),
    ("[nbdproxy]\nbuffer_size = 7\n", "buffer_size"),
    ("[nbdproxy]\nno_tls = maybe\n", "no_tls"),
    ("[nbdproxy]\nlog_level = LOUD\n", "log_level"),
    ("port = 1\n", "nbdproxy.conf"),                  # no section header
    ("[nbdproxy]\nport = 1\nport = 2\n", "nbdproxy.conf"),
])
def test_bad_ini(tmp_path, text, words):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "nbdproxy.conf").write_text(text)
    line = fail(tmp_path, base_args(tmp_path))
    assert words in line


def test_bad_ini_in_conf_d_names_the_file(tmp_path):
    conf = tmp_path / "conf"
    (conf / "conf.d").mkdir(parents=True)
    (conf / "conf.d" / "50-bad.conf").write_text("[nbdproxy]\nbogus = 1\n")
    line = fail(tmp_path, base_args(tmp_path))
    assert "bogus" in line


def test_bad_flag_type(tmp_path):
    """argparse's own errors: exit status 2, no traceback."""
    proc = subprocess.run(NBDPROXY + ["serve", "--port", "abc"], cwd=TOP, capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--port" in proc.stderr


# Sockets in use

def test_control_socket_in_use(tmp_path, serve):
    first = serve(base_args(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    line = fail(other, base_args(other, **{"--control-socket": str(tmp_path / "control.sock")}))
    assert "in use" in line
    # The first daemon still serves on its socket.
    status, _ = request(UnixHTTPConnection(str(tmp_path / "control.sock")), "GET", "/tickets/")
    assert status == 200
    assert first.stop() == 0


def test_local_socket_in_use(daemon, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    line = fail(other, base_args(other, **{"--local-socket": daemon.local_socket}))
    assert "in use" in line and daemon.local_socket in line
    assert not os.path.exists(other / "control.sock")
    assert options_star(daemon.local())["unix_socket"] == daemon.local_socket


def test_abstract_socket_in_use(tmp_path, serve):
    name = abstract_name()
    first = serve(base_args(tmp_path, **{"--local-socket": name}))
    other = tmp_path / "other"
    other.mkdir()
    line = fail(other, base_args(other, **{"--local-socket": name}))
    assert name in line
    assert not os.path.exists(other / "control.sock")
    assert options_star(UnixHTTPConnection("\0" + name[1:]))["unix_socket"] == "\0" + name[1:]
    assert first.stop() == 0


def test_tcp_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = fail(tmp_path, base_args(tmp_path, **{"--port": str(port), "--host": "127.0.0.1"})
                    + ["--no-tls"])
    assert str(port) in line
    assert not os.path.exists(tmp_path / "control.sock")


def test_bad_host(tmp_path):
    line = fail(tmp_path, base_args(tmp_path, **{"--port": "0", "--host": "no.such.host.invalid"})
                + ["--no-tls"])
    assert "no.such.host.invalid" in line


# INI files

def ini(path, **settings):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[nbdproxy]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))


def max_readers(local_path, url, control_path):
    add_ticket(control_path, url, 16 * MiB)
    status, body = request(UnixHTTPConnection(local_path), "OPTIONS", "/images/test")
    assert status == 200, body
    return json.loads(body)["max_readers"]


def test_ini_files(tmp_path, serve, mem):
    conf = tmp_path / "conf"
    control = tmp_path / "ini-control.sock"
    local = tmp_path / "ini-local.sock"
    ini(conf / "nbdproxy.conf", control_socket=control, local_socket=local, port=-1,
        nbd_connections=2, log_level="warning")
    ini(conf / "conf.d" / "20-b.conf", nbd_connections=4, log_level="info")
    ini(conf / "conf.d" / "10-a.conf", nbd_connections=3)
    ini(conf / "conf.d" / "30-c.conf.disabled", nbd_connections=9)
    ini(conf / "conf.d" / "sub" / "40-d.conf", nbd_connections=9)
    s = serve([], conf_dir=str(conf))
    assert f"control={control}" in s.ready_line
    assert f"local={local}" in s.ready_line
    assert max_readers(str(local), mem.url, str(control)) == 4
    assert s.stop() == 0


def test_ini_flags_win(tmp_path, serve, mem):
    conf = tmp_path / "conf"
    ini(conf / "nbdproxy.conf", control_socket=tmp_path / "ini.sock", nbd_connections=2,
        port=54322, local_socket=abstract_name())
    ini(conf / "conf.d" / "50-x.conf", nbd_connections=3)
    local = str(tmp_path / "local.sock")
    s = serve(base_args(tmp_path, **{"--local-socket": local}) + ["--nbd-connections", "5"],
              conf_dir=str(conf))
    assert "remote=" not in s.ready_line
    assert not os.path.exists(tmp_path / "ini.sock")
    assert max_readers(local, mem.url, str(tmp_path / "control.sock")) == 5
    assert s.stop() == 0


def test_ini_tls_settings(tmp_path, serve, cert):
    conf = tmp_path / "conf"
    ini(conf / "conf.d" / "tls.conf", cert_file=cert[0], key_file=cert[1], host="127.0.0.1",
        port=0)
    s = serve(["--control-socket", str(tmp_path / "control.sock"), "--local-socket", "none"],
              conf_dir=str(conf))
    port = int(re.search(r"remote=https://127\.0\.0\.1:(\d+)", s.ready_line)[1])
    import http.client
    conn = http.client.HTTPSConnection("localhost", port, timeout=10,
                                       context=ssl.create_default_context(cafile=cert[0]))
    assert request(conn, "GET", "/info/")[0] == 200
    assert s.stop() == 0


def test_ini_no_tls_bool(tmp_path, serve):
    conf = tmp_path / "conf"
    ini(conf / "nbdproxy.conf", no_tls="yes", host="127.0.0.1", port=0)
    s = serve(["--control-socket", str(tmp_path / "control.sock"), "--local-socket", "none"],
              conf_dir=str(conf))
    assert re.search(r"remote=http://127\.0\.0\.1:\d+", s.ready_line)
    assert s.stop() == 0


# Other flags

def test_nbd_connections(tmp_path, serve, mem):
    local = str(tmp_path / "local.sock")
    s = serve(base_args(tmp_path, **{"--local-socket": local}) + ["--nbd-connections", "3"])
    add_ticket(str(tmp_path / "control.sock"), mem.url, 16 * MiB)
    status, body = request(UnixHTTPConnection(local), "OPTIONS", "/images/test")
    assert json.loads(body)["max_readers"] == 3
    assert json.loads(body)["max_writers"] == 3
    assert s.stop() == 0


def test_buffer_size(tmp_path, serve):
    """NBD reads and writes are never larger than --buffer-size (seen in nbdkit's log)."""
    nbdlog = tmp_path / "nbd.log"
    sock = str(tmp_path / "logged.sock")
    nbd_server = NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
                            "--filter=log", "memory", "size=4M", f"logfile={nbdlog}"], sock)
    try:
        local = str(tmp_path / "local.sock")
        s = serve(base_args(tmp_path, **{"--local-socket": local})
                  + ["--buffer-size", str(256 * 1024)])
        add_ticket(str(tmp_path / "control.sock"), nbd_server.url, 4 * MiB)
        payload = os.urandom(3 * MiB)
        status, _ = request(UnixHTTPConnection(local), "PUT", "/images/test", payload)
        assert status == 200
        status, data = request(UnixHTTPConnection(local), "GET", "/images/test",
                               headers={"Range": f"bytes=0-{3 * MiB - 1}"})
        assert status == 206 and data == payload
        assert s.stop() == 0
    finally:
        nbd_server.stop()
    text = nbdlog.read_text()
    sizes = {kind: [int(n, 16) for n in re.findall(rf"{kind} id=\d+ offset=0x[0-9a-f]+ "
                                                    r"count=0x([0-9a-f]+)", text)]
             for kind in ("Read", "Write")}
    assert sizes["Read"] and sizes["Write"], text[:2000]
    assert max(sizes["Read"]) <= 256 * 1024
    assert max(sizes["Write"]) <= 256 * 1024
    assert sum(sizes["Write"]) == 3 * MiB


def test_max_connections(tmp_path, cert, mem):
    """Full of connections that use a ticket (never closed to make room), a new one waits in
    line for a place, then gets a 503 it can read; a closed connection makes room."""
    d = Daemon(str(tmp_path), *cert, args=["--max-connections", "2"])
    conns = [d.local() for _ in range(2)]
    try:
        d.add_ticket(mem.url, 16 * MiB)
        for conn in conns:
            assert response(conn, "OPTIONS", "/images/test").status == 200
        extra = d.local()
        started = time.monotonic()
        resp = response(extra, "OPTIONS", "/images/*")
        extra.close()
        assert resp.status == 503
        assert time.monotonic() - started >= 2.5     # server.WAIT_FOR_ROOM
        assert resp.getheader("Connection") == "close"
        assert resp.getheader("Content-Length") == str(len(resp.data))
        assert resp.getheader("Server").startswith("nbdproxy/")
        assert resp.getheader("Date")
        # The control socket is not limited.
        assert request(d.control(), "GET", "/tickets/")[0] == 200
        # The kept connections still work; a closed one makes room for one waiting.
        assert response(conns[0], "OPTIONS", "/images/test").status == 200
        waiting = d.local()
        waiting.request("OPTIONS", "/images/*")
        time.sleep(0.5)
        conns[0].close()
        assert waiting.getresponse().status == 200
        waiting.close()
    finally:
        for conn in conns:
            conn.close()
        d.stop()


def test_max_connections_per_service(tmp_path, serve):
    """The local socket and the TCP service each have max_connections of their own (issue 12,
    item 2): a full TCP service does not lock out the local clients, nor the other way."""
    local = str(tmp_path / "local.sock")
    s = serve(base_args(tmp_path, **{"--local-socket": local, "--port": "0",
                                     "--host": "127.0.0.1"})
              + ["--no-tls", "--max-connections", "1"])
    port = int(re.search(r"remote=http://127\.0\.0\.1:(\d+)", s.ready_line)[1])
    import http.client
    tcp = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    kept = UnixHTTPConnection(local)
    try:
        assert response(tcp, "GET", "/info/").status == 200
        assert response(kept, "OPTIONS", "/images/*").status == 200
        # Each service is full now: a second connection to either waits in line, and gets the
        # place of the one that used no ticket once that one is PENDING_GRACE old.
        started = time.monotonic()
        assert request(UnixHTTPConnection(local), "OPTIONS", "/images/*")[0] == 200
        other = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert request(other, "GET", "/info/")[0] == 200
        assert time.monotonic() - started >= 1.5
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            response(kept, "OPTIONS", "/images/*")
    finally:
        tcp.close()
        kept.close()
    assert s.stop() == 0


def test_log_level_warning(tmp_path, serve):
    """Below the level nothing is logged; not even the ready line (INFO)."""
    control = str(tmp_path / "control.sock")
    s = serve(base_args(tmp_path) + ["--log-level", "warning"], ready=False)
    wait_for_socket(control, s.proc)
    deadline = time.monotonic() + 10
    while True:     # the file appears at bind(), connections work after listen()
        try:
            status = request(UnixHTTPConnection(control), "GET", "/tickets/")[0]
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert status == 200
    assert s.stop() == 0
    assert " INFO " not in s.read_log()
    assert " DEBUG " not in s.read_log()


def test_log_level_debug(tmp_path, serve):
    s = serve(base_args(tmp_path) + ["--log-level", "DEBUG"])
    control = str(tmp_path / "control.sock")
    assert request(UnixHTTPConnection(control), "GET", "/tickets/")[0] == 200
    assert s.stop() == 0
    assert " INFO " in s.read_log()


def test_version():
    proc = subprocess.run(NBDPROXY + ["--version"], cwd=TOP, capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 0
    assert re.fullmatch(r"nbdproxy \d+\.\d+\S*\n", proc.stdout)


# Signals

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(tmp_path, serve, sig, cert):
    control, local = tmp_path / "control.sock", tmp_path / "local.sock"
    s = serve(base_args(tmp_path, **{"--local-socket": str(local), "--port": "0",
                                     "--host": "127.0.0.1"})
              + ["--cert-file", cert[0], "--key-file", cert[1]])
    port = int(re.search(r"remote=https://127\.0\.0\.1:(\d+)", s.ready_line)[1])
    # An idle kept connection does not hold the daemon.
    idle = UnixHTTPConnection(str(local))
    assert response(idle, "OPTIONS", "/images/*").status == 200
    start = time.monotonic()
    assert s.stop(sig) == 0
    assert time.monotonic() - start < 5
    idle.close()
    assert not os.path.exists(control)
    assert not os.path.exists(local)
    assert connect_refused(("127.0.0.1", port), socket.AF_INET)
    log = s.read_log()
    assert "Traceback" not in log
    assert "stopped" in log


def test_sigterm_abstract_socket(tmp_path, serve):
    name = abstract_name()
    s = serve(base_args(tmp_path, **{"--local-socket": name}))
    assert s.stop() == 0
    assert connect_refused("\0" + name[1:])
    # The name is free again: another daemon can take it.
    again = serve(base_args(tmp_path, **{"--local-socket": name}))
    assert again.stop() == 0


def test_sigterm_lets_transfer_finish(tmp_path, serve, mem):
    control, local = str(tmp_path / "control.sock"), str(tmp_path / "local.sock")
    s = serve(base_args(tmp_path, **{"--local-socket": local, "--port": "0",
                                     "--host": "127.0.0.1"}) + ["--no-tls"])
    port = int(re.search(r"remote=http://127\.0\.0\.1:(\d+)", s.ready_line)[1])
    add_ticket(control, mem.url, 16 * MiB)
    payload = os.urandom(4 * MiB)
    put = start_put(local, "test", payload, MiB)
    try:
        deadline = time.monotonic() + 5
        while not ticket_info(control)["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        s.wait_log("stopping")
        time.sleep(0.1)
        assert s.proc.poll() is None        # still serving the running PUT
        assert connect_refused(local)
        assert connect_refused(("127.0.0.1", port), socket.AF_INET)
        put.sendall(payload[MiB:])
        answer = read_answer(put)
    finally:
        put.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    s.proc.wait(10)
    assert s.stop() == 0
    assert read_export(mem.sock, 0, len(payload)) == payload
    assert not os.path.exists(control) and not os.path.exists(local)


def test_sigterm_stop_timeout(tmp_path, serve, mem):
    """A transfer that does not finish is cut after --stop-timeout; the exit is still clean."""
    control, local = str(tmp_path / "control.sock"), str(tmp_path / "local.sock")
    s = serve(base_args(tmp_path, **{"--local-socket": local}) + ["--stop-timeout", "1"])
    add_ticket(control, mem.url, 16 * MiB)
    put = start_put(local, "test", bytes(4 * MiB), MiB)
    try:
        deadline = time.monotonic() + 5
        while not ticket_info(control)["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        start = time.monotonic()
        assert s.stop() == 0
        assert 0.9 < time.monotonic() - start < 5
    finally:
        put.close()
    assert "still running" in s.read_log()
    assert not os.path.exists(control) and not os.path.exists(local)


# Logs

def test_operation_log_lines(mem, daemon):   # mem first: it stops after the daemon
    daemon.add_ticket(mem.url, 16 * MiB, ticket_id="logged")
    conn = daemon.local()
    try:
        assert response(conn, "GET", "/images/logged",
                        headers={"Range": "bytes=4096-12287"}).status == 206
        assert response(conn, "PUT", "/images/logged", b"x" * 5000,
                        headers={"Content-Range": "bytes 1000-5999/*"}).status == 200
        assert response(conn, "PATCH", "/images/logged",
                        json.dumps({"op": "zero", "offset": 65536, "size": 131072}).encode(),
                        headers={"Content-Type": "application/json"}).status == 200
        assert response(conn, "PATCH", "/images/logged", b'{"op":"flush"}').status == 200
    finally:
        conn.close()

    def op_line(op):
        m = re.search(rf"op={op} ticket=logged offset=(\d+) size=(\d+) seconds=(\d+\.\d+)",
                      daemon.read_log())
        assert m, f"no log line for {op}:\n{daemon.read_log()}"
        return int(m[1]), int(m[2]), float(m[3])

    deadline = time.monotonic() + 5
    while "op=flush ticket=logged" not in daemon.read_log() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert op_line("read")[:2] == (4096, 8192)
    assert op_line("write")[:2] == (1000, 5000)
    assert op_line("zero")[:2] == (65536, 131072)
    assert op_line("flush")[0] == 0
    assert all(op_line(op)[2] < 5 for op in ("read", "write", "zero", "flush"))


def test_connection_log_line(mem, daemon):   # mem first: it stops after the daemon
    daemon.add_ticket(mem.url, 16 * MiB, ticket_id="totals")
    payload = os.urandom(300000)
    conn = daemon.local()
    try:
        assert response(conn, "PUT", "/images/totals", payload).status == 200
        assert len(response(conn, "GET", "/images/totals",
                            headers={"Range": "bytes=0-1048575"}).data) == MiB
        assert response(conn, "GET", "/images/totals",
                        headers={"Range": "bytes=0-99"}).status == 206
    finally:
        conn.close()
    pattern = (r"connection closed id=(\d+) service=local requests=3 in=(\d+) out=(\d+) "
               r"seconds=(\d+\.\d+)")
    deadline = time.monotonic() + 5
    while not re.search(pattern, daemon.read_log()):
        assert time.monotonic() < deadline, daemon.read_log()
        time.sleep(0.02)
    m = re.search(pattern, daemon.read_log())
    assert int(m[2]) == len(payload)
    assert int(m[3]) == MiB + 100
    assert float(m[4]) < 10


def test_tls_connection_log_line(mem, daemon):   # mem first: it stops after the daemon
    daemon.add_ticket(mem.url, 16 * MiB, ticket_id="tls")
    conn = daemon.remote()
    try:
        assert len(response(conn, "GET", "/images/tls",
                            headers={"Range": "bytes=0-65535"}).data) == 65536
    finally:
        conn.close()
    pattern = r"connection closed id=\d+ service=remote requests=1 in=0 out=65536 "
    deadline = time.monotonic() + 5
    while not re.search(pattern, daemon.read_log()):
        assert time.monotonic() < deadline, daemon.read_log()
        time.sleep(0.02)


def test_max_connections_tls(tmp_path, cert, mem):
    """Over TLS the 503 comes after the handshake, so an HTTPS client can read it."""
    d = Daemon(str(tmp_path), *cert, args=["--max-connections", "1"])
    try:
        d.add_ticket(mem.url, 16 * MiB)
        kept = d.remote()
        assert response(kept, "OPTIONS", "/images/test").status == 200
        resp = response(d.remote(), "PUT", "/images/x", b"y" * 100000)
        assert resp.status == 503
        assert resp.data == b"Too many connections\n"
        kept.close()
    finally:
        d.stop()


def test_failed_operation_log_line(mem, daemon):
    """A PUT whose client goes away mid-body is logged as a failed operation."""
    daemon.add_ticket(mem.url, 16 * MiB, ticket_id="cut")
    put = start_put(daemon.local_socket, "cut", bytes(2 * MiB), 100000)
    put.close()
    pattern = r"op=write ticket=cut offset=0 size=\d+ seconds=\d+\.\d+ failed"
    deadline = time.monotonic() + 5
    while not re.search(pattern, daemon.read_log()):
        assert time.monotonic() < deadline, daemon.read_log()
        time.sleep(0.02)


@pytest.mark.parametrize("where", ["under-a-file", "too-long"])
def test_bad_socket_path(tmp_path, where):
    (tmp_path / "file").write_text("")
    path = {"under-a-file": str(tmp_path / "file" / "control.sock"),
            "too-long": str(tmp_path / ("x" * 120))}[where]
    line = fail(tmp_path, base_args(tmp_path, **{"--control-socket": path}))
    assert line.startswith("nbdproxy: ")
    assert path in line
