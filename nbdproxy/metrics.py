"""Prometheus text metrics for GET /metrics on the control socket (names start with nbdproxy_)."""

import bisect
import threading

from . import images

# Upper bounds (seconds) of the NBD request latency histogram.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """Counters owned by one server; every method is thread-safe."""

    def __init__(self, registry=None):
        self.registry = registry
        self.qemu_nbd = None    # the daemon's backends.qemu_nbd.Supervisor
        self._lock = threading.Lock()
        self._requests = {}
        self._bytes = {}
        self._errors = 0
        self._connections = 0
        self._latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0

    def request(self, op, status):
        with self._lock:
            key = (op, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            if status >= 500:
                self._errors += 1

    def transferred(self, op, n):
        with self._lock:
            self._bytes[op] = self._bytes.get(op, 0) + n

    def connection(self, delta):
        with self._lock:
            self._connections += delta

    def nbd_latency(self, seconds):
        i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self._latency[i] += 1
            self._latency_sum += seconds
            self._latency_count += 1

    def text(self):
        tickets = self.registry.list() if self.registry is not None else []
        processes = self.qemu_nbd.running() if self.qemu_nbd is not None else 0
        with self._lock:
            lines = [
                "# HELP nbdproxy_requests_total HTTP requests served, by op and status.",
                "# TYPE nbdproxy_requests_total counter",
            ]
            for (op, status), n in sorted(self._requests.items()):
                lines.append(f'nbdproxy_requests_total{{op="{op}",status="{status}"}} {n}')
            lines += ["# HELP nbdproxy_bytes_total Bytes moved, by op.",
                      "# TYPE nbdproxy_bytes_total counter"]
            for op, n in sorted(self._bytes.items()):
                lines.append(f'nbdproxy_bytes_total{{op="{op}"}} {n}')
            lines += ["# HELP nbdproxy_errors_total Requests that failed with a server error.",
                      "# TYPE nbdproxy_errors_total counter",
                      f"nbdproxy_errors_total {self._errors}",
                      "# HELP nbdproxy_connections Open HTTP connections.",
                      "# TYPE nbdproxy_connections gauge",
                      f"nbdproxy_connections {self._connections}",
                      "# HELP nbdproxy_active_transfers Tickets with requests running.",
                      "# TYPE nbdproxy_active_transfers gauge",
                      f"nbdproxy_active_transfers {sum(1 for t in tickets if t.active)}",
                      "# HELP nbdproxy_tickets Tickets in the registry.",
                      "# TYPE nbdproxy_tickets gauge",
                      f"nbdproxy_tickets {len(tickets)}",
                      "# HELP nbdproxy_qemu_nbd_processes qemu-nbd processes of image tickets.",
                      "# TYPE nbdproxy_qemu_nbd_processes gauge",
                      f"nbdproxy_qemu_nbd_processes {processes}",
                      "# HELP nbdproxy_nbd_request_seconds Latency of NBD data commands.",
                      "# TYPE nbdproxy_nbd_request_seconds histogram"]
            cumulative = 0
            for bound, n in zip(LATENCY_BUCKETS + ("+Inf",), self._latency):
                cumulative += n
                lines.append(f'nbdproxy_nbd_request_seconds_bucket{{le="{bound}"}} {cumulative}')
            lines.append(f"nbdproxy_nbd_request_seconds_sum {self._latency_sum:.6f}")
            lines.append(f"nbdproxy_nbd_request_seconds_count {self._latency_count}")
        return "\n".join(lines) + "\n"

    def handler(self, ctx, req, _):
        resp = images.empty_response(200)
        resp.content_type = "text/plain"
        resp.charset = None
        resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
        resp.body = self.text().encode()
        return resp
