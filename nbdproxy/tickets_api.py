"""Handlers of the control API (/tickets/...): add, show, list, extend and delete tickets."""

import json

from . import errors, tickets
from .images import empty_response, json_response

MAX_BODY = 64 * 1024


def _json_body(req):
    if ("CONTENT_LENGTH" not in req.environ
            and "chunked" in req.environ.get("HTTP_TRANSFER_ENCODING", "").lower()):
        # A chunked body (curl -T -): read it up to the limit, like a sized one.
        data = req.environ["wsgi.input"].read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise errors.BadRequest(f"Body too large: more than {MAX_BODY} bytes")
        return _parse_json(data)
    value = req.environ.get("CONTENT_LENGTH") or "0"
    if not (value.isascii() and value.isdigit() and len(value) <= 20):
        raise errors.BadRequest(f"Invalid Content-Length {value[:30]!r}")
    if int(value) > MAX_BODY:
        raise errors.BadRequest(f"Body too large: {value} bytes, at most {MAX_BODY}")
    return _parse_json(req.environ["wsgi.input"].read(int(value)))


def _parse_json(data):
    try:
        return json.loads(data)
    except RecursionError:
        raise errors.BadRequest("Invalid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.BadRequest(f"Invalid JSON: {e}") from None


def put(ctx, req, ticket_id):
    try:
        data = _json_body(req)
    except errors.BadRequest as e:
        raise errors.BadRequest(f"Invalid ticket: {e}") from None
    ctx.registry.add(ticket_id, data)
    return empty_response(200)


def get(ctx, req, ticket_id):
    if ticket_id == "":
        return json_response([t.info() for t in ctx.registry.list()])
    return json_response(ctx.registry.get(ticket_id).info())


def patch(ctx, req, ticket_id):
    data = _json_body(req)
    if not isinstance(data, dict) or "timeout" not in data:
        raise errors.BadRequest("Expecting a JSON object with 'timeout'")
    timeout = data["timeout"]
    if (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0
            or timeout > tickets.MAX_TIMEOUT):
        raise errors.BadRequest(f"Invalid timeout {str(timeout)[:30]}, expecting an integer "
                                f"from 0 to {tickets.MAX_TIMEOUT}")
    ctx.registry.get(ticket_id).extend(timeout)
    return empty_response(200)


def delete(ctx, req, ticket_id):
    if ticket_id == "":
        ctx.registry.remove_all()
    else:
        ctx.registry.remove(ticket_id)
    return empty_response(204)
