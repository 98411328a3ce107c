"""http.client connections over unix sockets (paths, or abstract names starting with NUL)."""

import http.client
import socket


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection whose socket is a unix socket; "\\0NAME" is an abstract name."""

    def __init__(self, path, timeout=60):
        self.path = path
        super().__init__("localhost", timeout=timeout)

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            self.sock = None
            raise
