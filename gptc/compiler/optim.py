"""The optimizer as graph ops: global gradient-norm clipping and AdamW, appended to a
forward graph after autodiff, so one training graph holds the whole step and the
planner can fuse the update like any other code.

Per step the host feeds two scalars: `lr` (the schedule's value) and `step` (1-based,
for Adam's bias correction). AdamW follows PyTorch's torch.optim.AdamW exactly:
p <- p - lr*wd*p; m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
p <- p - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)."""
from __future__ import annotations

import math

from gptc.compiler.autodiff import gradients
from gptc.compiler.ir import Graph, Tensor
from gptc.spec import TrainSpec


def decays(train: TrainSpec, shape: tuple[int, ...]) -> bool:
    """Whether weight decay applies to a parameter of this shape."""
    return {"all": True, "none": False, "matrices": len(shape) >= 2}[train.decay] and train.weight_decay > 0


def add_training(graph: Graph, loss: Tensor, train: TrainSpec, expose_gradients: bool = False,
                 objective: Tensor | None = None) -> None:
    """Append backward, clipping and AdamW to `graph`: outputs "loss" and "grad_norm"
    (and "grad.<name>" of every param with expose_gradients, for tests); updates every
    param and its moments "m.<name>" and "v.<name>". The gradients are those of
    `objective` (default: the loss; a mixture of experts adds its auxiliary loss)."""
    names = list(graph.params)
    params = [Tensor(graph, graph.params[n]) for n in names]
    grads = gradients(loss if objective is None else objective, params)
    graph.output("loss", loss)
    if expose_gradients:
        for name, g in zip(names, grads):
            if g is not None:
                graph.output(f"grad.{name}", g)
    with graph.scope("optimizer"):
        lr = graph.input("lr", ())
        # The forward pass may have created "step" already (dropout keys its masks by it).
        step = Tensor(graph, graph.inputs["step"]) if "step" in graph.inputs else graph.input("step", ())
        live = [(n, p, g) for n, p, g in zip(names, params, grads) if g is not None]
        norm = sum((g * g).sum() for _, _, g in live).sqrt()
        graph.output("grad_norm", norm)
        if train.grad_clip > 0:
            # As torch.nn.utils.clip_grad_norm_: scale by min(1, clip / (norm + 1e-6)).
            ratio = train.grad_clip / (norm + 1e-6)
            scale = (ratio < 1.0).where(ratio, 1.0)
        b1, b2 = train.betas
        # 1 - beta^t computed in the graph from the fed step: exp(t * ln beta).
        correction1 = 1.0 - (step * math.log(b1)).exp() if b1 > 0 else graph.const(1.0)
        correction2 = 1.0 - (step * math.log(b2)).exp() if b2 > 0 else graph.const(1.0)
        for name, p, g in live:
            with graph.scope(f"adamw.{name}"):
                if train.grad_clip > 0:
                    g = g * scale
                m = graph.state(f"m.{name}", p.shape) * b1 + g * (1.0 - b1)
                v = graph.state(f"v.{name}", p.shape) * b2 + g * g * (1.0 - b2)
                if decays(train, p.shape):
                    p = p * (1.0 - lr * train.weight_decay)
                update = (m / correction1) / ((v / correction2).sqrt() + train.eps)
                graph.updates[name] = (p - update * lr).id
                graph.updates[f"m.{name}"] = m.id
                graph.updates[f"v.{name}"] = v.id
