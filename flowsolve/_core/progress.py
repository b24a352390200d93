"""Progress of long work (training, data-set likelihoods, solver studies) through tqdm, the
ecosystem's convention: a live bar on a terminal, and whole lines at a slow rate when the
output is piped to a file or a log (a carriage-return line would collapse there)."""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int, label: str, *, enabled: bool = True, unit: str = "it",
                 initial: int = 0) -> tqdm:
    """A tqdm bar on stderr for ``total`` units of work (``initial`` already done: a resumed
    run). Disabled bars accept every call and print nothing. On a non-terminal stream the
    bar is refreshed at most every 30 s, each refresh on its own line."""
    stream = sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    if not interactive:
        stream = _Lines(stream)
    return tqdm(total=total, initial=initial, desc=label, unit=unit, file=stream,
                disable=not enabled, dynamic_ncols=interactive, leave=True,
                mininterval=0.1 if interactive else 30.0, ascii=not interactive)


class _Lines:
    """A text stream that writes each tqdm refresh as a line of its own: tqdm redraws its
    bar with carriage returns, which a log file or a pipe would keep as one long line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()
