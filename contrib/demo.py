"""`make run`: serve a built-in demo image with nbdproxy in the foreground.

Makes demo/disk.qcow2 (1 GiB virtual, a few MiB of data), a self-signed certificate, starts
qemu-nbd on the image and the daemon, adds a ticket, prints commands to try, and runs until
Ctrl-C, when it stops both.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(TOP, "demo")
TICKET = "demo"


def run(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def make_image(path):
    if os.path.exists(path):
        return
    run("qemu-img", "create", "-f", "qcow2", path, "1G")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 512M 2M",
        "-c", "write -P 0x63 1020M 4M", path)


def make_cert(cert, key):
    if os.path.exists(cert):
        return
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)


def wait_for(path, proc):
    for _ in range(500):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit(f"demo: {proc.args[0]} exited with {proc.returncode}")
        time.sleep(0.02)
    sys.exit(f"demo: nothing listens on {path}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=54322)
    args = parser.parse_args()
    os.makedirs(DEMO, exist_ok=True)
    image = os.path.join(DEMO, "disk.qcow2")
    cert, key = os.path.join(DEMO, "cert.pem"), os.path.join(DEMO, "key.pem")
    nbd_sock = os.path.join(DEMO, "nbd.sock")
    control = os.path.join(DEMO, "control.sock")
    local = os.path.join(DEMO, "local.sock")
    make_image(image)
    make_cert(cert, key)
    for path in (nbd_sock,):
        if os.path.exists(path):
            os.unlink(path)

    qemu = subprocess.Popen(["qemu-nbd", "--persistent", "--shared=8", "--cache=writeback",
                             "--allocation-depth", "--format=qcow2", "--socket", nbd_sock, image])
    wait_for(nbd_sock, qemu)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "nbdproxy", "serve", "--conf-dir", DEMO,
         "--control-socket", control, "--local-socket", local, "--port", str(args.port),
         "--cert-file", cert, "--key-file", key],
        stderr=subprocess.PIPE, text=True)
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
        ticket = {"uuid": TICKET, "size": 1024**3, "ops": ["read", "write"], "timeout": 86400,
                  "url": f"nbd:unix:{nbd_sock}", "sparse": True, "filename": "disk.raw"}
        subprocess.run(["curl", "-sS", "--fail", "--unix-socket", control, "-X", "PUT",
                        "--data-binary", json.dumps(ticket), f"http://localhost/tickets/{TICKET}"],
                       check=True)
        print(USAGE.format(local=local, control=control, port=port, cert=cert, t=TICKET),
              flush=True)
        for line in daemon.stderr:
            sys.stderr.write(line)
        return daemon.wait()
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait()
        qemu.terminate()
        qemu.wait()


USAGE = """
nbdproxy is serving demo/disk.qcow2 (1 GiB virtual, 7 MiB of data) as ticket '{t}'.
Try, from another terminal in this directory:

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

  # the ticket, as the management layer sees it
  curl -s --unix-socket {control} http://localhost/tickets/{t}

Ctrl-C stops the daemon and qemu-nbd.
"""

if __name__ == "__main__":
    sys.exit(main())
