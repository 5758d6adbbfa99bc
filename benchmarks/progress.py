"""A one-line progress bar on stderr: done/total, elapsed, a rough time left, and what runs now."""

import sys
import time


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per item otherwise."""
    def __init__(self, total: int, stream=sys.stderr, width: int = 24) -> None:
        self.total, self.done, self.stream, self.width = max(total, 1), 0, stream, width
        self.start = time.monotonic()
        self.interactive = getattr(stream, "isatty", lambda: False)()

    def update(self, label: str) -> None:
        """Shows `label` as the item now running; call `advance()` when it is done."""
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        eta = "?" if left != left else f"{left:.0f}s"
        line = f"[{bar}] {self.done}/{self.total} {elapsed:.0f}s, ~{eta} left | {label}"
        # On a terminal redraw one line; in a log print one line per item so the log stays readable.
        self.stream.write(("\r" + line[:160] + "\033[K") if self.interactive else line + "\n")
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
        elapsed = time.monotonic() - self.start
        self.stream.write(f"{self.done}/{self.total} measurements in {elapsed:.0f}s\n")
        self.stream.flush()
