"""`make run`'s demo (contrib/demo.py): both tickets it prints commands for work, and Ctrl-C
(SIGINT) stops the daemon and the image ticket's qemu-nbd."""

import json
import os
import re
import signal
import subprocess
import sys
import time

from nbdproxy.client.connections import UnixHTTPConnection
from support import TOP, request


def _qemu_nbd_of(directory):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("qemu-nbd") and directory in cmdline:
            pids.append(pid)
    return pids


def test_demo_serves_both_tickets(tmp_path):
    demo = str(tmp_path / "demo")
    proc = subprocess.Popen([sys.executable, os.path.join(TOP, "contrib", "demo.py"),
                             "--port", "0", "--dir", demo], cwd=TOP, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        deadline = time.monotonic() + 60
        while "Ctrl-C stops the daemon" not in out:
            assert time.monotonic() < deadline and proc.poll() is None, out
            out += proc.stdout.readline()
        local = os.path.join(demo, "local.sock")
        for ticket, size in (("demo", 1024**3), ("demo-file", 256 * 1024**2)):
            status, body = request(UnixHTTPConnection(local), "OPTIONS", f"/images/{ticket}")
            assert status == 200 and json.loads(body)["size"] == size, body
            status, body = request(UnixHTTPConnection(local), "GET", f"/images/{ticket}/extents")
            extents = json.loads(body)
            assert extents[-1]["start"] + extents[-1]["length"] == size
        status, body = request(UnixHTTPConnection(local), "GET", "/images/demo-file",
                               headers={"Range": "bytes=0-16"})
        assert status == 206 and body == b"file ticket demo\n"
        assert re.search(r"https://localhost:\d+/images/demo-file", out)
        assert _qemu_nbd_of(demo)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert not _qemu_nbd_of(demo)
