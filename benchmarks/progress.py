"""A progress bar on stderr: tqdm when it is installed, one line per step when it is not."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, enabled: bool = True, desc: str = "benchmark"):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="row", file=sys.stderr,
                                 dynamic_ncols=True)

    def step(self, label: str) -> None:
        """Say what runs next."""
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
