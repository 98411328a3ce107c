"""The processes a benchmark run needs: NBD servers, the two HTTP daemons, and their set-up.

Everything here is started fresh and stopped by the object that started it; nothing is killed by
name. Paths are under bench/work/ (gitignored).
"""

import http.client
import json
import mmap
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(BENCH)
WORK = os.path.join(BENCH, "work")
IMAGEIO_VENV = os.path.join(BENCH, ".venv-imageio")
IMAGEIO_VERSION = "2.5.1"
# This tree's venv, else the python running the bench (a git worktree has no .venv of its own);
# PYTHONPATH=TOP in the daemon's environment makes it run this tree's code either way.
NBDPROXY_PYTHON = (os.path.join(TOP, ".venv", "bin", "python")
                   if os.path.exists(os.path.join(TOP, ".venv", "bin", "python")) else sys.executable)

# glibc's mmap threshold for the NBD servers: without it a fresh qemu-nbd 7.2 takes a page fault per
# 4 KiB of every large request (issue 5). Set for every system compared.
NBD_SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432"}


# Set-up

def ensure_imageio_venv(log=print):
    """bench/.venv-imageio with ovirt-imageio from PyPI; returns its python."""
    python = os.path.join(IMAGEIO_VENV, "bin", "python")
    probe = [python, "-c", "import ovirt_imageio._internal.version as v; print(v.string)"]
    try:
        if subprocess.run(probe, capture_output=True, text=True).stdout.strip() == IMAGEIO_VERSION:
            return python
    except OSError:
        pass
    log(f"setup: creating {os.path.relpath(IMAGEIO_VENV, TOP)} with ovirt-imageio=={IMAGEIO_VERSION}")
    if not os.path.exists(python):
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", IMAGEIO_VENV],
                       check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"ovirt-imageio=={IMAGEIO_VERSION}"], check=True)
    out = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    if out != IMAGEIO_VERSION:
        raise RuntimeError(f"ovirt-imageio in {IMAGEIO_VENV} is {out!r}, not {IMAGEIO_VERSION}")
    return python


def make_cert(directory, name="", ips=("127.0.0.1",)):
    """A self-signed certificate (its own CA) for localhost and ips; made once, kept."""
    cert = os.path.join(directory, f"cert{name}.pem")
    key = os.path.join(directory, f"key{name}.pem")
    if not (os.path.exists(cert) and os.path.exists(key)):
        san = ",".join(["DNS:localhost"] + [f"IP:{ip}" for ip in ips])
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                        "-subj", "/CN=localhost", "-addext", f"subjectAltName={san}",
                        "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def direct_io_supported(directory):
    """True if files in directory can be opened with O_DIRECT and read/written aligned."""
    path = os.path.join(directory, ".odirect-probe")
    buf = mmap.mmap(-1, 4096)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwritev(fd, [buf], 0)
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


def make_dense(path, size, log=print):
    """A raw image of size bytes of random data (made once, kept)."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    log(f"setup: writing {size >> 20} MiB of random data to {os.path.relpath(path, TOP)}")
    tmp = path + ".tmp"
    chunk = 64 * 1024**2
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return path


def copy_file(src, dst, log=print):
    """A fully allocated copy (upload targets: every run overwrites allocated blocks)."""
    if os.path.exists(dst) and os.path.getsize(dst) == os.path.getsize(src):
        return dst
    log(f"setup: copying {os.path.relpath(src, TOP)} to {os.path.relpath(dst, TOP)}")
    shutil.copyfile(src, dst + ".tmp")
    os.rename(dst + ".tmp", dst)
    return dst


def sparse_layout(size, data, piece):
    """Offsets of the data pieces: data/piece pieces spread evenly over size."""
    count = data // piece
    stride = size // count
    return [i * stride + (stride - piece) // 2 // piece * piece for i in range(count)]


def make_sparse(path, size, data, piece, log=print):
    """A sparse raw image: size bytes virtual, data bytes of random data in piece-sized pieces."""
    offsets = sparse_layout(size, data, piece)
    stamp = f"{size} {data} {piece}\n"
    if os.path.exists(path) and os.path.exists(path + ".layout"):
        with open(path + ".layout") as f:
            if f.read() == stamp:
                return path, offsets
    log(f"setup: making {os.path.relpath(path, TOP)}: {size >> 30} GiB virtual, "
        f"{data >> 20} MiB of data")
    with open(path, "wb") as f:
        f.truncate(size)
        for off in offsets:
            f.seek(off)
            f.write(os.urandom(piece))
        os.fsync(f.fileno())
    with open(path + ".layout", "w") as f:
        f.write(stamp)
    return path, offsets


def fresh_sparse_target(path, size):
    """An empty sparse raw file of size bytes (the target of a sparse upload)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def host_env():
    """The environment a host starts qemu-nbd with: ours without glibc's MALLOC_* tunables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


def allocated(path):
    return os.stat(path).st_blocks * 512


# Processes

def children(pid):
    """Pids of the children of a process (all its threads)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid):
    """VmHWM of a process in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_for(predicate, proc, what, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.01)
    raise TimeoutError(f"{what} not ready after {timeout} s")


class Process:
    """A child process we started, stopped with SIGTERM then SIGKILL by its own handle."""

    proc = None
    log = None

    def stop(self, timeout=30):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None

    @property
    def pid(self):
        return self.proc.pid

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class NBDServer(Process):
    """qemu-nbd or nbdkit serving one image on a unix socket, started fresh for one run."""

    def __init__(self, argv, sock, log_path, env=None):
        self.sock = sock
        if os.path.exists(sock):
            os.unlink(sock)
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log,
                                     env=env if env is not None
                                     else dict(os.environ, **NBD_SERVER_ENV))
        try:
            wait_for(lambda: os.path.exists(sock), self.proc, argv[0])
        except Exception:
            self.stop()
            raise

    @property
    def url(self):
        return f"nbd:unix:{self.sock}"

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self, timeout=10):
        super().stop(timeout)
        if os.path.exists(self.sock):
            os.unlink(self.sock)


class NBDFactory:
    """Starts the NBD server of one run: qemu-nbd with the chosen cache mode, or nbdkit file."""

    CACHE_ARGS = {"none": ["--cache=none", "--aio=native"], "writeback": ["--cache=writeback"]}

    def __init__(self, workdir, direct):
        self.workdir = workdir
        self.direct = direct
        self.cache_args = self.CACHE_ARGS["none" if direct else "writeback"]
        self.count = 0

    def describe(self):
        env = " ".join(f"{k}={v}" for k, v in NBD_SERVER_ENV.items())
        return ("qemu-nbd --persistent --shared=8 " + " ".join(self.cache_args)
                + f" ({env}); nbdkit file (same environment)")

    def sock(self):
        self.count += 1
        return os.path.join(self.workdir, f"nbd-{self.count}.sock")

    def start(self, kind, image, discard=False, cache=None, env=None):
        """cache: "none" or "writeback" for this server (default: the run's); env: its whole
        environment (default: ours with NBD_SERVER_ENV)."""
        sock = self.sock()
        log = os.path.join(self.workdir, "nbd-servers.log")
        if kind == "qemu-nbd":
            cache_args = self.CACHE_ARGS[cache] if cache else self.cache_args
            argv = ["qemu-nbd", "--persistent", "--shared=8", *cache_args, "--format=raw",
                    "--socket", sock]
            if discard:
                argv.append("--discard=unmap")
            argv.append(image)
        elif kind == "nbdkit":
            argv = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock, "file", image]
        else:
            raise ValueError(kind)
        return NBDServer(argv, sock, log, env)


class ImageTicketServer:
    """qemu-nbd started exactly as an image ticket of this tree starts it (its flags and
    environment: nbdproxy.backends.qemu_nbd.Server), waited for until it greets."""

    def __init__(self, sock, image, read_only, direct):
        if TOP not in sys.path:
            sys.path.insert(0, TOP)
        from nbdproxy.backends import qemu_nbd
        self.sock = sock
        self.server = qemu_nbd.Server(image, "raw", sock, read_only=read_only, clients=8,
                                      direct=direct)
        self.argv = self.server.argv
        self.env = qemu_nbd.FAST_ENV

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def cpu(self):
        return cpu_seconds(self.server.pid)

    def stop(self):
        self.server.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=300):
        self.unix_path = path
        super().__init__("localhost", timeout=timeout)

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


class Endpoint:
    """Where a client connects: the unix socket, or TLS over TCP."""

    def __init__(self, transport, address, cafile=None):
        self.transport = transport
        self.address = address
        self.ctx = ssl.create_default_context(cafile=cafile) if transport == "tls" else None

    def connect(self):
        if self.transport == "unix":
            conn = UnixHTTPConnection(self.address)
        else:
            host, port = self.address
            conn = http.client.HTTPSConnection(host, port, context=self.ctx, timeout=300)
        conn.connect()
        return conn


def control_request(path, method, url, body=None):
    conn = UnixHTTPConnection(path, timeout=120)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, url, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Daemon(Process):
    """Common part of the two HTTP daemons: tickets on the control socket, endpoints, CPU, RSS."""

    name = None

    def __init__(self, directory, cert, key, host="127.0.0.1"):
        self.host = host
        self.delete_errors = []
        self.dir = directory
        self.cert, self.key = cert, key
        os.makedirs(directory, exist_ok=True)
        self.control_socket = os.path.join(directory, "control.sock")
        self.local_socket = os.path.join(directory, "local.sock")
        self.log_path = os.path.join(directory, "daemon.log")
        for path in (self.control_socket, self.local_socket):
            if os.path.exists(path):
                os.unlink(path)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv(), stdout=self.log, stderr=self.log, cwd=directory,
                                     env=self.env())
        try:
            self.port = wait_for(self._ready, self.proc, self.name)
        except Exception:
            self.stop()
            raise

    def env(self):
        return None

    def read_log(self):
        with open(self.log_path) as f:
            return f.read()

    def add_ticket(self, ticket_id, url, size, ops=("read", "write"), sparse=False):
        ticket = {"uuid": ticket_id, "size": size, "ops": list(ops), "timeout": 3600,
                  "url": url, "sparse": sparse, "inactivity_timeout": 300}
        status, body = control_request(self.control_socket, "PUT", f"/tickets/{ticket_id}",
                                       json.dumps(ticket).encode())
        if status != 200:
            raise RuntimeError(f"{self.name}: add ticket: {status} {body!r}")
        return f"/images/{ticket_id}"

    def add_image_ticket(self, ticket_id, image, ops=("read", "write")):
        """An image ticket (API.md 7d): the daemon starts qemu-nbd for it; size left out."""
        ticket = {"uuid": ticket_id, "ops": list(ops), "timeout": 3600,
                  "image": {"path": image, "format": "raw"}, "inactivity_timeout": 300}
        status, body = control_request(self.control_socket, "PUT", f"/tickets/{ticket_id}",
                                       json.dumps(ticket).encode())
        if status != 200:
            raise RuntimeError(f"{self.name}: add image ticket: {status} {body!r}")
        return f"/images/{ticket_id}"

    def qemu_nbd_cpu(self):
        """CPU seconds of the qemu-nbd children of the daemon (an image ticket's server)."""
        total = 0.0
        for pid in children(self.proc.pid):
            try:
                total += cpu_seconds(pid)
            except FileNotFoundError:
                pass
        return total

    def delete_ticket(self, ticket_id):
        status, body = control_request(self.control_socket, "DELETE", f"/tickets/{ticket_id}")
        if status not in (200, 204):
            # nbdproxy at 97cea15 answers 500 after removing the ticket (empty_response(204)
            # deletes a Content-Type webob did not set); count it, go on if the ticket is gone.
            gone, _ = control_request(self.control_socket, "GET", f"/tickets/{ticket_id}")
            if gone != 404:
                raise RuntimeError(f"{self.name}: delete ticket: {status} {body!r}")
            self.delete_errors.append(status)

    def endpoint(self, transport):
        if transport == "unix":
            return Endpoint("unix", self.local_socket)
        return Endpoint("tls", (self.host, self.port), cafile=self.cert)

    def https_url(self, ticket_id):
        return f"https://{self.host}:{self.port}/images/{ticket_id}"

    def peak_rss(self):
        return peak_rss(self.proc.pid)


class NbdProxy(Daemon):
    name = "nbdproxy"

    def __init__(self, directory, cert, key, extra_args=(), host="127.0.0.1"):
        self.extra_args = list(extra_args)   # e.g. --no-file-direct for a second daemon
        super().__init__(directory, cert, key, host)

    def env(self):
        return dict(os.environ, PYTHONPATH=TOP)

    def argv(self):
        conf_dir = os.path.join(self.dir, "conf")
        os.makedirs(conf_dir, exist_ok=True)
        return [NBDPROXY_PYTHON, "-m", "nbdproxy", "serve", "--conf-dir", conf_dir,
                "--control-socket", self.control_socket, "--local-socket", self.local_socket,
                "--host", self.host, "--port", "0", "--cert-file", self.cert,
                "--key-file", self.key, "--log-level", "INFO",
                "--run-dir", os.path.join(self.dir, "run"), *self.extra_args]

    def _ready(self):
        m = re.search(r"nbdproxy ready .*remote=https://\S+:(\d+)", self.read_log())
        return int(m[1]) if m else None


IMAGEIO_CONF = """\
# ovirt-imageio's default configuration, except what a benchmark outside of oVirt must change:
# paths, TLS files, no privilege drop or systemd, a log file of its own.
[daemon]
run_dir = {dir}
drop_privileges = false
systemd_enable = false

[tls]
enable = true
key_file = {key}
cert_file = {cert}
ca_file = {cert}

[remote]
host = {host}
port = 0

[local]
enable = true
socket = {local}

[control]
transport = unix
socket = {control}

[handlers]
keys = logfile

[handler_logfile]
keyword__class = logging.FileHandler
args = ("{log}",)
kwargs = {{}}
level = DEBUG
formatter = long
"""


class Imageio(Daemon):
    name = "imageio"
    python = None  # set by the caller: bench/.venv-imageio/bin/python

    def argv(self):
        conf_dir = os.path.join(self.dir, "conf")
        os.makedirs(os.path.join(conf_dir, "conf.d"), exist_ok=True)
        self.imageio_log = os.path.join(self.dir, "imageio.log")
        if os.path.exists(self.imageio_log):
            os.unlink(self.imageio_log)  # its FileHandler appends; the port is read from it
        with open(os.path.join(conf_dir, "conf.d", "50-bench.conf"), "w") as f:
            f.write(IMAGEIO_CONF.format(dir=self.dir, key=self.key, cert=self.cert,
                                        local=self.local_socket, control=self.control_socket,
                                        host=self.host,
                                        log=self.imageio_log))
        # The package's own entry point (bin/ovirt-imageio) is server.main().
        return [self.python or sys.executable, "-c",
                "from ovirt_imageio._internal import server; server.main()",
                "--conf-dir", conf_dir]

    def read_log(self):
        try:
            with open(self.imageio_log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _ready(self):
        text = self.read_log()
        if "Ready for requests" not in text:
            return None
        m = re.search(r"remote\.service listening on \('[^']*', (\d+)", text)
        if not m:
            m = re.search(r"remote.service listening on .*?(\d+)\)", text)
        return int(m[1]) if m else None
