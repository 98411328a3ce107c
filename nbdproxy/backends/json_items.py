"""The upstream's JSON answers taken apart as they arrive: the items of a JSON array (a streamed
extents map, never held whole) and the Extents in them, checked before they are believed."""

import codecs
import json

from . import Extent

# One item's JSON never needs more than this.
MAX_ITEM_TEXT = 64 * 1024


def array_items(read, check=None):
    """The items of a JSON array read(n) gives in pieces, decoded one at a time as they arrive;
    ValueError when it is not one. Memory: one item's text at most MAX_ITEM_TEXT. check() runs
    for every piece read: an answer that never ends (whitespace for ever) can be stopped."""
    decoder = json.JSONDecoder()
    text_of = codecs.getincrementaldecoder("utf-8")("replace").decode
    text, i, eof, started = "", 0, False, False
    while True:
        while i < len(text) and text[i] in " \t\r\n" + ("," if started else ""):
            i += 1
        if i < len(text):
            if not started:
                if text[i] != "[":
                    raise ValueError("not a JSON array")
                started, i = True, i + 1
                continue
            if text[i] == "]":
                return
            try:
                item, j = decoder.raw_decode(text, i)
                yield item
                i = j
                continue
            except json.JSONDecodeError:
                if eof or len(text) - i > MAX_ITEM_TEXT:
                    raise ValueError("not a JSON array of the items expected") from None
        elif eof:
            raise ValueError("the answer ended early")
        if check is not None:
            check()
        data = read(256 * 1024)
        eof = not data
        text = text[i:] + text_of(data, final=eof)
        i = 0


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def extent(item, context):
    """An Extent from one upstream JSON extent, or None when it is not one."""
    if not isinstance(item, dict):
        return None
    start, length = item.get("start"), item.get("length")
    if not (is_int(start) and start >= 0 and is_int(length) and length > 0):
        return None
    flags = {k: item.get(k, False) for k in ("zero", "hole", "dirty")}
    if not all(isinstance(v, bool) for v in flags.values()):
        return None
    if context == "dirty" and "dirty" not in item or context == "zero" and "zero" not in item:
        return None
    return Extent(start, length, **flags)
