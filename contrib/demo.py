"""`make run`: serve built-in demo images with nbdproxy in the foreground.

Makes demo/disk.qcow2 (1 GiB virtual, a few MiB of data), demo/disk.raw, a self-signed
certificate, starts the daemon, adds an image ticket `demo` (the daemon runs the image's qemu-nbd
itself, API.md 7d) and a file: ticket `demo-file` (API.md 7a), prints commands to try, and runs
until Ctrl-C, when the daemon stops (and its qemu-nbd with it).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(TOP, "demo")
TICKET = "demo"
FILE_TICKET = "demo-file"


def run(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def make_image(path):
    if os.path.exists(path):
        return
    run("qemu-img", "create", "-f", "qcow2", path, "1G")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 512M 2M",
        "-c", "write -P 0x63 1020M 4M", path)


def make_raw(path):
    """A 256 MiB sparse raw file with a little data: served as it is by a file: ticket."""
    if os.path.exists(path):
        return
    with open(path, "wb") as f:
        f.truncate(256 * 1024**2)
        f.write(b"file ticket demo\n" * 4096)


def add_ticket(control, ticket):
    subprocess.run(["curl", "-sS", "--fail", "--unix-socket", control, "-X", "PUT",
                    "--data-binary", json.dumps(ticket),
                    f"http://localhost/tickets/{ticket['uuid']}"], check=True)


def make_cert(cert, key):
    if os.path.exists(cert):
        return
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=54322)
    parser.add_argument("--dir", default=DEMO, help="where the demo's files go (default demo/)")
    args = parser.parse_args()
    demo = os.path.abspath(args.dir)
    os.makedirs(demo, exist_ok=True)
    image = os.path.join(demo, "disk.qcow2")
    cert, key = os.path.join(demo, "cert.pem"), os.path.join(demo, "key.pem")
    control = os.path.join(demo, "control.sock")
    local = os.path.join(demo, "local.sock")
    raw = os.path.join(demo, "disk.raw")
    make_image(image)
    make_raw(raw)
    make_cert(cert, key)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "nbdproxy", "serve", "--conf-dir", demo,
         "--control-socket", control, "--local-socket", local, "--port", str(args.port),
         "--cert-file", cert, "--key-file", key, "--run-dir", os.path.join(demo, "run")],
        stderr=subprocess.PIPE, text=True, cwd=TOP)
    signal.signal(signal.SIGINT, lambda *_: daemon.terminate())
    signal.signal(signal.SIGTERM, lambda *_: daemon.terminate())
    try:
        port = None
        for line in daemon.stderr:
            sys.stderr.write(line)
            m = re.search(r"nbdproxy ready .*remote=https://\S+:(\d+)", line)
            if m:
                port = int(m[1])
                break
        if port is None:
            sys.exit(f"demo: the daemon did not start (exit status {daemon.wait()})")
        # No size: the image's virtual size. The daemon starts qemu-nbd and answers once it
        # serves.
        add_ticket(control, {"uuid": TICKET, "ops": ["read", "write"], "timeout": 86400,
                             "image": {"path": image, "format": "qcow2"}, "sparse": True,
                             "filename": "disk.raw"})
        # A file: ticket: the raw file's own bytes, no NBD server (API.md 7a); no size: the
        # file's.
        add_ticket(control, {"uuid": FILE_TICKET, "ops": ["read", "write"], "timeout": 86400,
                             "url": f"file://{raw}", "sparse": True})
        print(USAGE.format(local=local, control=control, port=port, cert=cert, t=TICKET,
                           f=FILE_TICKET), flush=True)
        for line in daemon.stderr:
            sys.stderr.write(line)
        return daemon.wait()
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait()


USAGE = """
nbdproxy is serving demo/disk.qcow2 (1 GiB virtual, 7 MiB of data) as ticket '{t}' (an image
ticket: the daemon runs its qemu-nbd), and demo/disk.raw (256 MiB, sparse) as ticket '{f}' (a
file: ticket: no NBD server). Try, from another terminal in this directory:

  # what the image offers (features, limits, the unix socket to use)
  curl -s --unix-socket {local} -X OPTIONS http://localhost/images/{t}

  # where the data is
  curl -s --unix-socket {local} http://localhost/images/{t}/extents

  # a ranged download over the unix socket, and over TLS
  curl -s --unix-socket {local} -H 'Range: bytes=0-15' http://localhost/images/{t} | od -c
  curl -s --cacert {cert} -H 'Range: bytes=536870912-536870927' https://localhost:{port}/images/{t} | od -c

  # upload 1 MiB at offset 4 MiB, then flush
  head -c 1M /dev/urandom > /tmp/piece
  curl -s --unix-socket {local} -T /tmp/piece -H 'Content-Range: bytes 4194304-5242879/*' \\
       http://localhost/images/{t}
  curl -s --unix-socket {local} -X PATCH -d '{{"op":"flush"}}' http://localhost/images/{t}

  # the file: ticket: its extents are the file's layout, a download reads the file itself
  curl -s --unix-socket {local} http://localhost/images/{f}/extents
  curl -s --unix-socket {local} -H 'Range: bytes=0-16' http://localhost/images/{f}
  .venv/bin/nbdproxy download --cafile {cert} https://localhost:{port}/images/{f} /tmp/copy.raw

  # the ticket, as the management layer sees it (its image, and the private url of its qemu-nbd)
  curl -s --unix-socket {control} http://localhost/tickets/{t}

  # another image ticket, and the qemu-nbd processes the daemon runs
  qemu-img create -f qcow2 /tmp/other.qcow2 1G
  curl -s --unix-socket {control} -X PUT -d '{{"uuid": "other", "ops": ["read"], "timeout": 600,
       "image": {{"path": "/tmp/other.qcow2"}}}}' http://localhost/tickets/other
  curl -s --unix-socket {control} http://localhost/metrics | grep qemu_nbd
  curl -s --unix-socket {control} -X DELETE http://localhost/tickets/other

Ctrl-C stops the daemon, and the daemon the image's qemu-nbd.
"""

if __name__ == "__main__":
    sys.exit(main())
