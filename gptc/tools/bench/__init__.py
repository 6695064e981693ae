"""`gptc bench`: gptc's fused plan against its unfused plan and against PyTorch, on
one GPU, in one process, with the ceilings of that GPU measured in the same run.

The method: count the FLOPs and the fewest bytes each kernel must move; the larger of
the two times, at the measured copy bandwidth and matrix-product rate, is its floor;
report each kernel's time as a percent of that floor; time with device events after
warm-up, medians over many runs; run the peers in the same process on the same GPU.
What one run does:
1. ceilings (measure.py): device-to-device copy bandwidth (cuMemcpyDtoD/hipMemcpyDtoD
   of 1 GiB, bytes read + written) and the rate of a large matrix product in each
   precision (torch.matmul 8192^3 in fp32 with TF32 off, tf32 and bf16 where PyTorch is
   importable; else gptc's own fp32 and bf16 matmul kernels on 4096^3, lower bounds of
   the device's rates); the floor uses the rate of the run's precision, the others
   are noted;
2. gptc (measure.py): for each of the training step and the inference forward, the
   fused and the unfused plan, each launched as one replayed device graph; the loss of
   steps 1 and 2 from the same weights on the same batch; step times with device
   events after warm-up, medians over many steps;
3. a per-kernel table of each plan: time (each kernel in isolation: launched
   config.KERNEL_LAUNCHES times inside one device graph, the median of
   config.KERNEL_REPLAYS replays, divided), bytes and FLOPs from
   gptc.compiler.planner.cost, GB/s, TFLOP/s, and the percent of the roofline floor
   max(bytes / copy bandwidth, FLOPs / matrix-product rate of the run's precision) (report.py);
4. PyTorch (peers.py), if importable with a GPU: the same model (torch_twin.py) with
   the same weights and batch, in eager mode, torch.compile, and torch.compile with
   the whole step (forward, backward, clipping, AdamW) captured in one CUDA graph,
   timed the same way, with the loss each computed;
5. bench.json, bench.md, bench.png and roofline.png under --out, and a compact table printed last
   (report.py).

Every figure names the GPU, the date and the gptc commit."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import warnings
from typing import Callable

import numpy as np

from gptc.spec import GptcError, Spec
from gptc.tools.bench.config import WHAT_LABEL, BenchConfig, model_summary
from gptc.tools.bench.measure import bench_gptc, ceilings_for, measure_ceilings
from gptc.tools.bench.peers import bench_torch, import_torch
from gptc.tools.bench.report import git_commit, gpu_slug, render_summary, today, write_outputs

NO_GPU = "no GPU found: gptc bench needs an AMD or NVIDIA GPU"


def make_batch(spec: Spec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids (B, S) and targets: the one batch every framework runs."""
    rng = np.random.default_rng(seed)
    shape = (spec.train.batch_size, spec.model.seq_len)
    return (rng.integers(0, spec.model.vocab_size, shape).astype(np.int32),
            rng.integers(0, spec.model.vocab_size, shape).astype(np.int32))


def run_bench(cfg: BenchConfig, device, log: Callable[[str], None] = print, ceilings: dict | None = None) -> dict:
    """Everything of one `gptc bench` run on `device`; returns the result dict
    (what bench.json holds). `ceilings` may be given to reuse one measurement for
    several configurations of one run."""
    from gptc.models import build_graph, init_params
    torch, why_not = import_torch()
    wants_torch = any(c.startswith("torch-") for c in cfg.compare)
    notes = []
    if why_not and wants_torch:
        notes.append(why_not)
        log(f"gptc bench: {why_not}")
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    graph = build_graph(cfg.spec, "train")
    params = init_params(graph, cfg.spec.train.seed)
    tokens, targets = make_batch(cfg.spec, cfg.seed)
    meta = {
        "config": cfg.name, "model": dataclasses.asdict(cfg.spec.model), "train": dataclasses.asdict(cfg.spec.train),
        "model_summary": model_summary(cfg.spec), "params": int(sum(v.size for v in params.values())),
        "batch": cfg.batch, "seq_len": cfg.spec.model.seq_len, "tokens_per_step": int(tokens.size),
        "precision": cfg.spec.train.precision, "gpu": device.name, "gpu_slug": gpu_slug(device.name),
        "date": today(), "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(), "torch": torch.__version__ if torch is not None else None,
        "cuda": getattr(getattr(torch, "version", None), "cuda", None), "compiler": _compiler_id(device),
        "what": list(cfg.what), "compare": list(cfg.compare), "seed": cfg.seed, "repeats": cfg.repeats,
        "notes": notes,
    }
    if torch is not None and wants_torch:
        precision = ("the forward in torch.autocast(bfloat16) (fp32 master weights), as gptc's bf16 graph"
                     if cfg.spec.train.precision == "bf16" else
                     "fp32 with TF32 off (torch.backends.cuda.matmul.allow_tf32 = False), as gptc's kernels")
        notes.append(f"PyTorch runs {precision}; "
                     "attention through F.scaled_dot_product_attention(is_causal=True); the CUDA-graph column is "
                     "torch.compile (default mode) with the whole step captured by torch.cuda.graph, the optimizer "
                     "AdamW(capturable=True, foreach=True)")
    warnings.filterwarnings("ignore", message=".*TensorFloat32 tensor cores.*")  # TF32 stays off on purpose
    log(f"gptc bench: {cfg.name} ({meta['model_summary']}), batch {cfg.batch}, on {device.name}, commit {meta['commit']}")
    if ceilings is None:
        ceilings = measure_ceilings(device, torch, log)
    ceilings = ceilings_for(ceilings, cfg.spec.train.precision)
    result = {"schema": 1, "meta": meta, "ceilings": ceilings, "steps": [], "plans": {}}
    for what in cfg.what:
        log(f"{WHAT_LABEL[what]}:")
        for fuse in (True, False):
            if not fuse and "unfused" not in cfg.compare:
                continue
            step, plan = bench_gptc(device, cfg, what, fuse, params, tokens, targets, ceilings, log)
            result["steps"].append(step)
            if plan is not None:
                result["plans"][f"{what} {'fused' if fuse else 'unfused'}"] = plan
        if torch is not None and wants_torch:
            result["steps"] += bench_torch(torch, cfg, what, params, tokens, targets, log)
    return result


def _compiler_id(device) -> str:
    from gptc.runtime.device import compiler_available
    ok, text = compiler_available(device.target.vendor)
    return text if ok else "unknown"


def open_bench_device(kind: str = "auto"):
    """The GPU to benchmark on; GptcError (one line, exit 2) when there is none."""
    from gptc.runtime.device import open_device
    try:
        device = open_device(kind)
    except Exception as e:
        raise GptcError(f"{NO_GPU} ({type(e).__name__}: {e})") from None
    if device is None:
        raise GptcError(NO_GPU)
    return device


def bench_main(cfg: BenchConfig, out_dir: str | os.PathLike, device_kind: str = "auto",
               log: Callable[[str], None] = print) -> dict:
    """`gptc bench`: run, write DIR/bench.{json,md,png} and DIR/roofline.png, print the compact table last."""
    device = open_bench_device(device_kind)
    try:
        result = run_bench(cfg, device, log)
    finally:
        device.close()
    paths = write_outputs(result, out_dir, log)
    log("wrote " + ", ".join(str(p) for p in paths))
    log("")
    log(render_summary(result))
    return result
