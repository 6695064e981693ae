"""What one `gptc bench` run measures: the model, the step kinds, the frameworks
compared, how many timed steps, and the command-line values that choose them."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from gptc.spec import GptcError, Spec, load_spec, preset, validate

WHATS = ("train", "infer")
COMPARES = ("unfused", "torch-eager", "torch-compile", "torch-cudagraphs")
FRAMEWORKS = {  # result key -> label
    "gptc-fused": "gptc fused",
    "gptc-unfused": "gptc unfused",
    "torch-eager": "torch eager",
    "torch-compile": "torch.compile",
    "torch-cudagraphs": "torch.compile + CUDA graph",
}
WHAT_LABEL = {"train": "training step (forward + loss + backward + AdamW)", "infer": "inference forward (logits, no KV cache)"}
KERNEL_LAUNCHES = 10   # launches of one kernel per captured graph, for per-kernel times
KERNEL_REPLAYS = 5     # replays of that graph; the median over them, / KERNEL_LAUNCHES


@dataclass
class BenchConfig:
    spec: Spec
    name: str = "hipgpt"                       # what the figures call the model
    what: tuple[str, ...] = WHATS
    compare: tuple[str, ...] = COMPARES
    repeats: int = 20                          # at least this many timed steps per figure
    budget_ms: float = 1000.0                  # ... or as many as fit in this much time (<= measure.MAX_SAMPLES)
    seed: int = 0
    per_kernel: bool = True

    @property
    def batch(self) -> int:
        return self.spec.train.batch_size


def parse_list(text: str | None, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'), each checked against `allowed`; None or 'all' -> all."""
    if text is None or text.strip() == "all":
        return tuple(allowed)
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    for s in items:
        if s not in allowed:
            raise GptcError(f"--{what}: unknown value '{s}'; choose from {', '.join(allowed)}")
    return items


def resolve_spec(value: str | None, batch: int | None = None) -> tuple[Spec, str]:
    """--preset NAME|SPEC: a preset name or a spec TOML file; (spec, name for figures)."""
    value = value or "hipgpt"
    if value.endswith(".toml") or os.sep in value or Path(value).is_file():
        spec, name = load_spec(value), Path(value).stem
    else:
        spec, name = preset(value), value
    if batch is not None:
        spec = validate(replace(spec, train=replace(spec.train, batch_size=batch)))
    return spec, name


def model_summary(spec: Spec) -> str:
    m = spec.model
    tied = ", tied" if m.tie_embeddings else ""
    return f"E{m.d_model} L{m.n_layers} H{m.n_heads} F{m.d_ff} V{m.vocab_size} S{m.seq_len}{tied}"
