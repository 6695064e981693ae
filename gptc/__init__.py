"""gptc: compile GPT models written in a Python DSL into fused GPU kernels."""
from gptc.ir import Graph, Tensor, TensorType
from gptc.models import build_graph, init_params, param_count
from gptc.optim import add_training
from gptc.spec import GptcError, ModelSpec, Spec, SpecError, TrainSpec, load_spec, preset, save_spec

__version__ = "0.1.0"
__all__ = ["add_training", "Graph", "Tensor", "TensorType", "build_graph", "init_params", "param_count", "GptcError",
           "ModelSpec", "Spec", "SpecError", "TrainSpec", "load_spec", "preset", "save_spec", "__version__"]
