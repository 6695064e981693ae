"""Multi-GPU scaling on this host: `gptc bench --gpus N` for gpt2 (124M) and the mid
model (benchmarks/mid.toml), in --precision (default bf16), each at its batch per GPU, with ZeRO-1 as well.
Writes benchmarks/results/<gpu>-<date>-<commit>-multi/<model>/multi_gpu.{json,md}.

    PYTHONPATH=. python3 benchmarks/multi_gpu.py --gpus 2 [--batch 8] [--steps 20] [--precision bf16]"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from gptc.tools.bench.config import resolve_spec
from gptc.tools.bench.multi import bench_gpus
from gptc.tools.bench.report import git_commit, today

ROOT = Path(__file__).resolve().parent
MODELS = {"gpt2": "gpt2", "mid": str(ROOT / "mid.toml")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--batch", type=int, help="sequences per GPU (default: the model's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per figure")
    p.add_argument("--models", default="gpt2,mid")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--out", help="default benchmarks/results/<date>-<commit>-multi")
    a = p.parse_args()
    out = Path(a.out or ROOT / "results" / f"{today()}-{git_commit()}-multi")
    summary = {}
    for name in a.models.split(","):
        spec, _ = resolve_spec(MODELS[name], a.batch)
        spec = replace(spec, train=replace(spec.train, precision=a.precision))
        summary[name] = bench_gpus(spec, a.gpus, out / name, steps=a.steps, zero1=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
