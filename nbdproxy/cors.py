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
    return req.method in METHODS and (path.startswith("/images/") or path in ("/info", "/info/"))


def add_headers(req, resp):
    """Add the headers the request asks for, each only when its request header is not empty."""
    if not applies(req):
        return
    added = False
    if req.headers.get("Origin"):
        resp.headers["Access-Control-Allow-Origin"] = "*"
        added = True
    if req.headers.get("Access-Control-Request-Headers"):
        resp.headers["Access-Control-Allow-Headers"] = "*"
        added = True
    if req.headers.get("Access-Control-Request-Method"):
        resp.headers["Access-Control-Allow-Methods"] = allowed_methods(req, resp)
        added = True
    if added:
        resp.headers["Access-Control-Max-Age"] = MAX_AGE


def allowed_methods(req, resp):
    """A preflight (OPTIONS) gets ovirt-imageio's list, with PATCH when the answer's Allow has it
    (a writable ticket, or *); anything else gets "*" as in ovirt-imageio. A refused preflight
    (403) gets the list too, though a browser fails any preflight that is not a 2xx."""
    if req.method != "OPTIONS":
        return "*"
    allow = resp.headers.get("Allow", "").split(",")
    return PREFLIGHT_METHODS + ",PATCH" if "PATCH" in allow else PREFLIGHT_METHODS
