"""Dependency-free PNG charts: numpy, zlib and struct only, no matplotlib.

Two chart kinds cover what gptc draws: `line_chart` (the trainer's loss curves, one
coloured line per series, optionally on a log y axis) and `bar_chart` (the benchmark's
grouped bars, with each value printed above its bar). Both draw into an (H, W, 3)
uint8 canvas and save it with `write_png`, which writes atomically (a temporary file
in the target directory, then os.replace).

Text uses the embedded 5x7 bitmap font below (ASCII 32..126, with a one-row
descender), drawn at 1x for ticks, labels and legends and at 2x for titles; any other
character is drawn as '?'. Axes get "nice" ticks (1, 2 or 5 x 10^k) labelled compactly
(0.001, 250, 1.5K, 2M, 3e-5), light grid lines and outward tick marks. Non-finite
values (and non-positive ones on a log axis) are skipped: a line breaks around them,
and an isolated point is drawn as a small square. Output is deterministic: the same
input gives the same bytes."""
from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from gptc.common import write_atomic

__all__ = ["PALETTE", "bar_chart", "line_chart", "series_color", "write_png"]

# --------------------------------------------------------------------------- font

# One glyph per line: eight rows of five pixels ('#' on), top to bottom. Rows 0-6 hold
# capitals and digits (x-height is rows 2-6); row 7 is the descender of g, j, p, q, y.
_GLYPHS = {
    " ": "..... ..... ..... ..... ..... ..... ..... .....",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#.. .....",
    '"': ".#.#. .#.#. .#.#. ..... ..... ..... ..... .....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#. .....",
    "$": "..#.. .#### #.#.. .###. ..#.# ####. ..#.. .....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...## .....",
    "&": ".##.. #..#. #.#.. .#... #.#.# #..#. .##.# .....",
    "'": "..#.. ..#.. .#... ..... ..... ..... ..... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#. .....",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#... .....",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. ..... .....",
    ",": "..... ..... ..... ..... ..... .##.. ..#.. .#...",
    "-": "..... ..... ..... ##### ..... ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##.. .....",
    "/": "..... ....# ...#. ..#.. .#... #.... ..... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###. .....",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###. .....",
    "2": ".###. #...# ....# ...#. ..#.. .#... ##### .....",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###. .....",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#. .....",
    "5": "##### #.... ####. ....# ....# #...# .###. .....",
    "6": "..##. .#... #.... ####. #...# #...# .###. .....",
    "7": "##### ....# ...#. ..#.. .#... .#... .#... .....",
    "8": ".###. #...# #...# .###. #...# #...# .###. .....",
    "9": ".###. #...# #...# .#### ....# ...#. .##.. .....",
    ":": "..... .##.. .##.. ..... .##.. .##.. ..... .....",
    ";": "..... .##.. .##.. ..... .##.. ..#.. .#... .....",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#. .....",
    "=": "..... ..... ##### ..... ##### ..... ..... .....",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#... .....",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#.. .....",
    "@": ".###. #...# ....# .##.# #.#.# #.#.# .###. .....",
    "A": ".###. #...# #...# ##### #...# #...# #...# .....",
    "B": "####. #...# #...# ####. #...# #...# ####. .....",
    "C": ".###. #...# #.... #.... #.... #...# .###. .....",
    "D": "###.. #..#. #...# #...# #...# #..#. ###.. .....",
    "E": "##### #.... #.... ####. #.... #.... ##### .....",
    "F": "##### #.... #.... ####. #.... #.... #.... .....",
    "G": ".###. #...# #.... #.### #...# #...# .#### .....",
    "H": "#...# #...# #...# ##### #...# #...# #...# .....",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###. .....",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##.. .....",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...# .....",
    "L": "#.... #.... #.... #.... #.... #.... ##### .....",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...# .....",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...# .....",
    "O": ".###. #...# #...# #...# #...# #...# .###. .....",
    "P": "####. #...# #...# ####. #.... #.... #.... .....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.# .....",
    "R": "####. #...# #...# ####. #.#.. #..#. #...# .....",
    "S": ".#### #.... #.... .###. ....# ....# ####. .....",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#.. .....",
    "U": "#...# #...# #...# #...# #...# #...# .###. .....",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#.. .....",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#. .....",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...# .....",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#.. .....",
    "Z": "##### ....# ...#. ..#.. .#... #.... ##### .....",
    "[": ".###. .#... .#... .#... .#... .#... .###. .....",
    "\\": "..... #.... .#... ..#.. ...#. ....# ..... .....",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###. .....",
    "^": "..#.. .#.#. #...# ..... ..... ..... ..... .....",
    "_": "..... ..... ..... ..... ..... ..... ..... #####",
    "`": ".#... ..#.. ...#. ..... ..... ..... ..... .....",
    "a": "..... ..... .###. ....# .#### #...# .#### .....",
    "b": "#.... #.... #.##. ##..# #...# #...# ####. .....",
    "c": "..... ..... .###. #.... #.... #...# .###. .....",
    "d": "....# ....# .##.# #..## #...# #...# .#### .....",
    "e": "..... ..... .###. #...# ##### #.... .###. .....",
    "f": "..##. .#..# .#... ###.. .#... .#... .#... .....",
    "g": "..... ..... .#### #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...# .....",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###. .....",
    "j": "...#. ..... ..##. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#. .....",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###. .....",
    "m": "..... ..... ##.#. #.#.# #.#.# #...# #...# .....",
    "n": "..... ..... #.##. ##..# #...# #...# #...# .....",
    "o": "..... ..... .###. #...# #...# #...# .###. .....",
    "p": "..... ..... ####. #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #.... .....",
    "s": "..... ..... .#### #.... .###. ....# ####. .....",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##. .....",
    "u": "..... ..... #...# #...# #...# #..## .##.# .....",
    "v": "..... ..... #...# #...# #...# .#.#. ..#.. .....",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#. .....",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...# .....",
    "y": "..... ..... #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... ##### .....",
    "{": "...## ..#.. ..#.. .#... ..#.. ..#.. ...## .....",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#.. .....",
    "}": "##... ..#.. ..#.. ...#. ..#.. ..#.. ##... .....",
    "~": "..... ..... .#... #.#.# ...#. ..... ..... .....",
}
_GLYPH_W, _GLYPH_H, _ADVANCE = 5, 8, 6  # glyph box; ADVANCE = glyph width + 1 px gap
_FONT = np.zeros((128, _GLYPH_H, _GLYPH_W), dtype=bool)
for _ch, _rows in _GLYPHS.items():
    _FONT[ord(_ch)] = np.array([[c == "#" for c in row] for row in _rows.split()], dtype=bool)
del _ch, _rows

# --------------------------------------------------------------------------- colours

# Series colours, in order (the "tab10" palette); series past the tenth get colours
# spread around the hue circle by the golden ratio.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
_WHITE = (255, 255, 255)
_TEXT = (30, 30, 30)
_AXIS = (60, 60, 60)
_GRID = (225, 225, 225)
_MINOR_GRID = (245, 245, 245)
_MUTED = (120, 120, 120)

_MIN_SIZE = (200, 150)  # smallest width, height accepted
_MAX_SIDE = 16384


def series_color(i: int) -> tuple[int, int, int]:
    """The RGB colour of the i-th series (0-based) in both chart kinds."""
    if i < len(PALETTE):
        return PALETTE[i]
    h = (i * 0.6180339887498949) % 1.0
    s, v = 0.65, 0.85
    k = np.array([5.0, 3.0, 1.0])
    rgb = v - v * s * np.clip(np.minimum((k + h * 6) % 6, 4 - (k + h * 6) % 6), 0, 1)
    return tuple(int(round(c * 255)) for c in rgb)  # type: ignore[return-value]


# --------------------------------------------------------------------------- PNG


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image: 8-bit truecolour, filter 0 on every row."""
    h, w, _ = rgb.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # leading 0 per row: filter type None
    raw[:, 1:] = rgb.reshape(h, 3 * w)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) + _png_chunk(b"IEND", b""))


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image to `path` as a PNG, atomically: the bytes go
    to a temporary file in the same directory, which then replaces `path`, so a reader
    never sees a partial file. The directory must exist."""
    target = _check_path(path)
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"write_png: rgb must be a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_png: rgb must have shape (H, W, 3), got {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"write_png: rgb must have dtype uint8, got {rgb.dtype}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"write_png: image must be at least 1x1 pixels, got {rgb.shape[1]}x{rgb.shape[0]}")
    data = _encode_png(np.ascontiguousarray(rgb))
    directory = os.path.dirname(target) or "."
    if not os.path.isdir(directory):
        raise ValueError(f"write_png: directory {directory!r} does not exist")
    write_atomic(target, data)


# --------------------------------------------------------------------------- validation


def _check_path(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = os.fspath(path)
    if not isinstance(p, str) or not p:
        raise ValueError(f"path must be a non-empty str path, got {p!r}")
    if p.endswith(("/", os.sep)):
        raise ValueError(f"path {p!r} names a directory, not a file")
    return p


def _check_text(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}")
    return value


def _check_size(width: object, height: object) -> tuple[int, int]:
    for what, v, lo in (("width", width, _MIN_SIZE[0]), ("height", height, _MIN_SIZE[1])):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{what} must be an int, got {type(v).__name__}")
        if not lo <= v <= _MAX_SIDE:
            raise ValueError(f"{what} must be between {lo} and {_MAX_SIDE} pixels, got {v}")
    return int(width), int(height)  # type: ignore[arg-type]


def _as_floats(what: str, values: object) -> np.ndarray:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"{what} must be a sequence of numbers, got {type(values).__name__}")
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must contain only numbers") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------- numbers


def _strip_zeros(s: str) -> str:
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _sci(v: float, sig: int) -> str:
    """3e-5 style: mantissa with at most `sig` significant digits, no exponent padding."""
    mant, exp = f"{v:.{max(sig - 1, 0)}e}".split("e")
    return f"{_strip_zeros(mant)}e{int(exp)}"


_SUFFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def _format_value(v: float, sig: int = 3) -> str:
    """A compact label with about `sig` significant digits: 0.0123, 45.7, 1.23K, 2M, 3e-5."""
    if not math.isfinite(v):
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if a < 1e-3:
        return _sci(v, sig)
    if a >= 1e15:
        return _sci(v, sig)
    for scale, suffix in _SUFFIXES:
        if a >= scale * (1 - 0.5 * 10.0 ** -sig):  # 999.95 rounds up into the next unit
            s = _strip_zeros(f"{v / scale:.{sig}g}")
            return s + suffix if "e" not in s else _sci(v, sig)
    s = _strip_zeros(f"{v:.{sig}g}")
    if "e" in s:  # e.g. 999.96 -> '1e+03'
        return _format_value(round(v), sig)
    return s


def _format_tick(v: float, step: float) -> str:
    """A tick label for value `v` on an axis whose ticks are `step` apart: only as many
    decimals as the step needs (0.25 -> '0.25', 1500 with step 500 -> '1.5K')."""
    if abs(v) < step * 1e-6:
        return "0"
    a = abs(v)
    if a < 1e-3 or a >= 1e15:
        digits = max(0, int(math.floor(math.log10(a) + 1e-9)) - int(math.floor(math.log10(step) + 1e-9)))
        return _sci(v, min(digits + 1, 6))
    scale, suffix = 1.0, ""
    for sc, sx in _SUFFIXES:
        if a >= sc:
            scale, suffix = sc, sx
            break
    decimals = max(0, -int(math.floor(math.log10(step / scale) + 1e-9)))
    return _strip_zeros(f"{v / scale:.{min(decimals, 12)}f}") + suffix


def _nice_step(raw: float) -> float:
    """The smallest 1, 2 or 5 x 10^k that is >= raw."""
    exp = math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        step = m * 10.0 ** exp
        if step >= raw * (1 - 1e-9):
            return step
    return 10.0 ** (exp + 1)


def _next_step(step: float) -> float:
    exp = math.floor(math.log10(step) + 1e-9)
    m = step / 10.0 ** exp
    return (2.0 if m < 1.5 else 5.0 if m < 3.5 else 10.0) * 10.0 ** exp


def _linear_ticks(lo: float, hi: float, max_ticks: int) -> tuple[list[float], float]:
    """Nice ticks inside [lo, hi], at most max_ticks (but at least one step)."""
    span = hi - lo
    step = _nice_step(span / max(max_ticks, 1))
    while True:
        first = math.ceil(lo / step - 1e-9)
        last = math.floor(hi / step + 1e-9)
        if last - first + 1 <= max(max_ticks, 2):
            break
        step = _next_step(step)
    ticks = [k * step for k in range(first, last + 1)]
    ticks = [0.0 if abs(t) < step * 1e-9 else t for t in ticks]
    return ticks, step


# --------------------------------------------------------------------------- drawing


def _text_mask(text: str, scale: int = 1) -> np.ndarray:
    """A bool bitmap of `text` in the embedded font: (8*scale, (6*len-1)*scale)."""
    codes = np.array([ord(c) if 32 <= ord(c) < 127 else ord("?") for c in text], dtype=np.int64)
    if codes.size == 0:
        return np.zeros((_GLYPH_H * scale, 0), dtype=bool)
    cells = np.zeros((len(codes), _GLYPH_H, _ADVANCE), dtype=bool)
    cells[:, :, :_GLYPH_W] = _FONT[codes]
    mask = cells.transpose(1, 0, 2).reshape(_GLYPH_H, -1)[:, :-1]
    if scale > 1:
        mask = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)
    return mask


def _text_width(text: str, scale: int = 1) -> int:
    return max(0, _ADVANCE * len(text) - 1) * scale


def _fit_text(text: str, max_width: int, scale: int = 1) -> str:
    """`text`, cut and ended with '..' if wider than max_width pixels."""
    if _text_width(text, scale) <= max_width:
        return text
    n = max(0, (max_width // scale + 1) // _ADVANCE - 2)
    return text[:n] + ".." if n > 0 else text[: max(1, (max_width // scale + 1) // _ADVANCE)]


class _Canvas:
    """An RGB image with clipped rectangle, line, marker and text drawing."""

    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int],
             clip: tuple[int, int, int, int] | None = None) -> None:
        """Fill pixels x0 <= x < x1, y0 <= y < y1."""
        cx0, cy0, cx1, cy1 = clip or (0, 0, self.w, self.h)
        x0, x1 = max(int(x0), cx0), min(int(x1), cx1)
        y0, y1 = max(int(y0), cy0), min(int(y1), cy1)
        if x0 < x1 and y0 < y1:
            self.px[y0:y1, x0:x1] = color

    def mask(self, x: int, y: int, mask: np.ndarray, color: tuple[int, int, int]) -> None:
        """Paint the True pixels of `mask` with its top-left corner at (x, y)."""
        h, w = mask.shape
        x0, y0 = max(int(x), 0), max(int(y), 0)
        x1, y1 = min(int(x) + w, self.w), min(int(y) + h, self.h)
        if x0 >= x1 or y0 >= y1:
            return
        sub = mask[y0 - int(y):y1 - int(y), x0 - int(x):x1 - int(x)]
        self.px[y0:y1, x0:x1][sub] = color

    def text(self, x: float, y: float, text: str, color: tuple[int, int, int] = _TEXT, scale: int = 1,
             ha: str = "left", va: str = "top", rotate: bool = False) -> None:
        """Draw `text` anchored at (x, y): ha in left/center/right, va in top/middle/bottom
        of the cap height (descenders hang below). rotate: read bottom to top."""
        m = _text_mask(text, scale)
        if rotate:
            m = np.rot90(m)
        h, w = m.shape
        body_h = 7 * scale if not rotate else h
        dx = {"left": 0, "center": -(w // 2), "right": -w}[ha]
        dy = {"top": 0, "middle": -(body_h // 2), "bottom": -body_h}[va]
        self.mask(int(round(x)) + dx, int(round(y)) + dy, m, color)

    def polyline(self, xs: np.ndarray, ys: np.ndarray, color: tuple[int, int, int],
                 clip: tuple[int, int, int, int], thickness: int = 2) -> None:
        """Draw segments between consecutive points in pixel coordinates; a NaN point
        breaks the line, and a point with no neighbour is drawn as a small square."""
        ok = np.isfinite(xs) & np.isfinite(ys)
        seg = ok[:-1] & ok[1:]
        i = np.flatnonzero(seg)
        x0, y0, x1, y1 = xs[i], ys[i], xs[i + 1], ys[i + 1]
        # each segment is sampled once per pixel of its longer side, in chunks of about
        # 2M samples so that long, jagged series do not need unbounded memory
        n = np.ceil(np.maximum(np.abs(x1 - x0), np.abs(y1 - y0))).astype(np.int64) + 1
        chunk = np.searchsorted(np.cumsum(n), np.arange(1, int(n.sum()) // 2_000_000 + 2) * 2_000_000)
        lo = 0
        for hi in np.unique(np.r_[chunk, len(n)]):
            hi = int(min(max(hi, lo + 1), len(n)))
            if lo >= hi:
                continue
            m = n[lo:hi]
            owner = np.repeat(np.arange(lo, hi), m)
            start = np.repeat(np.cumsum(m) - m, m)
            t = (np.arange(int(m.sum())) - start) / np.maximum(n[owner] - 1, 1)
            self._stamp(x0[owner] + t * (x1 - x0)[owner], y0[owner] + t * (y1 - y0)[owner],
                        color, clip, thickness)
            lo = hi
        alone = ok.copy()
        alone[:-1] &= ~seg
        alone[1:] &= ~seg
        if alone.any():
            self._stamp(xs[alone], ys[alone], color, clip, thickness + 3)

    def _stamp(self, x: np.ndarray, y: np.ndarray, color: tuple[int, int, int],
               clip: tuple[int, int, int, int], size: int) -> None:
        """Paint a size x size square centred on each point, clipped to `clip`."""
        cx0, cy0, cx1, cy1 = clip
        bx = np.floor(x - size / 2 + 0.5).astype(np.int64)
        by = np.floor(y - size / 2 + 0.5).astype(np.int64)
        for ox in range(size):
            for oy in range(size):
                px, py = bx + ox, by + oy
                keep = (px >= cx0) & (px < cx1) & (py >= cy0) & (py < cy1)
                self.px[py[keep], px[keep]] = color


# --------------------------------------------------------------------------- layout

_PAD = 12          # outer margin
_TITLE_SCALE = 2
_TICK_LEN = 5
_LINE_H = 8        # one line of 1x text, descender included


class _Axis:
    """A value axis: data range, tick values and labels, and the data->pixel mapping."""

    def __init__(self, lo: float, hi: float, log: bool, length: int, min_gap: int,
                 label_extent: bool) -> None:
        self.log = log
        self.lo, self.hi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
        self.minor: list[float] = []
        # label_extent: labels run along the axis (x axis), so their widths limit the count
        max_ticks = max(2, min(10, length // min_gap))
        while True:
            self.ticks, self.labels = self._make_ticks(max_ticks)
            if not label_extent or max_ticks <= 2:
                break
            widest = max((_text_width(s) for s in self.labels), default=0)
            if len(self.ticks) * (widest + 16) <= length:
                break
            max_ticks -= 1

    def _make_ticks(self, max_ticks: int) -> tuple[list[float], list[str]]:
        if not self.log:
            ticks, step = _linear_ticks(self.lo, self.hi, max_ticks)
            return ticks, [_format_tick(t, step) for t in ticks]
        lo, hi = self.lo, self.hi
        decades = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
        if len(decades) >= 2:
            every = 1
            while len(decades[::every]) > max_ticks:
                every += 1
            first = next(d for d in decades if d % every == 0) if any(d % every == 0 for d in decades) else decades[0]
            major = [d for d in decades if (d - first) % every == 0]
            if every == 1 and len(decades) <= 6:
                self.minor = [math.log10(m) + d for d in range(decades[0] - 1, decades[-1] + 1)
                              for m in range(2, 10) if lo <= math.log10(m) + d <= hi]
            ticks = [float(d) for d in major]
            return ticks, [_format_value(10.0 ** d) for d in major]
        for mults in ((1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
            vals = [m * 10.0 ** d for d in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in mults]
            vals = [v for v in vals if lo - 1e-9 <= math.log10(v) <= hi + 1e-9]
            if len(vals) >= 3 or mults[-1] == 9 and len(vals) >= 2:
                vals = vals[:: max(1, math.ceil(len(vals) / max_ticks))]
                return [math.log10(v) for v in vals], [_format_value(v) for v in vals]
        # under a factor of two: linear ticks placed on the log axis
        ticks, step = _linear_ticks(10.0 ** lo, 10.0 ** hi, max_ticks)
        ticks = [t for t in ticks if t > 0]
        return [math.log10(t) for t in ticks], [_format_tick(t, step) for t in ticks]

    def frac(self, v: np.ndarray) -> np.ndarray:
        """Position of data values along the axis, 0 at lo and 1 at hi (NaN if not drawable)."""
        v = np.asarray(v, dtype=np.float64)
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
        return (v - self.lo) / (self.hi - self.lo)

    def tick_frac(self, t: float) -> float:
        return (t - self.lo) / (self.hi - self.lo)


def _padded_range(vals: np.ndarray, pad: float, log: bool) -> tuple[float, float]:
    """A (lo, hi) covering the finite values with `pad` of the span added on each side
    (in log10 space for a log axis); a default range when there is nothing to show."""
    v = vals[np.isfinite(vals)]
    if log:
        v = v[v > 0]
        if v.size == 0:
            return 1.0, 10.0
        llo, lhi = math.log10(float(v.min())), math.log10(float(v.max()))
        if lhi - llo < 1e-12:
            llo, lhi = llo - 0.5, lhi + 0.5
        d = (lhi - llo) * pad
        return 10.0 ** (llo - d), 10.0 ** (lhi + d)
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    if not math.isfinite(hi - lo):
        raise ValueError("values span too wide a range to plot (the difference overflows a float)")
    if hi - lo <= max(abs(lo), abs(hi)) * 1e-12:
        d = abs(lo) * 0.05 if lo != 0 else 1.0
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


def _legend_rows(items: list[str], width: int, swatch: int) -> list[list[int]]:
    """Indices of legend items per row, each row at most `width` pixels wide."""
    rows: list[list[int]] = []
    used = 0
    for i, name in enumerate(items):
        w = swatch + 5 + _text_width(name)
        if rows and used + 18 + w <= width:
            rows[-1].append(i)
            used += 18 + w
        else:
            rows.append([i])
            used = w
    return rows


def _draw_header(c: _Canvas, title: str, names: list[str], swatch: str) -> int:
    """Draw the title and a centred legend under it; return the y where the plot may start."""
    y = _PAD
    if title:
        t = _fit_text(title, c.w - 2 * _PAD, _TITLE_SCALE)
        c.text(c.w / 2, y, t, _TEXT, _TITLE_SCALE, ha="center")
        y += 7 * _TITLE_SCALE + 14
    if len(names) > 1 or (names and swatch == "box"):
        sw = 18 if swatch == "line" else 9
        shown = [_fit_text(n, c.w - 2 * _PAD - sw - 5) for n in names]
        rows = _legend_rows(shown, c.w - 2 * _PAD, sw)
        for row in rows[:8]:
            total = sum(sw + 5 + _text_width(shown[i]) for i in row) + 18 * (len(row) - 1)
            x = (c.w - total) // 2
            for i in row:
                col = series_color(i)
                if swatch == "line":
                    c.rect(x, y + 2, x + sw, y + 5, col)
                else:
                    c.rect(x, y - 1, x + sw, y + 8, col)
                c.text(x + sw + 5, y, shown[i])
                x += sw + 5 + _text_width(shown[i]) + 18
            y += _LINE_H + 6
        if len(rows) > 8:
            c.text(c.w / 2, y, f"(+{sum(len(r) for r in rows[8:])} more)", _MUTED, ha="center")
            y += _LINE_H + 6
        y += 4
    return y + 6


def _draw_y_axis(c: _Canvas, axis: _Axis, box: tuple[int, int, int, int], ylabel: str, grid: bool = True) -> None:
    x0, y0, x1, y1 = box
    ph = y1 - y0
    for t in axis.minor:
        py = y1 - 1 - int(round(axis.tick_frac(t) * (ph - 1)))
        if grid:
            c.rect(x0, py, x1, py + 1, _MINOR_GRID)
        c.rect(x0 - 3, py, x0, py + 1, _AXIS)
    for t, s in zip(axis.ticks, axis.labels):
        py = y1 - 1 - int(round(axis.tick_frac(t) * (ph - 1)))
        if grid:
            c.rect(x0, py, x1, py + 1, _GRID)
        c.rect(x0 - _TICK_LEN, py, x0, py + 1, _AXIS)
        c.text(x0 - _TICK_LEN - 4, py, s, ha="right", va="middle")
    if ylabel:
        c.text(_PAD, (y0 + y1) / 2, _fit_text(ylabel, ph), rotate=True, va="middle")


def _y_label_width(axis: _Axis) -> int:
    return max((_text_width(s) for s in axis.labels), default=0)


def _left_margin(axis: _Axis, ylabel: str) -> int:
    return _PAD + (_LINE_H + 10 if ylabel else 0) + _y_label_width(axis) + 4 + _TICK_LEN


def _frame(c: _Canvas, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    c.rect(x0 - 1, y0 - 1, x1 + 1, y0, _AXIS)
    c.rect(x0 - 1, y1, x1 + 1, y1 + 1, _AXIS)
    c.rect(x0 - 1, y0 - 1, x0, y1 + 1, _AXIS)
    c.rect(x1, y0 - 1, x1 + 1, y1 + 1, _AXIS)


# --------------------------------------------------------------------------- charts


def _decimate(px: np.ndarray, py: np.ndarray, ok: np.ndarray, pw: int) -> tuple[np.ndarray, np.ndarray]:
    """Thin a dense series with non-decreasing x to the first, last, lowest and highest
    point of each pixel column (per unbroken run), which draws the same picture with
    at most about 4 points per column. Other series are returned unchanged."""
    idx = np.flatnonzero(ok)
    if idx.size <= 4 * pw or np.any(np.diff(px[idx]) < 0):
        return px, py
    run = np.cumsum(np.r_[True, np.diff(idx) > 1])  # runs of consecutive drawable points
    col = np.floor(px[idx]).astype(np.int64)
    key = np.cumsum(np.r_[True, (np.diff(run) != 0) | (np.diff(col) != 0)])  # (run, column) buckets
    starts = np.flatnonzero(np.r_[True, np.diff(key) != 0])
    ends = np.r_[starts[1:], key.size] - 1
    order = np.lexsort((py[idx], key))  # by bucket, then y: bucket ends hold its min and max
    keep = np.unique(np.concatenate([starts, ends, order[starts], order[ends]]))
    sel, sel_run = idx[keep], run[keep]
    breaks = np.flatnonzero(np.diff(sel_run) != 0) + 1
    return np.insert(px[sel], breaks, np.nan), np.insert(py[sel], breaks, np.nan)


def line_chart(path: str | os.PathLike[str], series: dict[str, tuple[Sequence[float], Sequence[float]]],
               title: str, xlabel: str, ylabel: str, width: int = 800, height: int = 500,
               log_y: bool = False) -> None:
    """Draw one line per series (name -> (xs, ys)) and save a PNG to `path`.

    Each series gets its own colour (`series_color(i)` in dict order) and, when there
    are two or more, a legend entry under the title. Points are joined in the order
    given by 2-pixel lines; non-finite points (and, with log_y, points with y <= 0) are
    skipped and break the line; a point with no drawable neighbour, such as the only
    point of a series, is drawn as a small square. The x axis spans the data exactly,
    the y axis with 5% headroom (log10 scaled with log_y); an empty chart gets default
    axes and says "no data". Raises ValueError on malformed arguments."""
    target = _check_path(path)
    if not isinstance(series, Mapping):
        raise ValueError(f"series must be a dict of name -> (xs, ys), got {type(series).__name__}")
    for what, text in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)):
        _check_text(what, text)
    if not isinstance(log_y, (bool, np.bool_)):
        raise ValueError(f"log_y must be a bool, got {type(log_y).__name__}")
    w, h = _check_size(width, height)
    names: list[str] = []
    data: list[tuple[np.ndarray, np.ndarray]] = []
    for name, pair in series.items():
        if not isinstance(name, str):
            raise ValueError(f"series names must be str, got {type(name).__name__} {name!r}")
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"series {name!r} must be a pair (xs, ys)")
        xs = _as_floats(f"series {name!r} xs", pair[0])
        ys = _as_floats(f"series {name!r} ys", pair[1])
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: xs has {len(xs)} values but ys has {len(ys)}")
        names.append(name)
        data.append((xs, ys))

    # points that can be drawn: both coordinates finite (and y > 0 on a log axis)
    drawable = []
    for xs, ys in data:
        ok = np.isfinite(xs) & np.isfinite(ys)
        if log_y:
            ok &= ys > 0
        drawable.append(ok)
    all_x = np.concatenate([xs[ok] for (xs, _), ok in zip(data, drawable)] or [np.zeros(0)])
    all_y = np.concatenate([ys[ok] for (_, ys), ok in zip(data, drawable)] or [np.zeros(0)])

    c = _Canvas(w, h)
    top = _draw_header(c, title, names, "line")
    bottom = h - (_PAD + (_LINE_H + 10 if xlabel else 0) + _LINE_H + 4 + _TICK_LEN)
    if bottom - top < 40:
        raise ValueError(f"height {h} leaves no room for the plot (title, legend and labels need {h - bottom + top + 40} px)")
    ylo, yhi = _padded_range(all_y, 0.05, log_y)
    yaxis = _Axis(ylo, yhi, log_y, bottom - top, 40, label_extent=False)
    left = _left_margin(yaxis, ylabel)
    right = w - 24
    if right - left < 60:
        raise ValueError(f"width {w} leaves no room for the plot")
    xlo, xhi = _padded_range(all_x, 0.0, False)
    xaxis = _Axis(xlo, xhi, False, right - left, 70, label_extent=True)
    box = (left, top, right, bottom)
    pw, ph = right - left, bottom - top

    for t in xaxis.ticks:
        px = left + int(round(xaxis.tick_frac(t) * (pw - 1)))
        c.rect(px, top, px + 1, bottom, _GRID)
    _draw_y_axis(c, yaxis, box, ylabel)
    for t, s in zip(xaxis.ticks, xaxis.labels):
        px = left + int(round(xaxis.tick_frac(t) * (pw - 1)))
        c.rect(px, bottom, px + 1, bottom + _TICK_LEN, _AXIS)
        c.text(px, bottom + _TICK_LEN + 4, s, ha="center")
    if xlabel:
        c.text((left + right) / 2, h - _PAD - 7, _fit_text(xlabel, w - 2 * _PAD), ha="center")

    for i, ((xs, ys), ok) in enumerate(zip(data, drawable)):
        if not ok.any():
            continue
        fx, fy = xaxis.frac(xs), yaxis.frac(ys)
        px = np.where(ok, left + 0.5 + fx * (pw - 1), np.nan)
        py = np.where(ok, bottom - 0.5 - fy * (ph - 1), np.nan)
        px, py = _decimate(px, py, ok, pw)
        c.polyline(px, py, series_color(i), box)
    if all_x.size == 0:
        c.text((left + right) / 2, (top + bottom) / 2, "no data", _MUTED, 2, ha="center", va="middle")
    _frame(c, box)
    write_png(target, c.px)


def _wrap(text: str, max_width: int, max_lines: int = 3) -> list[str]:
    """Split `text` at spaces into lines of at most max_width pixels (cut with '..')."""
    words = text.split()
    lines: list[str] = []
    for word in words:
        if lines and _text_width(lines[-1] + " " + word) <= max_width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [_fit_text(line, max_width) for line in lines] or [""]


def bar_chart(path: str | os.PathLike[str], labels: Sequence[str], groups: dict[str, Sequence[float]],
              title: str, ylabel: str, width: int = 900, height: int = 500) -> None:
    """Draw grouped bars and save a PNG to `path`.

    There is one group per label along the x axis and, inside each, one bar per key of
    `groups` (in dict order, coloured `series_color(i)`, named in a legend under the
    title); groups[key][j] is the value of that key at labels[j]. Each bar's value is
    printed above it (below it when negative), vertically when it is wider than the bar.
    Bars start at zero; a non-finite value draws no bar and prints "n/a". Long labels
    wrap onto up to three lines. Raises ValueError on malformed arguments."""
    target = _check_path(path)
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ValueError(f"labels must be a sequence of str, got {type(labels).__name__}")
    if len(labels) == 0:
        raise ValueError("labels must not be empty: bar_chart needs at least one group")
    for lab in labels:
        if not isinstance(lab, str):
            raise ValueError(f"labels must be str, got {type(lab).__name__} {lab!r}")
    if not isinstance(groups, Mapping):
        raise ValueError(f"groups must be a dict of name -> values, got {type(groups).__name__}")
    if len(groups) == 0:
        raise ValueError("groups must not be empty: bar_chart needs at least one bar per label")
    _check_text("title", title)
    _check_text("ylabel", ylabel)
    w, h = _check_size(width, height)
    names: list[str] = []
    values: list[np.ndarray] = []
    for name, vals in groups.items():
        if not isinstance(name, str):
            raise ValueError(f"groups keys must be str, got {type(name).__name__} {name!r}")
        arr = _as_floats(f"groups[{name!r}]", vals)
        if len(arr) != len(labels):
            raise ValueError(f"groups[{name!r}] has {len(arr)} values but there are {len(labels)} labels")
        names.append(name)
        values.append(arr)
    v = np.stack(values)  # (bars per group, groups)
    k, n = v.shape

    c = _Canvas(w, h)
    top = _draw_header(c, title, names, "box")
    right = w - 24
    # first pass: y ticks without headroom give the left margin, hence the bar width
    fin = v[np.isfinite(v)]
    vlo = min(0.0, float(fin.min())) if fin.size else 0.0
    vhi = max(0.0, float(fin.max())) if fin.size else 1.0
    if vhi == vlo:
        vhi = 1.0
    if not math.isfinite(vhi - vlo):
        raise ValueError("values span too wide a range to plot (the difference overflows a float)")
    left_guess = _left_margin(_Axis(vlo, vhi, False, 300, 40, False), ylabel)
    slot = (right - left_guess) / n
    bar_w = max(1, min(int(slot * 0.8 / k), 100))
    texts = [[_format_value(float(x)) for x in row] for row in v]
    widest = max(_text_width(s) for row in texts for s in row)
    vertical = widest > bar_w + 4
    label_px = (widest if vertical else 7) + 12

    wrapped = [_wrap(lab, max(int(slot) - 6, 12)) for lab in labels]
    lines = max(len(wl) for wl in wrapped)
    bottom = h - (_PAD + (_LINE_H + 4) * lines + 6)
    if bottom - top < 40 + 2 * label_px:
        raise ValueError(f"height {h} leaves no room for the bars (title, legend and labels need more)")
    # headroom for the value labels: label_px pixels beyond the longest bar each way
    frac = label_px / (bottom - top)
    span = vhi - vlo
    lo = vlo - (span * frac / (1 - 2 * frac) if vlo < 0 else 0.0)
    hi = vhi + (span * frac / (1 - 2 * frac) if vhi > 0 else 0.0)
    yaxis = _Axis(lo, hi, False, bottom - top, 40, label_extent=False)
    left = _left_margin(yaxis, ylabel)
    if right - left < 60:
        raise ValueError(f"width {w} leaves no room for the plot")
    box = (left, top, right, bottom)
    pw, ph = right - left, bottom - top
    slot = pw / n
    bar_w = max(1, min(int(slot * 0.8 / k), 100))
    gap = 1 if bar_w >= 6 and k > 1 else 0

    _draw_y_axis(c, yaxis, box, ylabel)

    def ypix(val: float) -> float:  # the pixel row of a value, as the grid lines place it
        return bottom - 1 - float(yaxis.frac(np.array([val]))[0]) * (ph - 1)

    zero = int(round(ypix(0.0)))
    for j in range(n):
        cx = left + (j + 0.5) * slot
        x_start = int(round(cx - k * bar_w / 2))
        c.rect(int(round(cx)), bottom, int(round(cx)) + 1, bottom + _TICK_LEN, _AXIS)
        for li, line in enumerate(wrapped[j]):
            c.text(cx, bottom + _TICK_LEN + 4 + li * (_LINE_H + 4), line, ha="center")
        for i in range(k):
            x0 = x_start + i * bar_w
            x1 = x0 + bar_w - gap
            val = float(v[i, j])
            mid = (x0 + x1) / 2
            if not math.isfinite(val):
                c.text(mid, zero - 4, "n/a", _MUTED, ha="center", va="bottom", rotate=vertical)
                continue
            end = int(round(ypix(val)))
            y_a, y_b = (end, zero) if val >= 0 else (zero + 1, end + 1)
            if val != 0 and y_a == y_b:  # tiny but non-zero: show a sliver
                y_b = y_a + 1
            c.rect(x0, y_a, x1, y_b, series_color(i), clip=box)
            if val >= 0:
                c.text(mid, end - 4, texts[i][j], ha="center", va="bottom", rotate=vertical)
            else:
                c.text(mid, end + 5, texts[i][j], ha="center", va="top", rotate=vertical)
    c.rect(left, zero, right, zero + 1, _AXIS)
    _frame(c, box)
    write_png(target, c.px)
