"""`gptc bench --what decode`: generation speed, gptc against PyTorch in the same run.

For each batch (1, 8 and 64 sequences, one prompt length, one token count for all):
- time to first token (TTFT): the prefill of the prompts, ending with the first token
  of every sequence on the host;
- decode: the time of one generation step, its median and the tokens/s it gives
  (batch / step time). The PyTorch rows and the gptc-step row take the previous token
  ids in and give the next ones back on the host every step (what a generate loop
  does every token); the gptc row decodes as gptc generate does, in chains of steps
  queued at once, each step's drawn ids fed to the next on the device and read back
  once a chain (its step: a chain's time over its length);
- the roofline floor of a decode step: the bytes it must read (every weight once, and
  the KV cache up to the mean position of the timed steps) at the copy bandwidth
  measured in the same run, and the percent of it each framework reaches.
Frameworks: gptc (the prefill and decode plans of the batch, each replayed as one
device graph; greedy sampling on the GPU by the graphs' sampling tail), and where
importable: PyTorch eager with a KV cache (torch_twin.forward_cached), torch.compile
of the same step with a static cache and the step captured in a CUDA graph (as
transformers' generate with cache_implementation="static" does), and transformers'
generate itself (the model built from the same weights through gptc.tools.hf; TTFT =
generate of 1 token, a step = (generate of N tokens - TTFT) / (N - 1), wall clock).
All greedy, all from the same weights and prompts; the tokens each framework
generated are compared with gptc's (a mismatch is noted, not fatal: float32 sums in
another order may flip a near tie).
Times: device events after warm-up, medians over many steps (the transformers row:
wall clock, medians over `repeats` calls). The smoke mode runs on the CPU (gptc's
reference executor and PyTorch on the CPU, host clock, few steps) to check the code
path and the report; its figures mean nothing."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from gptc.common import write_atomic
from gptc.spec import GptcError, Spec
from gptc.tools.bench.measure import Timer, device_timer, measure, measure_copy, summarize
from gptc.tools.bench.report import fmt_num, fmt_rate, git_commit, gpu_slug, table, today

DECODE_BATCHES = (1, 8, 64)
PEERS = ("torch-eager", "torch-static", "hf-generate")
DECODE_FRAMEWORKS = {
    "gptc": "gptc (chained steps, ids fed back on the GPU)",
    "gptc-step": "gptc, one step at a time (ids via the host)",
    "torch-eager": "torch eager + KV cache",
    "torch-static": "torch.compile + static cache + CUDA graph",
    "hf-generate": "transformers generate",
}


@dataclass
class DecodeConfig:
    spec: Spec
    name: str = "hipgpt"
    batches: tuple[int, ...] = DECODE_BATCHES
    compare: tuple[str, ...] = PEERS
    prompt_len: int | None = None    # default: a quarter of the context
    new_tokens: int | None = None    # default: 64, at most what fits after the prompt
    repeats: int = 20
    budget_ms: float = 1000.0
    seed: int = 0
    smoke: bool = False              # the CPU: gptc's reference executor, PyTorch on the CPU

    def lengths(self) -> tuple[int, int]:
        s = self.spec.model.seq_len
        prompt = self.prompt_len or max(1, s // 4)
        new = self.new_tokens or min(64, s - prompt)
        if not (1 <= prompt < s and 2 <= new <= s - prompt):
            raise GptcError(f"decode bench: a prompt of {prompt} tokens and {new} new tokens do not fit the "
                            f"context of {s} (at least 2 new tokens)")
        return prompt, new


class WallTimer(Timer):
    """The host clock, for the CPU smoke mode (everything there is synchronous)."""

    def reset(self) -> None:
        pass

    def event(self) -> list:
        return [0.0]

    def record(self, ev) -> None:
        ev[0] = time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        return (b[0] - a[0]) * 1e3

    def sync(self) -> None:
        pass


def floor_ms(spec: Spec, batch: int, context: float, bandwidth: float | None) -> float | None:
    """The fewest milliseconds a decode step can take: every weight read once, and each
    sequence's keys and values up to `context` positions, at `bandwidth` bytes/s."""
    if not bandwidth:
        return None
    from gptc.models import param_count
    m = spec.model
    itemsize = 2 if spec.train.precision == "bf16" else 4
    kv = 2 * m.n_layers * m.kv_heads * m.head_dim * context * batch * itemsize
    return (param_count(spec) * itemsize + kv) / bandwidth * 1e3


def make_prompts(spec: Spec, batch: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, spec.model.vocab_size, (batch, length)).astype(np.int32)


def _row(framework: str, batch: int, ttft: list[float], steps: list[float], tokens: np.ndarray,
         floor: float | None, **extra) -> dict:
    step = summarize(steps)
    return {"framework": framework, "batch": batch, "ttft_ms": summarize(ttft)["median_ms"],
            "step_ms": step["median_ms"], "p10_ms": step["p10_ms"], "p90_ms": step["p90_ms"],
            "samples": step["samples"], "tokens_per_s": batch / step["median_ms"] * 1e3,
            "floor_ms": floor, "percent_of_floor": 100.0 * floor / step["median_ms"] if floor else None,
            "tokens": tokens.tolist(), **extra}


# ----------------------------------------------------------------------------- gptc
class _GptcSteps:
    """The prefill (of `length` tokens) and decode steps of one batch size, sharing the
    persistent arena (GPU) or one dict of params and states (the CPU reference)."""

    def __init__(self, spec: Spec, params: Mapping[str, np.ndarray], batch: int, device,
                 length: int | None = None) -> None:
        from gptc.models import build_graph
        self.length = length or spec.model.seq_len
        graphs = [build_graph(spec, "prefill", batch, self.length, sample=True),
                  build_graph(spec, "decode", batch, sample=True)]
        if device is None:
            from gptc.runtime.reference import ReferenceExecutor
            self.prefill, self.decode = (ReferenceExecutor(g, params) for g in graphs)
            self.decode.persistent = self.prefill.persistent = self.prefill.persistent | self.decode.persistent
            self.fetch = None
            return
        from gptc.compiler.codegen.kernels import render_plan
        from gptc.compiler.planner import make_plan
        from gptc.runtime.build import compile_kernels, plan_table, share_persistent
        from gptc.runtime.executor import Arenas, GpuExecutor
        tables, code = [], {}
        for g in graphs:
            plan = make_plan(g)
            kernels = render_plan(plan, device.target)
            tables.append(plan_table(plan, kernels))
            code.update(compile_kernels(kernels, device.target))
        share_persistent(tables)
        self.arenas = Arenas(device, tables)
        self.prefill, self.decode = (GpuExecutor(t, device, code, self.arenas) for t in tables)
        self.prefill.write({n: params[n] for n in tables[0]["params"]})
        self.fetch = ("next_token",)

    def run(self, ex, feeds: dict) -> np.ndarray:
        out = ex.run(feeds) if self.fetch is None else ex.run(feeds, outputs=self.fetch)
        return out["next_token"]

    def close(self) -> None:
        for ex in (self.prefill, self.decode):
            ex.close()
        if hasattr(self, "arenas"):
            self.arenas.close()


def bench_gptc_decode(cfg: DecodeConfig, device, params: Mapping[str, np.ndarray], prompts: np.ndarray,
                      new: int, timer: Timer, floor: float | None) -> list[dict]:
    """Two rows: "gptc", decoding as gptc generate does (chains of up to CHAIN_STEPS
    steps queued at once, each drawn token fed to the next step on the device; the
    step time is a chain's over its length), and "gptc-step", one step at a time with
    the token ids through the host (as the PyTorch peers' steps); both generate."""
    from gptc.models import prefill_lengths
    from gptc.tools.generate import CHAIN_STEPS, Model, SamplingParams, chain_length, generate_batch
    spec = cfg.spec
    batch, length = prompts.shape
    s = min(n for n in prefill_lengths(spec) if n >= length)  # as gptc generate prefills them
    t0 = time.perf_counter()
    steps = _GptcSteps(spec, params, batch, device, s)
    try:
        greedy = SamplingParams(num_tokens=new, greedy=True)
        model = Model(spec, {s: steps.prefill}, steps.decode, lambda: None, batch, fetch=steps.fetch,
                      chain_steps=CHAIN_STEPS)
        rows = prompts.tolist()
        model.start(rows, greedy, spec.model.vocab_size)
        model.prefill(rows, 0)
        setup_s = time.perf_counter() - t0
        ttft = measure(timer, lambda: model.prefill(rows, 0), cfg.repeats, cfg.budget_ms)
        # The tokens: real greedy generations, chained (gptc generate's) and one step at a time.
        chained = np.stack(list(generate_batch(model, rows, greedy)), 1)
        tokens = [model.prefill(rows, 0)]
        for i in range(1, new):
            tokens.append(steps.run(steps.decode, {**model.sampling, "tokens": tokens[-1].reshape(batch, 1),
                                                   "pos": np.full(batch, length + i - 1, np.int32)}))
        # The step times around the mean position of those steps (the decode attention
        # reads the keys up to each sequence's position: a step's cost grows with it).
        chain = chain_length(new - 1)  # the longest the generation ran
        start = length + new // 2 - chain // 2
        positions = [[start + j] * batch for j in range(chain)]
        chain_ms = measure(timer, lambda: model.decode(chained[:, -1], positions, 1), cfg.repeats, cfg.budget_ms)
        middle = {**model.sampling, "tokens": tokens[-1].reshape(batch, 1), "pos": np.full(batch, start, np.int32)}
        step_ms = measure(timer, lambda: steps.run(steps.decode, middle), cfg.repeats, cfg.budget_ms)
    finally:
        steps.close()
    return [_row("gptc", batch, ttft, [t / chain for t in chain_ms], chained, floor, setup_s=setup_s, chain=chain),
            _row("gptc-step", batch, ttft, step_ms, np.stack(tokens, 1), floor)]


# ----------------------------------------------------------------------------- PyTorch
def bench_torch_decode(torch, key: str, cfg: DecodeConfig, params: Mapping[str, np.ndarray], prompts: np.ndarray,
                       new: int, timer: Timer, floor: float | None, where: str) -> dict:
    """torch-eager: forward_cached step by step; torch-static: the same step under
    torch.compile, its decode step captured in a CUDA graph (on a GPU) with static
    input tensors."""
    from gptc.tools.bench import torch_twin as tm
    from gptc.tools.bench.peers import _capture
    batch, length = prompts.shape
    t0 = time.perf_counter()
    model = tm.build_model(cfg.spec.model, params, where)
    cache = tm.KVCache(cfg.spec.model, batch, where)
    prompt = torch.from_numpy(prompts.astype(np.int64)).to(where)
    prompt_pos = torch.arange(length, device=where)
    fn = tm.forward_cached if key == "torch-eager" else torch.compile(tm.forward_cached, dynamic=False)
    with torch.no_grad():
        def prefill():
            return fn(model, prompt, prompt_pos, cache).argmax(-1).cpu()

        tok = torch.zeros(batch, 1, dtype=torch.int64, device=where)
        pos = torch.zeros(1, dtype=torch.int64, device=where)

        def device_step():
            return fn(model, tok, pos, cache).argmax(-1)

        first = prefill()
        step = lambda: device_step().cpu()  # noqa: E731
        if key == "torch-static" and where == "cuda":
            graph, static_next = _capture(torch, device_step)
            step = lambda: (graph.replay(), static_next.cpu())[1]  # noqa: E731
        setup_s = time.perf_counter() - t0
        ttft = measure(timer, prefill, cfg.repeats, cfg.budget_ms)
        tokens = [prefill()]
        for i in range(1, new):
            tok.copy_(tokens[-1].reshape(batch, 1))
            pos.fill_(length + i - 1)
            tokens.append(step())
        pos.fill_(length + new // 2)
        samples = measure(timer, step, cfg.repeats, cfg.budget_ms)
    del first
    return _row(key, batch, ttft, samples, torch.stack(tokens, 1).numpy(), floor, setup_s=setup_s)


def hf_model(torch, spec: Spec, params: Mapping[str, np.ndarray], where: str):
    """The transformers model of gptc's weights (gptc.tools.hf's layout), or GptcError."""
    import transformers

    from gptc.tools.hf import layout_of, to_hf
    layout = layout_of(spec.model)
    config = dict(layout.write_config(spec.model))
    model_type = config.pop("model_type")
    config.pop("architectures", None)
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    state = {k: torch.from_numpy(v) for k, v in to_hf(layout, spec.model, dict(params)).items()}
    missing, _ = model.load_state_dict(state, strict=False)
    if [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]:
        raise GptcError(f"transformers model: weights missing for {missing[:3]}")
    return model.to(where).eval()


def bench_hf_decode(torch, cfg: DecodeConfig, params: Mapping[str, np.ndarray], prompts: np.ndarray, new: int,
                    floor: float | None, where: str) -> dict:
    batch, _ = prompts.shape
    t0 = time.perf_counter()
    model = hf_model(torch, cfg.spec, params, where)
    ids = torch.from_numpy(prompts.astype(np.int64)).to(where)
    mask = torch.ones_like(ids)

    def generate(n: int):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        if where == "cuda":
            torch.cuda.synchronize()
        return out

    tokens = generate(new)[:, ids.shape[1]:].cpu().numpy()
    setup_s = time.perf_counter() - t0
    repeats = max(3, min(cfg.repeats, 10))
    one, full = [], []
    for _ in range(repeats):
        for n, into in ((1, one), (new, full)):
            t = time.perf_counter()
            generate(n)
            into.append((time.perf_counter() - t) * 1e3)
    # From the medians (wall-clock noise can make one pair's difference negative on a
    # busy host; the clamp only matters there).
    step = max((float(np.median(full)) - float(np.median(one))) / (new - 1), 1e-6)
    return _row("hf-generate", batch, one, [step], tokens, floor, setup_s=setup_s, clock="wall",
                samples_each=repeats)


# ----------------------------------------------------------------------------- the run
def run_decode_bench(cfg: DecodeConfig, device, log: Callable[[str], None] = print) -> dict:
    """Every row of `gptc bench --what decode` on `device` (None with cfg.smoke: the CPU)."""
    from gptc.models import build_graph, init_params
    from gptc.tools.bench.peers import import_torch
    from gptc.tools.generate import CHAIN_STEPS
    if device is None and not cfg.smoke:
        raise GptcError("the decode bench needs a GPU (or the smoke mode)")
    prompt_len, new = cfg.lengths()
    params = init_params(build_graph(cfg.spec, "infer", 1), cfg.spec.train.seed)
    notes = []
    torch, why_not = import_torch()
    where = "cuda"
    if cfg.smoke:
        try:
            import torch
            where = "cpu"
        except ImportError:
            torch, why_not = None, "PyTorch is not installed: skipping the PyTorch rows"
    if torch is None and cfg.compare:
        notes.append(why_not)
        log(f"gptc bench: {why_not}")
    if torch is not None and where == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    bandwidth, how = (None, "not measured (smoke mode)") if device is None else measure_copy(device)
    meta = {"config": cfg.name, "model": dataclasses.asdict(cfg.spec.model), "precision": cfg.spec.train.precision,
            "gpu": device.name if device else "cpu (smoke mode: figures mean nothing)",
            "gpu_slug": gpu_slug(device.name) if device else "cpu-smoke", "date": today(),
            "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_commit(),
            "torch": torch.__version__ if torch is not None else None, "prompt_len": prompt_len,
            "new_tokens": new, "batches": list(cfg.batches), "repeats": cfg.repeats, "smoke": cfg.smoke,
            "copy_bytes_per_s": bandwidth, "copy_how": how, "notes": notes}
    notes.append("greedy decoding, float32 (TF32 off); a decode step = previous token ids in, next token ids back "
                 "on the host, except for the gptc row: as gptc generate, it queues chains of decode steps (up to "
                 f"{CHAIN_STEPS}, one device graph), each step's drawn ids fed to the next on the GPU and read back once a "
                 "chain; its step time is a chain's over its length; the floor reads every weight once plus the KV cache up to the mean position from HBM "
                 "(a model whose weights fit in L2 can beat it)")
    log(f"gptc bench decode: {cfg.name}, prompt {prompt_len} tokens, {new} new tokens, on {meta['gpu']}, "
        f"commit {meta['commit']}")
    rows = []
    for batch in cfg.batches:
        prompts = make_prompts(cfg.spec, batch, prompt_len, cfg.seed)
        floor = floor_ms(cfg.spec, batch, prompt_len + new / 2, bandwidth)
        gptc_timer = device_timer(device) if device is not None else WallTimer()
        runs = [("gptc", lambda: bench_gptc_decode(cfg, device, params, prompts, new, gptc_timer, floor))]  # 2 rows
        if torch is not None:
            from gptc.tools.bench.measure import TorchTimer
            torch_timer = TorchTimer(torch) if where == "cuda" else WallTimer()
            for key in cfg.compare:
                if key == "hf-generate":
                    runs.append((key, lambda: [bench_hf_decode(torch, cfg, params, prompts, new, floor, where)]))
                else:
                    runs.append((key, lambda key=key: [bench_torch_decode(torch, key, cfg, params, prompts, new,
                                                                          torch_timer, floor, where)]))
        for key, run in runs:
            try:
                got = run()
            except Exception as e:  # one failing framework must not lose the rest of the run
                if key == "gptc":
                    raise
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                log(f"  batch {batch:>3}  {DECODE_FRAMEWORKS[key]:<46} failed: {msg}")
                rows.append({"framework": key, "batch": batch, "error": msg})
                continue
            for row in got:
                gptc_row = next(r for r in rows + got if r["framework"] == "gptc" and r["batch"] == batch)
                row["same_tokens"] = row["tokens"] == gptc_row["tokens"]
                rows.append(row)
                log(f"  batch {batch:>3}  {DECODE_FRAMEWORKS[row['framework']]:<46} TTFT {row['ttft_ms']:8.2f} ms  "
                    f"step {row['step_ms']:7.3f} ms  {fmt_rate(row['tokens_per_s']):>8} tokens/s"
                    + ("" if row["same_tokens"] else "  (tokens differ from gptc's)"))
        if torch is not None and where == "cuda":
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    return {"schema": 1, "kind": "decode", "meta": meta, "rows": rows}


# ----------------------------------------------------------------------------- the report
def decode_table(result: dict, markdown: bool = False) -> str:
    """One line per (batch, framework)."""
    headers = ["batch", "framework", "TTFT ms", "step ms", "tokens/s", "floor ms", "% of floor", "vs gptc", "tokens"]
    body = []
    for r in result["rows"]:
        name = DECODE_FRAMEWORKS[r["framework"]]
        if "error" in r:
            body.append([str(r["batch"]), name, "failed: " + r["error"][:60], "", "", "", "", "", ""])
            continue
        g = next((x for x in result["rows"] if x["framework"] == "gptc" and x["batch"] == r["batch"]), None)
        ratio = g["tokens_per_s"] / r["tokens_per_s"] if g and r["framework"] != "gptc" else None
        body.append([str(r["batch"]), name, fmt_num(r["ttft_ms"]), fmt_num(r["step_ms"]), fmt_rate(r["tokens_per_s"]),
                     fmt_num(r["floor_ms"]), f"{r['percent_of_floor']:.0f}%" if r["percent_of_floor"] else "-",
                     f"gptc {ratio:.2f}x" if ratio else "-", "same" if r.get("same_tokens", True) else "differ"])
    return table(headers, body, align="rlrrrrrrl", markdown=markdown)


def render_decode_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# gptc bench --what decode: {meta['config']} on {meta['gpu']}", "",
             f"{meta['date']}, commit {meta['commit']}, PyTorch {meta['torch'] or 'not installed'}; prompt "
             f"{meta['prompt_len']} tokens, {meta['new_tokens']} new tokens, greedy; precision {meta['precision']}.",
             ""]
    if meta["copy_bytes_per_s"]:
        lines += [f"Floor: weights + KV cache bytes per step at {meta['copy_bytes_per_s'] / 1e12:.2f} TB/s "
                  f"({meta['copy_how']}).", ""]
    lines.append(decode_table(result, markdown=True))
    lines += ["", "Notes:"] + [f"- {n}" for n in meta["notes"]] + [
        "- TTFT: the prefill of the prompts until every sequence's first token is on the host; step: the time of "
        "one decode step (one new token of every sequence); tokens/s = batch / step; medians over device events after warm-up "
        "(transformers generate: wall clock, see gptc/tools/bench/decode.py)."]
    return "\n".join(lines) + "\n"


def write_decode_outputs(result: dict, out_dir: str | Path) -> list[Path]:
    """DIR/decode.json and DIR/decode.md, each written atomically."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GptcError(f"cannot write to output directory '{out_dir}': {e.strerror}") from None
    paths = [out / "decode.json", out / "decode.md"]
    write_atomic(paths[0], json.dumps(result, indent=1, allow_nan=True) + "\n")
    write_atomic(paths[1], render_decode_markdown(result))
    return paths


def bench_decode_main(cfg: DecodeConfig, out_dir: str | Path, device_kind: str = "auto",
                      log: Callable[[str], None] = print) -> dict:
    """`gptc bench --what decode`: run, write DIR/decode.{json,md}, print the table last."""
    device = None
    if not cfg.smoke:
        from gptc.tools.bench import open_bench_device
        device = open_bench_device(device_kind)
    try:
        result = run_decode_bench(cfg, device, log)
    finally:
        if device is not None:
            device.close()
    paths = write_decode_outputs(result, out_dir)
    log("wrote " + ", ".join(str(p) for p in paths))
    log("")
    log(decode_table(result))
    return result
