"""Handler of /images/{ticket}/extents: NBD block status as JSON zero or dirty extents."""

import json

import nbd

from . import errors
from .backends.nbd import ALLOCATION, DEPTH
from .images import authorize, json_response

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


def iterate(h, context, start, length):
    """Yield (start, length, flags) with neighbours of equal flags merged."""
    flags_of = _dirty_flags if context == "dirty" else _zero_flags
    cur_start, cur_len, cur_flags = start, 0, None
    for n, raw in h.block_status(start, length):
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
    with ticket.backend.handle() as h:
        if context == "dirty" and h.dirty_context not in h.contexts:
            raise errors.NotFound("The export has no dirty bitmap")
        start, length = _window(req, h.size)
        operation = ticket.start("extents", start, 0)
        ok = False
        try:
            result = []
            for extent in iterate(h, context, start, length):
                result.append(_as_dict(context, extent))
            ok = True
        finally:
            ticket.finish(operation, ok)
    return json_response(result)
