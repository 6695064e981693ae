"""Reverse-mode differentiation over the IR graph.

The backward pass is built from the same primitive ops as the forward pass (each op's
VJP is written with Tensor handles), so the planner can fuse it like any other code.
Nodes of the backward pass are tagged with the scope of the forward node they
differentiate plus "#bwd", so a kernel of the backward pass traces back to the model
source too."""
from __future__ import annotations

from typing import Sequence

from gptc.compiler.ir import Graph, Tensor
from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import SOURCE


def gradients(loss: Tensor, wrt: Sequence[Tensor]) -> list[Tensor | None]:
    """d loss / d w for each w in `wrt` (None where the loss does not depend on w).
    A tensor used several times gets the sum of the gradients of its uses."""
    graph: Graph = loss.graph
    if loss.shape != ():
        raise ValueError(f"the loss must be a scalar, got {loss.type}")
    wrt_ids = [w.id for w in wrt]
    # No gradient flows through stop_gradient: nodes that depend on a w only through one
    # need no gradient (and no VJP is built for them).
    needs_grad = graph.reachable(wrt_ids, through=lambda n: graph.op(n) != "stop_gradient")
    on_path = graph.reachable([loss.id], forward=False) & needs_grad

    grads: dict[int, Tensor] = {loss.id: graph.const(1.0, loss.dtype)}
    for nid in reversed(graph.topo_order()):
        if nid not in on_path or nid not in grads:
            continue
        node = graph.node(nid)
        vjp = OPS[node["op"]].vjp
        if vjp is None:
            if OPS[node["op"]].kind != SOURCE:  # the inference-only ops (decoding, sampling)
                raise ValueError(f"{graph.describe(nid)}: {node['op']} has no gradient (an inference-only op); "
                                 "a loss cannot depend on it")
            continue  # a source: its gradient is final
        inputs = [Tensor(graph, i) for i in node["inputs"]]
        with graph.replace_scope(node["scope"] + "#bwd"):
            in_grads = vjp(node["attrs"], Tensor(graph, nid), grads[nid], *inputs)
            for src, g in zip(node["inputs"], in_grads):
                if g is None or src not in on_path:
                    continue
                if g.shape != graph.type(src).shape:
                    raise AssertionError(f"VJP of {graph.describe(nid)} gave shape {g.shape} for %{src}")
                grads[src] = grads[src] + g if src in grads else g
    return [grads.get(w) for w in wrt_ids]
