"""The NumPy reference executor: runs any graph, op by op, in float32 or float64.
Clear rather than fast: it is the oracle every generated kernel is checked against."""
from __future__ import annotations

import threading
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np

from gptc.compiler.ir import Graph
from gptc.compiler.ops import OPS
from gptc.compiler.ops.numeric import numpy_dtype
from gptc.runtime.feeds import check_bounds

T = TypeVar("T")


def run_graph(graph: Graph, feeds: Mapping[str, np.ndarray], float_dtype: type = np.float32,
              keep: bool = False) -> dict:
    """Evaluate `graph`. `feeds` gives a value for every input, param and state by name.
    Returns {"outputs": {name: array}, "updates": {name: array}} and, with keep=True,
    "values": {node id: array} for every node."""
    names = {**graph.inputs, **graph.params, **graph.states}
    missing = sorted(set(names) - set(feeds))
    if missing:
        raise KeyError(f"no value fed for {', '.join(missing)}")
    check_bounds(feeds, graph.input_bounds())
    values: dict[int, np.ndarray] = {}
    for nid in graph.topo_order():
        node = graph.node(nid)
        out_type = node["type"]
        if node["op"] in ("input", "param", "state"):
            value = np.asarray(feeds[node["attrs"]["name"]])
            if value.shape != out_type.shape:
                raise ValueError(f"'{node['attrs']['name']}' was fed shape {value.shape}, the graph needs {out_type.shape}")
        else:
            args = [values[i] for i in node["inputs"]]
            value = OPS[node["op"]].reference(args, node["attrs"], out_type, float_dtype)
        values[nid] = np.asarray(value, dtype=numpy_dtype(out_type.dtype, float_dtype))
    result = {"outputs": {k: values[v] for k, v in graph.outputs.items()},
              "updates": {k: values[v] for k, v in graph.updates.items()}}
    if keep:
        result["values"] = values
    return result


class ReferenceExecutor:
    """Runs a graph step after step, keeping params and states between steps (the CPU
    counterpart of the generated GPU executor)."""

    device_name = "cpu (NumPy reference executor)"

    def __init__(self, graph: Graph, params: Mapping[str, np.ndarray], float_dtype: type = np.float32) -> None:
        self.graph = graph
        self.float_dtype = float_dtype
        self.persistent: dict[str, np.ndarray] = {n: np.asarray(params[n], dtype=float_dtype) for n in graph.params}
        for name, nid in graph.states.items():
            self.persistent[name] = np.zeros(graph.type(nid).shape, dtype=float_dtype)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = run_graph(self.graph, {**inputs, **self.persistent}, self.float_dtype)
        self.persistent.update(result["updates"])
        return result["outputs"]

    def run_chain(self, feeds: Mapping[str, np.ndarray], link: Mapping[str, str],
                  outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Steps one after the other, as GpuExecutor.run_chain queues them: feeds[name]
        holds every step's value along a leading axis; step i > 0 takes each input
        `name` of `link` from step i-1's output link[name]. Returns `outputs` (default:
        all), stacked the same way."""
        results: list[dict[str, np.ndarray]] = []
        for i in range(len(next(iter(feeds.values())))):
            f = {name: np.asarray(value)[i] for name, value in feeds.items()}
            if results:
                f.update({name: results[-1][output].reshape(f[name].shape) for name, output in link.items()})
            results.append(self.run(f))
        return {name: np.stack([r[name] for r in results]) for name in (outputs or results[0])}

    def read(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Current values of params and states (copies)."""
        return {n: self.persistent[n].astype(np.float32) for n in (names or self.persistent)}

    def write(self, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            if name not in self.persistent:
                raise KeyError(f"'{name}' is not a param or state of this graph")
            self.persistent[name] = np.asarray(value, dtype=self.float_dtype).reshape(self.persistent[name].shape)

    def close(self) -> None:
        pass


def simulate_ranks(world: int, step: Callable[[int], T]) -> list[T]:
    """Run step(rank) for every rank of a simulated world of `world` ranks, each in a
    thread of its own whose reference collectives exchange with the others
    (ops/collective.py); the results in rank order. A rank that raises releases the
    others, and its exception is raised here."""
    from gptc.compiler.ops.collective import SimulatedWorld, use_world
    sim = SimulatedWorld(world)
    results: list = [None] * world
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            with use_world(sim, rank):
                results[rank] = step(rank)
        except threading.BrokenBarrierError:
            pass  # another rank failed first
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
            sim.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
