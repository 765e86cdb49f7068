"""Progress bars on a terminal, plain dated lines in a log: `progress` is tqdm's constructor for both."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30  # at most one line per bar this often when the output is a file or a pipe
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:3.0f}%), {elapsed} elapsed, ~{remaining} left{postfix}"


class _Lines(tqdm):
    """tqdm that writes whole lines (no carriage returns), for logs."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)  # a line per interval, not per call

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        line = msg or self.__str__()
        if line.strip() and line != getattr(self, "_last", None):  # close() repeats the last state
            self.fp.write(line + "\n")
            self.fp.flush()
        self._last = line


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return _Lines(iterable, bar_format=LOG_FORMAT, file=sys.stderr, **kwargs)
