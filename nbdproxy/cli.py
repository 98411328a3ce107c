"""The `nbdproxy` command: serve, and the ticket commands that talk to a running daemon."""

import argparse
import json
import logging
import sys
import uuid

from . import __version__, config, errors

LOG_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


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
    serve.add_argument("--remove-timeout", type=int, metavar="SECONDS")
    serve.add_argument("--stop-timeout", type=int, metavar="SECONDS")
    serve.set_defaults(run=run_serve)

    ticket = sub.add_parser("ticket", help="manage tickets of a running daemon")
    ticket.add_argument("--control-socket", default=config.SETTINGS["control_socket"][1])
    tsub = ticket.add_subparsers(metavar="ACTION", required=True)
    add = tsub.add_parser("add", help="add a ticket; prints its id")
    add.add_argument("--url", required=True, help="NBD URL of the export")
    add.add_argument("--size", type=int, required=True)
    add.add_argument("--ops", default="read,write")
    add.add_argument("--timeout", type=int, default=3600)
    add.add_argument("--inactivity-timeout", type=int)
    add.add_argument("--sparse", action="store_true")
    add.add_argument("--dirty", action="store_true")
    add.add_argument("--filename")
    add.add_argument("--transfer-id")
    add.add_argument("--id", help="ticket id (default: a new uuid)")
    add.set_defaults(run=run_ticket_add)
    for name, helptext in (("show", "print a ticket"), ("delete", "cancel and remove a ticket")):
        p = tsub.add_parser(name, help=helptext)
        p.add_argument("id")
        p.set_defaults(run=run_ticket_action, action=name)
    p = tsub.add_parser("extend", help="set a ticket's expiry to now + SECONDS")
    p.add_argument("id")
    p.add_argument("seconds", type=int)
    p.set_defaults(run=run_ticket_action, action="extend")
    p = tsub.add_parser("list", help="print all tickets")
    p.set_defaults(run=run_ticket_action, action="list", id="")
    return parser


def run_serve(args):
    from . import server

    flags = {name: getattr(args, name, None) for name in config.SETTINGS}
    cfg = config.load(args.conf_dir, flags)
    logging.basicConfig(level=cfg.log_level, format=LOG_FORMAT, stream=sys.stderr)
    srv = server.Server(cfg)
    srv.bind()
    srv.install_signal_handlers()
    srv.serve()
    return 0


def run_ticket_add(args):
    from .client.control import ControlClient

    ticket_id = args.id or str(uuid.uuid4())
    ticket = {"uuid": ticket_id, "url": args.url, "size": args.size,
              "ops": [op for op in args.ops.split(",") if op], "timeout": args.timeout,
              "sparse": args.sparse, "dirty": args.dirty}
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
