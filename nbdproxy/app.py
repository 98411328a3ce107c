"""Routing of requests to handlers, and the one place where errors become HTTP responses."""

import logging

import webob

from . import checksum, cors, errors, extents, images, tickets_api
from . import __version__

log = logging.getLogger("nbdproxy.app")

SERVER_FAILED = "Server failed to perform the request, check logs"

# Sub-paths of /images/{ticket} and the methods each serves.
IMAGE_ROUTES = {
    "": {"OPTIONS": images.options, "GET": images.get, "HEAD": images.head,
         "PUT": images.put, "PATCH": images.patch},
    "extents": {"GET": extents.get},
    "checksum": {"GET": checksum.get},
    "checksum/algorithms": {"GET": checksum.algorithms},
}

TICKET_ROUTES = {"GET": tickets_api.get, "PUT": tickets_api.put, "PATCH": tickets_api.patch,
                 "DELETE": tickets_api.delete}
TICKET_LIST_ROUTES = {"GET": tickets_api.get, "DELETE": tickets_api.delete}

_STATUS = [
    (errors.BadRequest, 400),
    (errors.ClientGone, 400),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (errors.MethodNotAllowed, 405),
    (errors.Conflict, 409),
    (errors.RangeNotSatisfiable, 416),
    (errors.ServiceUnavailable, 503),
    (errors.BadGateway, 502),
    (errors.UpstreamRefused, 400),     # its own status, below
]


def error_response(exc):
    """The text/plain response for an exception; 500s log the cause and tell nothing more."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            break
    else:
        if isinstance(exc, errors.BackendError):
            log.error("Request failed: %s", exc)
        else:
            log.error("Request failed", exc_info=exc)
        return text_response(500, SERVER_FAILED)
    status = getattr(exc, "status", status)
    resp = text_response(status, str(exc))
    if status == 403:
        resp.headers["Connection"] = "close"
    elif status == 405:
        resp.headers["Allow"] = exc.allow
    elif status == 416 and exc.size is not None:
        resp.headers["Content-Range"] = f"bytes */{exc.size}"
    return resp


def text_response(status, message):
    return webob.Response(status=status, body=(message + "\n").encode("utf-8"),
                          content_type="text/plain", charset="UTF-8")


class Context:
    """What a handler may use for one request."""

    def __init__(self, app, connection):
        self.registry = app.registry
        self.buffer_size = app.buffer_size
        self.local_socket = app.local_socket
        self.metrics = app.metrics
        self.checksum_budget = app.checksum_budget
        self.connection = connection


class NoConnection:
    """Stands for the connection when the app is called without the server (webob tests)."""

    def __init__(self):
        self._buffer = None

    def use_ticket(self, ticket):
        pass

    def buffer(self, size):
        if self._buffer is None or len(self._buffer) != size:
            self._buffer = bytearray(size)
        return self._buffer


class App:
    """A WSGI application for one service: "local" and "remote" data, or "control"."""

    def __init__(self, service, registry, buffer_size=8 * 1024**2, local_socket=None,
                 metrics=None, checksum_budget=None):
        self.service = service
        self.registry = registry
        self.buffer_size = buffer_size
        self.local_socket = local_socket
        self.metrics = metrics
        # The daemon-wide checksum.Budget; None (an app without the server): no limit.
        self.checksum_budget = checksum_budget

    def respond(self, req, connection=None):
        ctx = Context(self, connection or NoConnection())
        op = "unknown"
        try:
            handler, ticket_id = self._route(req)
            op = f"{handler.__module__.rsplit('.', 1)[-1]}.{handler.__name__}"
            resp = handler(ctx, req, ticket_id)
        except Exception as e:
            resp = error_response(e)
        if self.service != "control":
            cors.add_headers(req, resp)
        if self.metrics is not None:
            self.metrics.request(op, resp.status_code)
        return resp

    def __call__(self, environ, start_response):
        req = webob.Request(environ)
        return self.respond(req, environ.get("nbdproxy.connection"))(environ, start_response)

    def _route(self, req):
        try:
            path = req.path_info
            req.GET     # webob decodes the path and the query as UTF-8, on first use
        except UnicodeDecodeError:
            raise errors.BadRequest("Invalid request target: not UTF-8") from None
        if self.service == "control":
            routes, ticket_id = self._control_route(path)
        else:
            routes, ticket_id = self._data_route(path)
        handler = routes.get(req.method)
        if handler is None:
            raise errors.MethodNotAllowed(f"Method {req.method} not allowed for {path}",
                                          ",".join(routes))
        return handler, ticket_id

    def _data_route(self, path):
        if path.startswith("/images/"):
            ticket_id, sep, sub = path[len("/images/"):].partition("/")
            routes = IMAGE_ROUTES.get(sub)
            if ticket_id and routes is not None and (sub or not sep):
                return routes, ticket_id
        elif path in ("/info", "/info/") and self.service == "remote":
            return {"GET": info}, None
        raise errors.NotFound(f"No such resource {path}")

    def _control_route(self, path):
        if path == "/tickets/":
            return TICKET_LIST_ROUTES, ""
        if path.startswith("/tickets/"):
            ticket_id = path[len("/tickets/"):]
            if "/" not in ticket_id:
                return TICKET_ROUTES, ticket_id
        if path == "/metrics" and self.metrics is not None:
            return {"GET": self.metrics.handler}, None
        raise errors.NotFound(f"No such resource {path}")


def info(ctx, req, _):
    return images.json_response({"version": __version__})
