"""Handler of /images/{ticket}/extents: NBD block status as JSON zero or dirty extents."""

import itertools
import json

import nbd
import webob

from . import errors
from .backends.nbd import ALLOCATION, DEPTH
from .images import Stream, Watch, authorize, json_response

CONTEXTS = ("zero", "dirty")

# A full map with more extents than this is streamed (chunked) instead of sent whole.
MAX_BUFFERED = 10_000


def _zero_flags(flags, bitmap):
    zero = bool(flags.get(ALLOCATION, 0) & nbd.STATE_ZERO)
    hole = flags.get(DEPTH) == 0
    return (zero, hole)


def _dirty_flags(flags, bitmap):
    dirty = bool(flags.get(bitmap, 0) & 1)
    zero = bool(flags.get(ALLOCATION, 0) & nbd.STATE_ZERO)
    return (dirty, zero)


def iterate(h, context, start, length, check=None):
    """Yield (start, length, flags) with neighbours of equal flags merged; check() runs for
    each run block status gives (to stop a canceled request during a long walk)."""
    flags_of = _dirty_flags if context == "dirty" else _zero_flags
    cur_start, cur_len, cur_flags = start, 0, None
    for n, raw in h.block_status(start, length):
        if check is not None:
            check()
        flags = flags_of(raw, h.dirty_context)
        if flags == cur_flags:
            cur_len += n
            continue
        if cur_len:
            yield cur_start, cur_len, cur_flags
        cur_start, cur_len, cur_flags = cur_start + cur_len, n, flags
    if cur_len:
        yield cur_start, cur_len, cur_flags


def _as_dict(context, extent):
    start, length, (a, b) = extent
    if context == "dirty":
        return {"start": start, "length": length, "dirty": a, "zero": b}
    return {"start": start, "length": length, "zero": a, "hole": b}


def _window(req, size):
    """The [start, start+length) window asked with ?start=S&length=L, clipped to the image."""
    try:
        start = int(req.GET.get("start", "0"))
        length = int(req.GET["length"]) if "length" in req.GET else None
    except ValueError:
        raise errors.BadRequest("start and length must be integers") from None
    if start < 0 or (length is not None and length < 0):
        raise errors.BadRequest("start and length must be >= 0")
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
    pool = ticket.backend
    h = pool.acquire()
    operation = None
    try:
        if context == "dirty" and h.dirty_context not in h.contexts:
            raise errors.NotFound("The export has no dirty bitmap")
        # Nothing past the ticket is described (API.md 4b).
        start, length = _window(req, min(ticket.size, h.size))
        operation = ticket.start("extents", start, 0)
        check = Watch(ctx, operation)
        extents = iterate(h, context, start, length, check)
        first = list(itertools.islice(extents, MAX_BUFFERED))
    except BaseException:
        pool.release(h, reuse=False)
        if operation is not None:
            ticket.finish(operation, False)
        raise
    if len(first) < MAX_BUFFERED:
        pool.release(h)
        ticket.finish(operation, True)
        return json_response([_as_dict(context, e) for e in first])
    # A large map goes out as it is computed (chunked), never held whole; it stops at a cancel.
    check.streaming()
    resp = webob.Response(status=200, content_type="application/json", charset=None)
    resp.app_iter = Stream(ticket, h, operation, _json_array(context, first, extents))
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
