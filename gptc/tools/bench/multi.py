"""`gptc bench --gpus N`: training tokens/s on 1 GPU and on N GPUs of this host (data
parallel, batch B per GPU), the scaling efficiency, and the communication time the
backward does not hide.

Each configuration runs as its own set of processes (one per GPU, started by
tools/launch.py as `gptc train --gpus` does); each rank compiles (or takes from the
cache) the training step of its rank, runs a few warm-up steps, then times `steps`
replays of the captured step with device events. Rank 0 writes its figures to a JSON
file the parent reads.

- tokens/s (N) = N * B * seq_len / step time;
- scaling efficiency = tokens/s (N) / (N * tokens/s (1));
- exposed communication = step time (N) - step time (1): each GPU computes the same
  step as the single GPU, so the rest is communication that did not overlap.
Every figure names the GPU, the date and the commit."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from gptc.common import write_atomic
from gptc.spec import Spec, load_spec, spec_to_toml


def rank_main(spec_file: str, steps: int, zero1: bool, result: str) -> None:
    """One rank: time `steps` training steps; rank 0 writes `result`."""
    from gptc.compiler.parallel import Parallel
    from gptc.models import build_graph, init_params
    from gptc.runtime.bundle import cached_bundle
    from gptc.runtime.comm import launch_env, open_communicator
    from gptc.runtime.device import open_device
    from gptc.tools.bench.report import git_commit, today

    spec = load_spec(spec_file)
    env = launch_env()
    dev = open_device("auto", env.local_rank)
    if dev is None:
        sys.exit(f"gptc: error: rank {env.rank}: no GPU {env.local_rank}")
    par = Parallel(env.world, env.rank, zero1 and env.world > 1)
    quiet = lambda line: None  # noqa: E731
    comm = open_communicator(env, dev.target.vendor) if env.world > 1 and env.rank > 0 else None
    bundle = cached_bundle(spec, dev, quiet, parallel=par)
    if env.world > 1 and env.rank == 0:
        comm = open_communicator(env, dev.target.vendor)
        print(f"  the {env.world} ranks joined", file=sys.stderr, flush=True)
    graph = build_graph(spec, "train", parallel=par)
    runtime = bundle.open(dev, init_params(graph, spec.train.seed), comm=comm)
    try:
        ex = runtime.steps["train"]
        rng = np.random.default_rng(env.rank)
        b, s = spec.train.batch_size, spec.model.seq_len
        window = rng.integers(0, spec.model.vocab_size, (b, s + 1)).astype(np.int32)
        feed = {"tokens": window[:, :-1], "targets": window[:, 1:], "lr": np.float32(1e-4), "step": np.float32(1)}
        for _ in range(3):  # compile, capture, warm up
            loss = float(ex.run(feed)["loss"])
        start, end = dev.event(), dev.event()
        dev.synchronize()
        dev.record(start)
        for _ in range(steps):
            ex.launch()
        dev.record(end)
        ms = dev.elapsed_ms(start, end) / steps
    finally:
        runtime.close()
        if comm is not None:
            comm.close()
    if env.rank == 0:
        figures = {"world": env.world, "zero1": par.zero1, "batch_per_gpu": b, "seq_len": s,
                   "precision": spec.train.precision, "step_ms": ms,
                   "tokens_per_s": env.world * b * s / (ms / 1e3), "loss": loss, "device": dev.name,
                   "date": today(), "commit": git_commit()}
        write_atomic(result, json.dumps(figures))


def bench_gpus(spec: Spec, gpus: int, out: str | os.PathLike, steps: int = 20, zero1: bool = False,
               log=print) -> dict:
    """1 GPU, then `gpus` GPUs (and with ZeRO-1 if `zero1`); writes multi_gpu.json and
    multi_gpu.md under `out` and returns the figures."""
    from gptc.tools.launch import run_ranks
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "multi_gpu_spec.toml"
    spec_file.write_text(spec_to_toml(spec))
    runs = [(1, False), (gpus, False)] + ([(gpus, True)] if zero1 else [])
    results = []
    for world, z in runs:
        result = out / f"multi_gpu_{world}{'_zero1' if z else ''}.json"
        result.unlink(missing_ok=True)
        log(f"gptc bench --gpus: {world} GPU{'s' if world > 1 else ''}{' (ZeRO-1)' if z else ''} ...")
        run_ranks([sys.executable, "-m", "gptc.tools.bench.multi", str(spec_file), "--steps", str(steps),
                   "--result", str(result)] + (["--zero1"] if z else []), world)
        results.append(json.loads(result.read_text()))
    one = results[0]
    for r in results:
        r["scaling_efficiency"] = r["tokens_per_s"] / (r["world"] * one["tokens_per_s"])
        r["exposed_comm_ms"] = r["step_ms"] - one["step_ms"]
    report = {"runs": results}
    write_atomic(out / "multi_gpu.json", json.dumps(report, indent=1))
    lines = [f"# gptc bench --gpus {gpus}: {one['device']}, {one['date']}, commit {one['commit']}", "",
             f"batch {one['batch_per_gpu']} x seq_len {one['seq_len']} per GPU, {one['precision']}, {steps} timed steps",
             "",
             "| GPUs | ZeRO-1 | step ms | tokens/s | scaling efficiency | exposed communication ms |",
             "|---:|:---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['world']} | {'yes' if r['zero1'] else 'no'} | {r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['scaling_efficiency']:.1%} | {r['exposed_comm_ms']:.2f} |")
    write_atomic(out / "multi_gpu.md", "\n".join(lines) + "\n")
    log("\n".join(lines[4:]))
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gptc.tools.bench.multi", description="one rank of gptc bench --gpus")
    p.add_argument("spec")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--zero1", action="store_true")
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    rank_main(a.spec, a.steps, a.zero1, a.result)


if __name__ == "__main__":
    main()
