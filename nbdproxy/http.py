"""The HTTP/1.1 connection loop: request heads parsed, bodies framed, answers streamed.

One thread serves one connection. Bodies are read with readinto and written from memoryviews, so
no data is copied in Python on the way between the socket and NBD.
"""

import email.utils
import functools
import http.server
import io
import logging
import mmap
import re
import socket
import ssl
import struct
import time
import urllib.parse

import webob

from . import __version__, errors

log = logging.getLogger("nbdproxy.http")

MAX_REQUEST_LINE = 4096
# Limits of the request head, request line included: 431 past them. One bound on the whole head
# keeps what a connection's head costs small (100 lines of 64 KiB each were about 20 MB).
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100

_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_TOKEN_BYTES = re.compile(_TOKEN.pattern.encode())
# A CR, LF or NUL inside a value (a bare CR, an obs-fold continuation is caught as a bad name).
_BAD_VALUE = re.compile(rb"[\r\n\0]")
MAX_CHUNK_LINE = 1024
# A chunk size is HEXDIG only (RFC 9112 7.1): int(x, 16) also takes "0x5", "+5", "0_5", "-0".
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")

# Bodies smaller than this go out in the same send as the head.
SMALL_BODY = 64 * 1024

# After answering a request whose body we did not read, and closing, we keep reading (and
# dropping) what the client still sends for this long and this much, so that a client busy
# sending its body gets our answer instead of a broken pipe (a "lingering close").
LINGER_SECONDS = 2
LINGER_BYTES = 64 * 1024**2


class Body:
    """The request body (wsgi.input), framed by Content-Length or chunked encoding.

    A client that sent `Expect: 100-continue` gets `100 Continue` when the body is first read, so
    a request refused before that never makes the client send its body.
    """

    def __init__(self, handler, length, chunked, expect_continue):
        self._handler = handler
        self._rfile = handler.rfile
        self._remaining = length
        self._chunked = chunked
        self._chunk_left = 0
        self._expect_continue = expect_continue
        self.received = 0
        self.done = length == 0 and not chunked
        self.gone = None        # why, when the client left before it could be answered

    @property
    def complete(self):
        return self.done

    def _continue(self):
        if self._expect_continue:
            self._expect_continue = False
            try:
                self._handler.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError as e:
                # The client left without waiting for its answer: not a server error.
                self.gone = f"the client left before 100 Continue: {e.strerror or e}"
                raise errors.ClientGone(self.gone) from None

    def readinto(self, buf):
        """Read at most len(buf) bytes into buf; 0 at the end of the body."""
        if self.done or not len(buf):
            return 0
        self._continue()
        if self._chunked:
            return self._readinto_chunked(buf)
        n = self._readinto_raw(memoryview(buf)[:min(len(buf), self._remaining)])
        self._remaining -= n
        if self._remaining == 0:
            self.done = True
        return n

    def read(self, size=-1):
        out = bytearray()
        chunk = bytearray(min(size, 1024**2) if size >= 0 else 1024**2)
        while size < 0 or len(out) < size:
            view = memoryview(chunk)[:len(chunk) if size < 0 else min(len(chunk), size - len(out))]
            n = self.readinto(view)
            if not n:
                break
            out += view[:n]
        return bytes(out)

    def _readinto_raw(self, view):
        try:
            n = self._rfile.readinto(view)
        except (OSError, ValueError) as e:
            raise errors.ClientGone(f"reading the request body failed: {e}") from None
        if n is None:
            raise errors.ClientGone("the client sent nothing for the inactivity timeout")
        if not n:
            raise errors.ClientGone("the client closed the connection before the end of the body")
        self.received += n
        return n

    def _readline(self):
        try:
            line = self._rfile.readline(MAX_CHUNK_LINE + 1)
        except OSError as e:
            raise errors.ClientGone(f"reading the request body failed: {e}") from None
        if not line.endswith(b"\n"):
            if len(line) > MAX_CHUNK_LINE:
                raise errors.BadRequest("Invalid chunked body: line too long")
            # End of input, or (plain sockets) the inactivity timeout, inside the line.
            raise errors.ClientGone("the chunked body ended inside a chunk line")
        return line.strip()

    def _readinto_chunked(self, buf):
        if self._chunk_left == 0:
            size_field = self._readline().split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_field):
                raise errors.BadRequest(f"Invalid chunk size {size_field[:20]!r}")
            self._chunk_left = int(size_field, 16)
            if self._chunk_left == 0:
                while self._readline():     # trailers, up to the empty line
                    pass
                self.done = True
                return 0
        n = self._readinto_raw(memoryview(buf)[:min(len(buf), self._chunk_left)])
        self._chunk_left -= n
        if self._chunk_left == 0 and self._readline():
            raise errors.BadRequest("Invalid chunked body: chunk not followed by CRLF")
        return n


class Connection:
    """One client connection: its idle timeout, the tickets it used, its reusable buffer, totals."""

    def __init__(self, sock, service, address, timeout):
        self.id = next(service.connection_ids)
        self.sock = sock
        self.timeout = timeout      # as set by set_timeout()
        self.service = service
        self.address = address
        self.tickets = set()
        self.authorized = False     # a valid ticket was used: never closed to make room
        self.busy = False
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.monotonic()
        self._buffer = None

    def use_ticket(self, ticket):
        self.authorized = True
        if ticket not in self.tickets:
            self.tickets.add(ticket)
            ticket.add_connection(self)
        timeout = ticket.inactivity_timeout or None
        if timeout != self.timeout:     # system calls: not on every request
            set_timeout(self.sock, timeout)
            self.timeout = timeout

    def buffer(self, size):
        """The connection's buffer: anonymous memory, whose pages become resident only when a
        request touches them, so 64 KiB requests cost 64 KiB, not buffer_size, and the memory
        goes back to the system when the connection closes (no heap fragmentation)."""
        if self._buffer is None or len(self._buffer) != size:
            self._buffer = mmap.mmap(-1, size)
        return self._buffer

    def shutdown(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        self._buffer = None     # freed now, even if something still points at this connection
        for ticket in self.tickets:
            ticket.remove_connection(self)
        log.info("connection closed id=%d service=%s requests=%d in=%d out=%d seconds=%.3f",
                 self.id, self.service.name, self.requests, self.bytes_in, self.bytes_out,
                 time.monotonic() - self.started)


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves the requests of one connection through the service's app."""

    protocol_version = "HTTP/1.1"
    server_version = "nbdproxy/" + __version__
    # The stdlib's default, "HTTP/0.9", makes every answer bare (no status line, no headers):
    # errors found before the request line's version was read, and two-word request lines.
    default_request_version = "HTTP/1.0"

    def __init__(self, sock, address, service, connection):
        self.connection_state = connection
        self.service = service
        super().__init__(sock, address, service)

    def setup(self):
        super().setup()
        if not isinstance(self.connection, ssl.SSLSocket):
            self.wfile = _Writer(self.connection_state)

    # Parsing

    def handle_one_request(self):
        conn = self.connection_state
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 3)
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if not line:
            self.close_connection = True
            return
        conn.busy = True
        try:
            if len(line.rstrip(b"\r\n")) > MAX_REQUEST_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414, "Request line too long")
                return
            self.raw_requestline = line
            if not self.parse_request():
                return
            conn.requests += 1
            self._dispatch()
        finally:
            conn.busy = False
            if self.service.stopping:
                self.close_connection = True

    def finish(self):
        super().finish()
        if getattr(self, "linger", False):
            _linger(self.request)

    def parse_request(self):
        """Parse the request line and the header lines; on a bad one send the error, False.

        Our own parser: the stdlib's goes through the email package (a third of the daemon's CPU
        on small requests) and silently drops every header after a malformed line, Content-Length
        included, which would let the body be read as the next request.
        """
        self.command = None
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3:
            self.send_error(400, f"Bad request syntax ({self.requestline[:100]!r})")
            return False
        command, path, version = words
        m = _VERSION.fullmatch(version)
        if not m:
            self.send_error(400, f"Bad request version ({version[:20]!r})")
            return False
        if m[1] == "0":
            self.send_error(400, f"{version} is not supported")
            return False
        if m[1] != "1":
            self.send_error(505, f"Invalid HTTP version ({version[:20]})")
            return False
        if not _TOKEN.fullmatch(command):
            self.send_error(400, f"Bad request method ({command[:20]!r})")
            return False
        self.command, self.path, self.request_version = command, path, version
        headers = self._read_headers(MAX_HEAD - len(self.raw_requestline))
        if headers is None:
            return False
        if "transfer-encoding" in headers and "content-length" in headers:
            # Two framings: which one a proxy in front used is unknown (request smuggling).
            # RFC 9112 6.3 lets a server refuse it; the connection closes.
            self.send_error(400, "Content-Length and Transfer-Encoding together")
            return False
        coding = headers.get("transfer-encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            # Any other coding, or chunked not alone and last: the body's end is unknown to us
            # (RFC 9112 6.3); reading on would serve the body as the next request.
            self.send_error(400, f"Unsupported Transfer-Encoding {coding[:40]!r}")
            return False
        self.headers = headers
        connection = headers.get("connection", "").lower()
        if "close" in connection:
            self.close_connection = True
        elif version != "HTTP/1.0" or "keep-alive" in connection:
            self.close_connection = False
        return True

    def _read_headers(self, budget):
        """{lower-case name: value} of the header lines, at most budget bytes with the blank
        line that ends them; None after sending the error."""
        headers = {}
        count = 0
        while True:
            line = self.rfile.readline(budget + 1)
            budget -= len(line)
            if budget < 0:
                self.send_error(431, "Request head too large")
                return None
            if line in (b"\r\n", b"\n"):
                return headers
            if not line.endswith(b"\n"):
                self.send_error(400, "The request head ended early")
                return None
            count += 1
            if count > MAX_HEADERS:
                self.send_error(431, "Too many headers")
                return None
            name, sep, value = line.partition(b":")
            value = value.rstrip(b"\r\n").strip(b" \t")
            if not sep or not _TOKEN_BYTES.fullmatch(name) or _BAD_VALUE.search(value):
                self.send_error(400, "Invalid header line")
                return None
            key = name.decode("ascii").lower()
            text = value.decode("latin-1")
            headers[key] = headers[key] + "," + text if key in headers else text

    def _environ(self):
        target = self.path
        if target.startswith(("http://", "https://")):
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        path, _, query = target.partition("?")
        environ = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "0",
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": str(self.client_address),
            "wsgi.url_scheme": "https" if self.service.tls else "http",
            "wsgi.version": (1, 0),
            "wsgi.errors": None,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "nbdproxy.connection": self.connection_state,
        }
        for name, value in self.headers.items():
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_LENGTH", "CONTENT_TYPE"):
                key = "HTTP_" + key
            environ[key] = environ[key] + "," + value if key in environ else value
        chunked = "HTTP_TRANSFER_ENCODING" in environ     # parse_request took only chunked
        if chunked:
            environ.pop("CONTENT_LENGTH", None)
            length = None
        else:
            value = environ.get("CONTENT_LENGTH", "0") or "0"
            # A bad Content-Length is the handler's 400; the body is then left unread.
            # Only ASCII digits ("²".isdigit() is true), and few enough for int().
            length = int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else -1
        expect = environ.get("HTTP_EXPECT", "").lower() == "100-continue"
        body = Body(self, length, chunked, expect)
        if length == -1:
            body.done = False
        environ["wsgi.input"] = body
        return environ

    # Answering

    def _dispatch(self):
        environ = self._environ()
        body = environ["wsgi.input"]
        req = webob.Request(environ)
        resp = self.service.app.respond(req, self.connection_state)
        self.connection_state.bytes_in += body.received
        try:
            if body.gone:
                # No one to answer: one line, and the connection closes.
                log.info("client gone: %s", body.gone)
                self.close_connection = True
                close = getattr(resp.app_iter, "close", None)
                if close is not None:
                    close()
                return
            if not body.complete:
                resp.headers["Connection"] = "close"
                self.linger = True
            if resp.headers.get("Connection", "").lower() == "close":
                self.close_connection = True
            elif self.close_connection:
                # The client asked to close (Connection: close, or HTTP/1.0 without
                # keep-alive): say so in the answer, as RFC 9112 9.6 wants.
                resp.headers["Connection"] = "close"
            self._send(resp)
        finally:
            # webob caches parsed queries in environ, objects that point back to environ: a
            # cycle that would keep this connection (and its buffer) alive until a gc run.
            environ.clear()

    def _send(self, resp):
        app_iter = resp.app_iter
        try:
            head = [f"HTTP/1.1 {resp.status}\r\n{self._common_headers()}"]
            head += [f"{name}: {value}\r\n" for name, value in resp.headerlist
                     if name not in ("Server", "Date")]
            if self.command == "HEAD":
                self._write_head(head)
                return
            if isinstance(app_iter, list) and sum(map(len, app_iter)) <= SMALL_BODY:
                self._write_head(head, app_iter)
                self.connection_state.bytes_out += sum(map(len, app_iter))
                return
            # A body of unknown length (a streamed extents map) goes chunked, or to the close.
            chunked = resp.content_length is None
            if chunked and self.request_version == "HTTP/1.1":
                head.append("Transfer-Encoding: chunked\r\n")
            elif chunked:
                self.close_connection = True
                chunked = False
            self._write_head(head)
            self._stream(app_iter, chunked)
        except errors.ClientGone as e:
            log.info("client gone: %s", e)
            self.close_connection = True
        except OSError as e:
            log.info("sending the response failed: %s", e)
            self.close_connection = True
        finally:
            close = getattr(app_iter, "close", None)
            if close is not None:
                close()

    def _stream(self, app_iter, chunked=False):
        """Send the body; if the data source fails after the head went out, close the connection."""
        write = self.wfile.write
        conn = self.connection_state
        zero_copy = getattr(app_iter, "zero_copy", None)
        try:
            if zero_copy is not None and not chunked and isinstance(self.wfile, _Writer):
                # The backend sends from its storage to the socket (a plain one: not TLS).
                for n in zero_copy(conn.sock):
                    conn.bytes_out += n
                return
            for chunk in app_iter:
                if chunked:
                    if chunk:
                        write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    write(chunk)
                conn.bytes_out += len(chunk)
            if chunked:
                write(b"0\r\n\r\n")
        except (OSError, errors.ClientGone):
            # The client's side (zero copy says ClientGone): _send logs it as such, not as a
            # failed response.
            raise
        except Exception as e:
            self.close_connection = True
            if isinstance(e, errors.Canceled):
                log.info("stopped sending: %s", e)
            else:
                log.error("response failed after its head was sent: %s", e,
                          exc_info=not isinstance(e, errors.Error))

    def send_error(self, code, message=None, explain=None):
        """Errors found while parsing the request head: text/plain, and the connection closes."""
        self.close_connection = True
        self.linger = True
        reason = self.responses.get(code, ("Error",))[0]
        body = ((message or reason) + "\n").encode("utf-8", "replace")
        try:
            # The answer to HEAD has the headers of the answer to GET, and never a body.
            self._write_head([f"HTTP/1.1 {code} {reason}\r\n{self._common_headers()}"
                              "Content-Type: text/plain; charset=UTF-8\r\n"
                              f"Content-Length: {len(body)}\r\nConnection: close\r\n"],
                             [] if self.command == "HEAD" else [body])
        except OSError:
            pass

    def _common_headers(self):
        return f"Server: {self.server_version}\r\nDate: {http_date(int(time.time()))}\r\n"

    def _write_head(self, lines, body=()):
        """Send the head (lines without the blank line that ends it) and a small body, at once."""
        self.wfile.write(b"".join(["".join(lines).encode("latin-1"), b"\r\n", *body]))

    def log_message(self, format, *args):
        log.debug("%s: " + format, self.connection_state.id, *args)


class _Writer(io.BufferedIOBase):
    """sendall for a plain socket whose idle timeout is SO_SNDTIMEO.

    A blocking send returns early only when the timeout passed with the socket buffer full (or
    a signal came): it then returns what it had sent before it waited, and sendall would wait
    again, up to twice the timeout in all. Here a short send after waiting that long is the
    timeout.
    """

    def __init__(self, conn):
        self.conn = conn

    def writable(self):
        return True

    def write(self, data):
        sock, timeout = self.conn.sock, self.conn.timeout
        view = memoryview(data).cast("B")
        sent = 0
        while sent < len(view):
            started = time.monotonic()
            n = sock.send(view[sent:])
            sent += n
            if sent < len(view) and timeout and time.monotonic() - started >= timeout:
                raise TimeoutError("the client read nothing for the inactivity timeout")
        return sent


def set_timeout(sock, seconds):
    """Set the idle timeout of a client socket: None for none.

    A plain socket stays blocking, with the kernel's SO_RCVTIMEO and SO_SNDTIMEO: a Python
    timeout costs a poll(2) and a GIL hand-off before every recv and send (a tenth of the
    daemon's CPU on small requests). An expired receive timeout reads as the end of the input
    (the connection closes); an expired send fails with EAGAIN. A TLS socket keeps Python's
    timeout: on a blocking socket the ssl module retries a timed-out SSL_read forever.
    """
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    usec = round((seconds or 0) * 1e6)
    value = struct.pack("@ll", usec // 1000000, usec % 1000000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


@functools.lru_cache(maxsize=1)
def http_date(second):
    """The Date header of responses in this second: formatting it anew each time was 5 % of
    the daemon's Python time on small requests."""
    return email.utils.formatdate(second, usegmt=True)


def _linger(sock):
    """Close our side, then drop what the client still sends, until it closes or the limits."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        left = LINGER_BYTES
        buf = bytearray(64 * 1024)
        while left > 0:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            sock.settimeout(timeout)
            n = sock.recv_into(buf)
            if not n:
                break
            left -= n
    except (OSError, ValueError):
        pass
