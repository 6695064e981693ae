"""gptc: compile GPT models written in a Python DSL into fused GPU kernels.

The public API; the layers below it (each imports only from those under it):
  gptc.common, gptc.target  helpers every layer may use (atomic writes, the Target)
  gptc.spec                 model and training specs, presets, TOML
  gptc.compiler             DSL, IR and ops, autodiff, optimizer, planner, codegen
  gptc.models               the GPT family, written in the DSL
  gptc.runtime              devices, kernel cache, executor, bundles, NumPy reference
  gptc.tools                CLI, trainer, sampler, data, tokenizer, checkpoints, bench
"""
from gptc.common import VERSION as __version__
from gptc.compiler import dsl
from gptc.compiler.ir import Graph, Tensor, TensorType
from gptc.compiler.optim import add_training
from gptc.models import build_graph, init_params, param_count
from gptc.spec import GptcError, ModelSpec, Spec, SpecError, TrainSpec, load_spec, preset, save_spec

__all__ = ["add_training", "dsl", "Graph", "Tensor", "TensorType", "build_graph", "init_params", "param_count",
           "GptcError", "ModelSpec", "Spec", "SpecError", "TrainSpec", "load_spec", "preset", "save_spec",
           "__version__"]
