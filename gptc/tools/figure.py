"""PNG figures through matplotlib, for the trainer's loss.png and the bench's bench.png
and roofline.png (the figures themselves are drawn where their data lives: train.py,
bench/report.py).

matplotlib is imported only when a figure is drawn, and used without pyplot: each
figure is a `Figure` on its own Agg canvas (no display, no global state). Without
matplotlib, new_figure raises PlotUnavailable, whose one-line message the tools print
as a note before going on: a plot must never cost a run its results."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gptc.common import write_atomic
from gptc.spec import GptcError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


class PlotUnavailable(GptcError):
    """matplotlib cannot be imported, so no plot is written (one-line message)."""


def new_figure(width_px: int, height_px: int) -> Figure:
    """An empty figure of width_px x height_px pixels, laid out by matplotlib's
    constrained layout, on an Agg canvas."""
    try:
        import matplotlib  # noqa: F401  (first: when it is missing, the error names matplotlib itself)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        why = "is not installed" if e.name == "matplotlib" else f"cannot be imported ({e})"
        raise PlotUnavailable(f"matplotlib {why}; no plot written (pip install matplotlib)") from None
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: str | os.PathLike) -> Path:
    """Render `figure` as PNG and write it atomically (no half-written file on a crash)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
    return Path(path)
