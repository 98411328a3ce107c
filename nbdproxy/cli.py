"""The `nbdproxy` command: serve, and the ticket commands that talk to a running daemon."""

import argparse
import json
import logging
import os
import re
import sys
import uuid

from . import __version__, config, errors

LOG_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"

# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text):
    """text with each control character written as its Python escape (CR LF -> \\r\\n)."""
    return _UNSAFE.sub(lambda m: repr(m[0])[1:-1], text)


class SafeFormatter(logging.Formatter):
    """One log record is one line: ticket ids, URLs, paths and errors carry client strings, and a
    CR or LF in them would start forged lines. The message is escaped; the lines of a traceback
    are escaped too and indented, so that no line after a record's first can pass for a record."""

    def formatMessage(self, record):
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei):
        return self._indent(super().formatException(ei))

    def formatStack(self, stack_info):
        return self._indent(super().formatStack(stack_info))

    @staticmethod
    def _indent(text):
        return "\n".join("  " + escape_controls(line) for line in text.split("\n"))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except errors.Error as e:
        print(f"nbdproxy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nbdproxy: interrupted", file=sys.stderr)
        return 130


def build_parser():
    parser = argparse.ArgumentParser(prog="nbdproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nbdproxy {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--conf-dir", default="/etc/nbdproxy",
                       help="read nbdproxy.conf and conf.d/*.conf here (default %(default)s)")
    serve.add_argument("--control-socket", metavar="PATH")
    serve.add_argument("--control-group", metavar="GROUP")
    serve.add_argument("--local-socket", metavar="ADDR",
                       help="a path, @NAME for an abstract socket, or 'none'")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="0 picks a free port; -1 turns TCP off")
    serve.add_argument("--cert-file")
    serve.add_argument("--key-file")
    serve.add_argument("--no-tls", action="store_const", const=True,
                       help="serve plain HTTP on the TCP port")
    serve.add_argument("--log-level")
    serve.add_argument("--buffer-size", type=int, metavar="BYTES")
    serve.add_argument("--max-connections", type=int)
    serve.add_argument("--nbd-connections", type=int, metavar="N",
                       help="NBD connections per ticket (default 8)")
    serve.add_argument("--nbd-request-size", type=int, metavar="BYTES",
                       help="largest NBD read or write command (default 512 KiB)")
    serve.add_argument("--nbd-timeout", type=int, metavar="SECONDS",
                       help="fail a request whose NBD command gets no answer in this time "
                            "(default 300; 0: wait forever)")
    serve.add_argument("--no-file-direct", dest="file_direct", action="store_const",
                       const=False, help="file: tickets use the page cache, never O_DIRECT")
    serve.add_argument("--nbd-idle-timeout", type=int, metavar="SECONDS",
                       help="close an NBD connection no request used for this long (default 5; "
                            "0: when its request ends)")
    serve.add_argument("--nbd-connect-timeout", type=int, metavar="SECONDS",
                       help="fail a request whose NBD server does not complete the handshake "
                            "in this time (default 10; 0: wait forever)")
    serve.add_argument("--nbd-tls-certificates", metavar="DIR",
                       help="CA directory (ca-cert.pem) that verifies the NBD servers of "
                            "nbds:// and nbds+unix:// ticket URLs (default: those are refused)")
    serve.add_argument("--run-dir", metavar="DIR",
                       help="where image tickets' qemu-nbd sockets go, created 0700 "
                            "(default /run/nbdproxy/images)")
    serve.add_argument("--max-tickets", type=int, metavar="N",
                       help="tickets at once; more get 503 (default 10000)")
    serve.add_argument("--remove-timeout", type=int, metavar="SECONDS")
    serve.add_argument("--stop-timeout", type=int, metavar="SECONDS")
    serve.add_argument("--initial-timeout", type=int, metavar="SECONDS",
                       help="idle timeout of a connection before it uses a ticket (default 60)")
    serve.add_argument("--backend-ca-file", metavar="FILE",
                       help="CA certificates trusted for https: (proxy) tickets' upstreams")
    serve.add_argument("--backend-timeout", type=int, metavar="SECONDS",
                       help="how long an upstream may stall (default 300; 0: forever)")
    serve.add_argument("--checksum-memory", type=int, metavar="BYTES",
                       help="memory for the block buffers of all checksums at once "
                            "(default 256 MiB, at least 16 MiB)")
    serve.set_defaults(run=run_serve)

    ticket = sub.add_parser("ticket", help="manage tickets of a running daemon")
    ticket.add_argument("--control-socket", default=config.SETTINGS["control_socket"][1])
    tsub = ticket.add_subparsers(metavar="ACTION", required=True)
    add = tsub.add_parser("add", help="add a ticket; prints its id")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", type=utf8, help="URL of the export (nbd:..., file:///...)")
    source.add_argument("--image", metavar="PATH", type=utf8,
                        help="an image file the daemon serves with a qemu-nbd of its own")
    add.add_argument("--format", help="with --image: raw, qcow2... (default: probed; give it "
                                      "to open backing chains)")
    add.add_argument("--bitmap", metavar="NAME",
                     help="with --image: a persistent dirty bitmap for ?context=dirty")
    add.add_argument("--size", type=int,
                     help="required for nbd: URLs; default the file's or image's size")
    add.add_argument("--ops", default="read,write", type=utf8)
    add.add_argument("--timeout", type=int, default=3600)
    add.add_argument("--inactivity-timeout", type=int)
    add.add_argument("--sparse", action="store_true")
    add.add_argument("--dirty", action="store_true")
    add.add_argument("--filename", type=utf8)
    add.add_argument("--transfer-id", type=utf8)
    add.add_argument("--id", type=ticket_id, help="ticket id (default: a new uuid)")
    add.set_defaults(run=run_ticket_add)
    for name, helptext in (("show", "print a ticket"), ("delete", "cancel and remove a ticket")):
        p = tsub.add_parser(name, help=helptext)
        p.add_argument("id", type=ticket_id)
        p.set_defaults(run=run_ticket_action, action=name)
    p = tsub.add_parser("extend", help="set a ticket's expiry to now + SECONDS")
    p.add_argument("id", type=ticket_id)
    p.add_argument("seconds", type=int)
    p.set_defaults(run=run_ticket_action, action="extend")
    p = tsub.add_parser("list", help="print all tickets")
    p.set_defaults(run=run_ticket_action, action="list", id="")
    # `nbdproxy ticket ACTION ... --control-socket PATH` works too (SUPPRESS: when not given
    # after the action, the value given before it, or the default, stays).
    for action_parser in tsub.choices.values():
        action_parser.add_argument("--control-socket", default=argparse.SUPPRESS,
                                   help="the daemon's control socket")
    add_transfer_commands(sub)
    return parser


def utf8(text):
    """A ticket string: JSON carries text, so bytes of the command line that are not UTF-8
    (surrogate-escaped in text) cannot be sent."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8: {os.fsencode(text)!r}") from None
    return text


def ticket_id(text):
    """An id as a ticket can have one (any other text is sent percent-encoded): an empty one
    would name the list of all tickets, and '/' cannot be in an id."""
    text = utf8(text)
    if not text:
        raise argparse.ArgumentTypeError("a ticket id may not be empty")
    if "/" in text:
        raise argparse.ArgumentTypeError(f"a ticket id may not contain '/': {text!r}")
    return text


def block_size(text):
    """--block-size: what the server's /checksum takes (API.md 4c)."""
    from .client.transfer import check_block_size

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    problem = check_block_size(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def run_serve(args):
    from . import server

    flags = {name: getattr(args, name, None) for name in config.SETTINGS}
    cfg = config.load(args.conf_dir, flags)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    logging.basicConfig(level=cfg.log_level, handlers=[handler])
    srv = server.Server(cfg)
    srv.bind()
    srv.install_signal_handlers()
    srv.serve()
    return 0


def run_ticket_add(args):
    from .client.control import ControlClient

    ticket_id = args.id or str(uuid.uuid4())
    if args.image is None and (args.format or args.bitmap):
        raise errors.Error("--format and --bitmap go with --image")
    ticket = {"uuid": ticket_id, "ops": [op for op in args.ops.split(",") if op],
              "timeout": args.timeout, "sparse": args.sparse, "dirty": args.dirty}
    if args.image is not None:
        # The daemon needs the absolute path; a relative one is the caller's directory.
        ticket["image"] = {"path": os.path.abspath(args.image)}
        for key in ("format", "bitmap"):
            if getattr(args, key):
                ticket["image"][key] = getattr(args, key)
    else:
        ticket["url"] = args.url
    if args.size is not None:
        ticket["size"] = args.size
    for key in ("inactivity_timeout", "filename", "transfer_id"):
        if getattr(args, key) is not None:
            ticket[key] = getattr(args, key)
    ControlClient(args.control_socket).add(ticket)
    print(ticket_id)


def run_ticket_action(args):
    from .client.control import ControlClient

    control = ControlClient(args.control_socket)
    if args.action == "show":
        print(json.dumps(control.show(args.id), indent=2))
    elif args.action == "list":
        print(json.dumps(control.list(), indent=2))
    elif args.action == "extend":
        control.extend(args.id, args.seconds)
    elif args.action == "delete":
        control.show(args.id)  # a missing ticket is an error here, not a silent 204
        control.delete(args.id)


# download, upload, checksum: the client commands (nbdproxy.client.transfer).

def add_transfer_commands(sub):
    def common(p, verify=True):
        p.add_argument("--connections", type=int, metavar="N",
                       help="HTTP connections in parallel (default min(4, the server's maximum))")
        tls = p.add_mutually_exclusive_group()
        tls.add_argument("--cafile", metavar="FILE", help="CA certificate(s) to verify the server")
        tls.add_argument("--insecure", action="store_true",
                         help="do not verify the server's certificate")
        if verify:
            p.add_argument("--verify", action="store_true",
                           help="compare the block hash of both sides at the end")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    p = sub.add_parser("download", help="download an image into a local raw or qcow2 file")
    p.add_argument("url", metavar="URL", help="https://HOST:PORT/images/TICKET")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--format", choices=("raw", "qcow2"),
                   help="local format (default qcow2 for *.qcow2 or with a backing file, else raw)")
    p.add_argument("--incremental", action="store_true",
                   help="download only the dirty extents (needs --backing-file)")
    p.add_argument("--backing-file", metavar="FILE",
                   help="the previous backup: FILE becomes a qcow2 on top of it")
    common(p)
    p.set_defaults(run=run_download)

    p = sub.add_parser("upload", help="upload a local image (raw, qcow2...) to a ticket")
    p.add_argument("file", metavar="FILE")
    p.add_argument("url", metavar="URL", help="https://HOST:PORT/images/TICKET")
    common(p)
    p.set_defaults(run=run_upload)

    p = sub.add_parser("checksum", help="print the block hash of a local image (or of a URL)")
    p.add_argument("file", metavar="FILE|URL")
    p.add_argument("--algorithm", default="blake2b")
    p.add_argument("--block-size", type=block_size, default=4 * 1024**2, metavar="BYTES",
                   help="1 MiB to 16 MiB, a multiple of 4096 (default %(default)s)")
    p.add_argument("--cafile", metavar="FILE")
    p.add_argument("--insecure", action="store_true")
    p.set_defaults(run=run_checksum)


def _client_setup(args):
    """Log warnings to stderr, and turn SIGTERM and SIGHUP into KeyboardInterrupt, so that a
    transfer stops the same way on all of them: its finally blocks stop the local qemu-nbd."""
    import signal

    logging.basicConfig(level=logging.WARNING, format="nbdproxy: %(message)s", stream=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)


def run_download(args):
    from .client import transfer
    from .client.progress import Progress

    _client_setup(args)
    transfer.download(args.url, args.file, fmt=args.format, incremental=args.incremental,
                      backing_file=args.backing_file, connections=args.connections,
                      cafile=args.cafile, secure=not args.insecure, verify=args.verify,
                      progress=Progress("download", quiet=args.quiet))


def run_upload(args):
    from .client import transfer
    from .client.progress import Progress

    _client_setup(args)
    transfer.upload(args.file, args.url, connections=args.connections, cafile=args.cafile,
                    secure=not args.insecure, verify=args.verify,
                    progress=Progress("upload", quiet=args.quiet))


def run_checksum(args):
    from .client import transfer
    from .client.image import ImageClient

    _client_setup(args)
    if args.file.startswith(("http://", "https://")):
        with ImageClient(args.file, args.cafile, not args.insecure) as client:
            result = client.checksum(args.algorithm, args.block_size)
    else:
        result = transfer.checksum(args.file, args.algorithm, args.block_size)
    print(json.dumps(result))
