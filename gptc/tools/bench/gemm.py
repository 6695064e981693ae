"""`gptc bench --gemm`: gptc's bf16 matmul (templates/matmul_wgmma.hip.j2 on sm_90,
templates/matmul_mma.hip.j2 on the other matrix units) against torch.matmul in bf16 (cuBLAS / hipBLASLt) in the same process, at
4096^3 and at gpt2's shapes (B*T = 8192 tokens, C = 768, vocab 50257), forward and the
backward's transposed-operand products.

Each product stores bf16, as torch.matmul of bf16 tensors does, from operands in the
layouts the model has (A's rows or columns contiguous, B's likewise). Times are device
events after warm-up, medians over many calls; each shape's floor is the larger of
its FLOPs at the measured bf16 rate of torch.matmul 8192^3 and its fewest bytes
(operands read once, product written once) at the measured copy bandwidth. gptc's
product is checked against PyTorch's (relative Frobenius error) in the same run."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from gptc.common import write_atomic

# (label, M, N, K, A layout, B layout): A "k" = (M, K) row-major, "m" = stored (K, M)
# and read transposed; B "n" = (K, N) row-major, "k" = stored (N, K) and read transposed.
TOKENS, C, VOCAB = 8192, 768, 50257
GEMM_SHAPES = (
    ("square 4096", 4096, 4096, 4096, "k", "n"),
    ("c_attn x@W", TOKENS, 3 * C, C, "k", "n"),
    ("c_proj x@W", TOKENS, C, C, "k", "n"),
    ("fc x@W", TOKENS, 4 * C, C, "k", "n"),
    ("proj x@W", TOKENS, C, 4 * C, "k", "n"),
    ("lm_head x@wte^T", TOKENS, VOCAB, C, "k", "k"),
    ("c_attn dX=dY@W^T", TOKENS, C, 3 * C, "k", "k"),
    ("fc dX=dY@W^T", TOKENS, C, 4 * C, "k", "k"),
    ("lm_head dX=dL@wte", TOKENS, C, VOCAB, "k", "n"),
    ("c_attn dW=X^T@dY", C, 3 * C, TOKENS, "m", "n"),
    ("c_proj dW=X^T@dY", C, C, TOKENS, "m", "n"),
    ("fc dW=X^T@dY", C, 4 * C, TOKENS, "m", "n"),
    ("proj dW=X^T@dY", 4 * C, C, TOKENS, "m", "n"),
    ("lm_head dW=dL^T@X", VOCAB, C, TOKENS, "m", "n"),
)
TARGET_FRACTION = 0.6  # issue 9: >= 60% of cuBLAS


def run_gemm_bench(device, torch, shapes=GEMM_SHAPES, log: Callable[[str], None] = print) -> dict:
    """Time each shape in gptc and torch.matmul; the rows of the report."""
    from gptc.compiler.planner import make_plan
    from gptc.runtime.build import load_executor
    from gptc.tools.bench.measure import (TorchTimer, device_timer, gptc_gemm_graph, measure, measure_copy,
                                          stored_shapes, summarize)
    from gptc.compiler.codegen.kernels import render_plan
    bw, _ = measure_copy(device)
    timer = TorchTimer(torch)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak_ms = summarize(measure(timer, lambda: torch.matmul(x, y), repeats=10, budget_ms=300))["median_ms"]
    peak = 2 * 8192 ** 3 / (peak_ms / 1e3)
    del x, y
    log(f"  copy bandwidth {bw / 1e12:.2f} TB/s, torch.matmul bf16 8192^3 {peak / 1e12:.0f} TFLOP/s")
    rows = []
    for label, m, n, k, al, bl in shapes:
        flops, nbytes = 2 * m * n * k, 2 * (m * k + k * n + m * n)
        floor_ms = max(flops / peak, nbytes / bw) * 1e3
        sa, sb = stored_shapes(m, n, k, al, bl)
        gen = torch.Generator(device="cuda").manual_seed(len(rows))
        ta = torch.randn(*sa, device="cuda", generator=gen).to(torch.bfloat16)
        tb = torch.randn(*sb, device="cuda", generator=gen).to(torch.bfloat16)
        opa, opb = (ta if al == "k" else ta.T), (tb if bl == "n" else tb.T)
        tc = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        torch_ms = summarize(measure(timer, lambda: torch.matmul(opa, opb, out=tc), repeats=20, budget_ms=400))["median_ms"]
        plan = make_plan(gptc_gemm_graph(m, n, k, al, bl), True)
        kernel = render_plan(plan, device.target)[0]
        ex = load_executor(plan, device, {})
        try:
            host_a, host_b = ta.float().cpu().numpy(), tb.float().cpu().numpy()
            out = ex.run({"a": host_a, "b": host_b})["c"].astype(np.float32)
            ref = tc.float().cpu().numpy()
            err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
            gptc_ms = summarize(measure(device_timer(device), ex.launch, repeats=20, budget_ms=400))["median_ms"]
        finally:
            ex.close()
        del ta, tb, tc, opa, opb
        torch.cuda.empty_cache()
        row = dict(shape=label, m=m, n=n, k=k, a=al, b=bl, gptc_ms=gptc_ms, torch_ms=torch_ms, floor_ms=floor_ms,
                   gptc_tflops=flops / gptc_ms / 1e9, torch_tflops=flops / torch_ms / 1e9,
                   of_torch=torch_ms / gptc_ms, of_floor=floor_ms / gptc_ms, rel_err=err,
                   kernel=kernel.symbol, grid=kernel.grid[0], block=kernel.block[0])
        rows.append(row)
        log(f"  {label:20s} {m}x{n}x{k}: gptc {row['gptc_tflops']:6.1f} TFLOP/s, torch {row['torch_tflops']:6.1f}, "
            f"{100 * row['of_torch']:5.1f}% of torch, err {err:.1e}")
    return dict(rows=rows, copy_bytes_per_s=bw, bf16_peak_flops=peak)


def render_gemm_md(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# gptc bench --gemm: bf16 matmul vs torch.matmul (cuBLAS), {meta['gpu']}, {meta['date']}, "
             f"commit {meta['commit']}", "",
             f"Operands and product bf16, f32 accumulation. torch {meta['torch']}. Floor = max(FLOPs at torch's "
             f"bf16 8192^3 rate {result['bf16_peak_flops'] / 1e12:.0f} TFLOP/s, bytes at the copy bandwidth "
             f"{result['copy_bytes_per_s'] / 1e12:.2f} TB/s). Device events, medians. Aim: >= "
             f"{100 * TARGET_FRACTION:.0f}% of torch.", "",
             "| shape | M x N x K | A, B contiguous along | gptc TFLOP/s | torch TFLOP/s | % of torch | % of floor "
             "| rel. err vs torch | aim met |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['m']} x {r['n']} x {r['k']} | {r['a']}, {r['b']} | {r['gptc_tflops']:.1f} "
                     f"| {r['torch_tflops']:.1f} | {100 * r['of_torch']:.1f} | {100 * r['of_floor']:.1f} "
                     f"| {r['rel_err']:.1e} | {'yes' if r['of_torch'] >= TARGET_FRACTION else 'NO'} |")
    return "\n".join(lines) + "\n"


def gemm_main(out_dir: str | os.PathLike, device_kind: str = "auto", log: Callable[[str], None] = print) -> dict:
    """`gptc bench --gemm`: run, write DIR/gemm.json and DIR/gemm.md, print the table."""
    from gptc.spec import GptcError
    from gptc.tools.bench import open_bench_device
    from gptc.tools.bench.peers import import_torch
    from gptc.tools.bench.report import git_commit, today
    torch, why = import_torch()
    if torch is None:
        raise GptcError(f"gptc bench --gemm compares with torch.matmul: {why}")
    device = open_bench_device(device_kind)
    try:
        log(f"gptc bench --gemm on {device.name}")
        result = run_gemm_bench(device, torch, log=log)
        result["meta"] = dict(gpu=device.name, date=today(), commit=git_commit(), torch=torch.__version__,
                              target=device.target.name)
    finally:
        device.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = render_gemm_md(result)
    write_atomic(out / "gemm.json", json.dumps(result, indent=1))
    write_atomic(out / "gemm.md", md)
    log(f"wrote {out / 'gemm.json'}, {out / 'gemm.md'}\n")
    log(md)
    return result
