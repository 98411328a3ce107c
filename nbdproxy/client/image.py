"""An HTTP client of one image: OPTIONS, extents, GET ranges, PUT, PATCH zero and flush, checksum.

It speaks the ovirt-imageio 2.5 API (shared/docs/API.md), so it works with nbdproxy and with an
ovirt-imageio daemon. After OPTIONS it moves to the unix socket the server advertises when the
server is on this host, and stays on TCP when that does not work.
"""

import http.client
import json
import logging
import re
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
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as e:     # "Invalid IPv6 URL"
            raise ClientError(f"invalid URL {url!r}: {e}") from None
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
        # A ticket id may be any text: what HTTP cannot carry as it is goes percent-encoded
        # (UTF-8; a byte that was not UTF-8 on the command line goes as that byte).
        self.path = urllib.parse.quote(path, safe="/%!$&'()*+,;=:@", errors="surrogateescape")
        self.timeout = timeout
        self.context = ssl_context(cafile, secure) if self.scheme == "https" else None
        self.transport = "tcp"
        self.unix_path = None
        try:
            self._conn = self._new_connection()
        except http.client.InvalidURL as e:     # a host with a space or a control character
            raise ClientError(f"invalid URL {url!r}: {e}") from None
        self.info = self._options()
        if unix_socket:
            self._try_unix_socket()

    @property
    def where(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

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
        return self._read_json(resp, method)

    def _read_json(self, resp, what):
        """The JSON of resp's body; a body cut short or not JSON is one ClientError line."""
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self._conn.close()
            raise self._connection_error(e) from None
        try:
            return json.loads(data) if data else None
        except (ValueError, RecursionError):
            raise ClientError(f"{self.url}: {what}: the answer is not JSON") from None

    def _options(self):
        resp = self._send("OPTIONS", self.path)
        if resp.status == 405:
            # An old server with no features (API.md 1).
            resp.read()
            return {"features": []}
        self._check(resp, "OPTIONS")
        return _checked_options(self._read_json(resp, "OPTIONS"), self.url)

    # The image

    @property
    def features(self):
        return self.info.get("features", [])

    @property
    def max_readers(self):
        return max(1, self.info.get("max_readers", 1))

    @property
    def max_writers(self):
        return max(1, self.info.get("max_writers", 1))

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
        """Yield the extents of the image in order, asked a window at a time.

        Whatever the server answers, what is yielded covers [0, size) exactly, contiguous and in
        order (API.md 4b): a map with a gap, an overlap, a non-positive length, or one that ends
        early or passes the end is a ClientError, never a short copy. Without a size in OPTIONS
        the map asked from 0 gives the size.
        """
        if "extents" not in self.features:
            if "size" not in self.info:
                raise ClientError(f"{self.url}: the server reports neither extents nor a size")
            if self.info["size"]:
                yield {"start": 0, "length": self.info["size"], "zero": False, "hole": False,
                       "dirty": True}
            return
        size = self.info.get("size")
        pos = 0
        while size is None or pos < size:
            extents = self._extents_window(context, pos, size)
            first, end = _span(extents)
            if size is None and first is None:
                return          # an empty image
            if first is None or end <= pos:
                raise ClientError(f"{self.url}: the extents end at {pos}, before the end of "
                                  f"the image at {size}")
            if first > pos:
                raise ClientError(f"{self.url}: the extents leave a gap at {pos}-{first}")
            if size is not None and end > size:
                raise ClientError(f"{self.url}: the extents pass the end of the image: "
                                  f"{end} > {size}")
            for extent in extents:
                stop = extent["start"] + extent["length"]
                if stop <= pos:
                    continue     # the server ignored the window and answered from 0
                yield dict(extent, start=pos, length=stop - pos)
                pos = stop
            if size is None:
                return

    def _extents_window(self, context, start, size):
        """The checked extents the server answers for the window from start (all without size)."""
        url = f"{self.path}/extents?context={context}"
        if size is not None:
            url += f"&start={start}&length={min(EXTENTS_WINDOW, size - start)}"
        resp = self._send("GET", url)
        if resp.status == 404 and context == "dirty":
            resp.read()
            raise HTTPError(f"{self.url}: no dirty extents: the ticket is not a dirty ticket "
                            "or the export has no dirty bitmap", 404)
        self._check(resp, "GET extents")
        return _checked_extents(self._read_json(resp, "extents"), context, self.url)

    def get(self, offset, length):
        """Send GET for [offset, offset+length); the response, whose body the caller reads fully."""
        end = offset + length - 1
        resp = self._send("GET", self.path, headers={"Range": f"bytes={offset}-{end}"})
        self._check(resp, "GET", (200, 206))
        problem = self._range_problem(resp, offset, length)
        if problem:
            resp.close()
            self._conn.close()      # the body is not read: the connection is done
            raise ClientError(f"{self.url}: asked for bytes {offset}-{end}, {problem}")
        return resp

    def _range_problem(self, resp, offset, length):
        """Why resp does not carry exactly [offset, offset+length) of the image, or None.

        A 206 must say that range in Content-Range; a 200 is the whole image (the server ignored
        Range, as RFC 9110 lets it), which is the range only when that is all of the image.
        """
        if resp.status == 206:
            header = resp.getheader("Content-Range")
            m = _CONTENT_RANGE.fullmatch(header.strip()) if header else None
            if not m or (int(m[1]), int(m[2])) != (offset, offset + length - 1):
                return f"the server sends {_shown(header)} (206)"
        elif offset != 0 or length != self.info.get("size"):
            return "the server sends the whole image instead (200)"
        elif resp.length is None:
            return "the server sends the whole image (200) of unknown length"
        if resp.length is not None and resp.length != length:
            return f"the server sends {resp.length} bytes"
        return None

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
        result = self._json("GET", f"{self.path}/checksum" + (f"?{query}" if query else ""))
        if not isinstance(result, dict) or not isinstance(result.get("checksum"), str):
            raise ClientError(f"{self.url}: checksum: expecting a JSON object with a "
                              "\"checksum\" string")
        return result


# A 206's Content-Range (RFC 9110 14.4): the range it carries, and the total or "*".
_CONTENT_RANGE = re.compile(r"bytes[ ]+(\d+)-(\d+)/(?:\d+|\*)", re.IGNORECASE | re.ASCII)


def _shown(header):
    """A header's value as it may go into a one-line message."""
    if header is None:
        return "no Content-Range"
    return f"Content-Range {header[:80]!r}"


def read_fully(readinto, view, client=None):
    """Fill view (a bytearray or a memoryview) from readinto; the response must not end early."""
    view = memoryview(view).cast("B")     # a bytearray's slice would be a copy, never filled
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
            raise ClientError(f"{where}: the server's response ended {len(view) - got} bytes "
                              "early (the server closed the connection)")
        got += n
    return got


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_options(info, url):
    """OPTIONS's answer (API.md 1) with the types this client relies on, else a ClientError."""
    def bad(what):
        return ClientError(f"{url}: OPTIONS: unexpected answer: {what}")

    if not isinstance(info, dict):
        raise bad(f"expecting a JSON object, not {type(info).__name__}")
    features = info.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise bad("features is not a list of strings")
    for key in ("max_readers", "max_writers"):
        if key in info and not _is_int(info[key]):
            raise bad(f"{key} is not an integer: {str(info[key])[:40]!r}")
    if "size" in info and not (_is_int(info["size"]) and info["size"] >= 0):
        raise bad(f"size is not an integer >= 0: {str(info['size'])[:40]!r}")
    if info.get("unix_socket") is not None and not isinstance(info["unix_socket"], str):
        raise bad("unix_socket is not a string")
    return info


# The flags of an extent in each context: (required, optional) keys, all booleans.
FLAGS = {"zero": (("zero",), ("hole",)), "dirty": (("dirty",), ("zero",))}


def _checked_extents(extents, context, url):
    """The extents of one answer: a list of objects with integer start >= 0 and length > 0, each
    starting where the one before it ends, and boolean flags (optional ones default to False)."""
    def bad(what):
        return ClientError(f"{url}: extents: unexpected answer: {what}")

    if not isinstance(extents, list):
        raise bad(f"expecting a JSON array, not {type(extents).__name__}")
    required, optional = FLAGS[context]
    checked = []
    for i, e in enumerate(extents):
        if not isinstance(e, dict):
            raise bad(f"extent {i} is not an object")
        start, length = e.get("start"), e.get("length")
        if not (_is_int(start) and start >= 0):
            raise bad(f"extent {i}: start is not an integer >= 0")
        if not (_is_int(length) and length > 0):
            raise bad(f"extent {i}: length is not an integer > 0")
        if checked and start != checked[-1]["start"] + checked[-1]["length"]:
            raise bad(f"extent {i} starts at {start}, not where extent {i - 1} ends")
        flags = {}
        for key in required + optional:
            value = e.get(key, None if key in required else False)
            if not isinstance(value, bool):
                raise bad(f"extent {i}: {key} is not a boolean")
            flags[key] = value
        checked.append({"start": start, "length": length, **flags})
    return checked


def _span(extents):
    """(start of the first, end of the last) of checked extents; (None, None) when empty."""
    if not extents:
        return None, None
    return extents[0]["start"], extents[-1]["start"] + extents[-1]["length"]
