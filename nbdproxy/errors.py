"""Project exceptions. Raised where a problem is found; app.py maps them to HTTP responses."""


class Error(Exception):
    """Base of all nbdproxy errors; str(error) is the message a client may see."""


class BadRequest(Error):
    """The request is malformed (400)."""


class Forbidden(Error):
    """The ticket does not allow this request: missing, expired, canceled, or op not allowed (403)."""


class NotFound(Error):
    """No such resource (404)."""


class MethodNotAllowed(Error):
    """The resource exists but does not support this method (405)."""

    def __init__(self, message, allow):
        super().__init__(message)
        self.allow = allow


class Conflict(Error):
    """The resource is busy (409)."""


class ServiceUnavailable(Error):
    """A limit of the daemon is reached, such as max_tickets (503)."""


class RangeNotSatisfiable(Error):
    """A range past the end of the ticket or the export (416)."""

    def __init__(self, message, size):
        super().__init__(message)
        self.size = size


class ServiceUnavailable(Error):
    """The request cannot be served now: the NBD server does not answer, or the daemon lacks a
    shared resource such as checksum memory (503)."""


class Canceled(Forbidden):
    """The ticket was canceled while the request was running."""


class BackendError(Error):
    """The NBD server failed or could not be reached (500; the cause goes to the log)."""


class BadGateway(Error):
    """The upstream daemon of a proxy ticket failed or could not be reached (502)."""


class UpstreamRefused(Error):
    """The upstream daemon of a proxy ticket answered a 4xx: passed on with its status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


class ClientGone(Error):
    """The HTTP client closed the connection or sent less than it announced."""


class ConfigError(Error):
    """A bad setting: one clear line and a non-zero exit."""
