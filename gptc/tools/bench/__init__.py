"""`gptc bench`: gptc's fused plan against its unfused plan and against PyTorch, on
one GPU, in one process, with the ceilings of that GPU measured in the same run.

What one run does (DESIGN.md, "Performance method"):
1. ceilings: device-to-device copy bandwidth (cuMemcpyDtoD/hipMemcpyDtoD of 1 GiB,
   bytes read + written) and the rate of a large fp32 matrix product (torch.matmul
   8192^3 with TF32 off where PyTorch is importable, with tf32 and bf16 noted; else
   gptc's own matmul kernel on 4096^3, which is a lower bound of the device's rate);
2. gptc: for each of the training step and the inference forward, the fused and the
   unfused plan, each launched as one replayed device graph; the loss of steps 1 and
   2 from the same weights on the same batch; step times with device events after
   warm-up, medians over many steps;
3. a per-kernel table of each plan: time (each kernel in isolation: launched
   KERNEL_LAUNCHES times inside one device graph, the median of KERNEL_REPLAYS
   replays, divided), bytes and FLOPs from gptc.compiler.planner.cost, GB/s, TFLOP/s, and the percent
   of the roofline floor max(bytes / copy bandwidth, FLOPs / GEMM rate);
4. PyTorch, if importable with a GPU: the same model (gptc.tools.bench.torch_twin) with the same
   weights and batch, in eager mode, torch.compile, and torch.compile with the whole
   step (forward, backward, clipping, AdamW) captured in one CUDA graph, timed the
   same way, with the loss each computed;
5. bench.json, bench.md and bench.png under --out, and a compact table printed last.

Every figure names the GPU, the date and the gptc commit."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
import statistics
import subprocess
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gptc.common import PACKAGE_DIR
from gptc.compiler.planner.cost import KernelCost, bound, floor_seconds, plan_costs
from gptc.spec import GptcError, Spec

WHATS = ("train", "infer")
COMPARES = ("unfused", "torch-eager", "torch-compile", "torch-cudagraphs")
FRAMEWORKS = {  # result key -> label
    "gptc-fused": "gptc fused",
    "gptc-unfused": "gptc unfused",
    "torch-eager": "torch eager",
    "torch-compile": "torch.compile",
    "torch-cudagraphs": "torch.compile + CUDA graph",
}
WHAT_LABEL = {"train": "training step (forward + loss + backward + AdamW)", "infer": "inference forward (logits, no KV cache)"}
NO_GPU = "no GPU found: gptc bench needs an AMD or NVIDIA GPU"
KERNEL_LAUNCHES = 10   # launches of one kernel per captured graph, for per-kernel times
KERNEL_REPLAYS = 5     # replays of that graph; the median over them, / KERNEL_LAUNCHES
COPY_BYTES = 1 << 30   # each of the two buffers of the copy-bandwidth ceiling
TOP_KERNELS = 12


# ----------------------------------------------------------------------------- config

@dataclass
class BenchConfig:
    spec: Spec
    name: str = "hipgpt"                       # what the figures call the model
    what: tuple[str, ...] = WHATS
    compare: tuple[str, ...] = COMPARES
    repeats: int = 20                          # at least this many timed steps per figure
    budget_ms: float = 1000.0                  # ... or as many as fit in this much time (<= MAX_SAMPLES)
    seed: int = 0
    per_kernel: bool = True

    @property
    def batch(self) -> int:
        return self.spec.train.batch_size


MAX_SAMPLES = 500


def parse_list(text: str | None, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'), each checked against `allowed`; None or 'all' -> all."""
    if text is None or text.strip() == "all":
        return tuple(allowed)
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    for s in items:
        if s not in allowed:
            raise GptcError(f"--{what}: unknown value '{s}'; choose from {', '.join(allowed)}")
    return items


def resolve_spec(value: str | None, batch: int | None = None) -> tuple[Spec, str]:
    """--preset NAME|SPEC: a preset name or a spec TOML file; (spec, name for figures)."""
    from dataclasses import replace

    from gptc.spec import load_spec, preset, validate
    value = value or "hipgpt"
    if value.endswith(".toml") or os.sep in value or Path(value).is_file():
        spec, name = load_spec(value), Path(value).stem
    else:
        spec, name = preset(value), value
    if batch is not None:
        spec = validate(replace(spec, train=replace(spec.train, batch_size=batch)))
    return spec, name


def model_summary(spec: Spec) -> str:
    m = spec.model
    tied = ", tied" if m.tie_embeddings else ""
    return f"E{m.d_model} L{m.n_layers} H{m.n_heads} F{m.d_ff} V{m.vocab_size} S{m.seq_len}{tied}"


# ----------------------------------------------------------------------------- provenance

def git_commit(repo: str | os.PathLike | None = None) -> str:
    """`git rev-parse --short HEAD` of the gptc checkout ("+dirty" when gptc/ or
    templates/ has uncommitted changes); $GPTC_COMMIT overrides (device machines get
    the tree without .git); "unknown" when neither works."""
    env = os.environ.get("GPTC_COMMIT", "").strip()
    if env:
        return env
    repo = Path(repo) if repo else PACKAGE_DIR.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gptc", "templates"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3 (cuda:sm_90)' -> 'h100-80gb-hbm3'."""
    name = re.sub(r"\(.*?\)", "", device_name)
    name = re.sub(r"\b(nvidia|amd|geforce|radeon|instinct)\b", "", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def today() -> str:
    return _dt.date.today().isoformat()


def results_dir_name(device_name: str, date: str, commit: str) -> str:
    return f"{gpu_slug(device_name)}-{date}-{commit.replace('+', '-')}"


# ----------------------------------------------------------------------------- statistics

def summarize(samples_ms: Sequence[float]) -> dict:
    xs = sorted(float(x) for x in samples_ms)
    if not xs:
        return {"median_ms": float("nan"), "p10_ms": float("nan"), "p90_ms": float("nan"), "samples": 0}
    q = lambda p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(xs), "p10_ms": q(0.1), "p90_ms": q(0.9), "samples": len(xs)}


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of logits (..., V) against int targets, in float64."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])
    t = np.asarray(targets).reshape(-1)
    top = x.max(axis=1)
    lse = np.log(np.exp(x - top[:, None]).sum(axis=1)) + top
    return float(np.mean(lse - x[np.arange(len(t)), t]))


def tokens_per_s(tokens: int, ms: float) -> float:
    return tokens / (ms / 1e3) if ms and ms > 0 and math.isfinite(ms) else float("nan")


# ----------------------------------------------------------------------------- timing

class Timer:
    """Device events on one stream: event(), record(ev), elapsed_ms(a, b), sync()."""

    def event(self): raise NotImplementedError
    def record(self, ev) -> None: raise NotImplementedError
    def elapsed_ms(self, a, b) -> float: raise NotImplementedError
    def sync(self) -> None: raise NotImplementedError


class DeviceTimer(Timer):
    """Events of a gptc Device (they are reused: the driver API has no cheap destroy here)."""

    def __init__(self, device):
        self.device = device
        self._pool: list = []
        self._next = 0

    def reset(self) -> None:
        self._next = 0

    def event(self):
        if self._next == len(self._pool):
            self._pool.append(self.device.event())
        ev = self._pool[self._next]
        self._next += 1
        return ev

    def record(self, ev) -> None:
        self.device.record(ev)

    def elapsed_ms(self, a, b) -> float:
        return self.device.elapsed_ms(a, b)

    def sync(self) -> None:
        self.device.synchronize()


_DEVICE_TIMERS: dict[int, DeviceTimer] = {}


def device_timer(device) -> DeviceTimer:
    """One DeviceTimer per device, so its events are reused across measurements."""
    timer = _DEVICE_TIMERS.get(id(device))
    if timer is None or timer.device is not device:
        timer = _DEVICE_TIMERS[id(device)] = DeviceTimer(device)
    return timer


class TorchTimer(Timer):
    def __init__(self, torch):
        self.torch = torch

    def reset(self) -> None:
        pass

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, ev) -> None:
        ev.record()

    def elapsed_ms(self, a, b) -> float:
        return float(a.elapsed_time(b))

    def sync(self) -> None:
        self.torch.cuda.synchronize()


def sample_count(estimate_ms: float, repeats: int, budget_ms: float) -> int:
    """At least `repeats` samples, more while they fit in `budget_ms`, at most MAX_SAMPLES."""
    if not (estimate_ms > 0 and math.isfinite(estimate_ms)):
        return repeats
    return max(repeats, min(MAX_SAMPLES, int(budget_ms / estimate_ms)))


def measure(timer: Timer, enqueue: Callable[[], Any], repeats: int = 20, budget_ms: float = 1000.0,
            warmup: int = 3) -> list[float]:
    """Per-call device times (ms) of `enqueue` after `warmup` calls: events recorded
    between consecutive calls queued back to back (interval i ends where i+1
    starts, so host gaps that starve the device count), then one synchronize."""
    timer.reset()
    for _ in range(warmup):
        enqueue()
    a, b = timer.event(), timer.event()
    timer.record(a)
    for _ in range(3):
        enqueue()
    timer.record(b)
    timer.sync()
    n = sample_count(timer.elapsed_ms(a, b) / 3, repeats, budget_ms)
    timer.reset()
    events = [timer.event() for _ in range(n + 1)]
    timer.record(events[0])
    for i in range(n):
        enqueue()
        timer.record(events[i + 1])
    timer.sync()
    return [timer.elapsed_ms(events[i], events[i + 1]) for i in range(n)]


# ----------------------------------------------------------------------------- per-kernel rows

def kernel_rows(costs: Sequence[KernelCost], times_ms: Sequence[float], bandwidth: float, rate: float,
                labels: Sequence[str] | None = None) -> list[dict]:
    """One row per kernel: time, bytes, FLOPs, achieved GB/s and TFLOP/s, floor and
    percent of floor. bandwidth in bytes/s, rate in FLOP/s."""
    rows = []
    for i, (c, ms) in enumerate(zip(costs, times_ms)):
        s = ms / 1e3
        fl = floor_seconds(c.bytes, c.flops, bandwidth, rate)
        rows.append({
            "kernel": c.name, "family": c.family, "ms": ms, "bytes": c.bytes, "flops": c.flops,
            "gbps": c.bytes / s / 1e9 if s > 0 else float("nan"),
            "tflops": c.flops / s / 1e12 if s > 0 else float("nan"),
            "floor_ms": fl * 1e3, "pct_floor": 100.0 * fl / s if s > 0 else float("nan"),
            "bound": bound(c.bytes, c.flops, bandwidth, rate), "nodes": c.nodes,
            "what": labels[i] if labels else "",
        })
    return rows


def family_rows(rows: Sequence[dict]) -> list[dict]:
    """Per kernel family: count, time, bytes, FLOPs, floor, percent of floor; by time."""
    fam: dict[str, dict] = {}
    for r in rows:
        f = fam.setdefault(r["family"], {"family": r["family"], "kernels": 0, "ms": 0.0, "bytes": 0, "flops": 0,
                                         "floor_ms": 0.0})
        f["kernels"] += 1
        f["ms"] += r["ms"]
        f["bytes"] += r["bytes"]
        f["flops"] += r["flops"]
        f["floor_ms"] += r["floor_ms"]
    out = sorted(fam.values(), key=lambda f: -f["ms"])
    for f in out:
        f["pct_floor"] = 100.0 * f["floor_ms"] / f["ms"] if f["ms"] > 0 else float("nan")
    return out


def plan_summary(rows: Sequence[dict], step_ms: float | None) -> dict:
    total = sum(r["ms"] for r in rows)
    floor = sum(r["floor_ms"] for r in rows)
    return {"kernels": len(rows), "kernel_sum_ms": total, "floor_ms": floor, "step_ms": step_ms,
            "bytes": sum(r["bytes"] for r in rows), "flops": sum(r["flops"] for r in rows),
            "pct_floor_of_step": 100.0 * floor / step_ms if step_ms else float("nan"),
            "families": family_rows(rows),
            "top": sorted(rows, key=lambda r: -r["ms"])[:TOP_KERNELS]}


def launch_labels(plan) -> list[str]:
    """kernel_label of every launch of `plan`."""
    return [kernel_label(plan, [plan.kernels[i] for i in launch]) for launch in plan.launches]


def kernel_label(plan, kernels) -> str:
    """The ops and scopes of a kernel (or of the kernels of one launch), short:
    'matmul,add @ h.0/linear'."""
    g = plan.graph
    kernels = kernels if isinstance(kernels, (list, tuple)) else [kernels]
    nodes = [n for k in kernels for n in k.nodes]
    ops: list[str] = []
    for n in nodes:
        op = g.op(n)
        if op == "matmul":  # the shape says most about a matmul's speed: [batch x] M x N x K
            a = g.type(g.inputs_of(n)[0]).shape
            out = g.type(n).shape
            batch = int(np.prod(out[:-2])) if len(out) > 2 else 1
            op = f"matmul[{f'b{batch} ' if batch > 1 else ''}{out[-2]}x{out[-1]}x{a[-1]}]"
        if op not in ops:
            ops.append(op)
    ops.sort(key=lambda o: not o.startswith("matmul"))  # stable: matmuls first, then in graph order
    scopes = Counter(g.node(n)["scope"] for n in nodes if g.node(n)["scope"])
    text = ",".join(ops[:4]) + ("..." if len(ops) > 4 else "")
    if scopes:  # the scope most of its nodes came from
        top = sorted(scopes.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        text += " @ " + top + (f" +{len(scopes) - 1}" if len(scopes) > 1 else "")
    return text


# ----------------------------------------------------------------------------- formatting

def fmt_num(x: float | None, digits: int = 3) -> str:
    """Compact: 3 significant digits, thousands separators for large values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))}f}"


def fmt_rate(tokens_s: float | None) -> str:
    """tokens/s as '408 K', '3.02 M'."""
    if tokens_s is None or not math.isfinite(tokens_s):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens_s >= scale:
            return f"{fmt_num(tokens_s / scale)} {unit}"
    return fmt_num(tokens_s)


def fmt_loss(losses: Sequence[float] | None, i: int) -> str:
    if not losses or len(losses) <= i or losses[i] is None or not math.isfinite(losses[i]):
        return "-"
    return f"{losses[i]:.6f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None,
          markdown: bool = False) -> str:
    """A text table; align is one 'l' or 'r' per column (default: first l, rest r)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    if markdown:
        sep = ["---:" if a == "r" else "---" for a in align]
        return "\n".join("| " + " | ".join(r) + " |" for r in [cells[0], sep] + cells[1:])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    just = lambda s, i: s.rjust(widths[i]) if align[i] == "r" else s.ljust(widths[i])  # noqa: E731
    return "\n".join("  ".join(just(c, i) for i, c in enumerate(r)).rstrip() for r in cells)


def _step(result: dict, what: str, key: str) -> dict | None:
    for s in result["steps"]:
        if s["what"] == what and s["framework"] == key:
            return s
    return None


def ratios(result: dict, what: str) -> dict[str, float]:
    """How many times faster gptc fused is than each other framework (their ms / fused ms)."""
    fused = _step(result, what, "gptc-fused")
    out = {}
    if not fused or not fused.get("median_ms"):
        return out
    for s in result["steps"]:
        if s["what"] == what and s["framework"] != "gptc-fused" and s.get("median_ms"):
            out[s["framework"]] = s["median_ms"] / fused["median_ms"]
    return out


def step_rows(result: dict, what: str) -> list[list[str]]:
    base = _step(result, what, "gptc-fused")
    rows = []
    for key, label in FRAMEWORKS.items():
        s = _step(result, what, key)
        if s is None:
            continue
        if s.get("error"):
            rows.append([label, "failed", "-", "-", "-", "-", "-", "-"])
            continue
        vs = (s["median_ms"] / base["median_ms"]) if base and base.get("median_ms") else float("nan")
        rows.append([label, fmt_num(s["median_ms"]), fmt_num(s["p10_ms"]) + "-" + fmt_num(s["p90_ms"]),
                     fmt_rate(s["tokens_per_s"]), (fmt_num(vs) + "x") if math.isfinite(vs) else "-",
                     fmt_loss(s.get("losses"), 0), fmt_loss(s.get("losses"), 1),
                     fmt_num(s.get("setup_s"))])
    return rows


STEP_HEADERS = ["framework", "ms/step", "p10-p90 ms", "tokens/s", "x fused time", "loss 1", "loss 2", "first call s"]
KERNEL_HEADERS = ["kernel", "family", "ms", "MB", "MFLOP", "GB/s", "TFLOP/s", "% floor", "bound", "ops @ scope"]
FAMILY_HEADERS = ["family", "kernels", "ms (sum)", "% of sum", "MB", "GFLOP", "% floor"]


def _kernel_table_rows(rows: Sequence[dict]) -> list[list[str]]:
    return [[r["kernel"], r["family"], fmt_num(r["ms"]), fmt_num(r["bytes"] / 1e6), fmt_num(r["flops"] / 1e6),
             fmt_num(r["gbps"]), fmt_num(r["tflops"]), fmt_num(r["pct_floor"]), r["bound"], r.get("what", "")[:60]]
            for r in rows]


def _family_table_rows(plan: dict) -> list[list[str]]:
    total = plan["kernel_sum_ms"] or float("nan")
    return [[f["family"], str(f["kernels"]), fmt_num(f["ms"]), fmt_num(100 * f["ms"] / total),
             fmt_num(f["bytes"] / 1e6), fmt_num(f["flops"] / 1e9), fmt_num(f["pct_floor"])]
            for f in plan["families"]]


def headline(result: dict) -> str:
    m = result["meta"]
    return f"{m['gpu']} · {m['date']} · gptc {m['commit']}" + (f" · PyTorch {m['torch']}" if m.get("torch") else "")


def ceiling_lines(result: dict) -> list[list[str]]:
    c = result["ceilings"]
    rows = [["device-to-device copy", f"{fmt_num(c['copy_bytes_per_s'] / 1e12)} TB/s", c["copy_how"]],
            ["fp32 matrix product", f"{fmt_num(c['gemm_flops_per_s'] / 1e12)} TFLOP/s", c["gemm_how"]]]
    for name, (rate, how) in c.get("noted", {}).items():
        rows.append([f"{name} matrix product (noted, not used)", f"{fmt_num(rate / 1e12)} TFLOP/s", how])
    return rows


def speedup_phrase(ratio: float, other: str) -> str:
    """ratio = other's time / gptc fused time -> '1.92x faster than X' or '2.23x slower than X'."""
    if ratio >= 1:
        return f"{fmt_num(ratio)}x faster than {other}"
    return f"{fmt_num(1 / ratio)}x slower than {other}"


def comparison_line(result: dict, what: str) -> str:
    r = ratios(result, what)
    parts = [speedup_phrase(r[key], "unfused" if key == "gptc-unfused" else FRAMEWORKS[key])
             for key in ("gptc-unfused", "torch-cudagraphs", "torch-compile", "torch-eager") if key in r]
    return "gptc fused: " + "; ".join(parts) if parts else ""


def render_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# gptc bench: {m['config']}, batch {m['batch']}, {m['precision']}", "",
             headline(result), "",
             f"Model {m['model_summary']} ({m['params']:,} parameters), batch {m['batch']} "
             f"({m['tokens_per_step']:,} tokens a step). Times are medians of device-event intervals between "
             f"back-to-back steps after warm-up (each framework's fastest path: gptc and the CUDA-graph "
             f"column replay one device graph a step); the p10-p90 column shows the spread. "
             f"'loss 1' and 'loss 2' are the losses each framework computed on the same batch from the same "
             f"weights (step 2 after one AdamW update). 'x fused time' is each median over gptc fused's. 'first call' is "
             f"the seconds from nothing to the first result: gptc plans, compiles (NVRTC/hiprtc, disk-cached), loads "
             f"and captures; torch.compile compiles; the CUDA-graph column reuses torch.compile's code and counts its "
             f"warm-up and capture only.", "",
             "## Ceilings (measured in this run)", "",
             table(["ceiling", "value", "how"], ceiling_lines(result), "lrl", markdown=True), ""]
    for note in m.get("notes", []):
        lines.append(f"- {note}")
    if m.get("notes"):
        lines.append("")
    for what in m["what"]:
        lines += [f"## {WHAT_LABEL[what][0].upper() + WHAT_LABEL[what][1:]}", "",
                  table(STEP_HEADERS, step_rows(result, what), markdown=True), ""]
        line = comparison_line(result, what)
        if line:
            lines += [line + ".", ""]
        for s in result["steps"]:
            if s["what"] == what and s.get("error"):
                lines += [f"- {FRAMEWORKS[s['framework']]} failed: {s['error']}", ""]
    for key, plan in result["plans"].items():
        lines += [f"## Kernels: {key}", "",
                  f"{plan['kernels']} launches (a launch runs one kernel, or several independent ones the planner "
                  f"batched, named k012+3); {fmt_num(plan['bytes'] / 1e6)} MB and {fmt_num(plan['flops'] / 1e9)} GFLOP "
                  f"at the least; roofline floor {fmt_num(plan['floor_ms'])} ms, "
                  f"{fmt_num(plan['pct_floor_of_step'])}% of the replayed step ({fmt_num(plan['step_ms'])} ms). "
                  f"Per-kernel times are measured in isolation (each kernel launched {KERNEL_LAUNCHES} times in one "
                  f"device graph, median of {KERNEL_REPLAYS} replays; its inputs stay in L2), so their sum "
                  f"({fmt_num(plan['kernel_sum_ms'])} ms) differs from the replayed step.", "",
                  table(FAMILY_HEADERS, _family_table_rows(plan), markdown=True), "",
                  f"Top {len(plan['top'])} kernels by time:", "",
                  table(KERNEL_HEADERS, _kernel_table_rows(plan["top"]), "llrrrrrrll", markdown=True), ""]
    lines += ["Cost model (gptc/compiler/planner/cost.py): bytes = each distinct buffer a kernel reads or writes, once (a gather "
              "counts the rows it looks up); FLOPs = 2·M·N·K per matrix product plus one per element of every "
              "other arithmetic op; floor = max(bytes / copy bandwidth, FLOPs / fp32 GEMM rate); % floor = "
              "floor / measured time.", ""]
    return "\n".join(lines)


def render_summary(result: dict) -> str:
    """The compact table printed last."""
    m = result["meta"]
    out = [f"gptc bench: {m['config']} ({m['model_summary']}), batch {m['batch']}, {m['precision']} -- {headline(result)}",
           "ceilings: " + "; ".join(f"{r[0]} {r[1]}" for r in ceiling_lines(result)[:2])]
    for note in m.get("notes", []):
        out.append(f"note: {note}")
    for what in m["what"]:
        out += ["", WHAT_LABEL[what] + ":", table(STEP_HEADERS, step_rows(result, what))]
        line = comparison_line(result, what)
        if line:
            out.append(line)
    for key, plan in result["plans"].items():
        if "fused" not in key or "unfused" in key:
            continue
        top = plan["top"][:8]
        out += ["", f"top kernels of {key} (in isolation: sum {fmt_num(plan['kernel_sum_ms'])} ms, "
                    f"step {fmt_num(plan['step_ms'])} ms, floor {fmt_num(plan['floor_ms'])} ms):",
                table(KERNEL_HEADERS, _kernel_table_rows(top), "llrrrrrrll")]
    return "\n".join(out)


def write_outputs(result: dict, out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> list[Path]:
    """DIR/bench.json, DIR/bench.md and DIR/bench.png (tokens/s by framework)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GptcError(f"cannot write to output directory '{out_dir}': {e.strerror}") from None
    written = []
    path = out / "bench.json"
    path.write_text(json.dumps(result, indent=1, default=_json_default, allow_nan=True) + "\n")
    written.append(path)
    path = out / "bench.md"
    path.write_text(render_markdown(result))
    written.append(path)
    try:
        written.append(write_chart(result, out / "bench.png"))
    except Exception as e:  # a chart must never lose the numbers
        log(f"gptc bench: no chart written ({type(e).__name__}: {e})")
    return written


def chart_groups(result: dict) -> tuple[list[str], dict[str, list[float]]]:
    """Labels (one per measured step kind) and, per framework, million tokens/s."""
    whats = list(result["meta"]["what"])
    groups: dict[str, list[float]] = {}
    for key, label in FRAMEWORKS.items():
        values = []
        for what in whats:
            s = _step(result, what, key)
            values.append(s["tokens_per_s"] / 1e6 if s and not s.get("error") and s.get("tokens_per_s") else float("nan"))
        if any(math.isfinite(v) for v in values):
            groups[label] = values
    return [{"train": "training step", "infer": "inference forward"}[w] for w in whats], groups


def gpu_short(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3 (cuda:sm_90)' -> 'H100 80GB HBM3'."""
    name = re.sub(r"\(.*?\)", "", device_name)
    return re.sub(r"\s+", " ", re.sub(r"\b(NVIDIA|AMD)\b", "", name)).strip() or device_name


def chart_title(result: dict) -> str:
    m = result["meta"]
    return f"{m['config']} b{m['batch']} {m['precision']} - {gpu_short(m['gpu'])} - {m['date']} - gptc {m['commit']}"


def write_chart(result: dict, path: Path) -> Path:
    from gptc.tools.plot import bar_chart
    labels, groups = chart_groups(result)
    bar_chart(path, labels, groups, title=chart_title(result),
              ylabel=f"million tokens/s, {result['meta']['model_summary']} (higher is better)", width=1000)
    return path


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------- ceilings

def measure_copy(device, nbytes: int = COPY_BYTES) -> tuple[float, str]:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    timer = device_timer(device)
    src, dst = device.alloc(nbytes), device.alloc(nbytes)
    try:
        device.memset(src, 0x5A, nbytes)
        samples = measure(timer, lambda: device.copy(dst, src, nbytes), repeats=20, budget_ms=300, warmup=3)
    finally:
        device.synchronize()
        device.free(src)
        device.free(dst)
    ms = summarize(samples)["median_ms"]
    return 2 * nbytes / (ms / 1e3), f"copy of {nbytes >> 20} MiB on the device, bytes read + written, median of {len(samples)}"


def measure_gemm_torch(torch, n: int = 8192) -> dict[str, tuple[float, str]]:
    """fp32 (TF32 off), tf32 and bf16 rates of torch.matmul n^3 on random data."""
    timer = TorchTimer(torch)
    out = {}
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            gen = torch.Generator(device="cuda").manual_seed(0)
            a = torch.randn(n, n, device="cuda", generator=gen).to(dtype)
            b = torch.randn(n, n, device="cuda", generator=gen).to(dtype)
            c = torch.empty(n, n, device="cuda", dtype=dtype)
            samples = measure(timer, lambda: torch.matmul(a, b, out=c), repeats=10, budget_ms=200, warmup=3)
            ms = summarize(samples)["median_ms"]
            out[name] = (2 * n ** 3 / (ms / 1e3),
                         f"torch.matmul {n}x{n}x{n} {name}{' (TF32 off)' if name == 'fp32' else ''}, random data, "
                         f"median of {len(samples)}")
            del a, b, c
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
        torch.cuda.empty_cache()
    return out


def measure_gemm_gptc(device, n: int = 4096) -> tuple[float, str]:
    """fp32 rate of gptc's own matmul kernel on n^3 (a lower bound of the device's)."""
    from gptc.runtime.build import load_executor
    from gptc.compiler.ir import Graph
    from gptc.compiler.planner import make_plan
    g = Graph()
    a, b = g.input("a", (n, n)), g.input("b", (n, n))
    g.output("c", a @ b)
    ex = load_executor(make_plan(g, True), device, {})
    try:
        rng = np.random.default_rng(0)
        ex.run({"a": rng.standard_normal((n, n), np.float32), "b": rng.standard_normal((n, n), np.float32)})
        samples = measure(device_timer(device), ex.launch, repeats=10, budget_ms=300, warmup=2)
    finally:
        _close_executor(ex)
    ms = summarize(samples)["median_ms"]
    return 2 * n ** 3 / (ms / 1e3), (f"gptc's own fp32 matmul kernel {n}x{n}x{n} (PyTorch not available: a lower "
                                     f"bound of the device's rate), median of {len(samples)}")


def measure_ceilings(device, torch, log: Callable[[str], None] = print) -> dict:
    bw, bw_how = measure_copy(device)
    log(f"  copy bandwidth {bw / 1e12:.2f} TB/s")
    noted = {}
    if torch is not None:
        rates = measure_gemm_torch(torch)
        rate, how = rates.pop("fp32")
        noted = rates
    else:
        rate, how = measure_gemm_gptc(device)
    log(f"  fp32 GEMM {rate / 1e12:.1f} TFLOP/s" + "".join(f", {k} {v[0] / 1e12:.0f} TFLOP/s" for k, v in noted.items()))
    return {"copy_bytes_per_s": bw, "copy_how": bw_how, "gemm_flops_per_s": rate, "gemm_how": how, "noted": noted}


# ----------------------------------------------------------------------------- gptc

def _close_executor(ex) -> None:
    captured = getattr(ex, "captured", None)
    if captured is not None and hasattr(captured, "release"):
        try:
            captured.release()
        except Exception:
            pass
        ex.captured = None
    ex.close()


def _kernel_launcher(ex, index: int) -> Callable[[], None]:
    """Launch kernel `index` of an executor (with its clears)."""
    if hasattr(ex, "run_kernel"):
        return lambda: ex.run_kernel(index)
    clears, launch = ex.launches[index]

    def go() -> None:
        for address, nbytes in clears:
            ex.device.memset(address, 0, nbytes)
        launch.launch()
    return go


def time_kernels(device, ex, count: int, launches: int = KERNEL_LAUNCHES, replays: int = KERNEL_REPLAYS) -> list[float]:
    """Each kernel in isolation: `launches` launches captured in one device graph,
    replayed `replays` times after one warm replay; median replay time / launches.
    Kernels run on the executor's current buffers; in-place updates (AdamW) change
    its parameters, so the executor is not used for anything after this."""
    timer = device_timer(device)
    times = []
    for i in range(count):
        go = _kernel_launcher(ex, i)
        device.begin_capture()
        try:
            for _ in range(launches):
                go()
        finally:
            graph = device.end_capture()
        try:
            device.replay(graph)
            timer.reset()
            events = [timer.event() for _ in range(replays + 1)]
            timer.record(events[0])
            for r in range(replays):
                device.replay(graph)
                timer.record(events[r + 1])
            timer.sync()
            times.append(statistics.median(timer.elapsed_ms(events[r], events[r + 1]) for r in range(replays)) / launches)
        finally:
            if hasattr(graph, "release"):
                graph.release()
    return times


def bench_gptc(device, cfg: BenchConfig, what: str, fuse: bool, params: Mapping[str, np.ndarray],
               tokens: np.ndarray, targets: np.ndarray, ceilings: dict, log: Callable[[str], None]) -> tuple[dict, dict | None]:
    """One gptc plan: (step result, plan result with per-kernel rows)."""
    from gptc.runtime.build import load_executor
    from gptc.models import build_graph
    from gptc.compiler.planner import make_plan
    key = "gptc-fused" if fuse else "gptc-unfused"
    t0 = time.perf_counter()
    graph = build_graph(cfg.spec, what)
    plan = make_plan(graph, fuse)
    ex = load_executor(plan, device, params)
    try:
        losses = []
        if what == "train":
            for step in (1, 2):
                out = ex.run({"tokens": tokens, "targets": targets, "lr": np.float32(cfg.spec.train.lr),
                              "step": np.float32(step)})
                losses.append(float(out["loss"]))
        else:
            out = ex.run({"tokens": tokens})
            losses.append(cross_entropy(out["logits"], targets))
        setup_s = time.perf_counter() - t0
        samples = measure(device_timer(device), ex.launch, cfg.repeats, cfg.budget_ms)
        stats = summarize(samples)
        costs = plan_costs(plan)  # one per launch
        step = {"what": what, "framework": key, **stats, "tokens_per_s": tokens_per_s(tokens.size, stats["median_ms"]),
                "losses": losses, "setup_s": setup_s, "kernels": len(plan.kernels), "launches": len(costs)}
        log(f"  {FRAMEWORKS[key]:<28} {stats['median_ms']:9.3f} ms  {fmt_rate(step['tokens_per_s']):>9} tokens/s  "
            f"loss {fmt_loss(losses, 0)}  ({len(costs)} launches, first call {setup_s:.1f} s)")
        plan_result = None
        if cfg.per_kernel:
            times = time_kernels(device, ex, len(costs))
            rows = kernel_rows(costs, times, ceilings["copy_bytes_per_s"], ceilings["gemm_flops_per_s"],
                               launch_labels(plan))
            plan_result = {**plan_summary(rows, stats["median_ms"]), "rows": rows}
        return step, plan_result
    finally:
        _close_executor(ex)


# ----------------------------------------------------------------------------- PyTorch

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
    the whole step captured in one CUDA graph."""
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

    for key in variants:
        t0 = time.perf_counter()
        try:
            tm.load_params(model, params)
            if key in ("torch-compile", "torch-cudagraphs") and compiled is None:
                compiled = torch.compile(model.loss if what == "train" else model, dynamic=False)
            if what == "train":
                loss_fn = model.loss if key == "torch-eager" else compiled
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
                fn = model if key == "torch-eager" else compiled
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


# ----------------------------------------------------------------------------- driver

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
        notes.append("PyTorch runs fp32 with TF32 off (torch.backends.cuda.matmul.allow_tf32 = False), as gptc's kernels; "
                     "attention through F.scaled_dot_product_attention(is_causal=True); the CUDA-graph column is "
                     "torch.compile (default mode) with the whole step captured by torch.cuda.graph, the optimizer "
                     "AdamW(capturable=True, foreach=True)")
    warnings.filterwarnings("ignore", message=".*TensorFloat32 tensor cores.*")  # TF32 stays off on purpose
    log(f"gptc bench: {cfg.name} ({meta['model_summary']}), batch {cfg.batch}, on {device.name}, commit {meta['commit']}")
    if ceilings is None:
        ceilings = measure_ceilings(device, torch, log)
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
    """`gptc bench`: run, write DIR/bench.{json,md,png}, print the compact table last."""
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
