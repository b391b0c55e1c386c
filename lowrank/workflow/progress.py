"""A progress line for training: step, loss, learning rate, tokens/s. Redrawn in place on a
terminal; on a pipe or file, one line every `every` steps (logs stay readable)."""

from __future__ import annotations

import time


class Progress:
    def __init__(self, total: int, stream, every: int = 1, start: int = 0):
        self.total, self.stream, self.every, self.step = total, stream, every, start
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t, self.tokens, self.open = time.perf_counter(), 0, False

    def update(self, epoch: int, epochs: int, loss: float, lr: float, tokens: int) -> None:
        self.step += 1
        self.tokens += tokens
        if self.step % self.every and self.step != self.total:
            return
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t, 1e-9)  # over the steps since the last line
        self.t, self.tokens = now, 0
        width = 24
        done = int(width * self.step / max(1, self.total))
        line = (f"[{'#' * done}{'.' * (width - done)}] step {self.step}/{self.total} epoch {epoch}/{epochs} "
                f"loss {loss:.4f} lr {lr:.2e} {rate:,.0f} tok/s")
        if self.tty:
            self.stream.write("\r" + line)
            self.open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own, below the bar."""
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.open = False
