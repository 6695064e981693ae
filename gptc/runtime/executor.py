"""Running compiled plans on a GPU: arenas, buffers, launches, graph capture and replay.

The executor neither plans, renders nor compiles: it works from a plan *table*: plain, JSON-serialisable data (buffers with
arena offsets, named inputs/outputs/params/states, and the launch list) that a bundle's
manifest stores, so loading a bundle never re-plans (gptc/runtime/build.py makes them). Several tables (the training step,
evaluation, prefill and decode of one model) share one persistent arena (params,
optimizer state, KV cache) and one activation arena, since they never run at once."""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from gptc.compiler.ops.numeric import round_to_bf16
from gptc.runtime.device import Device, ptr
from gptc.spec import GptcError
from gptc.runtime.feeds import check_bounds

HOST_DTYPE = {"f32": np.float32, "i32": np.int32, "bool": np.bool_, "f64": np.float64, "bf16": np.uint16}


def to_storage(array: np.ndarray, dtype: str) -> np.ndarray:
    """Host array in the layout of a device buffer of `dtype` (bf16: upper 16 bits)."""
    if dtype == "bf16":
        return (round_to_bf16(np.asarray(array, np.float32)).view(np.uint32) >> 16).astype(np.uint16)
    return np.ascontiguousarray(array, dtype=HOST_DTYPE[dtype])


def from_storage(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def check_inputs(table: dict, inputs: Mapping[str, np.ndarray]) -> None:
    """Refuse, before anything is uploaded, inputs a plan table cannot run on: a missing
    one (KeyError), or ids outside the bounds the graph gave them (InputError)."""
    missing = sorted(set(table["inputs"]) - set(inputs))
    if missing:
        raise KeyError(f"no value fed for {', '.join(missing)}")
    check_bounds(inputs, table["bounds"])


class DeviceMemoryError(GptcError):
    pass


def check_fits(device: Device, persistent: int, activations: int) -> None:
    """Refuse, before allocating anything, a model whose arenas exceed the device's free memory."""
    free, total = device.memory_info()
    if persistent + activations > free:
        gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
        raise DeviceMemoryError(
            f"the model needs {gib(persistent + activations)} of GPU memory (parameters and optimizer state "
            f"{gib(persistent)}, activations {gib(activations)}), but {device.name} has {gib(free)} free of "
            f"{gib(total)}; use a smaller batch (--batch) or model")


class Arenas:
    """Device memory shared by the plans of one model: one persistent and one
    activation arena; io buffers are per plan."""

    def __init__(self, device: Device, tables: Sequence[dict]) -> None:
        self.device = device
        sizes = {arena: max(max(t["arena_bytes"][arena] for t in tables), 256) for arena in ("persistent", "activations")}
        check_fits(device, sizes["persistent"], sizes["activations"] + sum(t["arena_bytes"]["io"] for t in tables))
        self.base = {}
        for arena, size in sizes.items():
            self.base[arena] = device.alloc(size)
            if arena == "persistent":
                device.memset(self.base[arena], 0, size)  # optimizer state and KV cache start at zero

    def close(self) -> None:
        for address in self.base.values():
            self.device.free(address)
        self.base = {}


class GpuExecutor:
    """Runs one plan table. `code` maps kernel symbols to code objects. `launch_step`,
    when given, issues the launches (the generated executor.py's function for this
    plan); otherwise they are issued in table order. The first launch() records them
    into a device graph; later ones replay it.

    `comm` (gptc.runtime.comm.Communicator) runs the collective launches of a
    multi-GPU step: each on the device's side stream (the communication stream), forked
    from the step's stream after the kernels before it, and joined back before the first
    launch that reads its results ("waits" in the table), so it runs beside the
    backward; inside a capture the fork and join become edges of the device graph."""

    def __init__(self, table: dict, device: Device, code: Mapping[str, bytes], arenas: Arenas,
                 use_graph: bool = True, launch_step: Callable[["GpuExecutor"], None] | None = None,
                 comm=None) -> None:
        if comm is None and any(e["family"] == "collective" for e in table["launches"]):
            raise GptcError("this step holds collectives: it runs only in a multi-GPU run (with a communicator)")
        self.table, self.device, self.arenas = table, device, arenas
        self.io_base = device.alloc(max(table["arena_bytes"]["io"], 256))
        self.comm = comm
        self.collectives: dict[int, list[tuple]] = {}
        self.events: dict[int, tuple] = {}  # collective launch -> (fork event, join event)
        self._functions: dict[str, object] = {}
        for index, entry in enumerate(table["launches"]):
            if entry["family"] == "collective":
                self.collectives[index] = [(c["op"], self.address(c["send"]), self.address(c["recv"]), c["count"],
                                            c["dtype"]) for c in entry["collective"]]
                self.events[index] = (device.event(), device.event())
                device.side_stream()  # made now: not while a capture runs
            elif entry["symbol"] not in self._functions:
                self._functions[entry["symbol"]] = device.get_function(device.load_module(code[entry["symbol"]]),
                                                                        entry["symbol"])
        self.bound = self._bind({})
        # The inputs lead the io arena (planner/schedule.py): one staging copy of them,
        # uploaded whole, is one host-to-device copy a step (not one per input).
        self._inputs = [(name, b, table["buffers"][b]) for name, b in sorted(table["inputs"].items())]
        self._staging = np.zeros(max((b["offset"] + b["nbytes"] for _, _, b in self._inputs), default=0), np.uint8)
        assert all(b["arena"] == "io" for _, _, b in self._inputs)
        self.use_graph = use_graph
        self.launch_step = launch_step
        self._graphs: dict[object, object] = {}  # None: the step's own; chains: by length, link and outputs
        self._chains: dict[tuple, _Chain] = {}
        self._current = self.bound
        self.device_name = device.name

    # ----- memory -------------------------------------------------------------
    def address(self, buffer: str) -> int:
        buf = self.table["buffers"][buffer]
        base = self.io_base if buf["arena"] == "io" else self.arenas.base[buf["arena"]]
        return base + buf["offset"]

    def _bind(self, moved: Mapping[str, int]) -> "_Bound":
        """The step's launches with buffer addresses (those in `moved` elsewhere)."""
        address = lambda b: moved.get(b) or self.address(b)  # noqa: E731

        def arg(entry: dict, i: int, buffer: str):
            """Parameter i of a launch: its buffer's address, or a tensor map of the buffer."""
            tm = entry["tensor_maps"].get(str(i))
            if tm is None:
                return ptr(address(buffer))
            return self.device.tensor_map(address(buffer) + 2 * tm["offset"], tm["dims"], tm["strides"], tm["box"])

        launches = [None if index in self.collectives else self.device.prepare_launch(
                        self._functions[entry["symbol"]], tuple(entry["grid"]), tuple(entry["block"]), entry["shared"],
                        [arg(entry, i, b) for i, b in enumerate(entry["args"])], name=entry["kernel"])
                    for index, entry in enumerate(self.table["launches"])]
        clears = [[(address(b), self.table["buffers"][b]["nbytes"]) for b in entry["clear"]]
                  for entry in self.table["launches"]]
        return _Bound(launches, clears)

    def upload(self, buffer: str, array: np.ndarray) -> None:
        self.device.upload(self.address(buffer), self._stored(buffer, array))

    def _stored(self, buffer: str, array: np.ndarray) -> np.ndarray:
        """`array` in the device layout of `buffer`, checked against its shape."""
        buf = self.table["buffers"][buffer]
        host = to_storage(array, buf["dtype"])
        if host.size != int(np.prod(buf["shape"])):
            raise ValueError(f"{buf['role'] or buffer}: got shape {host.shape}, the plan needs {tuple(buf['shape'])}")
        return host

    def download(self, buffer: str) -> np.ndarray:
        buf = self.table["buffers"][buffer]
        raw = np.empty(buf["shape"], dtype=HOST_DTYPE[buf["dtype"]])
        self.device.download(self.address(buffer), raw)
        return from_storage(raw, buf["dtype"])

    # ----- running ------------------------------------------------------------
    def run_kernel(self, index: int) -> None:
        """Launch kernel `index` of the table (clearing its scatter target first), or
        issue collective launch `index` on the communication stream."""
        dev = self.device
        for c in self.table["launches"][index].get("waits", ()):
            self._join(c)
        if index in self.collectives:
            fork, done = self.events[index]
            dev.record_on(fork, dev.stream)  # after the kernels producing its operands
            dev.wait_for(dev.side_stream(), fork)
            self.comm.group(self.collectives[index], dev.side_stream())
            dev.record_on(done, dev.side_stream())
            self._pending.append(index)
            return
        for address, nbytes in self._current.clears[index]:
            dev.memset(address, 0, nbytes)
        self._current.launches[index].launch()

    def _join(self, index: int) -> None:
        if index in self._pending:
            self._pending.remove(index)
            self.device.wait_for(self.device.stream, self.events[index][1])

    def _connect(self) -> None:
        """Issue every collective launch once, eagerly, before the capture: NCCL sets up
        its connections (per algorithm and protocol) on first use, which must not happen
        inside a capture (as PyTorch warms NCCL up before torch.cuda.graph). Every rank
        issues the same calls in the same order; they write only buffers each step
        writes again before reading."""
        dev = self.device
        for index in sorted(self.collectives):
            self.comm.group(self.collectives[index], dev.side_stream())
        done = self.events[min(self.collectives)][1]
        dev.record_on(done, dev.side_stream())
        dev.wait_for(dev.stream, done)
        dev.synchronize()

    def _launch_all(self, bound: "_Bound") -> None:
        self._pending: list[int] = []
        self._current = bound
        try:
            if self.launch_step is not None:
                self.launch_step(self)
            else:
                for i in range(len(bound.launches)):
                    self.run_kernel(i)
            for index in list(self._pending):  # the step ends when its communication has
                self._join(index)
        finally:
            self._current = self.bound

    def launch(self) -> None:
        """Queue one execution of every kernel (graph replay after the first)."""
        self._queue(None, [self.bound])

    def _queue(self, key: object, steps: Sequence["_Bound"]) -> None:
        """Queue `steps` one after the other: recorded into a device graph (kept under
        `key`) the first time, replayed after."""
        if not self.use_graph:
            for bound in steps:
                self._launch_all(bound)
            return
        if key not in self._graphs:
            if self.collectives:
                self._connect()
            self.device.begin_capture()
            try:
                for bound in steps:
                    self._launch_all(bound)
            finally:
                self._graphs[key] = self.device.end_capture()
        self.device.replay(self._graphs[key])

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One step; reads back the outputs named in `outputs` (default: all of them)."""
        check_inputs(self.table, inputs)
        for name, buffer, buf in self._inputs:
            host = self._stored(buffer, np.asarray(inputs[name]))
            self._staging[buf["offset"]:buf["offset"] + buf["nbytes"]] = host.reshape(-1).view(np.uint8)
        if self._staging.size:
            self.device.upload(self.io_base, self._staging)
        self.launch()
        shapes = self.table["output_shapes"]
        names = self.table["outputs"] if outputs is None else outputs
        return {name: self.download(self.table["outputs"][name]).reshape(shapes[name]) for name in names}

    def run_chain(self, feeds: Mapping[str, np.ndarray], link: Mapping[str, str],
                  outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Several steps queued at once, with one upload, one device graph and one
        read-back for all: feeds[name] holds every step's value of input `name` along a
        leading axis (the chain's length). Step i > 0 reads each input `name` of `link`
        from step i-1's output link[name] on the device (generation feeds each drawn
        token to the next step without a host round trip; the values fed for it are not
        read). Returns each of `outputs`, with the same leading axis. Each step has its
        own inputs and `outputs`; the other outputs are shared (left as the last step's)."""
        if self.collectives:
            raise GptcError("a step with collectives runs one step at a time")
        check_inputs(self.table, feeds)
        unknown = sorted(set(link) - set(self.table["inputs"]))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an input of this step (a link feeds an input from an output)")
        length = len(np.asarray(feeds[self._inputs[0][0]]))
        key = (length, tuple(sorted(link.items())), tuple(outputs))
        if key not in self._chains:
            self._chains[key] = _Chain(self, length, link, outputs)
        chain = self._chains[key]
        staging = np.zeros((length, chain.input_stride), np.uint8)
        for name, buffer, buf in self._inputs:
            values = np.asarray(feeds[name])
            host = to_storage(values, buf["dtype"])
            if host.size % length or host.nbytes // length != buf["nbytes"]:
                raise ValueError(f"{name}: got shape {values.shape}, a chain of {length} steps needs "
                                 f"{(length, *buf['shape'])}")
            staging[:, buf["offset"]:buf["offset"] + buf["nbytes"]] = host.reshape(length, -1).view(np.uint8)
        self.device.upload(chain.base, staging)
        self._queue(key, chain.steps)
        raw = np.empty((length, chain.output_stride), np.uint8)
        self.device.download(chain.base + staging.nbytes, raw)
        result = {}
        for name, offset in chain.output_offsets.items():
            buf = self.table["buffers"][self.table["outputs"][name]]
            host = np.ascontiguousarray(raw[:, offset:offset + buf["nbytes"]]).view(HOST_DTYPE[buf["dtype"]])
            result[name] = from_storage(host, buf["dtype"]).reshape(length, *self.table["output_shapes"][name])
        return result

    def read(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Current values of params and states."""
        table = self.table["persistent"]
        return {n: self.download(table[n]) for n in (names or table)}

    def write(self, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            if name not in self.table["persistent"]:
                raise KeyError(f"'{name}' is not a param or state of this plan")
            self.upload(self.table["persistent"][name], value)

    def poison(self) -> None:
        """Fill activations and outputs with NaN bytes, so a value read before it is
        written shows up (tests call this before a launch)."""
        self.device.memset(self.arenas.base["activations"], 0xFF, max(self.table["arena_bytes"]["activations"], 256))
        for buffer in self.table["outputs"].values():
            self.device.memset(self.address(buffer), 0xFF, self.table["buffers"][buffer]["nbytes"])
        for chain in self._chains.values():
            self.device.memset(chain.base, 0xFF, chain.nbytes)

    def close(self) -> None:
        """Free the step's inputs, outputs and chains and destroy its captured graphs. A graph
        that captured collectives holds a reference on the communicator (NCCL's
        localPersistentRefs) that only its destruction drops: ncclCommDestroy and
        ncclCommAbort wait for it, so this must run before the communicator closes."""
        if self._graphs:
            self.device.synchronize()
            for graph in self._graphs.values():
                graph.release()
            self._graphs = {}
        for chain in self._chains.values():
            self.device.free(chain.base)
        self._chains = {}
        if self.io_base:
            self.device.free(self.io_base)
            self.io_base = 0


class _Bound(NamedTuple):
    """A step's prepared launches and its scatter targets' clears, for one placement of
    its buffers."""
    launches: list
    clears: list


class _Chain:
    """The device memory and launches of `length` chained steps (GpuExecutor.run_chain):
    one allocation holds every step's inputs (rows of input_stride bytes, laid out as
    the io arena's inputs) and then every step's `outputs` (rows of output_stride)."""

    def __init__(self, ex: GpuExecutor, length: int, link: Mapping[str, str], outputs: Sequence[str]) -> None:
        buffers, align = ex.table["buffers"], 256
        up = lambda n: -(-n // align) * align  # noqa: E731
        self.input_stride = up(max(ex._staging.size, 1))
        self.output_offsets, at = {}, 0
        for name in outputs:
            self.output_offsets[name] = at
            at += up(buffers[ex.table["outputs"][name]]["nbytes"])
        self.output_stride = at
        for name, output in link.items():
            if output not in self.output_offsets or (buffers[ex.table["inputs"][name]]["nbytes"]
                                                     != buffers[ex.table["outputs"][output]]["nbytes"]):
                raise ValueError(f"input {name} cannot be fed from output {output}: the output must be read back "
                                 f"and have the input's size")
        self.output_bytes = length * self.output_stride
        self.nbytes = length * self.input_stride + self.output_bytes
        self.base = ex.device.alloc(self.nbytes)
        outputs_base = self.base + length * self.input_stride
        self.steps = []
        for i in range(length):
            moved = {buffer: self.base + i * self.input_stride + buf["offset"]
                     for _, buffer, buf in ex._inputs}
            moved.update({ex.table["outputs"][name]: outputs_base + i * self.output_stride + offset
                          for name, offset in self.output_offsets.items()})
            if i:
                previous = outputs_base + (i - 1) * self.output_stride
                moved.update({ex.table["inputs"][name]: previous + self.output_offsets[output]
                              for name, output in link.items()})
            self.steps.append(ex._bind(moved))
