"""Everything `gptc bench` writes, from a result dict (what bench.json holds) and
nothing else: provenance (GPU, date, commit), per-kernel roofline rows, text and
Markdown tables, bench.md, the compact summary printed last, and two figures (through
matplotlib; without it, a one-line note and no figure): bench.png, tokens/s by
framework, and roofline.png, every measured launch against the run's ceilings."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from gptc.common import PACKAGE_DIR
from gptc.compiler.planner.cost import KernelCost, bound, floor_seconds
from gptc.spec import GptcError
from gptc.tools.bench.config import FRAMEWORKS, KERNEL_LAUNCHES, KERNEL_REPLAYS, WHAT_LABEL
from gptc.tools.figure import PlotUnavailable, new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TOP_KERNELS = 12


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


# ----------------------------------------------------------------------------- rooflines: per-kernel rows

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
            "top": sorted(rows, key=lambda r: -r["ms"])[:TOP_KERNELS],
            "kernels_by_launch": list(rows)}  # every kernel, in launch order: A/B comparisons of two runs


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


# ----------------------------------------------------------------------------- results

def find_step(result: dict, what: str, key: str) -> dict | None:
    for s in result["steps"]:
        if s["what"] == what and s["framework"] == key:
            return s
    return None


def ratios(result: dict, what: str) -> dict[str, float]:
    """How many times faster gptc fused is than each other framework (their ms / fused ms)."""
    fused = find_step(result, what, "gptc-fused")
    out = {}
    if not fused or not fused.get("median_ms"):
        return out
    for s in result["steps"]:
        if s["what"] == what and s["framework"] != "gptc-fused" and s.get("median_ms"):
            out[s["framework"]] = s["median_ms"] / fused["median_ms"]
    return out


def step_rows(result: dict, what: str) -> list[list[str]]:
    base = find_step(result, what, "gptc-fused")
    rows = []
    for key, label in FRAMEWORKS.items():
        s = find_step(result, what, key)
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
            [f"{c['gemm_name']} matrix product (the floor's)", f"{fmt_num(c['gemm_flops_per_s'] / 1e12)} TFLOP/s",
             c["gemm_how"]]]
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


# ----------------------------------------------------------------------------- bench.md and the summary

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
              f"other arithmetic op; floor = max(bytes / copy bandwidth, FLOPs / {result['ceilings']['gemm_name']} "
              "matrix-product rate); % floor = "
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


# ----------------------------------------------------------------------------- files and figures

def write_outputs(result: dict, out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> list[Path]:
    """DIR/bench.json, DIR/bench.md, DIR/bench.png (tokens/s by framework) and, when
    launches were timed, DIR/roofline.png."""
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
    figures = {"bench.png": throughput_figure}
    if roofline_plans(result):
        figures["roofline.png"] = roofline_figure
    for name, draw in figures.items():
        try:
            written.append(save_png(draw(result), out / name))
        except PlotUnavailable as e:
            log(f"note: {e}")
            break
        except Exception as e:  # a figure must never lose the numbers
            log(f"gptc bench: {name} not written ({type(e).__name__}: {e})")
    return written


def chart_groups(result: dict) -> tuple[list[str], dict[str, list[float]]]:
    """Labels (one per measured step kind) and, per framework, million tokens/s."""
    whats = list(result["meta"]["what"])
    groups: dict[str, list[float]] = {}
    for key, label in FRAMEWORKS.items():
        values = []
        for what in whats:
            s = find_step(result, what, key)
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


def throughput_figure(result: dict) -> Figure:
    """Bars of million tokens/s: one group per step kind, one bar per framework, each
    bar labelled with its value."""
    labels, groups = chart_groups(result)
    figure = new_figure(1000, 560)
    ax = figure.add_subplot()
    width = 0.8 / max(len(groups), 1)
    for i, (framework, values) in enumerate(groups.items()):
        x = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(x, values, width, label=framework, color=f"C{i}")
        ax.bar_label(bars, [fmt_num(v) if math.isfinite(v) else "" for v in values], padding=2, fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(f"million tokens/s, {result['meta']['model_summary']} (higher is better)")
    ax.set_title(chart_title(result))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend()
    return figure


def roofline_rows(rows: Sequence[dict]) -> list[dict]:
    """The launches a log-log roofline can place: FLOPs, bytes and measured time all
    positive (a pure copy or gather has no FLOPs)."""
    return [r for r in rows if r["flops"] > 0 and r["bytes"] > 0 and 0 < r["ms"] < math.inf]


def roofline_plans(result: dict) -> dict[str, list[dict]]:
    """Plan key ('train fused', ...) -> its roofline_rows, for the plans that have some."""
    plans = {key: roofline_rows(plan.get("rows", [])) for key, plan in result["plans"].items()}
    return {key: rows for key, rows in plans.items() if rows}


def roofline_point(row: dict) -> tuple[float, float]:
    """(arithmetic intensity in FLOPs per byte, achieved FLOP/s) of a kernel row."""
    return row["flops"] / row["bytes"], row["flops"] / (row["ms"] / 1e3)


def roofline_figure(result: dict) -> Figure:
    """One log-log panel per timed plan: each launch at its arithmetic intensity and
    achieved FLOP/s, coloured by kernel family, marker area by its share of the plan's
    kernel time, the slowest named; under the two ceilings measured in the run: the
    copy bandwidth (FLOP/s = bandwidth x intensity) up to the ridge point and the
    matrix-product rate of the run's precision after it."""
    plans = roofline_plans(result)
    columns = min(len(plans), 2)
    grid_rows = math.ceil(len(plans) / columns)
    figure = new_figure(max(620 * columns, 900), 500 * grid_rows + 100 * (grid_rows == 1))  # room for the titles
    from matplotlib.collections import PathCollection
    from matplotlib.ticker import EngFormatter
    bandwidth, rate = result["ceilings"]["copy_bytes_per_s"], result["ceilings"]["gemm_flops_per_s"]
    ridge = rate / bandwidth
    intensities = [roofline_point(r)[0] for rows in plans.values() for r in rows]
    x_lo, x_hi = min(min(intensities), ridge) / 3, max(max(intensities), ridge) * 3
    families = sorted({r["family"] for rows in plans.values() for r in rows})  # one colour each, in every panel
    axes = figure.subplots(grid_rows, columns, squeeze=False, sharex=True, sharey=True)
    figure.suptitle(f"roofline: {chart_title(result)}\nmarker area: share of the plan's kernel time "
                    "(each launch timed in isolation)")
    legend = {}  # label -> handle, over all panels (a family may be missing from some)
    for ax, (key, rows) in zip(axes.flat, plans.items()):
        ax.plot([x_lo, ridge], [bandwidth * x_lo, rate], color="0.3",
                label=f"copy bandwidth {fmt_num(bandwidth / 1e12)} TB/s")
        ax.plot([ridge, x_hi], [rate, rate], color="0.3", linestyle="--",
                label=f"{result['ceilings']['gemm_name']} matrix product {fmt_num(rate / 1e12)} TFLOP/s")
        total_ms = sum(r["ms"] for r in rows)
        for i, family in enumerate(families):
            points = [r for r in rows if r["family"] == family]
            if points:
                x, y = zip(*map(roofline_point, points))
                ax.scatter(x, y, s=[10 + 400 * r["ms"] / total_ms for r in points], color=f"C{i}", alpha=0.7,
                           edgecolors="none", label=family)
        slowest = max(rows, key=lambda r: r["ms"])
        ax.annotate(f"slowest: {slowest['kernel']}", roofline_point(slowest), xytext=(-8, -16), fontsize=8,
                    textcoords="offset points", ha="right", arrowprops={"arrowstyle": "-", "color": "0.4"})
        hidden = len(result["plans"][key]["rows"]) - len(rows)
        ax.set_title(f"{key}: {len(rows)} launches" + (f" ({hidden} not shown: no FLOPs or no time)" if hidden else ""),
                     fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(x_lo, x_hi)
        ax.yaxis.set_major_formatter(EngFormatter(unit="FLOP/s"))
        ax.grid(alpha=0.3)
        legend.update((label, handle) for handle, label in zip(*ax.get_legend_handles_labels()))
    for ax in axes[-1]:
        ax.set_xlabel("arithmetic intensity (FLOPs per byte moved)")
    for ax in axes[:, 0]:
        ax.set_ylabel("achieved FLOP/s")
    for handle in figure.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=5,
                                fontsize=9).legend_handles:
        if isinstance(handle, PathCollection):  # one marker size for every family in the legend
            handle.set_sizes([30])
    return figure


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
