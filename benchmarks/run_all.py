"""The published gptc benchmarks: hipgpt at batch 32 and 256, and the mid-size model
(benchmarks/mid.toml: d_model 512, 8 layers, 8 heads, d_ff 2048, vocab 8192, context
512, batch 16), each through `gptc bench` (fused vs unfused plan vs PyTorch eager,
torch.compile and torch.compile + CUDA graph; training step and inference forward),
with the ceilings measured once at the start of the run.

    PYTHONPATH=. python3 benchmarks/run_all.py --out DIR [--configs hipgpt-b32,hipgpt-b256,mid-b16]
                                               [--repeats N] [--no-kernels] [--tar FILE]

Writes DIR/<config>/bench.{json,md,png}, DIR/<config>/roofline.png (not with
--no-kernels) and DIR/summary.md (one table over all configurations), after every
configuration, so a run stopped early keeps what it finished; --tar FILE packs DIR
into FILE after each configuration too. Copy DIR to
benchmarks/results/<gpu>-<date>-<commit>/ to publish it (gptc.tools.bench.report.results_dir_name
gives that name; DIR/summary.md names it as well). Set GPTC_COMMIT where the tree
has no .git (a copy on a device machine)."""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gptc.spec import GptcError  # noqa: E402
from gptc.tools.bench import open_bench_device, report, run_bench  # noqa: E402
from gptc.tools.bench.config import COMPARES, FRAMEWORKS, WHATS, BenchConfig, parse_list, resolve_spec  # noqa: E402
from gptc.tools.bench.measure import measure_ceilings  # noqa: E402
from gptc.tools.bench.peers import import_torch  # noqa: E402

CONFIGS = {  # name -> (preset or spec file, batch)
    "hipgpt-b32": ("hipgpt", 32),
    "hipgpt-b256": ("hipgpt", 256),
    "mid-b16": (str(HERE / "mid.toml"), 16),
}


def summary_markdown(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    m = first["meta"]
    lines = [f"# gptc benchmarks: {report.gpu_short(m['gpu'])}, {m['date']}, gptc {m['commit']}", "",
             report.headline(first), "",
             f"Results folder name: `{report.results_dir_name(m['gpu'], m['date'], m['commit'])}`. "
             "Each configuration's folder holds bench.md (the full tables, per-kernel rooflines included), "
             "bench.json (every number), bench.png (tokens/s) and roofline.png (every timed launch against the "
             "ceilings).", "",
             "## Ceilings", "", report.table(["ceiling", "value", "how"], report.ceiling_lines(first), "lrl", markdown=True), "",
             "## Tokens per second", ""]
    frameworks = list(FRAMEWORKS)
    rows = []
    for name, r in results.items():
        for what in r["meta"]["what"]:
            row = [name, r["meta"]["model_summary"] + f", batch {r['meta']['batch']}", what]
            for key in frameworks:
                s = report.find_step(r, what, key)
                row.append("failed" if s and s.get("error") else
                           f"{report.fmt_rate(s['tokens_per_s'])} ({report.fmt_num(s['median_ms'])} ms)" if s else "-")
            ratio = report.ratios(r, what)
            row += [report.fmt_num(ratio.get("gptc-unfused")) + "x" if "gptc-unfused" in ratio else "-",
                    report.fmt_num(ratio.get("torch-cudagraphs")) + "x" if "torch-cudagraphs" in ratio else "-"]
            rows.append(row)
    headers = ["config", "model", "step"] + [FRAMEWORKS[k] for k in frameworks] + [
        "fused vs unfused", "fused vs torch.compile + CUDA graph"]
    lines += [report.table(headers, rows, "lll" + "r" * (len(headers) - 3), markdown=True), "",
              "Cells: tokens/s (median ms a step). The last two columns: how many times as fast gptc's fused "
              "plan is (ratio of median step times).", ""]
    for note in m.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--what", default=None)
    ap.add_argument("--compare", default=None)
    ap.add_argument("--tar", default=None)
    args = ap.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for n in names:
        if n not in CONFIGS:
            print(f"unknown config {n}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        device = open_bench_device()
    except GptcError as e:
        print(f"gptc: error: {e}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    summaries = []
    try:
        torch, _ = import_torch()
        print(f"device {device.name}; PyTorch {getattr(torch, '__version__', None)}; commit {report.git_commit()}", flush=True)
        ceilings = measure_ceilings(device, torch)
        for name in names:
            t0 = time.perf_counter()
            value, batch = CONFIGS[name]
            spec, _ = resolve_spec(value, batch)
            cfg = BenchConfig(spec, name, parse_list(args.what, WHATS, "what"),
                                    parse_list(args.compare, COMPARES, "compare"),
                                    repeats=args.repeats, per_kernel=not args.no_kernels)
            result = run_bench(cfg, device, ceilings=ceilings)
            result["meta"]["wall_s"] = time.perf_counter() - t0
            results[name] = result
            report.write_outputs(result, out / name)
            (out / "summary.md").write_text(summary_markdown(results))
            (out / "summary.json").write_text(json.dumps(
                {n: {"meta": r["meta"], "steps": r["steps"]} for n, r in results.items()}, indent=1, default=str))
            if args.tar:
                with tarfile.open(args.tar, "w:gz") as tar:
                    tar.add(out, arcname=out.name)
            summaries.append(report.render_summary(result))
            print(f"[{name} done in {time.perf_counter() - t0:.0f} s; {time.perf_counter() - t_start:.0f} s in all]",
                  flush=True)
    finally:
        device.close()
    for s in summaries:
        print()
        print(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
