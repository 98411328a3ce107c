"""Handler of /images/{ticket}/extents: the backend's extents as JSON, zero or dirty (API.md 4b)."""

import itertools
import json

import webob

from . import errors
from .images import Stream, Watch, authorize, json_response

CONTEXTS = ("zero", "dirty")

# A full map with more extents than this is streamed (chunked) instead of sent whole.
MAX_BUFFERED = 10_000


def _as_dict(context, e):
    if context == "dirty":
        return {"start": e.start, "length": e.length, "dirty": e.dirty, "zero": e.zero}
    return {"start": e.start, "length": e.length, "zero": e.zero, "hole": e.hole}


def _number(text):
    """An integer >= 0 in ASCII digits (int() takes "1_0", "+1" and full-width digits too)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise errors.BadRequest(f"start and length must be integers >= 0, not {text[:30]!r}")
    return int(text)


def _window(req, size):
    """The [start, start+length) window asked with ?start=S&length=L, clipped to the image."""
    start = _number(req.GET.get("start", "0"))
    length = _number(req.GET["length"]) if "length" in req.GET else None
    if start > size:
        raise errors.RangeNotSatisfiable(f"start {start} is past the image size {size}", size)
    end = size if length is None else min(size, start + length)
    return start, end - start


def get(ctx, req, ticket_id):
    context = req.GET.get("context", "zero")
    if context not in CONTEXTS:
        raise errors.BadRequest(f"Unknown context {context!r}, expecting one of {CONTEXTS}")
    ticket = authorize(ctx, ticket_id, "read")
    if context == "dirty" and not ticket.dirty:
        raise errors.NotFound(f"Ticket {ticket_id} does not allow dirty extents")
    backend = ticket.backend
    ch = backend.acquire()
    operation = None
    try:
        if context not in backend.caps(ch).extents:
            raise errors.NotFound(f"The image has no {context} extents")
        # Nothing past the ticket is described (API.md 4b).
        start, length = _window(req, min(ticket.size, ch.size))
        operation = ticket.start("extents", start, 0)
        check = Watch(ctx, operation)
        extents = ch.extents(context, start, length, check)
        first = list(itertools.islice(extents, MAX_BUFFERED))
    except BaseException:
        backend.release(ch, reuse=False)
        if operation is not None:
            ticket.finish(operation, False)
        raise
    if len(first) < MAX_BUFFERED:
        backend.release(ch)
        ticket.finish(operation, True)
        return json_response([_as_dict(context, e) for e in first])
    # A large map goes out as it is computed (chunked), never held whole; it stops at a cancel.
    check.streaming()
    resp = webob.Response(status=200, content_type="application/json", charset=None)
    resp.app_iter = Stream(ticket, ch, operation, _json_array(context, first, extents))
    return resp


def _json_array(context, first, rest):
    """The text of a JSON array of extents, in pieces of about MAX_BUFFERED extents."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    yield ("[" + ",".join(dumps(_as_dict(context, e)) for e in first)).encode()
    while True:
        batch = list(itertools.islice(rest, MAX_BUFFERED))
        if not batch:
            break
        yield ("," + ",".join(dumps(_as_dict(context, e)) for e in batch)).encode()
    yield b"]\n"
