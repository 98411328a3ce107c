"""One kept-alive HTTP connection to an upstream daemon (a channel of the http backend): the
requests it forwards, streamed both ways, and the upstream's answers checked before they are
believed (statuses, ranges, JSON), failures as errors.BadGateway naming the upstream.
"""

import http.client
import json
import queue
import re
import select
import socket
import ssl
import threading
import urllib.parse

from .. import errors
from . import json_items
from .pipeline import read_fully

# The most moved per yield or per sized PUT: cancel and progress see every piece.
PIECE = 2 * 1024**2
# PATCH zero is sent in pieces of this size, so that a cancel stops it between pieces.
MAX_ZERO = 1024**3
# Upstream error bodies and JSON answers (OPTIONS, checksum) are small; more is not ours.
MAX_SMALL_BODY = 64 * 1024


_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/(?:[0-9]{1,20}|\*)")


def tls_context(cafile):
    """The context that verifies upstream certificates: cafile's CAs, else the system's store."""
    try:
        return ssl.create_default_context(cafile=cafile or None)
    except (OSError, ssl.SSLError) as e:
        raise errors.ConfigError(f"backend_ca_file: cannot load {cafile!r}: "
                                 f"{e.strerror or e}") from None


def _describe(e):
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate refused: {e.verify_message or e}"
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class Upstream:
    """One kept-alive HTTP connection to the upstream daemon: a channel of the backend."""

    # What Pool asks of a connection: nothing written here is ever unflushed on our side
    # (the upstream keeps what it acknowledged), and a flush covers the upstream's ticket.
    broken = False
    multi_conn = True
    unflushed = 0

    def __init__(self, backend):
        self.b = backend
        timeout = backend.settings.backend_timeout or None
        if backend.scheme == "https":
            context = backend.settings.backend_ssl or tls_context(None)
            self.conn = http.client.HTTPSConnection(backend.host, backend.port,
                                                    timeout=timeout, context=context)
        else:
            self.conn = http.client.HTTPConnection(backend.host, backend.port, timeout=timeout)
        self.conn.response_class = _FinalResponse
        self._reusable = True
        try:
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            raise self._gateway(f"cannot connect: {_describe(e)}") from None

    # Pool's side

    def take_unflushed(self):
        return 0

    def alive(self):
        """Usable for the next request: open, and the upstream did not close it meanwhile."""
        sock = self.conn.sock
        if not self._reusable or sock is None:
            return False
        try:
            return not select.select([sock], [], [], 0)[0]
        except (OSError, ValueError):
            return False

    def close(self):
        self.conn.close()

    def caps(self, max_connections):
        return self.b.caps(self)

    # Requests

    @property
    def size(self):
        return self.b.info["size"]

    def _gateway(self, what):
        return errors.BadGateway(f"Upstream {self.b.where} failed: {what}")

    def _send(self, method, url, body=None, headers=None):
        """One request without a streamed body; the response (its status not yet checked).
        A kept-alive connection the upstream closed meanwhile is reopened once."""
        for attempt in (1, 2):
            reused = self.conn.sock is not None
            try:
                if not reused:
                    self.conn.connect()
                self.conn.request(method, url, body=body, headers=headers or {})
                return self.conn.getresponse()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected) as e:
                self.conn.close()
                if attempt == 2 or not reused:
                    raise self._gateway(_describe(e)) from None
            except (OSError, http.client.HTTPException) as e:
                self._fail()
                raise self._gateway(_describe(e)) from None

    def _fail(self):
        self._reusable = False
        self.conn.close()

    def _check(self, resp, ok=(200,)):
        """Raise the project error for an upstream answer not in ok: 5xx (and anything but a
        4xx) -> BadGateway; a 4xx -> the error with its status and the upstream's message."""
        if resp.status in ok:
            return
        try:
            body = resp.read(MAX_SMALL_BODY) if (resp.length or 0) <= MAX_SMALL_BODY else b""
        except (OSError, http.client.HTTPException):
            body = b""
        if not resp.isclosed() or resp.will_close:
            self._fail()
        text = body.decode("utf-8", "replace").strip()
        first = text.splitlines()[0] if text else resp.reason
        if not 400 <= resp.status < 500:
            raise self._gateway(f"{resp.status} {first}")
        if resp.status == 416:
            total = (resp.getheader("Content-Range") or "").rpartition("/")[2]
            raise errors.RangeNotSatisfiable(first, int(total) if total.isdigit() else None)
        if resp.status == 405:
            raise errors.MethodNotAllowed(first, resp.getheader("Allow") or "OPTIONS")
        raise errors.UpstreamRefused(first, resp.status)

    def _small_json(self, resp):
        try:
            if resp.length is not None and resp.length > MAX_SMALL_BODY:
                raise ValueError("too large")
            data = resp.read(MAX_SMALL_BODY + 1)
            if len(data) > MAX_SMALL_BODY or not resp.isclosed():
                raise ValueError("too large")
            return json.loads(data)
        except (OSError, http.client.HTTPException) as e:
            self._fail()
            raise self._gateway(_describe(e)) from None
        except (ValueError, RecursionError):
            self._fail()
            raise self._gateway("the answer is not the JSON expected") from None
        finally:
            if resp.will_close:
                self._fail()

    def options(self):
        resp = self._send("OPTIONS", self.b.path)
        self._check(resp)
        info = self._small_json(resp)
        if not isinstance(info, dict) or not isinstance(info.get("features", []), list):
            raise self._gateway("OPTIONS: not the JSON object expected")
        out = {"features": [f for f in info.get("features", []) if isinstance(f, str)]}
        for key in ("max_readers", "max_writers"):
            value = info.get(key, 1)
            out[key] = value if json_items.is_int(value) and value >= 1 else 1
        if json_items.is_int(info.get("size")) and info["size"] >= 0:
            out["size"] = info["size"]
        return out

    def read(self, buf, offset, length):
        """Ask the upstream for the range now (so that its refusal comes before our answer's
        head); return the iterator of views of buf that streams its body."""
        if not length:
            return iter(())
        resp = self._send("GET", self.b.path,
                          headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        self._check(resp, (200, 206) if offset == 0 else (206,))
        if resp.length != length:
            self._fail()
            raise self._gateway(f"asked {length} bytes at {offset}, it sends {resp.length}")
        # A 206 of the right length but of another range would put its bytes in the wrong place
        # (a 200 is the whole image: right only from 0, of the length asked, checked above).
        if resp.status == 206:
            got = resp.getheader("Content-Range", "")
            m = _CONTENT_RANGE.fullmatch(got)
            if not m or (int(m[1]), int(m[2])) != (offset, offset + length - 1):
                self._fail()
                raise self._gateway(f"asked bytes {offset}-{offset + length - 1}, it sends "
                                    f"Content-Range {got[:60]!r}")
        return self._stream(resp, memoryview(buf)[:PIECE], length)

    def _stream(self, resp, view, length):
        left = length
        try:
            while left:
                n = min(len(view), left)
                self._fill(resp.readinto, view[:n])
                left -= n
                yield view[:n]
        finally:
            if left:
                self._fail()

    def _fill(self, readinto, view):
        try:
            got = 0
            while got < len(view):
                n = readinto(view[got:])
                if not n:
                    raise self._gateway("the response ended early")
                got += n
        except (OSError, http.client.HTTPException) as e:
            self._fail()
            raise self._gateway(_describe(e)) from None

    def read_into(self, view, offset):
        for _ in self.read(view, offset, len(view)):
            pass        # the views are view itself, in pieces
        return view

    def write(self, readinto, buf, offset, length, on_written, limit, punch_hole=False,
              check=None):
        """Forward a body: a known length streams as one PUT; a chunked body (length None)
        goes as sized PUTs of a piece each, since ovirt-imageio takes no chunked body."""
        check = check or (lambda: None)
        view = memoryview(buf)[:PIECE]
        if length is None:
            pos = offset
            while True:
                check()
                n = read_fully(readinto, view, exact=False)
                if not n:
                    return
                if pos + n > limit:
                    raise errors.RangeNotSatisfiable(
                        f"The body passes the end of the image, {limit}", limit)
                self._put(pos, n, lambda: (v for v in (view[:n],)), check)
                on_written(n)
                pos += n
        if offset + length > limit:
            raise errors.RangeNotSatisfiable(f"Writing {length} bytes at {offset} would pass "
                                             f"the end of the image, {limit}", limit)
        if not length:
            return

        slots = [memoryview(buf)[i * PIECE:(i + 1) * PIECE] for i in range(2)]
        self._put(offset, length, lambda: _read_ahead(readinto, slots, length, on_written),
                  check)

    def _put(self, offset, length, pieces, check):
        url = f"{self.b.path}?flush=n"
        try:
            if self.conn.sock is None:
                self.conn.connect()
            self.conn.putrequest("PUT", url, skip_accept_encoding=True)
            self.conn.putheader("Content-Length", str(length))
            self.conn.putheader("Content-Range", f"bytes {offset}-{offset + length - 1}/*")
            self.conn.endheaders()
        except (OSError, http.client.HTTPException) as e:
            self._fail()
            raise self._gateway(_describe(e)) from None
        sent, sent_error, body = 0, None, pieces()
        try:
            for piece in body:
                check()
                try:
                    self.conn.send(piece)
                except (OSError, http.client.HTTPException) as e:
                    # The upstream may have refused the request and closed: its answer says why.
                    sent_error = e
                    break
                sent += len(piece)
        except BaseException:
            self._fail()        # the upstream holds a partial body: never reuse this
            raise
        finally:
            body.close()
        try:
            resp = self.conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self._fail()
            raise self._gateway(_describe(sent_error or e)) from None
        self._check(resp)
        resp.read()
        if sent != length:
            self._fail()
            raise self._gateway(f"PUT sent {sent} of {length} bytes: {_describe(sent_error)}")

    def zero(self, offset, length, punch_hole, buf=None):
        """PATCH zero in pieces; the upstream ticket's sparse decides whether holes are made."""
        end = offset + length
        while offset < end:
            n = min(MAX_ZERO, end - offset)
            self._patch({"op": "zero", "offset": offset, "size": n, "flush": False})
            offset += n
            yield n

    def flush(self, covers=()):
        self._patch({"op": "flush"})

    def _patch(self, msg):
        resp = self._send("PATCH", self.b.path, body=json.dumps(msg).encode(),
                          headers={"Content-Type": "application/json"})
        self._check(resp)
        self._drain(resp)

    def _drain(self, resp):
        try:
            resp.read()
        except (OSError, http.client.HTTPException) as e:
            self._fail()
            raise self._gateway(_describe(e)) from None
        if resp.will_close:
            self._fail()

    def checksum(self, algorithm, block_size):
        query = urllib.parse.urlencode({"algorithm": algorithm, "block_size": block_size})
        resp = self._send("GET", f"{self.b.path}/checksum?{query}")
        self._check(resp)
        result = self._small_json(resp)
        if not isinstance(result, dict) or not isinstance(result.get("checksum"), str):
            raise self._gateway("checksum: not the JSON object expected")
        return {"algorithm": algorithm, "block_size": block_size,
                "checksum": result["checksum"]}

    def extents(self, context, offset, length, check=None):
        """The upstream's extents of [offset, offset+length), asked as a window (nbdproxy) and
        clipped to it (ovirt-imageio answers its whole map), parsed as they arrive."""
        check = check or (lambda: None)
        end = offset + length
        pos = offset
        upstream = self.upstream_extents(context, offset, length, check)
        try:
            for e in upstream:
                check()
                if e.start >= end:
                    break       # ovirt-imageio's map goes on past the window
                if e.start + e.length <= pos:
                    continue
                if e.start > pos:
                    raise self._gateway(f"extents: a gap at {pos}-{e.start}")
                stop = min(e.start + e.length, end)
                yield e._replace(start=pos, length=stop - pos)
                pos = stop
        finally:
            upstream.close()
        if pos < end:
            raise self._gateway(f"extents: the map ends at {pos}, before {end}")

    def upstream_extents(self, context, offset, length, check=None):
        """Every extent the upstream answers (from 0 when it ignores the window), checked to be
        contiguous; the connection is not reused when the caller stops early."""
        url = f"{self.b.path}/extents?context={context}"
        if offset is not None:
            url += f"&start={offset}&length={length}"
        resp = self._send("GET", url)
        self._check(resp)
        done = False
        try:
            prev_end = None
            read = resp.read1 if hasattr(resp, "read1") else resp.read
            for item in json_items.array_items(read, check):
                e = json_items.extent(item, context)
                if e is None:
                    raise self._gateway(f"extents: not the JSON expected: {str(item)[:80]}")
                if prev_end is not None and e.start != prev_end:
                    raise self._gateway(f"extents: extent at {e.start} does not start where "
                                        f"the one before ends, {prev_end}")
                prev_end = e.start + e.length
                yield e
            resp.read()     # what follows the array: a newline, the end of the chunks
            done = True
        except ValueError as e:
            raise self._gateway(f"extents: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            raise self._gateway(_describe(e)) from None
        finally:
            if not done or not resp.isclosed() or resp.will_close:
                self._fail()


def _read_ahead(readinto, slots, length, on_written):
    """The body's pieces, each read into a slot by a thread of its own while the one before is
    sent: the client's socket and the upstream's (TLS encryption) work at the same time."""
    ready, free = queue.SimpleQueue(), queue.SimpleQueue()
    for slot in slots:
        free.put(slot)

    def read():
        left = length
        try:
            while left:
                slot = free.get()
                if slot is None:
                    return
                n = min(len(slot), left)
                read_fully(readinto, slot[:n], exact=True)
                left -= n
                ready.put((slot, n))
        except BaseException as e:
            ready.put(e)

    reader = threading.Thread(target=read, name="body-read", daemon=True)
    reader.start()
    left = length
    try:
        while left:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            slot, n = item
            yield slot[:n]
            on_written(n)       # sent; the PUT's answer acknowledges all of it
            left -= n
            free.put(slot)
    finally:
        free.put(None)
        # Stopped early (the upstream failed, a cancel): the reader may sit in a read of a
        # client that sends slowly; it ends with that read, and nobody waits for it.
        if not left:
            reader.join()


class _FinalResponse(http.client.HTTPResponse):
    """A response that skips interim 1xx answers (103 Early Hints...), as RFC 9110 15.2 wants;
    http.client skips only 100 Continue."""

    def _read_status(self):
        while True:
            version, status, reason = super()._read_status()
            if not 100 < status < 200 or status == 101:
                return version, status, reason
            http.client.parse_headers(self.fp)      # the interim answer's header lines
