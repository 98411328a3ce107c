"""A progress bar for transfers: bytes done, rate and time left, redrawn in place on a terminal.

Silent when the stream is not a terminal or when quiet. update() is thread-safe: every worker
reports what it moved.
"""

import sys
import threading
import time

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human(n):
    n = float(n)
    for unit in UNITS:
        if abs(n) < 1024 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def clock(seconds):
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:d}:{rest % 60:02d}"


class Progress:
    def __init__(self, label="", total=0, quiet=False, stream=None, interval=0.2):
        self.stream = stream if stream is not None else sys.stderr
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.enabled = tty and not quiet
        self.label = label
        self.total = total
        self.done = 0
        self.interval = interval
        self.started = time.monotonic()
        self._drawn = 0.0
        self._width = 0
        self._lock = threading.Lock()

    def update(self, n):
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and now - self._drawn >= self.interval:
                self._draw(now)

    def line(self, now=None, final=False):
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.label} [{pct:5.1f}%] {human(self.done)} of {human(self.total)}, " \
               f"{human(rate)}/s"
        if final:
            text += f", {clock(elapsed)}"
        elif rate > 0 and self.total > self.done:
            text += f", {clock((self.total - self.done) / rate)} left"
        return text.strip()

    def _draw(self, now, final=False):
        text = self.line(now, final)
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
        self.stream.flush()
        self._drawn = now

    def close(self, ok=True):
        with self._lock:
            if not self.enabled:
                return
            if ok:
                self.done = max(self.done, self.total)
                self._draw(time.monotonic(), final=True)
            elif self._width:
                self.stream.write("\n")
                self.stream.flush()
            self.enabled = False
