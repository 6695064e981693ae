"""Progress output of long commands (gptc train, gptc prepare)."""
from __future__ import annotations

import os
import sys
from typing import TextIO


class Console:
    """Progress output: on a terminal, one live line rewritten in place (carriage return);
    otherwise (a pipe, a CI log) plain lines, as often as the caller chooses."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", lambda: False)())
        self.live = False
        self.closed = False

    def _write(self, text: str) -> None:
        # A reader that went away (`gptc train | head`) must not end a training run:
        # output stops, training and checkpoints go on.
        if self.closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.closed = True
            if self.stream is sys.stdout:  # so that the interpreter's final flush is quiet too
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)

    def line(self, text: str) -> None:
        self._write(("\r\x1b[K" if self.live else "") + text + "\n")
        self.live = False

    def status(self, text: str) -> None:
        self._write("\r" + text + "\x1b[K")
        self.live = True

    def end(self) -> None:
        if self.live:
            self._write("\n")
            self.live = False


def duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
