"""An HTTP client of one image: OPTIONS, extents, GET ranges, PUT, PATCH zero and flush, checksum.

It speaks the ovirt-imageio 2.5 API (shared/docs/API.md), so it works with nbdproxy and with an
ovirt-imageio daemon. After OPTIONS it moves to the unix socket the server advertises when the
server is on this host, and stays on TCP when that does not work.
"""

import http.client
import json
import logging
import socket
import ssl
import urllib.parse

from .. import errors
from .connections import UnixHTTPConnection

log = logging.getLogger("nbdproxy.client")

# Extents are asked in windows of this size (nbdproxy's ?start=&length=), so a copy can start before
# the map of a huge image is built. A server that ignores the window answers the whole map at once.
EXTENTS_WINDOW = 64 * 1024**3


class ClientError(errors.Error):
    """A transfer failed; str() is the one line the command prints."""


class HTTPError(ClientError):
    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class TCPHTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TCPHTTPConnection(http.client.HTTPConnection):
    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def ssl_context(cafile=None, secure=True):
    if not secure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        raise ClientError(f"cannot load CA file {cafile}: {e}") from None


def is_local_host(host):
    """True when host names an address of this machine (binding a socket to it works)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _name, addr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind((addr[0], 0) + tuple(addr[2:]))
                return True
        except OSError:
            continue
    return False


def _describe(e):
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"{e.verify_message or e} (use --cafile FILE, or --insecure)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class ImageClient:
    """One HTTP connection to /images/TICKET. clone() makes another on the same transport."""

    def __init__(self, url, cafile=None, secure=True, unix_socket=True, timeout=60):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"invalid URL {url!r}: expecting https://HOST:PORT/images/TICKET")
        path = parts.path.rstrip("/")
        if not path.startswith("/images/") or path == "/images":
            raise ClientError(f"invalid URL {url!r}: expecting https://HOST:PORT/images/TICKET")
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ClientError(f"invalid port in URL {url!r}") from None
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.path = path
        self.timeout = timeout
        self.context = ssl_context(cafile, secure) if self.scheme == "https" else None
        self.transport = "tcp"
        self.unix_path = None
        self._conn = self._new_connection()
        self.info = self._options()
        if unix_socket:
            self._try_unix_socket()

    @property
    def where(self):
        return f"{self.scheme}://{self.host}:{self.port}"

    # Connections

    def _new_connection(self):
        if self.transport == "unix":
            return UnixHTTPConnection(self.unix_path, timeout=self.timeout)
        if self.scheme == "https":
            return TCPHTTPSConnection(self.host, self.port, timeout=self.timeout,
                                      context=self.context)
        return TCPHTTPConnection(self.host, self.port, timeout=self.timeout)

    def _try_unix_socket(self):
        path = self.info.get("unix_socket")
        if not path or not is_local_host(self.host):
            return
        conn = UnixHTTPConnection(path, timeout=self.timeout)
        try:
            # The same ticket must answer there: a socket of that name could be another daemon's.
            conn.request("OPTIONS", self.path)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise OSError(f"OPTIONS over the unix socket gave {resp.status}")
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            log.debug("staying on TCP: unix socket %r: %s", path, e)
            return
        log.debug("using the unix socket %r", path)
        self._conn.close()
        self._conn = conn
        self.transport = "unix"
        self.unix_path = path

    def clone(self):
        """Another client of the same image on its own connection, without asking OPTIONS again."""
        other = object.__new__(ImageClient)
        other.__dict__.update(self.__dict__)
        other._conn = self._new_connection()
        return other

    def close(self):
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Requests

    def _send(self, method, url, body=None, headers=None):
        """Send one request, reconnecting once when a kept-alive connection was closed meanwhile."""
        for attempt in (1, 2):
            try:
                self._conn.request(method, url, body=body, headers=headers or {})
                return self._conn.getresponse()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected,
                    http.client.CannotSendRequest, http.client.ResponseNotReady) as e:
                self._conn.close()
                if attempt == 2:
                    raise self._connection_error(e) from None
            except (OSError, http.client.HTTPException) as e:
                self._conn.close()
                raise self._connection_error(e) from None

    def _connection_error(self, e):
        return ClientError(f"cannot talk to {self.where}: {_describe(e)}")

    def _check(self, resp, method, expected=(200,)):
        if resp.status in expected:
            return
        try:
            body = resp.read().decode("utf-8", "replace").strip()
        except (OSError, http.client.HTTPException):
            body = ""
        finally:
            if resp.will_close:
                self._conn.close()
        raise self._status_error(method, resp.status, resp.reason, body)

    def _status_error(self, method, status, reason, body):
        first = body.splitlines()[0] if body else reason
        if status == 403:
            msg = f"{self.url}: ticket refused (403): {first}"
        elif status == 416:
            msg = f"{self.url}: {method} past the end of the image (416): {first}"
        else:
            msg = f"{self.url}: {method} failed: {status} {reason}: {first}"
        return HTTPError(msg, status)

    def _json(self, method, url, body=None):
        resp = self._send(method, url, body=body)
        self._check(resp, method)
        try:
            data = resp.read()
            return json.loads(data) if data else None
        except (OSError, http.client.HTTPException) as e:
            self._conn.close()
            raise self._connection_error(e) from None
        except ValueError:
            raise ClientError(f"{self.url}: {method}: the answer is not JSON") from None

    def _options(self):
        resp = self._send("OPTIONS", self.path)
        if resp.status == 405:
            # An old server with no features (API.md 1).
            resp.read()
            return {"features": []}
        self._check(resp, "OPTIONS")
        try:
            return json.loads(resp.read())
        except ValueError:
            raise ClientError(f"{self.url}: OPTIONS: the answer is not JSON") from None

    # The image

    @property
    def features(self):
        return self.info.get("features", [])

    @property
    def max_readers(self):
        return max(1, int(self.info.get("max_readers", 1)))

    @property
    def max_writers(self):
        return max(1, int(self.info.get("max_writers", 1)))

    @property
    def writable(self):
        return "zero" in self.features or "flush" in self.features

    def size(self):
        """The image size: OPTIONS's size (an nbdproxy addition), else the end of the extents."""
        if "size" not in self.info:
            end = 0
            for extent in self.extents():
                end = extent["start"] + extent["length"]
            self.info["size"] = end
        return self.info["size"]

    def extents(self, context="zero"):
        """Yield the extents of the image in order, asked a window at a time."""
        if "extents" not in self.features:
            if "size" not in self.info:
                raise ClientError(f"{self.url}: the server reports neither extents nor a size")
            yield {"start": 0, "length": self.info["size"], "zero": False, "hole": False,
                   "dirty": True}
            return
        start = 0
        size = self.info.get("size")
        while size is None or start < size:
            url = f"{self.path}/extents?context={context}"
            if size is not None:
                url += f"&start={start}&length={min(EXTENTS_WINDOW, size - start)}"
            resp = self._send("GET", url)
            if resp.status == 404 and context == "dirty":
                resp.read()
                raise HTTPError(f"{self.url}: no dirty extents: the ticket is not a dirty ticket "
                                "or the export has no dirty bitmap", 404)
            self._check(resp, "GET extents")
            try:
                extents = json.loads(resp.read())
            except ValueError:
                raise ClientError(f"{self.url}: extents: the answer is not JSON") from None
            if not extents:
                break
            for extent in extents:
                if extent["start"] + extent["length"] <= start:
                    continue     # the server ignored the window and answered from 0
                yield extent
            end = extents[-1]["start"] + extents[-1]["length"]
            if size is None or end <= start:
                break
            start = end

    def get(self, offset, length):
        """Send GET for [offset, offset+length); the response, whose body the caller reads fully."""
        end = offset + length - 1
        resp = self._send("GET", self.path, headers={"Range": f"bytes={offset}-{end}"})
        self._check(resp, "GET", (200, 206))
        if resp.length is not None and resp.length != length:
            resp.close()
            self._conn.close()
            raise ClientError(f"{self.url}: asked for {length} bytes at {offset}, "
                              f"the server sends {resp.length}")
        return resp

    def readinto(self, offset, view):
        """Read len(view) bytes at offset into view."""
        resp = self.get(offset, len(view))
        read_fully(resp.readinto, view, self)

    def put(self, offset, length, pieces, flush=False):
        """PUT length bytes at offset; pieces yields the body as buffers."""
        url = f"{self.path}?flush={'y' if flush else 'n'}"
        try:
            self._conn.putrequest("PUT", url)
            self._conn.putheader("Content-Length", str(length))
            self._conn.putheader("Content-Range", f"bytes {offset}-{offset + length - 1}/*")
            self._conn.endheaders()
        except (OSError, http.client.HTTPException) as e:
            self._conn.close()
            raise self._connection_error(e) from None
        sent = 0
        try:
            for piece in pieces:
                self._conn.send(piece)
                sent += len(piece)
        except OSError:
            # The server may have refused the request and closed; its answer says why.
            pass
        try:
            resp = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self._conn.close()
            raise self._connection_error(e) from None
        self._check(resp, "PUT")
        resp.read()
        if sent != length:
            self._conn.close()
            raise ClientError(f"{self.url}: PUT sent {sent} of {length} bytes")

    def zero(self, offset, length, flush=False):
        body = json.dumps({"op": "zero", "offset": offset, "size": length, "flush": flush})
        self._patch(body.encode())

    def flush(self):
        self._patch(b'{"op":"flush"}')

    def _patch(self, body):
        resp = self._send("PATCH", self.path, body=body,
                          headers={"Content-Type": "application/json"})
        self._check(resp, "PATCH")
        resp.read()

    def checksum(self, algorithm=None, block_size=None):
        query = urllib.parse.urlencode(
            {k: v for k, v in (("algorithm", algorithm), ("block_size", block_size)) if v})
        return self._json("GET", f"{self.path}/checksum" + (f"?{query}" if query else ""))


def read_fully(readinto, view, client=None):
    got = 0
    while got < len(view):
        try:
            n = readinto(view[got:])
        except (OSError, http.client.HTTPException) as e:
            if client is not None:
                client._conn.close()
                raise client._connection_error(e) from None
            raise
        if not n:
            where = client.where if client is not None else "the server"
            if client is not None:
                client._conn.close()
            raise ClientError(f"{where} closed the connection {len(view) - got} bytes early")
        got += n
    return got
