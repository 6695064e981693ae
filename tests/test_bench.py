"""`gptc bench` without a GPU: the one-line refusal, and every part that needs no GPU
(statistics, timing loop, roofline rows, tables, JSON/Markdown writing and the two
figures with fake timings, with and without matplotlib, spec resolution, provenance),
plus the PyTorch model against gptc's reference executor on the CPU."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from gptc.tools import bench
from gptc.tools.bench import config, measure, peers, report
from gptc.tools.cli import main
from gptc.compiler.planner.cost import plan_costs
from gptc.models import build_graph, init_params
from gptc.compiler.planner import make_plan
from gptc.spec import GptcError, preset
from conftest import png_size


# ----- no GPU ------------------------------------------------------------------------
def test_no_gpu_one_line_exit_2(monkeypatch, capsys):
    import gptc.runtime.device as device_mod
    monkeypatch.setattr(device_mod, "open_device", lambda kind="auto", ordinal=0: None)
    assert main(["bench", "--preset", "tiny"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "gptc: error: no GPU found: gptc bench needs an AMD or NVIDIA GPU\n"


def test_bad_arguments_exit_2(capsys):
    assert main(["bench", "--compare", "unfused,jax"]) == 2
    assert "unknown value 'jax'" in capsys.readouterr().err
    assert main(["bench", "--preset", "nosuch"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_without_torch_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    torch, why = peers.import_torch()
    assert torch is None and why == "PyTorch is not installed: skipping the PyTorch columns"


# ----- small pieces ----------------------------------------------------------------
def test_parse_list():
    assert config.parse_list(None, config.WHATS, "what") == ("train", "infer")
    assert config.parse_list("infer", config.WHATS, "what") == ("infer",)
    assert config.parse_list("unfused, torch-eager", config.COMPARES, "compare") == ("unfused", "torch-eager")
    with pytest.raises(GptcError, match="--what: unknown value 'eval'"):
        config.parse_list("eval", config.WHATS, "what")


def test_resolve_spec(tmp_path):
    spec, name = config.resolve_spec("hipgpt", 256)
    assert name == "hipgpt" and spec.train.batch_size == 256 and spec.model.d_model == 128
    path = tmp_path / "mid.toml"
    path.write_text("[model]\nvocab_size = 8192\nseq_len = 512\nd_model = 512\nn_layers = 8\nn_heads = 8\n"
                    "d_ff = 2048\n[train]\nbatch_size = 16\n")
    spec, name = config.resolve_spec(str(path))
    assert name == "mid" and spec.train.batch_size == 16 and spec.model.n_layers == 8
    assert config.model_summary(spec) == "E512 L8 H8 F2048 V8192 S512"


def test_provenance(monkeypatch):
    assert report.gpu_slug("NVIDIA H100 80GB HBM3 (cuda:sm_90)") == "h100-80gb-hbm3"
    assert report.gpu_slug("AMD Instinct MI250X (hip:gfx90a)") == "mi250x"
    monkeypatch.setenv("GPTC_COMMIT", "abc1234")
    assert report.git_commit() == "abc1234"
    assert report.results_dir_name("NVIDIA H200 (cuda:sm_90)", "2026-11-21", "abc1234+dirty") == "h200-2026-11-21-abc1234-dirty"
    monkeypatch.delenv("GPTC_COMMIT")
    assert report.git_commit("/") == "unknown"  # not a git checkout


def test_summarize_and_rates():
    s = measure.summarize([3.0, 1.0, 2.0, 100.0, 2.5])
    assert s["median_ms"] == 2.5 and s["samples"] == 5 and s["p10_ms"] == 1.0 and s["p90_ms"] == 100.0
    assert measure.tokens_per_s(1024, 0.5) == pytest.approx(2_048_000)
    assert report.fmt_rate(2_048_000) == "2.05 M" and report.fmt_rate(408_000) == "408 K"
    assert report.fmt_num(0.51234) == "0.512" and report.fmt_num(12345.6) == "12,346" and report.fmt_num(float("nan")) == "-"
    assert measure.sample_count(0.5, 20, 1000) == measure.MAX_SAMPLES
    assert measure.sample_count(100.0, 20, 1000) == 20
    assert measure.sample_count(10.0, 20, 1000) == 100


class FakeTimer(measure.Timer):
    """Events are host counters; each enqueue advances the fake device clock by 2 ms."""

    def __init__(self):
        self.clock = 0.0
        self.created = 0

    def reset(self):
        pass

    def event(self):
        self.created += 1
        return {}

    def record(self, ev):
        ev["t"] = self.clock

    def elapsed_ms(self, a, b):
        return b["t"] - a["t"]

    def sync(self):
        pass


def test_measure_loop():
    timer = FakeTimer()
    calls = []

    def enqueue():
        calls.append(1)
        timer.clock += 2.0
    samples = measure.measure(timer, enqueue, repeats=7, budget_ms=10.0, warmup=2)
    assert samples == [2.0] * 7             # budget allows 5, repeats asks for at least 7
    assert len(calls) == 2 + 3 + 7          # warm-up, estimate, timed


def test_cross_entropy_numpy():
    logits = np.array([[[0.0, 0.0], [2.0, 0.0]]], np.float32)
    targets = np.array([[1, 0]])
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert measure.cross_entropy(logits, targets) == pytest.approx(expected)


def test_kernel_rows_roofline():
    from gptc.compiler.planner.cost import KernelCost
    costs = [KernelCost("k0", "pointwise", 2_000_000, 1_000_000, 1_000_000, 3),
             KernelCost("k1", "matmul", 1_000_000, 1_000_000, 2_000_000_000, 1)]
    # 3 TB/s, 50 TFLOP/s; k0: 3 MB -> 1 us floor, measured 4 us -> 25%, 750 GB/s
    # k1: 2 GFLOP -> 40 us floor (compute), measured 80 us -> 50%, 25 TFLOP/s
    rows = report.kernel_rows(costs, [0.004, 0.080], 3e12, 50e12)
    assert rows[0]["bound"] == "memory" and rows[0]["gbps"] == pytest.approx(750)
    assert rows[0]["pct_floor"] == pytest.approx(25) and rows[0]["floor_ms"] == pytest.approx(0.001)
    assert rows[1]["bound"] == "compute" and rows[1]["tflops"] == pytest.approx(25)
    assert rows[1]["pct_floor"] == pytest.approx(50)
    summary = report.plan_summary(rows, step_ms=0.1)
    assert summary["kernel_sum_ms"] == pytest.approx(0.084) and summary["floor_ms"] == pytest.approx(0.041)
    assert summary["pct_floor_of_step"] == pytest.approx(41)
    assert [f["family"] for f in summary["families"]] == ["matmul", "pointwise"]
    assert summary["top"][0]["kernel"] == "k1"


def test_table_formats():
    text = report.table(["a", "bb"], [["x", "1"], ["yyy", "22"]])
    assert text.splitlines() == ["a    bb", "x     1", "yyy  22"]
    md = report.table(["a", "bb"], [["x", "1"]], markdown=True)
    assert md.splitlines() == ["| a | bb |", "| --- | ---: |", "| x | 1 |"]


# ----- whole outputs from fake timings -------------------------------------------------
FAKE_CEILINGS = {"copy_bytes_per_s": 3.0e12, "copy_how": "fake copy",
                 "matrix": {"fp32": (50e12, "fake gemm"), "tf32": (400e12, "fake tf32"), "bf16": (790e12, "fake bf16")}}


@pytest.mark.parametrize("precision, name, rate", [("fp32", "fp32", 50e12), ("bf16", "bf16", 790e12)])
def test_floor_uses_the_matrix_rate_of_the_run_precision(precision, name, rate):
    """A bf16 run is held to the bf16 matrix-product rate (not fp32's, which would put
    its matmuls far above 100% of their floor); the other rates are noted only."""
    c = measure.ceilings_for(FAKE_CEILINGS, precision)
    assert (c["gemm_name"], c["gemm_flops_per_s"]) == (name, rate)
    assert name not in c["noted"] and len(c["noted"]) == 2
    result = {"ceilings": c}
    lines = report.ceiling_lines(result)
    assert lines[1][0] == f"{name} matrix product (the floor's)"
    assert all("noted, not used" in row[0] for row in lines[2:]) and len(lines) == 4
    assert FAKE_CEILINGS["matrix"][name] == (rate, "fake gemm" if name == "fp32" else "fake bf16")  # not consumed


def fake_result(what=("train", "infer"), with_torch=True) -> dict:
    spec = preset("hipgpt")
    ceilings = measure.ceilings_for(FAKE_CEILINGS, "fp32")
    meta = {"config": "hipgpt", "model_summary": config.model_summary(spec), "params": 6_000_000, "batch": 32,
            "seq_len": 32, "tokens_per_step": 1024, "precision": "fp32", "gpu": "NVIDIA H100 80GB HBM3 (cuda:sm_90)",
            "gpu_slug": "h100-80gb-hbm3", "date": "2026-11-21", "commit": "abc1234", "torch": "2.11.0",
            "what": list(what), "compare": list(config.COMPARES), "notes": ["a note"]}
    result = {"schema": 1, "meta": meta, "ceilings": ceilings, "steps": [], "plans": {}}
    ms = {"gptc-fused": 0.5, "gptc-unfused": 1.5, "torch-eager": 2.5, "torch-compile": 2.55, "torch-cudagraphs": 1.05}
    for w in what:
        for key, t in ms.items():
            if key.startswith("torch") and not with_torch:
                continue
            result["steps"].append({"what": w, "framework": key, "median_ms": t, "p10_ms": t * 0.98, "p90_ms": t * 1.05,
                                    "samples": 100, "tokens_per_s": measure.tokens_per_s(1024, t),
                                    "losses": [8.52, 8.49] if w == "train" else [8.52], "setup_s": 1.0})
        for fuse in (True, False):
            plan = make_plan(build_graph(spec, w), fuse)
            costs = plan_costs(plan)
            times = [0.001 + c.bytes / 2e9 + c.flops / 30e12 * 1e3 for c in costs]
            rows = report.kernel_rows(costs, times, 3e12, 50e12, report.launch_labels(plan))
            result["plans"][f"{w} {'fused' if fuse else 'unfused'}"] = {**report.plan_summary(rows, ms["gptc-fused"]),
                                                                        "rows": rows}
    return result


def test_ratios_and_summary():
    result = fake_result()
    r = report.ratios(result, "train")
    assert r["gptc-unfused"] == pytest.approx(3.0) and r["torch-cudagraphs"] == pytest.approx(2.1)
    text = report.render_summary(result)
    assert "gptc fused: 3.00x faster than unfused; 2.10x faster than torch.compile + CUDA graph" in text
    assert report.speedup_phrase(0.5, "X") == "2.00x slower than X"
    assert "NVIDIA H100 80GB HBM3 (cuda:sm_90) · 2026-11-21 · gptc abc1234" in text
    assert "top kernels of train fused" in text and "8.520000" in text


def test_write_outputs(tmp_path):
    result = fake_result()
    paths = report.write_outputs(result, tmp_path / "out", log=lambda s: None)
    names = sorted(p.name for p in paths)
    assert names[:2] == ["bench.json", "bench.md"]
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["meta"]["commit"] == "abc1234" and len(data["steps"]) == 10
    assert len(data["plans"]["train fused"]["rows"]) == len(make_plan(build_graph(preset("hipgpt"), "train")).launches)
    md = (tmp_path / "out" / "bench.md").read_text()
    assert md.startswith("# gptc bench: hipgpt, batch 32, fp32")
    assert "NVIDIA H100 80GB HBM3 (cuda:sm_90) · 2026-11-21 · gptc abc1234" in md
    assert "| torch.compile + CUDA graph | 1.05 |" in md
    assert "measured in isolation" in md and "## Kernels: train unfused" in md
    assert names == ["bench.json", "bench.md", "bench.png", "roofline.png"]
    assert png_size(tmp_path / "out" / "bench.png") == (1000, 560)
    assert png_size(tmp_path / "out" / "roofline.png") == (1240, 1000)  # 2 x 2 panels


def test_throughput_figure_bars():
    result = fake_result()
    labels, groups = report.chart_groups(result)
    ax, = report.throughput_figure(result).axes
    assert ax.get_title() == "hipgpt b32 fp32 - H100 80GB HBM3 - 2026-11-21 - gptc abc1234"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["training step", "inference forward"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(groups) == list(config.FRAMEWORKS.values())
    heights = [bar.get_height() for container in ax.containers for bar in container]
    assert heights == pytest.approx([v for values in groups.values() for v in values])
    assert "million tokens/s" in ax.get_ylabel()


def test_roofline_figure_points_and_ceilings():
    result = fake_result()
    figure = report.roofline_figure(result)
    without_flops = {key: sum(r["flops"] == 0 for r in plan["rows"]) for key, plan in result["plans"].items()}
    assert all(without_flops.values())  # copies and gathers: no FLOPs, no place on a log axis
    assert [ax.get_title() for ax in figure.axes] == [
        f"{key}: {len(plan['rows']) - without_flops[key]} launches ({without_flops[key]} not shown: no FLOPs or no time)"
        for key, plan in result["plans"].items()]
    ax = figure.axes[0]  # train fused
    assert ax.get_xscale() == ax.get_yscale() == "log"
    bandwidth, roof = ax.get_lines()
    x_lo, x_hi = ax.get_xlim()
    assert list(bandwidth.get_xdata()) == pytest.approx([x_lo, 50e12 / 3e12])
    assert list(bandwidth.get_ydata()) == pytest.approx([3e12 * x_lo, 50e12])
    assert list(roof.get_xdata()) == pytest.approx([50e12 / 3e12, x_hi]) and list(roof.get_ydata()) == [50e12] * 2
    rows = report.roofline_rows(result["plans"]["train fused"]["rows"])
    for points in ax.collections:
        family = [r for r in rows if r["family"] == points.get_label()]
        expected = [(r["flops"] / r["bytes"], r["flops"] / r["ms"] * 1e3) for r in family]
        np.testing.assert_allclose(points.get_offsets(), expected, rtol=1e-12)
    assert sorted(p.get_label() for p in ax.collections) == sorted({r["family"] for r in rows})
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[:2] == ["copy bandwidth 3.00 TB/s", "fp32 matrix product 50.0 TFLOP/s"]
    assert set(legend[2:]) == {r["family"] for plan in result["plans"].values() for r in report.roofline_rows(plan["rows"])}


def test_no_roofline_without_timed_launches(tmp_path):
    result = fake_result(what=("infer",))
    result["plans"] = {}  # --no-kernels
    paths = report.write_outputs(result, tmp_path, log=lambda s: None)
    assert [p.name for p in paths] == ["bench.json", "bench.md", "bench.png"]


def test_without_matplotlib_the_numbers_are_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    lines = []
    paths = report.write_outputs(fake_result(), tmp_path, log=lines.append)
    assert [p.name for p in paths] == ["bench.json", "bench.md"]
    assert lines == ["note: matplotlib is not installed; no plot written (pip install matplotlib)"]
    assert not list(tmp_path.glob("*.png"))


def test_chart_groups_skip_missing():
    result = fake_result(what=("train",), with_torch=False)
    labels, groups = report.chart_groups(result)
    assert labels == ["training step"]
    assert list(groups) == ["gptc fused", "gptc unfused"]
    assert groups["gptc fused"][0] == pytest.approx(2.048)


def test_failed_peer_is_reported():
    result = fake_result(what=("infer",))
    result["steps"].append({"what": "infer", "framework": "torch-cudagraphs", "error": "RuntimeError: boom"})
    result["steps"] = [s for s in result["steps"] if not (s["framework"] == "torch-cudagraphs" and "median_ms" in s)]
    md = report.render_markdown(result)
    assert "torch.compile + CUDA graph failed: RuntimeError: boom" in md
    assert "torch-cudagraphs" not in report.ratios(result, "infer")


# ----- the PyTorch model against gptc's reference executor ----------------------------
def test_torch_model_matches_reference():
    torch = pytest.importorskip("torch")
    from gptc.tools.bench import torch_twin as tm
    from gptc.runtime.reference import ReferenceExecutor
    spec = preset("tiny")
    graph = build_graph(spec, "train")
    params = init_params(graph, 0)
    tokens, targets = bench.make_batch(spec, 1)
    ref = ReferenceExecutor(graph, params)
    expected = [float(ref.run({"tokens": tokens, "targets": targets, "lr": np.float32(spec.train.lr),
                               "step": np.float32(s)})["loss"]) for s in (1, 2, 3)]
    model = tm.build_model(spec.model, params, device="cpu")
    assert sorted(tm.gptc_name(n) for n, _ in model.named_parameters()) == sorted(params)
    opt = tm.make_optimizer(model, spec.train)
    t, y = torch.from_numpy(tokens).long(), torch.from_numpy(targets).long()
    got = [float(tm.train_step(model.loss, model, opt, t, y, spec.train.grad_clip)) for _ in range(3)]
    assert got == pytest.approx(expected, rel=1e-5)
    # reset: same weights and fresh moments give the step-1 loss and update again
    tm.load_params(model, params)
    tm.reset_optimizer(opt)
    again = [float(tm.train_step(model.loss, model, opt, t, y, spec.train.grad_clip)) for _ in range(2)]
    assert again == pytest.approx(expected[:2], rel=1e-5)
    with torch.no_grad():
        logits = model(t).numpy()
    assert measure.cross_entropy(logits, targets) == pytest.approx(expected[2], rel=1e-5)
