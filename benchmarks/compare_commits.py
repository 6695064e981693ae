"""Is this commit slower than another? `gptc bench` from two source trees, alternately,
on the same GPU in one run, and the medians side by side.

    git worktree add /tmp/base 588d34a      # or: git archive 588d34a | tar -x -C base
    PYTHONPATH=. python3 benchmarks/compare_commits.py --baseline /tmp/base --out DIR
                 [--preset hipgpt] [--batch 32] [--what train] [--rounds 3]

Each round runs the baseline tree's bench, then this tree's, each in a fresh process
(`python3 -m gptc bench ... --compare unfused,torch-cudagraphs --no-kernels`, with
PYTHONPATH pointing at that tree), so drifts of the GPU's clocks hit both alike.
Writes DIR/<tree>-<round>/bench.json, DIR/compare.json and DIR/compare.md; prints the
table last. A figure is a regression when this tree's median over the rounds is more
than the rounds' spread slower than the baseline's."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREES = ("baseline", "this")


def run_bench(tree: Path, out: Path, args: argparse.Namespace, commit: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "GPTC_COMMIT": commit, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gptc", "bench", "--preset", args.preset, "--batch", str(args.batch),
           "--what", args.what, "--compare", "unfused,torch-cudagraphs", "--no-kernels", "--out", str(out)]
    print(f"$ ({tree.name}) {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=tree, env=env, check=True)
    return json.loads((out / "bench.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="source tree of the commit to compare against")
    ap.add_argument("--baseline-commit", default="baseline", help="its commit, for the tables")
    ap.add_argument("--commit", default=os.environ.get("GPTC_COMMIT", "this"), help="this tree's commit")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="hipgpt")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--what", default="train")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    trees = {"baseline": (Path(args.baseline).resolve(), args.baseline_commit), "this": (HERE.parent, args.commit)}
    medians: dict[tuple[str, str, str], list[float]] = {}  # (tree, what, framework) -> medians per round
    meta = None
    for r in range(args.rounds):
        for name in TREES:
            tree, commit = trees[name]
            result = run_bench(tree, out / f"{name}-{r}", args, commit)
            meta = meta or result["meta"]
            for s in result["steps"]:
                if s.get("median_ms") is not None:
                    medians.setdefault((name, s["what"], s["framework"]), []).append(s["median_ms"])
    rows, verdicts = [], []
    for (name, what, fw), values in sorted(medians.items()):
        if name != "this":
            continue
        base = medians.get(("baseline", what, fw))
        if not base:
            continue
        b, t = statistics.median(base), statistics.median(values)
        spread = max(max(base) - min(base), max(values) - min(values))
        slower = t - b > spread
        rows.append(f"| {what} | {fw} | {b:.4f} | {t:.4f} | {b / t:.3f}x | {spread:.4f} | "
                    f"{'slower' if slower else 'same or faster'} |")
        verdicts.append({"what": what, "framework": fw, "baseline_ms": base, "this_ms": values,
                         "baseline_median_ms": b, "this_median_ms": t, "spread_ms": spread, "regression": slower})
    gpu = meta["gpu"] if meta else "?"
    md = "\n".join([
        f"# {args.preset} batch {args.batch}: gptc {args.commit} against {args.baseline_commit}",
        "", f"{gpu}, {meta['date'] if meta else '?'}; {args.rounds} rounds, each tree in a fresh process, "
        "alternating; each cell is the median over the rounds of each round's median step time.", "",
        f"| step | framework | {args.baseline_commit} ms | {args.commit} ms | speed-up | spread ms | verdict |",
        "|---|---|---:|---:|---:|---:|---|", *rows, ""])
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"gpu": gpu, "preset": args.preset, "batch": args.batch,
                                                  "baseline": args.baseline_commit, "this": args.commit,
                                                  "figures": verdicts}, indent=1) + "\n")
    (out / "compare.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
