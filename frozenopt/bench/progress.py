"""A progress bar on stderr: tqdm when it is installed, else a small one of our own."""

from __future__ import annotations

import sys
import time


class _PlainBar:
    def __init__(self, total: int, desc: str, disable: bool = False):
        self.total = max(int(total), 1)
        self.n = 0
        self.desc = desc
        self.postfix = ""
        self.disable = disable
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_draw = 0.0
        self._last_pct = -1
        self._draw(force=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        self._draw(force=True)

    def update(self, k: int = 1) -> None:
        self.n = min(self.n + k, self.total)
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if self.disable:
            return
        now = time.perf_counter()
        frac = self.n / self.total
        if self.tty:
            if not force and now - self._last_draw < 0.1 and self.n < self.total:
                return
            width = 28
            fill = int(round(frac * width))
            elapsed = now - self.start
            eta = (elapsed / frac - elapsed) if frac > 0 else 0.0
            line = (f"\r{self.desc} |{'#' * fill}{'.' * (width - fill)}| {self.n}/{self.total} "
                    f"[{elapsed:5.1f}s<{eta:5.1f}s] {self.postfix}")
            sys.stderr.write(line[:200].ljust(100))
            sys.stderr.flush()
        else:
            # Not a terminal: one line per 10 % so logs stay readable.
            pct = int(frac * 10)
            if pct != self._last_pct or force:
                self._last_pct = pct
                sys.stderr.write(f"{self.desc}: {self.n}/{self.total} {self.postfix}\n")
                sys.stderr.flush()
        self._last_draw = now

    def close(self) -> None:
        if not self.disable and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_bar(total: int, desc: str, disable: bool = False):
    try:
        from tqdm import tqdm  # type: ignore
    except ImportError:
        return _PlainBar(total, desc, disable=disable)
    return tqdm(total=total, desc=desc, unit="it", file=sys.stderr, disable=disable,
                dynamic_ncols=True, leave=True)
