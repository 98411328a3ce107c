"""The daemon: binds the control, local and remote services, serves them, and stops cleanly."""

import collections
import errno
import grp
import itertools
import logging
import os
import resource
import selectors
import signal
import socket
import ssl
import stat
import threading
import time

from . import __version__, backends, checksum, cors, errors, http, metrics, tickets
from .app import App
from .backends import image as image_backend
from .backends.pool import IdleCloser
from .backends.qemu_nbd import Supervisor
from .backends.upstream import tls_context as backend_tls_context
from .backends.zero_copy import FdBudget
from .errors import ConfigError

log = logging.getLogger("nbdproxy.server")

# Idle timeout of a connection before it used a ticket (API.md 5), and of a TLS handshake.
INITIAL_TIMEOUT = 60

# Connections over max_connections get a 503 from a thread each, at most this many at once (more
# are closed at once), each within about this many seconds.
MAX_REFUSING = 64
REFUSE_TIMEOUT = 2

# When a service is at max_connections, a new connection takes the place of the one that has
# gone longest without using a valid ticket, if it was accepted more than this many seconds ago:
# neither half-sent requests (slowloris) nor cheap ticket-less ones (GET /info/, OPTIONS
# /images/*, 404s) can lock the transfers out.
PENDING_GRACE = 2

# A connection over the limit waits in line this long for a place (one that a connection closes,
# or one made by closing a connection without a ticket once it is PENDING_GRACE old), then 503.
WAIT_FOR_ROOM = PENDING_GRACE + 1

# Control connections at once; more are closed at once (each costs a thread and a descriptor).
MAX_CONTROL_CONNECTIONS = 16

# While accept() fails for want of descriptors or memory, it is retried after a pause growing
# from the first to the second (a listening socket stays readable: retrying at once spins).
ACCEPT_BACKOFF = (0.05, 1.0)
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _unix_listener(address, mode=None, group=None):
    """A listening unix socket at a path (unlinked first if stale) or an abstract name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        if not address.startswith("\0"):
            os.makedirs(os.path.dirname(address) or ".", exist_ok=True)
            _remove_stale(address)
        sock.bind(address)
        bound = True
        if not address.startswith("\0"):
            if group is not None:
                os.chown(address, -1, group)
            os.chmod(address, mode)
        sock.listen(128)
    except OSError as e:
        if bound:
            _close_listener(sock)
        sock.close()
        raise ConfigError(f"cannot listen on unix socket {_show(address)}: {e.strerror or e}")
    return sock


def _close_listener(sock):
    """Close a listening socket and remove its socket file, if it has one."""
    address = sock.getsockname() if sock.family == socket.AF_UNIX else None
    sock.close()
    if address and isinstance(address, str) and not address.startswith("\0"):
        try:
            os.unlink(address)
        except OSError:
            pass


def _remove_stale(path):
    if not os.path.lexists(path):
        return
    if stat.S_ISSOCK(os.lstat(path).st_mode):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            pass
        else:
            raise ConfigError(f"unix socket {path} is in use by another process")
        finally:
            probe.close()
    else:
        # Never unlink what is not a socket: a mistyped path must not cost a file.
        raise ConfigError(f"{path} exists and is not a socket")
    os.unlink(path)


def _tcp_listener(host, port):
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve host {host!r}: {e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _show(address):
    if isinstance(address, bytes):      # getsockname() of an abstract unix socket
        address = address.decode("utf-8", "surrogateescape")
    return "@" + address[1:] if address.startswith("\0") else address


def raise_fd_limit():
    """Raise the soft limit of open files to the hard one: systemd's default soft limit (1024)
    is reached with about a hundred live tickets (up to 8 NBD sockets each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, e)


def tls_context(cert_file, key_file):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load certificate {cert_file} and key {key_file}: {e}") from None
    return ctx


class _Slot:
    """A data connection counted by a Limiter, from accept to close."""

    def __init__(self, sock):
        self.fd = sock.fileno()
        self.family = sock.family
        self.since = time.monotonic()
        self.conn = None        # the http.Connection, once the TLS handshake is done
        self.evicted = False

    def evictable(self, now):
        """Has never used a valid ticket, and was accepted PENDING_GRACE seconds ago."""
        return (not self.evicted and now - self.since > PENDING_GRACE
                and (self.conn is None or not self.conn.authorized))


class Limiter:
    """max_connections of one service.

    Full, it makes room by closing the oldest connection that has not used a valid ticket (see
    PENDING_GRACE), if evict is on: clients without a ticket cannot lock the transfers out. The
    closed connection's place goes to the new one directly, so that no other new connection
    (a client without a ticket reconnecting at once) can take it first. When no connection can
    be closed yet, new ones wait in line (wait()): a freed place goes to the first in line, so
    clients that reconnect before PENDING_GRACE cannot keep every place to themselves.
    """

    def __init__(self, limit, evict=True):
        self.evicts = evict
        self._sem = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._slots = set()
        self._line = collections.deque()    # [granted] of the connections waiting for a place
        self._granted = threading.Condition(self._lock)

    def acquire(self):
        with self._lock:
            return not self._line and self._sem.acquire(blocking=False)

    def release(self):
        with self._lock:
            if self._line:
                self._line.popleft()[0] = True      # the place goes to the first in line
                self._granted.notify_all()
            else:
                self._sem.release()

    def wait(self, timeout):
        """Wait in line up to timeout seconds for a place; True when this connection has one."""
        me = [False]
        deadline = time.monotonic() + timeout
        with self._lock:
            self._line.append(me)
        while True:
            with self._lock:
                if me[0]:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    self._line.remove(me)
                    return False
                first = self._line[0] is me
                if not first:
                    self._granted.wait(min(left, 0.1))
                    continue
            # Connections age: the first in line looks again for one it may close.
            if self.evict():
                with self._lock:
                    if me[0]:   # granted meanwhile too: give that place back
                        self._sem.release()
                    else:
                        self._line.remove(me)
                return True
            with self._lock:
                if not me[0]:
                    self._granted.wait(min(deadline - time.monotonic(), 0.1))

    def track(self, sock):
        slot = _Slot(sock)
        with self._lock:
            self._slots.add(slot)
        return slot

    def untrack(self, slot):
        """Called before the socket is closed, so that evict() never touches a reused fd.
        True when the place was handed to another connection: then it is not released."""
        with self._lock:
            self._slots.discard(slot)
            return slot.evicted

    def evict(self):
        """Shut down the oldest connection without a ticket, whose place the caller then holds;
        False if there is none."""
        if not self.evicts:
            return False
        now = time.monotonic()
        with self._lock:
            candidates = [slot for slot in self._slots if slot.evictable(now)]
            if not candidates:
                return False
            victim = min(candidates, key=lambda slot: slot.since)
            victim.evicted = True
            try:
                # A duplicate of the fd: shutdown() acts on the socket the owner thread uses.
                with socket.fromfd(victim.fd, victim.family, socket.SOCK_STREAM) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        log.warning("closing a connection that used no ticket in %.1f s, to make room",
                    now - victim.since)
        return True


class Service:
    """One listening socket and its connections, each served by a thread."""

    # Socket timeout until a ticket sets its inactivity_timeout (config initial_timeout).
    initial_timeout = INITIAL_TIMEOUT

    def __init__(self, name, sock, app, tls=None, limiter=None, answer_refused=True):
        self.name = name
        self.sock = sock
        self.app = app
        self.tls = tls
        self.limiter = limiter
        # Over the limit: a 503 (data services), or closed at once (control).
        self.answer_refused = answer_refused
        self.stopping = False
        self.connections = set()
        self.connection_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._refusing = threading.BoundedSemaphore(MAX_REFUSING)
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept",
                                        daemon=True)

    @property
    def address(self):
        return self.sock.getsockname()

    def start(self):
        self._thread.start()

    def _accept_loop(self):
        delay = 0
        with selectors.DefaultSelector() as sel, selectors.DefaultSelector() as pause:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            pause.register(self._wake_r, selectors.EVENT_READ)
            while not self.stopping:
                if delay:
                    pause.select(delay)     # only stop() ends the pause early
                for key, _ in sel.select():
                    if key.fileobj is self.sock and not self.stopping:
                        delay = self._accept(delay)

    def _accept(self, delay):
        """Accept one connection; the pause before the next accept (0: none)."""
        try:
            sock, address = self.sock.accept()
        except OSError as e:
            if e.errno in _OUT_OF_RESOURCES:
                # Out of descriptors: the connection waits in the backlog until some close.
                if not delay:
                    log.error("%s: accept failed: %s; retrying at most every %g s until it "
                              "works", self.name, e.strerror or e, ACCEPT_BACKOFF[1])
                return min(max(delay * 2, ACCEPT_BACKOFF[0]), ACCEPT_BACKOFF[1])
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED):
                log.warning("%s: accept failed: %s", self.name, e)
            return delay
        if delay:
            log.info("%s: accepting connections again", self.name)
        if self.limiter is not None and not self.limiter.acquire():
            if self.limiter.evict():
                threading.Thread(target=self._serve, args=(sock, address), daemon=True,
                                 name=f"{self.name}-conn").start()
                return 0
            if self.answer_refused and self._refusing.acquire(blocking=False):
                threading.Thread(target=self._wait_for_room, args=(sock, address), daemon=True,
                                 name=f"{self.name}-wait").start()
            else:
                log.warning("%s: too many connections, refusing one", self.name)
                sock.close()
            return 0
        threading.Thread(target=self._serve, args=(sock, address), daemon=True,
                         name=f"{self.name}-conn").start()
        return 0

    def _serve(self, sock, address):
        slot = self.limiter.track(sock) if self.limiter is not None else None
        conn = None
        try:
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock.settimeout(self.initial_timeout)   # of the handshake
                sock = self.tls.wrap_socket(sock, server_side=True)
            http.set_timeout(sock, self.initial_timeout)
            conn = http.Connection(sock, self, address, self.initial_timeout)
            if slot is not None:
                slot.conn = conn
            with self._lock:
                self.connections.add(conn)
            if self.app.metrics is not None:
                self.app.metrics.connection(+1)
            http.Handler(sock, address, self, conn)
        except (OSError, ssl.SSLError) as e:
            log.info("%s: connection failed: %s", self.name, e)
        except Exception:
            log.exception("%s: connection failed", self.name)
        finally:
            if conn is not None:
                with self._lock:
                    self.connections.discard(conn)
                if self.app.metrics is not None:
                    self.app.metrics.connection(-1)
                conn.close()
            handed_over = slot is not None and self.limiter.untrack(slot)
            try:
                sock.close()
            except OSError:
                pass
            if self.limiter is not None and not handed_over:
                self.limiter.release()

    def stop_accepting(self):
        self.stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        address = self.sock.getsockname() if self.sock.family == socket.AF_UNIX else None
        self.sock.close()
        if address and isinstance(address, str) and not address.startswith("\0"):
            try:
                os.unlink(address)
            except OSError:
                pass
        os.close(self._wake_r)
        os.close(self._wake_w)

    def close_connections(self, busy_too):
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            if busy_too or not conn.busy:
                conn.shutdown()

    def busy(self):
        with self._lock:
            return sum(1 for c in self.connections if c.busy)

    def _wait_for_room(self, sock, address):
        """A connection over the limit waits in line for WAIT_FOR_ROOM, then gets a 503."""
        try:
            if self.limiter.wait(WAIT_FOR_ROOM):
                self._refusing.release()
                self._serve(sock, address)
                return
        except BaseException:
            self._refusing.release()
            sock.close()
            raise
        log.warning("%s: too many connections, refusing one", self.name)
        self._refuse(sock)

    def _refuse(self, sock):
        """Answer 503 to a connection over the limit, in its own thread: after the TLS handshake
        (a plain-text answer means nothing to a TLS client) and after its request head (a
        client still sending would get a broken pipe, not the answer), then close lingering."""
        body = b"Too many connections\n"
        try:
            sock.settimeout(REFUSE_TIMEOUT)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                head += chunk
            # A page on another origin reads the 503 only with its CORS headers (API.md 7c).
            extra = "".join(f"{k}: {v}\r\n" for k, v in cors.for_raw_head(head).items())
            sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nServer: nbdproxy/%s\r\n"
                         b"Date: %s\r\nContent-Type: text/plain; charset=UTF-8\r\n%s"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (__version__.encode(), http.http_date(int(time.time())).encode(),
                            extra.encode("latin-1"), len(body),
                            b"" if head.startswith(b"HEAD ") else body))
            http._linger(sock)
        except (OSError, ValueError):
            pass
        finally:
            sock.close()
            self._refusing.release()


class Server:
    """The daemon: a registry of tickets and the services that serve it."""

    def __init__(self, config):
        self.config = config
        self.metrics = metrics.Metrics()
        self.backend_settings = backends.Settings(
            nbd_connections=config.nbd_connections, nbd_request_size=config.nbd_request_size,
            nbd_timeout=config.nbd_timeout, nbd_connect_timeout=config.nbd_connect_timeout,
            nbd_idle_timeout=config.nbd_idle_timeout, file_direct=config.file_direct,
            nbd_tls_certificates=config.nbd_tls_certificates or None,
            closer=IdleCloser(), metrics=self.metrics,
            backend_timeout=config.backend_timeout,
            backend_ssl=backend_tls_context(config.backend_ca_file),
            run_dir=config.run_dir, qemu_nbd=Supervisor(), pipe_fds=FdBudget())
        self.metrics.qemu_nbd = self.backend_settings.qemu_nbd
        self.registry = tickets.Registry(self._open_backend, config.remove_timeout, self.metrics,
                                         config.max_tickets)
        self.metrics.registry = self.registry
        # One budget for the checksum buffers of both data services.
        self.checksum_budget = checksum.Budget(config.checksum_memory)
        self.services = []
        # Signal handlers only note the signal and write to a pipe, which takes no lock (a
        # handler may run while the main thread holds one); serve() acts on them.
        self._signals = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)    # a full pipe already wakes serve()

    def _open_backend(self, fields):
        return backends.open_backend(fields["url"], "write" in fields["ops"], fields["dirty"],
                                     self.backend_settings, image=fields["image"],
                                     size=fields["size"], sparse=fields["sparse"])

    def bind(self):
        """Bind every configured service; ConfigError (after closing what was bound) on failure."""
        cfg = self.config
        raise_fd_limit()
        try:
            # An unsafe run_dir is a bad setting, not a 500 at the first image ticket.
            image_backend.run_dir(cfg.run_dir)
        except errors.BackendError as e:
            raise ConfigError(f"run_dir: {e}") from None
        try:
            # The certificate first: a bad one fails before any socket is made.
            tls = None
            if cfg.port != -1 and not cfg.no_tls:
                tls = tls_context(cfg.cert_file, cfg.key_file)
            group = None
            if cfg.control_group:
                try:
                    group = grp.getgrnam(cfg.control_group).gr_gid
                except KeyError:
                    raise ConfigError(f"no such group {cfg.control_group!r}") from None
            control = _unix_listener(cfg.control_socket, 0o660 if group is not None else 0o600,
                                     group)
            self.services.append(Service("control", control,
                                         App("control", self.registry, metrics=self.metrics),
                                         limiter=Limiter(MAX_CONTROL_CONNECTIONS, evict=False),
                                         answer_refused=False))
            # Each data service has max_connections of its own: a flood on the network does
            # not lock out the local clients.
            local = cfg.local_address
            if local:
                sock = _unix_listener(local, 0o660)
                self.services.append(Service("local", sock, self._data_app("local"),
                                             limiter=Limiter(cfg.max_connections)))
            if cfg.port != -1:
                sock = _tcp_listener(cfg.host, cfg.port)
                self.services.append(Service("remote", sock, self._data_app("remote"), tls,
                                             limiter=Limiter(cfg.max_connections)))
        except BaseException:
            for service in self.services:
                _close_listener(service.sock)
            raise

    def _data_app(self, name):
        return App(name, self.registry, self.config.buffer_size, self.config.local_address,
                   self.metrics, self.checksum_budget)

    def describe(self):
        parts = []
        for s in self.services:
            if s.name == "remote":
                host, port = s.address[:2]
                scheme = "https" if s.tls else "http"
                parts.append(f"remote={scheme}://{'[' + host + ']' if ':' in host else host}"
                             f":{port}")
            else:
                parts.append(f"{s.name}={_show(s.address)}")
        return " ".join(parts)

    def serve(self):
        """Run until SIGTERM or SIGINT (or stop()), then stop cleanly."""
        for service in self.services:
            service.initial_timeout = getattr(self.config, "initial_timeout", INITIAL_TIMEOUT)
            service.start()
        log.info("nbdproxy ready %s", self.describe())
        while self._handle_signals():
            os.read(self._wake_r, 64)
        self.shutdown()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def stop(self, *_):
        self._note_signal(signal.SIGTERM, None)

    def install_signal_handlers(self):
        # The others too: their default action would kill the daemon mid-transfer, leaving
        # socket files behind.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                    signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF):
            signal.signal(sig, self._note_signal)
        # The kernel may deliver a signal to any thread; then the main thread's read() is not
        # interrupted and the Python handler would wait for it. The C handler writes to this
        # pipe from whatever thread got the signal, so serve() always wakes.
        signal.set_wakeup_fd(self._wake_w)

    def _note_signal(self, signum, _frame):
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b"s")
        except BlockingIOError:
            pass

    def _handle_signals(self):
        """Act on the signals noted; False when one of them asks to stop."""
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                return False
            if signum == signal.SIGHUP:
                self.reload_tls()
                self.reload_backend_ca()
            else:
                log.info("ignoring %s", signal.Signals(signum).name)
        return True

    def reload_tls(self):
        """SIGHUP: load the certificate and key files again, for the connections to come (those
        open keep theirs). A pair that cannot be loaded leaves the old one in use."""
        remote = [s for s in self.services if s.tls is not None]
        if not remote:
            log.info("SIGHUP: no TLS certificate to reload (other settings need a restart)")
            return
        try:
            ctx = tls_context(self.config.cert_file, self.config.key_file)
        except ConfigError as e:
            log.error("SIGHUP: keeping the current certificate: %s", e)
            return
        for service in remote:
            service.tls = ctx       # read once per new connection
        log.info("SIGHUP: reloaded certificate %s and key %s (other settings need a restart)",
                 self.config.cert_file, self.config.key_file)

    def reload_backend_ca(self):
        """SIGHUP: read backend_ca_file again, for the upstream connections to come."""
        if not self.config.backend_ca_file:
            return
        try:
            self.backend_settings.backend_ssl = backend_tls_context(
                self.config.backend_ca_file)
        except ConfigError as e:
            log.error("SIGHUP: keeping the current backend CA: %s", e)
            return
        log.info("SIGHUP: reloaded backend CA %s", self.config.backend_ca_file)

    def shutdown(self):
        """No new connections; idle ones close; running requests get stop_timeout to finish."""
        log.info("stopping")
        for service in self.services:
            service.stop_accepting()
        deadline = time.monotonic() + self.config.stop_timeout
        while True:
            for service in self.services:
                service.close_connections(busy_too=False)
            busy = sum(s.busy() for s in self.services)
            if not busy:
                break
            if time.monotonic() > deadline:
                log.warning("%d requests still running after %d s; closing them",
                            busy, self.config.stop_timeout)
                for service in self.services:
                    service.close_connections(busy_too=True)
                break
            time.sleep(0.05)
        # Image tickets in parallel: each close waits for its qemu-nbd to exit (up to 10 s).
        closing = []
        for ticket in self.registry.list():
            if ticket.image is None:
                ticket.backend.close()
            else:
                closing.append(threading.Thread(target=ticket.backend.close, name="close"))
                closing[-1].start()
        for thread in closing:
            thread.join()
        # Those still busy then (their stop waits for the last request) stop now.
        self.backend_settings.qemu_nbd.stop_all()
        log.info("stopped")
