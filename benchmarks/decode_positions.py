"""The decode step's time against the position it decodes at: a step writes only the new
position's keys and values and attends over positions 0..pos, so its time may grow with
the keys read (a few bytes per position) but never by a rewrite of the whole cache.

For each model and batch, the gptc decode step (token ids in, next ids back on the host,
the captured graph replayed; greedy sampling on the GPU) at positions from 0 to the last
one of the context, medians of device events after warm-up, beside the bytes the step must
read at that position (every weight once, and the keys and values up to pos).
Writes benchmarks/results/<gpu>-<date>-<commit>-decode-positions/decode_positions.{json,md}.

    PYTHONPATH=. python3 benchmarks/decode_positions.py [--models gpt2,hipgpt] [--batches 1,8]"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from gptc.common import write_atomic
from gptc.tools.bench.config import resolve_spec
from gptc.tools.bench.report import git_commit, gpu_slug, today

ROOT = Path(__file__).resolve().parent
FRACTIONS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def sweep(name: str, batch: int, device, repeats: int) -> dict:
    from gptc.models import build_graph, init_params, param_count
    from gptc.models.sampling import SEEN, sampling_feeds
    from gptc.tools.bench.decode import _GptcSteps
    from gptc.tools.bench.measure import device_timer, measure, summarize
    from gptc.tools.generate import SamplingParams
    spec, _ = resolve_spec(name, None)
    m = spec.model
    params = init_params(build_graph(spec, "infer", 1), spec.train.seed)
    steps = _GptcSteps(spec, params, batch, device)
    rows = []
    try:
        sampling = sampling_feeds(SamplingParams(greedy=True), m.vocab_size, np.zeros(batch, np.int32))
        steps.prefill.write({SEEN: np.zeros((batch, m.vocab_size), np.float32)})
        tokens = np.ones((batch, 1), np.int32)
        for pos in sorted({round(f * (m.seq_len - 1)) for f in FRACTIONS}):
            feed = {"tokens": tokens, "pos": np.full(batch, pos, np.int32), **sampling}
            samples = measure(device_timer(device), lambda: steps.run(steps.decode, feed), repeats, 1000.0)
            kv_bytes = 2 * m.n_layers * m.kv_heads * m.head_dim * (pos + 1) * batch * 4
            rows.append({"pos": pos, "step_ms": summarize(samples)["median_ms"],
                         "bytes": param_count(spec) * 4 + kv_bytes})
    finally:
        steps.close()
    times = [r["step_ms"] for r in rows]
    return {"model": name, "batch": batch, "seq_len": m.seq_len, "rows": rows, "max_over_min": max(times) / min(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,hipgpt")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", help="default benchmarks/results/<gpu>-<date>-<commit>-decode-positions")
    a = p.parse_args()
    from gptc.runtime.device import open_device
    device = open_device("auto")
    if device is None:
        raise SystemExit("decode_positions: needs a GPU")
    commit = git_commit()
    out = Path(a.out or ROOT / "results" / f"{gpu_slug(device.name)}-{today()}-{commit}-decode-positions")
    out.mkdir(parents=True, exist_ok=True)
    results = [sweep(name, int(b), device, a.repeats) for name in a.models.split(",") for b in a.batches.split(",")]
    meta = {"gpu": device.name, "date": today(), "commit": commit, "precision": "fp32"}
    write_atomic(out / "decode_positions.json", json.dumps({"meta": meta, "sweeps": results}, indent=1))
    lines = [f"# Decode step time by position: {meta['gpu']}, {meta['date']}, commit {commit}", "",
             "gptc decode step (token ids in, next ids out, greedy sampling on the GPU), fp32, medians of device "
             "events; bytes = every weight once + the keys and values up to pos.", "",
             "| model | batch | pos | step ms | MB to read |", "|---|---:|---:|---:|---:|"]
    for r in results:
        lines += [f"| {r['model']} | {r['batch']} | {row['pos']} | {row['step_ms']:.3f} | {row['bytes'] / 1e6:.1f} |"
                  for row in r["rows"]]
    lines += ["", "| model | batch | slowest / fastest position |", "|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['max_over_min']:.2f} |" for r in results]
    write_atomic(out / "decode_positions.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
