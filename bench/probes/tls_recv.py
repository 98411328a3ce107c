"""What receiving 1 GiB over TLS costs the receiver (the daemon's side of a TLS upload): through
the buffered file object (socket.makefile, as http.server and imageio read bodies) or straight
from the SSL object: a check that the Python layers over each 16 KiB record are not what TLS
uploads pay for.

    /usr/bin/python3 bench/probes/tls_recv.py CERT KEY rfile|sslobj
"""

import os
import resource
import socket
import ssl
import sys
import time

N = 1 << 30


def sender(port):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
    data, left = memoryview(os.urandom(8 << 20)), N
    while left:
        n = min(len(data), left)
        s.sendall(data[:n])
        left -= n
    s.recv(1)
    os._exit(0)


def main(cert, key, mode):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:
        sender(listener.getsockname()[1])
    s = ctx.wrap_socket(listener.accept()[0], server_side=True)
    s.settimeout(60)        # as the daemon's TLS sockets
    view, got = memoryview(bytearray(2 << 20)), 0
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    if mode == "rfile":
        f = s.makefile("rb")
        while got < N:
            got += f.readinto(view[:min(len(view), N - got)])
    else:
        read = s._sslobj.read
        while got < N:
            got += read(min(len(view), N - got), view)
    seconds, r1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
    s.sendall(b"x")
    os.waitpid(pid, 0)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    print(f"{mode}: {N / 2**20 / seconds:.0f} MiB/s, {cpu:.3f} CPU-s/GiB (receiver)")


if __name__ == "__main__":
    main(*sys.argv[1:])
