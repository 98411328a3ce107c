"""Handlers of /images/{ticket}: OPTIONS, GET and HEAD (download), PUT (upload), PATCH (zero, flush)."""

import json
import re
import select
import time
import unicodedata
import urllib.parse

import webob

from . import errors

# Features of a read-only ticket, and what a writable one adds (API.md 1).
READ_FEATURES = ["checksum", "extents"]
WRITE_FEATURES = ["checksum", "extents", "flush", "zero"]

# ASCII digits, and not thousands of them (int() refuses numbers of over 4300 digits).
_RANGE = re.compile(r"bytes=([0-9]{1,1000})-([0-9]{0,1000})")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,1000})-([0-9]{1,1000}|\*)/([0-9]{1,1000}|\*)")

# A PATCH body is a small JSON object; anything larger is not one of ours.
MAX_PATCH_BODY = 64 * 1024

# How often a long request looks whether its client left (a poll(2) each time).
CLIENT_CHECK_INTERVAL = 0.5
# RFC 9110 5.6.2 token; RFC 8187 attr-char (what filename*= may hold unencoded).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ATTR_CHARS = "!#$&+-.^_`|~"


def json_response(obj, status=200, **headers):
    body = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    resp = webob.Response(status=status, body=body, content_type="application/json",
                          charset=None)
    resp.headers.update(headers)
    return resp


def empty_response(status=200, **headers):
    resp = webob.Response(status=status, body=b"", charset=None)
    # webob sets no Content-Type for a 204; pop, not del, so that 204 does not fail with KeyError.
    resp.headers.pop("Content-Type", None)
    # API.md 0: every response has Content-Length, 0 without a body (webob omits it for 204).
    resp.headers["Content-Length"] = "0"
    resp.headers.update(headers)
    return resp


def authorize(ctx, ticket_id, op):
    ticket = ctx.registry.authorize(ticket_id, op)
    ctx.connection.use_ticket(ticket)
    return ticket


class Watch:
    """check() for a request that may run long without using its client's socket (checksum,
    zero, an extents walk): Canceled once the ticket is canceled, ClientGone once the client
    has closed the connection.

    The socket is polled at most every CLIENT_CHECK_INTERVAL, the first time that long after
    the start, so that short requests make no system call. A client that half-closes and
    waits for the answer to such a long request is taken for gone, as nginx takes it.
    """

    def __init__(self, ctx, operation):
        self.operation = operation
        self._next = time.monotonic() + CLIENT_CHECK_INTERVAL
        self._poll = None
        sock = getattr(ctx.connection, "sock", None)
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLRDHUP)   # and HUP, ERR, NVAL

    def __call__(self):
        self.operation.check()
        if self._poll is not None and time.monotonic() >= self._next:
            self._next = time.monotonic() + CLIENT_CHECK_INTERVAL
            if self._poll.poll(0):
                raise errors.ClientGone("the client closed the connection")

    def streaming(self):
        """The response body is going out: its writes find a client that left."""
        self._poll = None


# OPTIONS

def options(ctx, req, ticket_id):
    if ticket_id == "*":
        info = {"features": WRITE_FEATURES}
        if ctx.local_socket:
            info["unix_socket"] = ctx.local_socket
        return json_response(info, Allow="OPTIONS,GET,PUT,PATCH")
    ticket = authorize(ctx, ticket_id, "read")
    with ticket.backend.lend() as ch:
        size = min(ticket.size, ch.size)
        caps = ticket.backend.caps(ch)
    writable = ticket.may("write")
    features = WRITE_FEATURES if writable else READ_FEATURES
    if caps.features is not None:       # a proxy ticket: what its upstream has
        features = [f for f in features if f in caps.features]
    info = {
        "features": features,
        "max_readers": caps.max_connections,
        "max_writers": caps.max_connections,
        "size": size,
    }
    if ctx.local_socket:
        info["unix_socket"] = ctx.local_socket
    if ticket.transfer_id is not None:
        info["transfer_id"] = ticket.transfer_id
    ticket.touch()
    return json_response(info, Allow="OPTIONS,GET,PUT,PATCH" if writable else "OPTIONS,GET")


# GET and HEAD

def content_disposition(filename):
    """The Content-Disposition of a download (API.md 2): ASCII only, whatever the name holds."""
    if not filename:
        return "attachment"
    if filename.isascii():
        return "attachment; filename=" + _token_or_quoted(filename)
    # RFC 6266 4.3: filename*= for clients that read it, an ASCII filename= for those that do not.
    return (f"attachment; filename={_token_or_quoted(_ascii_fallback(filename))}; "
            f"filename*=UTF-8''{urllib.parse.quote(filename, safe=_ATTR_CHARS)}")


def _token_or_quoted(name):
    if _TOKEN.fullmatch(name):
        return name
    # Tickets hold no control characters (tickets.validate); any that got here become "_" so
    # that the header can never be split.
    name = re.sub(r"[\x00-\x1f\x7f]", "_", name)
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ascii_fallback(name):
    # "é" -> "e" (its base letter), anything else outside ASCII -> "_".
    decomposed = unicodedata.normalize("NFKD", name)
    base = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c if c.isascii() else "_" for c in base)


def parse_range(header):
    """(start, end_inclusive or None) from a Range header; None without one; 416 if unusable."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header.strip())
    if not m:
        raise errors.RangeNotSatisfiable(f"Unsupported range {header!r}", None)
    start = int(m[1])
    end = int(m[2]) if m[2] else None
    if end is not None and end < start:
        raise errors.RangeNotSatisfiable(f"Invalid range {header!r}", None)
    return start, end


def get(ctx, req, ticket_id, head=False):
    requested = parse_range(req.headers.get("Range"))
    ticket = authorize(ctx, ticket_id, "read")
    pool = ticket.backend
    h = pool.acquire()
    try:
        offset, length, status = _download_range(requested, ticket.size, h.size)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Disposition": content_disposition(ticket.filename),
            "Accept-Ranges": "bytes",
            "Content-Length": str(length),
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {offset}-{offset + length - 1}/{ticket.size}"
        stream = None if head else _download(ctx, ticket, h, offset, length)
    except BaseException:
        pool.release(h)
        raise
    if stream is None:
        pool.release(h)
        ticket.touch()
    resp = webob.Response(status=status, charset=None)
    if stream is not None:
        resp.app_iter = stream
    # Set last: webob drops Content-Length when app_iter is set.
    resp.headerlist = list(headers.items())
    return resp


def head(ctx, req, ticket_id):
    return get(ctx, req, ticket_id, head=True)


def _download_range(requested, ticket_size, export_size):
    if requested is None:
        return 0, min(ticket_size, export_size), 200
    start, end = requested
    for size in (ticket_size, export_size):
        if start >= size or (end is not None and end >= size):
            raise errors.RangeNotSatisfiable("Requested range not satisfiable", size)
    if end is None:
        end = min(ticket_size, export_size) - 1
    return start, end - start + 1, 206


class Stream:
    """A response body that uses a ticket's backend channel while it is sent.

    close() (called by the server whether or not the body was sent) gives the channel back and
    ends the ticket operation; a body not sent to the end counts as failed. zero_copy, when not
    None, is send_to(sock): the server may call it instead of iterating, on a plain socket.
    """

    def __init__(self, ticket, h, operation, chunks, zero_copy=None):
        self.ticket = ticket
        self.h = h
        self.operation = operation
        self.chunks = chunks
        self.zero_copy = zero_copy and self._send_to(zero_copy)
        self.ok = False
        self.closed = False
        self.finished = False

    def __iter__(self):
        yield from self.chunks
        self.ok = True

    def _send_to(self, counts):
        def send_to(sock):
            yield from counts(sock)
            self.ok = True
        return send_to

    def succeeded(self):
        """End the ticket operation now, before the last bytes reach the client, so that a client
        that got the whole body finds the ticket (active, transferred, expires) up to date."""
        if not self.finished:
            self.finished = True
            self.ticket.finish(self.operation, True)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.ticket.backend.release(self.h, reuse=self.ok)
        if not self.finished:
            self.finished = True
            self.ticket.finish(self.operation, self.ok)


def _download(ctx, ticket, h, offset, length):
    operation = ticket.start("read", offset, length)
    try:
        # Asked here, not in chunks(): a backend that asks an upstream first (a proxy ticket)
        # then fails before the response's head goes out, with the upstream's status.
        views = h.read(ctx.connection.buffer(ctx.buffer_size), offset, length)
    except BaseException:
        ticket.finish(operation, False)
        raise

    def chunks():
        for view in views:
            if operation.done + len(view) >= length:
                # The last piece: the request is done before the client can see its end.
                operation.progress(len(view))
                stream.succeeded()
                yield view
            else:
                yield view
                operation.progress(len(view))

    def sent(sock):
        """Zero copy: the channel sends the range from the file itself, with the same cancel
        points (one per piece) and the same early finish as chunks()."""
        def last(n):
            operation.progress(n)
            stream.succeeded()

        pos, end = offset, offset + length
        for n in h.send_to(sock, offset, length, last):
            pos += n
            if pos < end:
                operation.progress(n)
            yield n

    zero_copy = sent if ticket.backend.caps(h).zero_copy else None
    stream = Stream(ticket, h, operation, chunks(), zero_copy)
    return stream


# PUT

def _content_length(req):
    value = req.environ.get("CONTENT_LENGTH")
    if value in (None, ""):
        if req.environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            return None
        raise errors.BadRequest("Content-Length header is required")
    if not (value.isascii() and value.isdigit() and len(value) <= 20):
        raise errors.BadRequest(f"Invalid Content-Length {value[:30]!r}")
    return int(value)


def _put_offset(req):
    header = req.headers.get("Content-Range")
    if header is None:
        return 0
    m = _CONTENT_RANGE.fullmatch(header.strip())
    if not m:
        raise errors.BadRequest(f"Invalid Content-Range {header!r}")
    start = int(m[1])
    end = None if m[2] == "*" else int(m[2])
    total = None if m[3] == "*" else int(m[3])
    if end is not None and end < start:
        raise errors.BadRequest(f"Invalid Content-Range {header!r}: end before start")
    if end is not None and total is not None and end >= total:
        raise errors.BadRequest(f"Invalid Content-Range {header!r}: end past the total")
    return start


def _flush_param(req):
    value = req.GET.get("flush", "y")
    if value not in ("y", "n"):
        raise errors.BadRequest(f"Invalid flush value {value!r}, expecting 'y' or 'n'")
    return value == "y"


def _check_write_range(offset, length, *sizes):
    for size in sizes:
        if offset + length > size:
            raise errors.RangeNotSatisfiable(
                f"Requested range {offset}-{offset + length} is past the image size {size}", size)


def put(ctx, req, ticket_id):
    length = _content_length(req)
    offset = _put_offset(req)
    flush = _flush_param(req)
    ticket = authorize(ctx, ticket_id, "write")
    if length is not None:
        _check_write_range(offset, length, ticket.size)    # before opening NBD
    with ticket.backend.lend() as h:
        if length is not None:
            _check_write_range(offset, length, h.size)
        with ticket.running("write", offset, length or 0) as operation:
            body = req.environ["wsgi.input"]
            # A client that leaves is found by reading its body; a cancel by check().
            h.write(body.readinto, ctx.connection.buffer(ctx.buffer_size), offset, length,
                    operation.progress, min(ticket.size, h.size), punch_hole=ticket.sparse,
                    check=operation.check)
            if flush:
                ticket.backend.flush(h)
    return empty_response(200)


# PATCH

def _json_body(req):
    value = req.environ.get("CONTENT_LENGTH") or "0"
    if not (value.isascii() and value.isdigit() and len(value) <= 20) \
            or int(value) > MAX_PATCH_BODY:
        raise errors.BadRequest("PATCH body must be a JSON object of at most 64 KiB")
    data = req.environ["wsgi.input"].read(int(value))
    try:
        msg = json.loads(data)
    except RecursionError:
        raise errors.BadRequest("Invalid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.BadRequest(f"Invalid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise errors.BadRequest("PATCH body must be a JSON object")
    return msg


def _int_key(msg, key, default=None):
    if key not in msg:
        if default is None:
            raise errors.BadRequest(f"Missing {key!r}")
        return default
    value = msg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.BadRequest(f"Invalid {key!r}: {value!r}, expecting an integer >= 0")
    return value


def patch(ctx, req, ticket_id):
    msg = _json_body(req)
    op = msg.get("op")
    if op == "zero":
        offset = _int_key(msg, "offset", 0)
        size = _int_key(msg, "size")
        flush = msg.get("flush", False)
        if not isinstance(flush, bool):
            raise errors.BadRequest(f"Invalid 'flush': {flush!r}, expecting a boolean")
        return _zero(ctx, ticket_id, offset, size, flush)
    if op == "flush":
        return _flush(ctx, ticket_id)
    raise errors.BadRequest(f"Unknown or missing op {op!r}, expecting 'zero' or 'flush'")


def _zero(ctx, ticket_id, offset, size, flush):
    ticket = authorize(ctx, ticket_id, "write")
    with ticket.backend.lend() as h:
        _check_write_range(offset, size, ticket.size, h.size)
        with ticket.running("zero", offset, size) as operation:
            check = Watch(ctx, operation)
            for n in h.zero(offset, size, ticket.sparse, ctx.connection.buffer(ctx.buffer_size)):
                operation.progress(n)
                check()
            if flush:
                ticket.backend.flush(h)
    return empty_response(200)


def _flush(ctx, ticket_id):
    ticket = authorize(ctx, ticket_id, "write")
    with ticket.backend.lend() as h, ticket.running("flush"):
        ticket.backend.flush(h)
    return empty_response(200)
