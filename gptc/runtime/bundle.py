"""Kernel bundles: a directory holding everything needed to run a model on one target.

    manifest.json        format, gptc and compiler versions, target, spec, and per step
                         (train, eval, prefill and prefill_<L> for shorter prompts,
                         decode): buffers with arena offsets,
                         inputs/outputs, and the launch list (kernel, grid, block, args)
    spec.toml            the model and training spec
    kernels/<step>/*.hip the generated kernel sources, one per launch, each naming the
                         graph nodes it computes
    code/<symbol>.<ext>  code objects for the target (hsaco for AMD, cubin for NVIDIA),
                         one per distinct kernel
    executor.py          the generated executor: one straight-line function per step,
                         one line per launch

Loading a bundle never re-plans: it reads the manifest and the code objects. A bundle
made by another gptc version, or for another target than the device's, is refused."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from gptc.common import VERSION, make_temp_dir
from gptc.compiler.codegen.kernels import KernelSource, render_plan, render_template
from gptc.target import Target
from gptc.runtime.build import compile_kernels, plan_table, share_persistent
from gptc.runtime.executor import Arenas, GpuExecutor
from gptc.runtime.manifest import manifest_error
from gptc.compiler.parallel import SINGLE, Parallel
from gptc.models import build_graph, prefill_lengths
from gptc.compiler.planner import make_plan
from gptc.spec import GptcError, Spec, spec_from_dict, spec_to_toml

FORMAT = 5  # 2: plan tables name the bounds of their id inputs; 3: and the shapes of their outputs;
# 4: launches name their dynamic shared memory, targets the most a block may opt in to; 5: and the
# parameters that are TMA tensor maps
CODE_SUFFIX = {"amd": "hsaco", "nvidia": "cubin"}


class BundleError(GptcError):
    pass


def spec_dict(spec: Spec) -> dict:
    d = asdict(spec)
    d["train"]["betas"] = list(d["train"]["betas"])
    return d


@dataclass(frozen=True)
class RenderedBundle:
    """A bundle before its kernels are compiled: the manifest (all but the code objects),
    the kernels of every step and the executor module. Everything the compiler gets
    comes from these, so key() names the bundle they make."""
    spec: Spec
    manifest: dict
    kernels: dict[str, list[KernelSource]]
    executor: str

    @property
    def target(self) -> Target:
        return Target(**self.manifest["target"])

    def key(self) -> str:
        """sha256 over the kernels, plan tables, compiler, target and spec."""
        kernels = {step: [[k.name, k.source, k.code] for k in ks] for step, ks in self.kernels.items()}
        content = json.dumps([self.manifest, kernels, self.executor], sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()


def prefill_step_name(spec: Spec, length: int) -> str:
    """The bundle step of the prefill of `length` tokens: "prefill" for the whole context."""
    return "prefill" if length == spec.model.seq_len else f"prefill_{length}"


def prefill_steps(spec: Spec, steps) -> list[tuple[int, str]]:
    """(length, step name) of the prefill steps among `steps` (names)."""
    return [(n, prefill_step_name(spec, n)) for n in range(1, spec.model.seq_len + 1)
            if prefill_step_name(spec, n) in steps]


def render_bundle(spec: Spec, target: Target, compiler: str, fuse: bool = True,
                  log: Callable[[str], None] = print, sample_batch: int = 1, sink: int = 0,
                  parallel: Parallel = SINGLE) -> RenderedBundle:
    """Plan and render every step of `spec` for `target`; no compiler runs. Prefill
    and decode take `sample_batch` sequences (gptc generate --batch), with a streaming
    cache keeping `sink` first tokens when sink > 0 (--past-context stream). `parallel`:
    the training step of one rank of a data-parallel run (its collectives call the
    communicator that Bundle.open gets)."""
    batch = spec.train.batch_size
    graphs = {"train": build_graph(spec, "train", batch, parallel=parallel), "eval": build_graph(spec, "eval", batch)}
    for n in prefill_lengths(spec, sink):
        graphs[prefill_step_name(spec, n)] = build_graph(spec, "prefill", sample_batch, n, sink=sink, sample=True)
    graphs["decode"] = build_graph(spec, "decode", sample_batch, sink=sink, sample=True)
    tables, kernels = {}, {}
    for step, graph in graphs.items():
        plan = make_plan(graph, fuse)
        kernels[step] = render_plan(plan, target)
        tables[step] = plan_table(plan, kernels[step])
        log(f"  {step:<8} {len(kernels[step]):>4} kernels, {len({k.symbol for k in kernels[step]}):>4} distinct, "
            f"activations {plan.peak_activation_bytes / 2**20:,.1f} MiB")
    share_persistent(list(tables.values()))
    manifest = {
        "format": FORMAT,
        "versions": {"gptc": VERSION, "compiler": compiler},
        "target": target.to_dict(),
        "fused": fuse,
        "spec": spec_dict(spec),
        "steps": tables,
        **({"sink": sink} if sink else {}),
    }
    if parallel.world > 1:
        manifest["parallel"] = {"world": parallel.world, "zero1": parallel.zero1,
                                **({"rank": parallel.rank} if parallel.zero1 else {})}
    return RenderedBundle(spec, manifest, kernels, render_executor(manifest))


BUNDLE_ENTRIES = {"manifest.json", "spec.toml", "executor.py", "kernels", "code"}


def check_output_dir(out: Path) -> None:
    """Refuse, before any work, a bundle path that cannot be written or that holds
    anything a new bundle would replace other than an older bundle."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BundleError(f"'{out}' exists and is not a directory; choose a new or empty directory")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in BUNDLE_ENTRIES)
        if others:
            raise BundleError(f"'{out}' holds files that are not part of a bundle ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); choose a new or empty directory")
    # the bundle is written next to `out` and renamed into place: the nearest existing
    # folder above it must take new entries
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BundleError(f"cannot create '{out}': '{parent}' is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"cannot create '{out}': no permission to write in '{parent}'")


def compile_bundle(spec: Spec, out_dir: str | os.PathLike, target: Target, fuse: bool = True,
                   log: Callable[[str], None] = print, sample_batch: int = 1, sink: int = 0) -> Path:
    """Plan, render and compile every step of `spec` for `target` into a bundle at `out_dir`."""
    out = Path(out_dir)
    check_output_dir(out)
    started = time.perf_counter()
    write_bundle(render_bundle(spec, target, available_compiler(target), fuse, log, sample_batch, sink), out, log)
    log(f"bundle written to {out} ({time.perf_counter() - started:.1f} s)")
    return out


def available_compiler(target: Target) -> str:
    """The id of the compiler for `target`; BundleError when it is not installed."""
    from gptc.runtime.device import compiler_available
    ok, compiler = compiler_available(target.vendor)
    if not ok:
        raise BundleError(compiler.splitlines()[0])
    return compiler


def compile_progress(log: Callable[[str], None]) -> Callable[[int, int], None]:
    """progress(done, total) for compile_many that logs a line at every tenth of the kernels."""
    started = time.perf_counter()
    shown = [-1]

    def progress(done: int, total: int) -> None:
        tenth = 10 * done // total
        if tenth != shown[0]:
            shown[0] = tenth
            log(f"  compiled {done:>4} of {total} kernels ({time.perf_counter() - started:.1f} s)")
    return progress


def write_bundle(rendered: RenderedBundle, out: Path, log: Callable[[str], None] = print) -> None:
    """Compile the kernels of `rendered` and write the bundle at `out` (into a temporary
    directory first, then moved into place)."""
    target = rendered.target
    code = compile_kernels([k for ks in rendered.kernels.values() for k in ks], target, compile_progress(log))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        suffix = CODE_SUFFIX[target.vendor]
        (tmp / "code").mkdir()
        for symbol, obj in sorted(code.items()):
            (tmp / "code" / f"{symbol}.{suffix}").write_bytes(obj)
        for step, kernels in rendered.kernels.items():
            (tmp / "kernels" / step).mkdir(parents=True)
            for k in kernels:
                (tmp / "kernels" / step / f"{k.name}.hip").write_text(k.source)
        manifest = {**rendered.manifest, "code": {
            s: {"file": f"code/{s}.{suffix}", "sha256": hashlib.sha256(o).hexdigest()} for s, o in sorted(code.items())}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        (tmp / "spec.toml").write_text(spec_to_toml(rendered.spec))
        (tmp / "executor.py").write_text(rendered.executor)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"cannot write the bundle to '{out}': {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def render_executor(manifest: dict) -> str:
    return render_template("executor.py.j2", manifest=manifest, steps=list(manifest["steps"]))


class Bundle:
    """A bundle read from disk (manifest only; code objects load when a device opens it)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"'{path}' is not a gptc bundle (no manifest.json); make one with gptc compile")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise BundleError(f"the manifest of bundle '{path}' is corrupt; compile the bundle again") from None
        if not isinstance(self.manifest, dict):
            raise BundleError(f"the manifest of bundle '{path}' is damaged: it should be an object; "
                              "compile the bundle again")
        versions = self.manifest.get("versions")
        version = versions.get("gptc") if isinstance(versions, dict) else None
        form = self.manifest.get("format")
        if form != FORMAT or version != VERSION:
            raise BundleError(f"bundle '{path}' was made by gptc {version} (bundle format {form}), this is gptc "
                              f"{VERSION} (format {FORMAT}); compile it again with this version")
        problem = manifest_error(self.manifest)
        if problem:
            raise BundleError(f"the manifest of bundle '{path}' is damaged: {problem}; compile the bundle again")
        self.spec: Spec = spec_from_dict(self.manifest["spec"])
        self.target = Target(**self.manifest["target"])
        self.tables: dict[str, dict] = self.manifest["steps"]

    def check_device(self, device) -> None:
        if device.target.arch != self.target.arch or device.target.vendor != self.target.vendor:
            raise BundleError(f"bundle '{self.path}' is compiled for {self.target.name}, but this device is "
                              f"{device.target.name}; compile it again with --target {device.target.name}")

    def code(self) -> dict[str, bytes]:
        objects = {}
        for symbol, entry in self.manifest["code"].items():
            file = self.path / entry["file"]
            data = file.read_bytes() if file.is_file() else b""
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise BundleError(f"code object {entry['file']} of bundle '{self.path}' is missing or corrupt; "
                                  "compile the bundle again")
            objects[symbol] = data
        return objects

    def executor_module(self):
        spec = importlib.util.spec_from_file_location(f"gptc_bundle_{abs(hash(str(self.path)))}", self.path / "executor.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def open(self, device, params: Mapping[str, np.ndarray] | None = None, use_graph: bool = True,
             comm=None) -> "BundleRuntime":
        """The steps on `device`; `comm` (gptc.runtime.comm.Communicator) runs the
        collectives of a multi-GPU bundle's training step."""
        self.check_device(device)
        return BundleRuntime(self, device, params, use_graph, comm)


class BundleRuntime:
    """The steps of a bundle on a device, sharing one persistent arena: params written
    once are seen by every step; the KV cache written by prefill is read by decode."""

    def __init__(self, bundle: Bundle, device, params: Mapping[str, np.ndarray] | None, use_graph: bool,
                 comm=None) -> None:
        self.bundle, self.device = bundle, device
        code = bundle.code()
        module = bundle.executor_module()
        self.arenas = Arenas(device, list(bundle.tables.values()))
        self.steps: dict[str, GpuExecutor] = {
            step: GpuExecutor(table, device, code, self.arenas, use_graph, launch_step=getattr(module, step), comm=comm)
            for step, table in bundle.tables.items()}
        if params is not None:
            self.steps["train"].write({n: params[n] for n in self.steps["train"].table["params"]})

    def close(self) -> None:
        for ex in self.steps.values():
            ex.close()
        self.arenas.close()


def cached_bundle(spec: Spec, device, log: Callable[[str], None] = print, sample_batch: int = 1,
                  sink: int = 0, parallel: Parallel = SINGLE) -> Bundle:
    """The bundle of `spec` for the device's target, compiled once into gptc's cache at
    bundles/<RenderedBundle.key()>: the steps are planned and rendered every time (cheap
    next to compiling), so a changed template, planner or compiler makes a new bundle."""
    from gptc.runtime.cache import cache_root
    rendered = render_bundle(spec, device.target, available_compiler(device.target), log=lambda line: None,
                             sample_batch=sample_batch, sink=sink, parallel=parallel)
    root = cache_root() or Path(tempfile.mkdtemp(prefix="gptc-"))  # caching off: a fresh directory
    path = root / "bundles" / rendered.key()[:16]
    if not (path / "manifest.json").is_file():
        log(f"compiling the model for {device.target.name} into {path}")
        write_bundle(rendered, path, log)
    return Bundle(path)
