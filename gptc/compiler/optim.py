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
from gptc.compiler.parallel import SINGLE, Parallel, gather_shard, global_mean, reduce_gradients, shard_of
from gptc.spec import TrainSpec


def decays(train: TrainSpec, shape: tuple[int, ...]) -> bool:
    """Whether weight decay applies to a parameter of this shape."""
    return {"all": True, "none": False, "matrices": len(shape) >= 2}[train.decay] and train.weight_decay > 0


def add_training(graph: Graph, loss: Tensor, train: TrainSpec, expose_gradients: bool = False,
                 objective: Tensor | None = None, parallel: Parallel = SINGLE) -> None:
    """Append backward, clipping and AdamW to `graph`: outputs "loss" and "grad_norm"
    (and "grad.<name>" of every param with expose_gradients, for tests); updates every
    param and its moments "m.<name>" and "v.<name>". The gradients are those of
    `objective` (default: the loss; a mixture of experts adds its auxiliary loss).
    With parallel.world > 1 the graph is rank parallel.rank's part of a data-parallel
    step (compiler/parallel.py): loss, gradients and norm are global; with ZeRO-1 the
    moments hold this rank's slice of each parameter only."""
    names = list(graph.params)
    params = [Tensor(graph, graph.params[n]) for n in names]
    grads = gradients(loss if objective is None else objective, params)
    if expose_gradients:
        for name, g in zip(names, grads):
            if g is not None:
                graph.output(f"grad.{name}", g)
    live = [(n, p, g) for n, p, g in zip(names, params, grads) if g is not None]
    par = parallel
    if par.world > 1:
        with graph.scope("data_parallel"):
            reduced, bucket = reduce_gradients(graph, [g for _, _, g in live], par)
            live = [(n, p, g) for (n, p, _), g in zip(live, reduced)]
            loss = global_mean(loss, par, bucket)
            bucket += 1
            if "aux_loss" in graph.outputs:
                graph.output("aux_loss", global_mean(Tensor(graph, graph.outputs["aux_loss"]), par, bucket))
                bucket += 1
    graph.output("loss", loss)
    with graph.scope("optimizer"):
        lr = graph.input("lr", ())
        # The forward pass may have created "step" already (dropout keys its masks by it).
        step = Tensor(graph, graph.inputs["step"]) if "step" in graph.inputs else graph.input("step", ())
        squares = sum((g * g).sum() for _, _, g in live)
        if par.zero1 and par.world > 1:  # each rank holds a slice of every gradient
            squares = Tensor(graph, graph.add("all_reduce", [squares.id], world=par.world, bucket=bucket))
            bucket += 1
        norm = squares.sqrt()
        graph.output("grad_norm", norm)
        if train.grad_clip > 0:
            # As torch.nn.utils.clip_grad_norm_: scale by min(1, clip / (norm + 1e-6)).
            ratio = train.grad_clip / (norm + 1e-6)
            scale = (ratio < 1.0).where(ratio, 1.0)
        b1, b2 = train.betas
        # 1 - beta^t computed in the graph from the fed step: exp(t * ln beta).
        correction1 = 1.0 - (step * math.log(b1)).exp() if b1 > 0 else graph.const(1.0)
        correction2 = 1.0 - (step * math.log(b2)).exp() if b2 > 0 else graph.const(1.0)
        sharded = par.zero1 and par.world > 1
        for name, whole, g in live:
            with graph.scope(f"adamw.{name}"):
                p = shard_of(whole, par) if sharded else whole
                if train.grad_clip > 0:
                    g = g * scale
                m = graph.state(f"m.{name}", p.shape) * b1 + g * (1.0 - b1)
                v = graph.state(f"v.{name}", p.shape) * b2 + g * g * (1.0 - b2)
                if decays(train, whole.shape):
                    p = p * (1.0 - lr * train.weight_decay)
                update = (m / correction1) / ((v / correction2).sqrt() + train.eps)
                new = p - update * lr
                graph.updates[name] = (gather_shard(new, whole, par, bucket) if sharded else new).id
                graph.updates[f"m.{name}"] = m.id
                graph.updates[f"v.{name}"] = v.id
