"""CORS headers (API.md 7c) for a page on another origin, added as ovirt-imageio's cors.allow()
adds them, to every answer of the data services for /images/... and /info/, errors included."""

MAX_AGE = "86400"

# What ovirt-imageio's preflight answer allows; a writable ticket also allows PATCH (ours).
PREFLIGHT_METHODS = "OPTIONS,GET,PUT"

# The requests a page makes (HEAD: the headers of GET); DELETE and the like get nothing, as in
# ovirt-imageio, whose handlers without cors.allow() answer them.
METHODS = frozenset(("OPTIONS", "GET", "HEAD", "PUT", "PATCH"))


def applies(req):
    path = req.environ["PATH_INFO"]     # not req.path_info: that decodes, and may fail (a 400)
    return _applies(req.method, path)


def _applies(method, path):
    return method in METHODS and (path.startswith("/images/") or path in ("/info", "/info/"))


def add_headers(req, resp):
    """Add the headers the request asks for, each only when its request header is not empty."""
    if applies(req):
        allow = resp.headers.get("Allow", "")
        resp.headers.update(headers_for(req.method, req.headers.get, allow))


def headers_for(method, header, allow=""):
    """The CORS headers for a request with this method whose header(name) gives its headers;
    allow is the answer's Allow header (a preflight of a writable ticket also allows PATCH)."""
    out = {}
    if header("Origin"):
        out["Access-Control-Allow-Origin"] = "*"
    if header("Access-Control-Request-Headers"):
        out["Access-Control-Allow-Headers"] = "*"
    if header("Access-Control-Request-Method"):
        out["Access-Control-Allow-Methods"] = allowed_methods(method, allow)
    if out:
        out["Access-Control-Max-Age"] = MAX_AGE
    return out


def for_raw_head(head):
    """headers_for() of a request head as bytes (a refused connection's: no webob request)."""
    lines = head.split(b"\r\n")
    parts = lines[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not _applies(parts[0], parts[1].partition("?")[0]):
        return {}
    fields = {}
    for line in lines[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return headers_for(parts[0], lambda name: fields.get(name.lower()))


def allowed_methods(method, allow):
    """A preflight (OPTIONS) gets ovirt-imageio's list, with PATCH when the answer's Allow has it
    (a writable ticket, or *); anything else gets "*" as in ovirt-imageio. A refused preflight
    (403) gets the list too, though a browser fails any preflight that is not a 2xx."""
    if method != "OPTIONS":
        return "*"
    return PREFLIGHT_METHODS + ",PATCH" if "PATCH" in allow.split(",") else PREFLIGHT_METHODS
