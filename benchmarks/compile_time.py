"""Where the time of a cold bundle compile goes: `gptc compile` and the first `gptc train`
or `gptc generate` call (gptc.runtime.bundle.cached_bundle) do these phases.

    PYTHONPATH=. python3 benchmarks/compile_time.py [--preset gpt2] [--target cuda:sm_90] [--per-kernel 10]

With an empty kernel cache (a fresh temporary GPTC_CACHE_DIR, deleted at the end), it
times, as render_bundle and write_bundle run them: per step (train, eval, prefill,
decode) building the graph (autodiff and the optimizer included for train), planning,
rendering and the plan table; then compiling every distinct kernel (in parallel, as
gptc does), writing the bundle, loading the code objects (with a GPU here), and the
warm path (a second render_bundle, whose kernels are now all cache hits). Each phase
prints wall-clock seconds and CPU seconds (this process and its worker processes: on a
machine with spare cores the compile's CPU seconds exceed its wall seconds).
--per-kernel N then compiles each distinct kernel alone, one after another, and lists
the N slowest: the longest one bounds the parallel compile's wall time however many
cores there are. No GPU is needed: --target names what to compile for (default: the GPU
here, else cuda:sm_90). On the GPU machine:

    PYTHONPATH=. python3 benchmarks/compile_time.py --preset gpt2 --per-kernel 10
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


class Phases:
    """Wall and CPU seconds of named phases, printed as they finish."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    def __call__(self, name: str, fn: Callable[[], T]) -> T:
        wall, cpu = time.perf_counter(), _cpu()
        out = fn()
        row = (name, time.perf_counter() - wall, _cpu() - cpu)
        self.rows.append(row)
        print(f"  {row[0]:<28} {row[1]:8.2f} s wall {row[2]:8.2f} s CPU", flush=True)
        return out

    def total(self, prefix: str = "") -> tuple[float, float]:
        rows = [r for r in self.rows if r[0].startswith(prefix)]
        return sum(r[1] for r in rows), sum(r[2] for r in rows)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--target", default="auto", help="e.g. cuda:sm_90, hip:gfx90a (default: the GPU here, else cuda:sm_90)")
    ap.add_argument("--per-kernel", type=int, default=0, metavar="N",
                    help="also compile each distinct kernel alone and list the N slowest")
    args = ap.parse_args()

    cache = tempfile.mkdtemp(prefix="gptc-compile-time-")
    os.environ["GPTC_CACHE_DIR"] = cache  # read by gptc.runtime.cache at each call
    phases = Phases()
    try:
        phases("import gptc", lambda: __import__("gptc.runtime.bundle"))
        run(args, phases)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(args: argparse.Namespace, phases: Phases) -> None:
    import gptc
    from gptc.compiler.codegen.kernels import render_plan
    from gptc.compiler.planner import make_plan
    from gptc.models import build_graph
    from gptc.runtime.build import compile_kernels, plan_table
    from gptc.runtime.bundle import available_compiler, render_bundle, write_bundle
    from gptc.runtime.device import compile_many
    from gptc.target import parse_target

    device = None
    if args.target == "auto":
        from gptc.runtime.device import open_device
        device = phases("open the GPU", lambda: open_device("auto"))
        target = device.target if device is not None else parse_target("cuda:sm_90")
        gpu = device.name if device is not None else "no GPU"
    else:
        target, gpu = parse_target(args.target), "not used"
    spec = gptc.preset(args.preset)
    compiler = available_compiler(target)
    print(f"{args.preset} for {target.name} ({compiler}); {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
          f"GPU: {gpu}; gptc commit {_commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("cold kernel cache; phases as render_bundle and write_bundle run them:")
    batch = spec.train.batch_size
    kernels = []
    for step, b in (("train", batch), ("eval", batch), ("prefill", 1), ("decode", 1)):
        graph = phases(f"{step}: graph", lambda: build_graph(spec, step, b))
        plan = phases(f"{step}: plan", lambda: make_plan(graph, True))
        ks = phases(f"{step}: render", lambda: render_plan(plan, target))
        phases(f"{step}: plan table", lambda: plan_table(plan, ks))
        kernels += ks
    distinct = {k.symbol: k for k in kernels}
    print(f"  {len(kernels)} launches, {len(distinct)} distinct kernels, "
          f"{sum(len(k.code) for k in distinct.values()) / 1e6:.2f} MB of code")
    rendered = phases("render_bundle (all steps)", lambda: render_bundle(spec, target, compiler, log=lambda s: None))
    code = phases("compile (cold cache)", lambda: compile_kernels(kernels, target))
    out = Path(os.environ["GPTC_CACHE_DIR"]) / "bundle"
    phases("write bundle (cache hits)", lambda: write_bundle(rendered, out, log=lambda s: None))
    if device is not None:
        phases("load code objects on the GPU", lambda: [device.load_module(c) for c in code.values()])
        device.close()
    phases("warm: render_bundle again", lambda: render_bundle(spec, target, compiler, log=lambda s: None))
    front = phases.total("render_bundle")
    compile_ = phases.total("compile")
    write = phases.total("write")
    load = phases.total("load")
    print(f"cold first call (render_bundle + compile + write + load): {front[0] + compile_[0] + write[0] + load[0]:.2f} s "
          f"wall, {front[1] + compile_[1] + write[1] + load[1]:.2f} s CPU")

    if args.per_kernel:
        print(f"each distinct kernel compiled alone (empty cache), the {args.per_kernel} slowest:")
        from gptc.runtime.cache import KernelCache
        times = []
        for k in distinct.values():
            wall = time.perf_counter()
            compile_many([(k.code, k.symbol, (), k.origin)], target, jobs=1, cache=KernelCache(None))
            times.append((time.perf_counter() - wall, k.name, k.family, len(k.code)))
        times.sort(reverse=True)
        for t, name, family, size in times[:args.per_kernel]:
            print(f"  {t:6.2f} s  {name:<24} {family:<14} {size:>7} bytes")
        print(f"  sum {sum(t[0] for t in times):.2f} s over {len(times)} kernels")


if __name__ == "__main__":  # compile_many's hiprtc workers are spawned: they import this module
    main()
