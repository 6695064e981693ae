"""The PyTorch peers of `gptc bench`: the same model (gptc.tools.bench.torch_twin)
from the same weights on the same batch, in eager mode, under torch.compile, and
under torch.compile with the whole step captured in one CUDA graph, timed with CUDA
events like gptc's plans."""
from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np

from gptc.tools.bench.config import FRAMEWORKS, BenchConfig
from gptc.tools.bench.measure import TorchTimer, measure, summarize, tokens_per_s
from gptc.tools.bench.report import fmt_loss, fmt_rate


def import_torch():
    """(torch, None) if PyTorch with a usable GPU is importable, else (None, why)."""
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed: skipping the PyTorch columns"
    if not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} sees no GPU: skipping the PyTorch columns"
    return torch, None


def bench_torch(torch, cfg: BenchConfig, what: str, params: Mapping[str, np.ndarray], tokens: np.ndarray,
                targets: np.ndarray, log: Callable[[str], None]) -> list[dict]:
    """The PyTorch columns of one step kind: eager, torch.compile, torch.compile with
    the whole step captured in one CUDA graph. In the spec's precision: bf16 runs the
    forward under bf16 autocast (what a PyTorch user picks; no weight-cast cache, which
    CUDA graph capture does not allow)."""
    import torch.nn.functional as F

    from gptc.tools.bench import torch_twin as tm
    variants = [c for c in cfg.compare if c.startswith("torch-")]
    if not variants:
        return []
    timer = TorchTimer(torch)
    spec = cfg.spec
    T = torch.from_numpy(tokens.astype(np.int64)).cuda()
    Y = torch.from_numpy(targets.astype(np.int64)).cuda()
    model = tm.build_model(spec.model, params, "cuda")
    clip = spec.train.grad_clip
    results = []
    compiled = None

    def record(key: str, losses: list[float], setup_s: float, samples: list[float]) -> None:
        stats = summarize(samples)
        results.append({"what": what, "framework": key, **stats, "losses": losses, "setup_s": setup_s,
                        "tokens_per_s": tokens_per_s(tokens.size, stats["median_ms"])})
        log(f"  {FRAMEWORKS[key]:<28} {stats['median_ms']:9.3f} ms  {fmt_rate(results[-1]['tokens_per_s']):>9} tokens/s  "
            f"loss {fmt_loss(losses, 0)}  (first call {setup_s:.1f} s)")

    def infer_loss(logits) -> float:
        return float(F.cross_entropy(logits.float().flatten(0, 1), Y.flatten()))

    def in_precision(fn):
        if spec.train.precision == "fp32":
            return fn

        def autocast(*args):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                return fn(*args)
        return autocast

    for key in variants:
        t0 = time.perf_counter()
        try:
            tm.load_params(model, params)
            if key in ("torch-compile", "torch-cudagraphs") and compiled is None:
                compiled = torch.compile(model.loss if what == "train" else model, dynamic=False)
            if what == "train":
                loss_fn = in_precision(model.loss if key == "torch-eager" else compiled)
                opt = tm.make_optimizer(model, spec.train, capturable=(key == "torch-cudagraphs"))
                step = lambda: tm.train_step(loss_fn, model, opt, T, Y, clip)  # noqa: E731
                if key != "torch-cudagraphs":
                    losses = [float(step()) for _ in range(2)]
                    setup = time.perf_counter() - t0
                    record(key, losses, setup, measure(timer, step, cfg.repeats, cfg.budget_ms))
                else:
                    graph, static_loss = _capture(torch, step)
                    tm.load_params(model, params)
                    tm.reset_optimizer(opt)
                    losses = []
                    for _ in range(2):
                        graph.replay()
                        losses.append(float(static_loss))
                    setup = time.perf_counter() - t0
                    record(key, losses, setup, measure(timer, graph.replay, cfg.repeats, cfg.budget_ms))
                    del graph, static_loss
                del opt
                model.zero_grad(set_to_none=True)
            else:
                fn = in_precision(model if key == "torch-eager" else compiled)
                with torch.no_grad():
                    if key != "torch-cudagraphs":
                        losses = [infer_loss(fn(T))]
                        setup = time.perf_counter() - t0
                        record(key, losses, setup, measure(timer, lambda: fn(T), cfg.repeats, cfg.budget_ms))
                    else:
                        graph, static_logits = _capture(torch, lambda: fn(T))
                        graph.replay()
                        losses = [infer_loss(static_logits)]
                        setup = time.perf_counter() - t0
                        record(key, losses, setup, measure(timer, graph.replay, cfg.repeats, cfg.budget_ms))
                        del graph, static_logits
        except Exception as e:  # one failing peer must not lose the rest of the run
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log(f"  {FRAMEWORKS[key]:<28} failed: {msg}")
            results.append({"what": what, "framework": key, "error": msg})
        torch.cuda.synchronize()
    del model, compiled
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return results


def _capture(torch, fn, warmup: int = 3):
    """Warm `fn` up on a side stream (compiles, allocates optimizer state), then
    capture one call in a CUDA graph: (graph, the call's static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out
