"""Tests of gptc.tools.plot: the PNG writer, the line and bar charts, tick labels and input
validation. PNGs are decoded by a small reader below (zlib + filter type 0 rows,
which is what gptc.tools.plot writes)."""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from gptc.tools import plot
from gptc.tools.plot import PALETTE, bar_chart, line_chart, series_color, write_png


def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB, non-interlaced PNG whose rows all use filter type 0."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header, kinds = 8, b"", None, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        kinds.append(kind)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and pos == len(data)
    w, h, depth, color_type, compression, filt, interlace = header
    assert (depth, color_type, compression, filt, interlace) == (8, 2, 0, 0, 0)
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8)
    assert raw.size == h * (1 + 3 * w)
    rows = raw.reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all(), "only filter type 0 is supported by this reader"
    return rows[:, 1:].reshape(h, w, 3)


def has_color(img: np.ndarray, rgb: tuple[int, int, int], at_least: int = 1) -> bool:
    return int((img == np.array(rgb, dtype=np.uint8)).all(axis=2).sum()) >= at_least


def color_mask(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return (img == np.array(rgb, dtype=np.uint8)).all(axis=2)


def loss_series() -> dict[str, tuple[list[float], list[float]]]:
    steps = list(range(0, 1001, 10))
    train = [4.0 * math.exp(-s / 300) + 1.5 + 0.05 * math.sin(s) for s in steps]
    val = [4.0 * math.exp(-s / 300) + 1.7 for s in steps[::10]]
    return {"train": (steps, train), "val": (steps[::10], val)}


def assert_no_temp_files(directory: Path, expected: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == expected


# --------------------------------------------------------------------------- write_png


def test_write_png_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    write_png(tmp_path / "r.png", img)
    assert np.array_equal(read_png(tmp_path / "r.png"), img)
    write_png(str(tmp_path / "one.png"), np.zeros((1, 1, 3), dtype=np.uint8))
    assert read_png(tmp_path / "one.png").shape == (1, 1, 3)
    assert_no_temp_files(tmp_path, {"r.png", "one.png"})


def test_write_png_replaces_atomically(tmp_path, monkeypatch):
    target = tmp_path / "img.png"
    first = np.full((4, 5, 3), 10, dtype=np.uint8)
    write_png(target, first)
    write_png(target, np.full((6, 7, 3), 200, dtype=np.uint8))  # overwrite in place
    assert read_png(target).shape == (6, 7, 3)
    assert_no_temp_files(tmp_path, {"img.png"})

    # the temporary file lives in the target's directory and is renamed over it
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst)))
        assert Path(src).parent == Path(dst).parent and Path(src).exists()
        real_replace(src, dst)

    monkeypatch.setattr(plot.os, "replace", spy)
    write_png(target, first)
    assert len(seen) == 1 and seen[0][1] == target and seen[0][0] != target

    # a failure before the rename leaves the old file intact and no temporary file
    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(plot.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_png(target, np.zeros((3, 3, 3), dtype=np.uint8))
    assert np.array_equal(read_png(target), first)
    assert_no_temp_files(tmp_path, {"img.png"})


@pytest.mark.parametrize(
    "rgb, message",
    [
        ([[[0, 0, 0]]], "must be a numpy array"),
        (np.zeros((4, 4), dtype=np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((4, 4, 4), dtype=np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((4, 4, 3), dtype=np.float32), "dtype uint8"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "at least 1x1"),
    ],
)
def test_write_png_rejects_bad_images(tmp_path, rgb, message):
    with pytest.raises(ValueError, match=message):
        write_png(tmp_path / "x.png", rgb)
    assert_no_temp_files(tmp_path, set())


def test_write_png_rejects_bad_paths(tmp_path):
    img = np.zeros((2, 2, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not exist"):
        write_png(tmp_path / "missing" / "x.png", img)
    with pytest.raises(ValueError, match="str or os.PathLike"):
        write_png(123, img)
    with pytest.raises(ValueError, match="names a directory"):
        write_png(str(tmp_path) + "/", img)


# --------------------------------------------------------------------------- line_chart


def test_line_chart_draws_series_text_and_grid(tmp_path):
    out = tmp_path / "loss.png"
    line_chart(out, loss_series(), "training loss", "step", "loss")
    img = read_png(out)
    assert img.shape == (500, 800, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 4, "image is blank"
    assert has_color(img, PALETTE[0], 500) and has_color(img, PALETTE[1], 300)
    assert PALETTE[0] != PALETTE[1]
    assert has_color(img, plot._TEXT, 200), "no text drawn"
    assert has_color(img, plot._GRID, 500), "no grid lines"
    title_band = img[:40]
    assert color_mask(title_band, plot._TEXT).sum() > 100, "no title at the top"
    assert_no_temp_files(tmp_path, {"loss.png"})


def test_line_chart_custom_size_and_log_axis(tmp_path):
    steps = np.arange(1, 2001)
    ys = 10.0 / np.sqrt(steps)
    ys[::7] = -1.0  # not drawable on a log axis: skipped
    line_chart(tmp_path / "log.png", {"a": (steps, ys), "b": (steps, ys * 3)}, "log", "step", "loss",
               width=640, height=360, log_y=True)
    img = read_png(tmp_path / "log.png")
    assert img.shape == (360, 640, 3)
    assert has_color(img, PALETTE[0], 200) and has_color(img, PALETTE[1], 200)


def test_line_is_continuous(tmp_path):
    # one steep and one shallow straight line: every pixel column and row between the
    # ends must be covered, so segments are drawn between points, not just dots
    series = {"steep": ([0.0, 1.0], [0.0, 100.0]), "flat": ([0.0, 100.0], [0.0, 1.0])}
    for name, pair in series.items():
        line_chart(tmp_path / f"{name}.png", {name: pair}, name, "x", "y")
        mask = color_mask(read_png(tmp_path / f"{name}.png"), PALETTE[0])
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        assert set(range(xs.min(), xs.max() + 1)) <= set(xs.tolist()), f"{name}: gap in columns"
        assert set(range(ys.min(), ys.max() + 1)) <= set(ys.tolist()), f"{name}: gap in rows"
        assert xs.max() - xs.min() > 600 or ys.max() - ys.min() > 300
        # 2 px thick: each covered column of the flat line holds at least 2 pixels
        if name == "flat":
            counts = np.bincount(xs)[xs.min():xs.max() + 1]
            assert (counts >= 2).all()


def test_line_chart_skips_nonfinite_and_handles_degenerate_series(tmp_path):
    xs = list(range(50))
    ys = [float(x) for x in xs]
    ys[10] = float("nan")
    ys[20] = float("inf")
    ys[30] = float("-inf")
    line_chart(tmp_path / "gaps.png", {"gaps": (xs, ys)}, "gaps", "x", "y")
    assert has_color(read_png(tmp_path / "gaps.png"), PALETTE[0], 100)

    line_chart(tmp_path / "single.png", {"one": ([3], [2.5])}, "single", "x", "y")
    assert has_color(read_png(tmp_path / "single.png"), PALETTE[0], 4)  # a visible dot

    line_chart(tmp_path / "mixed.png", {"empty": ([], []), "nan": ([1, 2], [math.nan, math.nan]),
                                          "ok": ([1, 2, 3], [1, 4, 9])}, "mixed", "x", "y")
    img = read_png(tmp_path / "mixed.png")
    assert has_color(img, PALETTE[2], 50)
    plot_area = img[80:]  # below the title and the legend, which shows every series' colour
    assert not has_color(plot_area, PALETTE[0]) and not has_color(plot_area, PALETTE[1])
    assert has_color(img[:80], PALETTE[0]) and has_color(img[:80], PALETTE[1])

    line_chart(tmp_path / "empty.png", {}, "nothing yet", "x", "y")
    assert read_png(tmp_path / "empty.png").shape == (500, 800, 3)
    line_chart(tmp_path / "flat.png", {"c": ([0, 1, 2], [5, 5, 5])}, "constant", "x", "y")
    assert has_color(read_png(tmp_path / "flat.png"), PALETTE[0], 100)


def test_many_series_get_distinct_colours(tmp_path):
    n = 14
    colours = [series_color(i) for i in range(n)]
    assert len(set(colours)) == n
    xs = np.linspace(0, 1, 50)
    line_chart(tmp_path / "many.png", {f"s{i}": (xs, xs * (i + 1)) for i in range(n)}, "many", "x", "y")
    img = read_png(tmp_path / "many.png")
    for c in colours:
        assert has_color(img, c), c


def test_dense_series_is_fast_and_complete(tmp_path):
    n = 200_000
    rng = np.random.default_rng(1)
    steps = np.arange(n)
    loss = 3.0 + rng.standard_normal(n)
    loss[n // 2] = 50.0  # a single spike must survive the per-column thinning
    line_chart(tmp_path / "dense.png", {"loss": (steps, loss)}, "dense", "step", "loss")
    mask = color_mask(read_png(tmp_path / "dense.png"), PALETTE[0])
    ys, _ = np.nonzero(mask)
    top_of_plot = ys.min()
    assert top_of_plot < 80, "the spike to 50 was lost"


# --------------------------------------------------------------------------- bar_chart


def test_bar_chart(tmp_path):
    out = tmp_path / "bars.png"
    labels = ["tiny", "small", "gpt2 medium seq=1024"]
    groups = {"gptc": [152345.0, 45000.0, 12000.5], "torch": [120000.0, 50123.0, float("nan")],
              "torch.compile": [140000.0, -5000.0, 11000.0]}
    bar_chart(out, labels, groups, "throughput", "tokens/s")
    img = read_png(out)
    assert img.shape == (500, 900, 3)
    for i in range(3):
        assert has_color(img, PALETTE[i], 400), f"bars of group {i} missing"
    assert has_color(img, plot._TEXT, 200)
    assert_no_temp_files(tmp_path, {"bars.png"})

    bar_chart(tmp_path / "small.png", ["only"], {"v": [0.0]}, "", "", width=300, height=200)
    assert read_png(tmp_path / "small.png").shape == (200, 300, 3)
    many = {f"impl{j}": list(np.linspace(1e5, 3e6, 12) * (j + 1)) for j in range(5)}
    bar_chart(tmp_path / "many.png", [f"c{i}" for i in range(12)], many, "vertical labels", "FLOP/s")
    img = read_png(tmp_path / "many.png")
    for j in range(5):
        assert has_color(img, PALETTE[j], 50)


# --------------------------------------------------------------------------- determinism


def test_output_is_deterministic(tmp_path):
    for i in range(2):
        line_chart(tmp_path / f"l{i}.png", loss_series(), "loss", "step", "loss", log_y=True)
        bar_chart(tmp_path / f"b{i}.png", ["a", "b"], {"x": [1.0, 2.5], "y": [3.0, 0.25]}, "bars", "v")
    assert (tmp_path / "l0.png").read_bytes() == (tmp_path / "l1.png").read_bytes()
    assert (tmp_path / "b0.png").read_bytes() == (tmp_path / "b1.png").read_bytes()
    line_chart(tmp_path / "l2.png", loss_series(), "loss!", "step", "loss", log_y=True)
    assert (tmp_path / "l2.png").read_bytes() != (tmp_path / "l0.png").read_bytes()
    assert_no_temp_files(tmp_path, {"l0.png", "l1.png", "l2.png", "b0.png", "b1.png"})


# --------------------------------------------------------------------------- ticks and text


@pytest.mark.parametrize(
    "value, step, text",
    [(0.0, 0.5, "0"), (1500.0, 500.0, "1.5K"), (1000.0, 500.0, "1K"), (2e6, 1e6, "2M"),
     (0.001, 0.001, "0.001"), (0.30000000000000004, 0.1, "0.3"), (-2.5, 0.5, "-2.5"),
     (3e-5, 1e-5, "3e-5"), (250.0, 50.0, "250"), (4e9, 1e9, "4G")],
)
def test_tick_labels(value, step, text):
    assert plot._format_tick(value, step) == text


@pytest.mark.parametrize(
    "value, text",
    [(152345.0, "152K"), (12000.5, "12K"), (45.678, "45.7"), (0.0123, "0.0123"), (0.0, "0"),
     (2e6, "2M"), (999.96, "1K"), (1.5e-5, "1.5e-5"), (float("nan"), "n/a"), (-3100.0, "-3.1K")],
)
def test_value_labels(value, text):
    assert plot._format_value(value) == text


def test_nice_ticks():
    ticks, step = plot._linear_ticks(0.0, 10.0, 6)
    assert step == 2.0 and ticks == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    ticks, step = plot._linear_ticks(1.37, 6.3, 8)
    assert step == 1.0 and ticks == [2.0, 3.0, 4.0, 5.0, 6.0]
    ticks, step = plot._linear_ticks(-0.013, 0.013, 6)
    assert step == 0.005 and 0.0 in ticks
    for lo, hi in [(0.0, 1.0), (3.0, 1e6), (-7.0, 1234.5), (1e-6, 3e-6)]:
        ticks, step = plot._linear_ticks(lo, hi, 7)
        mant = step / 10.0 ** math.floor(math.log10(step) + 1e-9)
        assert any(math.isclose(mant, m) for m in (1.0, 2.0, 5.0))
        assert 2 <= len(ticks) <= 7 and all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)


def test_font_covers_printable_ascii():
    for code in range(33, 127):
        assert plot._FONT[code].any(), f"glyph for {chr(code)!r} is empty"
    mask = plot._text_mask("Hi é", 2)  # non-ASCII falls back to '?'
    assert mask.shape == (16, (6 * 4 - 1) * 2)
    assert np.array_equal(plot._text_mask("?"), plot._text_mask("é"))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(series=[1, 2]), "series must be a dict"),
        (dict(series={"a": ([1, 2, 3], [1, 2])}), "'a': xs has 3 values but ys has 2"),
        (dict(series={"a": ([1, 2], ["x", "y"])}), r"series 'a' ys must contain only numbers"),
        (dict(series={"a": ([[1, 2]], [[1, 2]])}), "one-dimensional"),
        (dict(series={"a": [1, 2, 3]}), r"must be a pair \(xs, ys\)"),
        (dict(series={"a": (5, [1])}), "must be a sequence of numbers"),
        (dict(series={1: ([1], [1])}), "series names must be str"),
        (dict(width=50), "width must be between"),
        (dict(height=10**6), "height must be between"),
        (dict(width=800.0), "width must be an int"),
        (dict(title=None), "title must be a str"),
        (dict(log_y="yes"), "log_y must be a bool"),
        (dict(series={"a": ([-1e308, 1e308], [1, 2])}), "too wide a range"),
    ],
)
def test_line_chart_errors(tmp_path, kwargs, message):
    args = dict(series={"a": ([1, 2], [3, 4])}, title="t", xlabel="x", ylabel="y")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        line_chart(tmp_path / "x.png", **args)
    assert_no_temp_files(tmp_path, set())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=[]), "labels must not be empty"),
        (dict(labels="ab"), "labels must be a sequence of str"),
        (dict(labels=["a", 2]), "labels must be str"),
        (dict(groups={}), "groups must not be empty"),
        (dict(groups=[1, 2]), "groups must be a dict"),
        (dict(groups={"g": [1.0]}), r"groups\['g'\] has 1 values but there are 2 labels"),
        (dict(groups={"g": [1.0, "x"]}), "must contain only numbers"),
        (dict(groups={3: [1.0, 2.0]}), "groups keys must be str"),
        (dict(ylabel=5), "ylabel must be a str"),
        (dict(height=100), "height must be between"),
    ],
)
def test_bar_chart_errors(tmp_path, kwargs, message):
    args = dict(labels=["a", "b"], groups={"g": [1.0, 2.0]}, title="t", ylabel="y")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        bar_chart(tmp_path / "x.png", **args)
    assert_no_temp_files(tmp_path, set())
