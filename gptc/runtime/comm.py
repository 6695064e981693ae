"""Multi-GPU: the launch environment, the rendezvous, and the collective library.

A data-parallel run is one process per GPU. Each process learns its place from the
environment the standard launchers set: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (torchrun; `gptc train --gpus N` sets the same), or Slurm's SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID (srun) or Open MPI's OMPI_COMM_WORLD_RANK, _SIZE,
_LOCAL_RANK (mpirun) when RANK is not set (MASTER_ADDR and MASTER_PORT are then the
user's to export).

Rendezvous: rank 0 makes the library's unique id and serves it over TCP on
MASTER_ADDR:MASTER_PORT (a few lines of the standard library); every other rank
connects, retrying until rank 0 listens, and reads it. Under torchrun, whose agent
already serves its own store on MASTER_PORT, gptc uses MASTER_PORT + 1.

The collective libraries, imported only when a run has more than one rank (neither is
installable without a GPU):
- NVIDIA: NCCL through nccl4py (NVIDIA's bindings; pinned in pyproject's `multi-gpu`
  extra); libnccl comes from the nvidia-nccl-cu12 wheel.
- AMD: RCCL through hip-python's `hip.rccl` module (the same C API). RCCL inside HIP
  graph capture was opt-in (RCCL_ENABLE_HIPGRAPH=1) in older ROCm releases; check yours.
Both are called with raw device pointers and the stream, on the executor's
communication stream, inside the step's captured device graph."""
from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from gptc.spec import GptcError, SpecError

# ncclDataType_t and ncclRedOp_t values (the C ABI, the same in RCCL).
NCCL_DTYPES = {"f32": 7, "f64": 8, "bf16": 9}
NCCL_SUM = 0


class RankFailure(GptcError):
    """A rank of a multi-GPU run failed or could not be reached."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def store_port(self) -> int:
        return self.master_port


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise SpecError(f"${name} must be an integer, got {env[name]!r}") from None


_SCHEMES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"))


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """This process's place in a multi-process run, from the launcher's environment
    (rank 0 of 1 when no launcher set one). SpecError names what is wrong."""
    env = os.environ if env is None else env
    for rank_var, size_var, local_var in _SCHEMES:
        if size_var in env:
            break
    else:
        return LaunchEnv(0, 1, 0, "127.0.0.1", 0)
    world = _int(env, size_var)
    rank = _int(env, rank_var) if rank_var in env else 0
    local = _int(env, local_var) if local_var in env else rank
    if world < 1:
        raise SpecError(f"${size_var} must be at least 1, got {world}")
    if not 0 <= rank < world:
        raise SpecError(f"${rank_var} must be in [0, {world}) (${size_var} is {world}), got {rank}")
    if local < 0:
        raise SpecError(f"${local_var} must not be negative, got {local}")
    if world == 1:
        return LaunchEnv(0, 1, local, "127.0.0.1", 0)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if missing:
        raise SpecError(f"a run of {world} ranks needs ${' and $'.join(missing)} (rank 0's host and a free port)")
    port = _int(env, "MASTER_PORT")
    if env.get("TORCHELASTIC_USE_AGENT_STORE"):
        port += 1  # torchrun's agent serves its own store on MASTER_PORT
    if not 0 < port < 65536:
        raise SpecError(f"$MASTER_PORT must be a TCP port (1-65535), got {env['MASTER_PORT']}")
    return LaunchEnv(rank, world, local, env["MASTER_ADDR"], port)


def share_bytes(env: LaunchEnv, payload: bytes | None, timeout: float = 1800.0) -> bytes:
    """Rank 0 serves `payload` to the other ranks over TCP on MASTER_ADDR:MASTER_PORT;
    the others pass None and get it. Every rank returns it once all have it. (The
    timeout leaves rank 0 time to compile the step the other ranks then take from the
    cache.)"""
    if env.world == 1:
        return payload or b""
    if env.rank == 0:
        assert payload is not None
        _exchange(env, b"", payload, timeout)
        return payload
    return _exchange(env, b"", None, timeout)


def gather_bytes(env: LaunchEnv, payload: bytes, timeout: float = 600.0) -> list[bytes] | None:
    """Every rank's `payload` on rank 0 (rank order; None on the other ranks), over TCP
    on the rendezvous port: for host data such as ZeRO-1's optimizer slices at a
    checkpoint. Every rank must call it at the same point."""
    if env.world == 1:
        return [payload]
    parts = _exchange(env, payload, b"" if env.rank == 0 else None, timeout)
    return parts if env.rank == 0 else None


_ROUNDS: dict[LaunchEnv, int] = {}   # exchanges this rank has begun (every rank makes the same ones in order)
_HEADER = struct.Struct("!IIQ")       # round, rank, payload bytes


def _exchange(env: LaunchEnv, payload: bytes, reply: bytes | None, timeout: float):
    """One round of the rendezvous. Rank 0 (reply given) listens, takes every other
    rank's payload and answers each with `reply`; it returns all payloads in rank
    order. Another rank sends its payload and returns rank 0's reply. Each connection
    names its round, and rank 0 drops one of another round unread (the rank retries):
    a rank that finished round r may already knock for round r + 1 while rank 0 still
    serves round r to the others."""
    round_ = _ROUNDS.get(env, 0)
    _ROUNDS[env] = round_ + 1
    deadline = time.monotonic() + timeout
    if env.rank == 0:
        parts: list[bytes | None] = [payload] + [None] * (env.world - 1)
        with socket.create_server(("", env.store_port)) as server:
            while None in parts:
                server.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    missing = [r for r, p in enumerate(parts) if p is None]
                    raise RankFailure(f"rank 0: rank{'s' if len(missing) > 1 else ''} "
                                      f"{', '.join(map(str, missing))} did not connect to port {env.store_port} "
                                      f"within {timeout:.0f} s") from None
                with conn:
                    try:
                        conn.settimeout(60)
                        their_round, rank, n = _HEADER.unpack(_read(conn, _HEADER.size))
                        if their_round != round_ or not 0 < rank < env.world or parts[rank] is not None:
                            continue
                        data = _read(conn, n)
                        conn.sendall(struct.pack("!I", len(reply)) + reply)
                    except OSError:  # that rank retries
                        continue
                    parts[rank] = data
        return parts
    while True:
        try:
            with socket.create_connection((env.master_addr, env.store_port), timeout=60) as conn:
                conn.sendall(_HEADER.pack(round_, env.rank, len(payload)) + payload)
                return _read(conn, struct.unpack("!I", _read(conn, 4))[0])
        except OSError as e:  # refused, timed out, or dropped by rank 0 (still in another round)
            if time.monotonic() > deadline:
                raise RankFailure(f"rank {env.rank}: could not reach rank 0 at {env.master_addr}:{env.store_port} "
                                  f"({e})") from None
            time.sleep(0.2)


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("rank 0 closed the connection early")
        data += chunk
    return data


class Communicator:
    """One rank's handle on the collective library. `group(calls, stream)` issues the
    calls of one collective launch (table entries of gptc/runtime/build.py: op, send,
    recv pointers, count, dtype) as one library group on `stream`."""

    def __init__(self, lib: Any, comm: Any, rank: int, world: int, raw_stream=int) -> None:
        self.lib, self.comm, self.rank, self.world = lib, comm, rank, world
        self._raw_stream = raw_stream

    def group(self, calls: Sequence[tuple[str, int, int, int, str]], stream: Any) -> None:
        s = self._raw_stream(stream)
        self.lib.group_start()
        try:
            for op, send, recv, count, dtype in calls:
                dt = NCCL_DTYPES[dtype]
                if op == "all_reduce":
                    self.lib.all_reduce(send, recv, count, dt, NCCL_SUM, self.comm, s)
                elif op == "reduce_scatter":
                    self.lib.reduce_scatter(send, recv, count // self.world, dt, NCCL_SUM, self.comm, s)
                elif op == "all_gather":
                    self.lib.all_gather(send, recv, count, dt, self.comm, s)
                else:
                    raise ValueError(f"unknown collective {op}")
        finally:
            self.lib.group_end()

    def close(self) -> None:
        """Release the communicator by aborting it: called once the steps' captured graphs
        are destroyed (NCCL waits for every graph that captured its calls to go: a
        finished 2-GPU run whose graphs were still alive hung both ranks in
        ncclCommDestroy on an H200 pair, 2026-11-30) or on a rank that failed (which must
        not wait for the others; PyTorch's ProcessGroupNCCL also shuts down with
        ncclCommAbort)."""
        if self.comm is not None:
            self.lib.abort(self.comm)
            self.comm = None


class _Nccl:
    """nccl4py's low-level bindings, under the names Communicator calls."""

    def __init__(self) -> None:
        try:
            import nccl.core as core
            from nccl.bindings import nccl as raw
        except ImportError as e:
            raise GptcError(f"multi-GPU training on NVIDIA needs nccl4py (pip install 'gptc[multi-gpu]'): {e}") from None
        self.core, self.raw = core, raw
        self.group_start, self.group_end = raw.group_start, raw.group_end
        self.all_reduce, self.reduce_scatter, self.all_gather = raw.all_reduce, raw.reduce_scatter, raw.all_gather

    def unique_id(self) -> bytes:
        return bytes(self.core.get_unique_id())

    def init(self, uid: bytes, world: int, rank: int) -> Any:
        self._comm = self.core.Communicator.init(world, rank, self.core.UniqueId.from_bytes(uid))
        return self._comm._comm  # the bindings' handle, what nccl4py's own calls pass

    def abort(self, comm: Any) -> None:
        self._comm.abort()


class _Rccl:
    """hip-python's rccl module (the NCCL C API under its C names)."""

    def __init__(self) -> None:
        try:
            from hip import rccl
        except ImportError as e:
            raise GptcError(f"multi-GPU training on AMD needs hip-python's rccl module: {e}") from None
        self.r = rccl
        self.group_start = lambda: self._check(rccl.ncclGroupStart())
        self.group_end = lambda: self._check(rccl.ncclGroupEnd())
        self.all_reduce = lambda *a: self._check(rccl.ncclAllReduce(*a))
        self.reduce_scatter = lambda *a: self._check(rccl.ncclReduceScatter(*a))
        self.all_gather = lambda *a: self._check(rccl.ncclAllGather(*a))

    @staticmethod
    def _check(result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RankFailure(f"RCCL error {int(err)}")
        return rest[0] if len(rest) == 1 else rest

    def unique_id(self) -> bytes:
        uid = self._check(self.r.ncclGetUniqueId())
        return bytes(uid.internal)

    def init(self, uid: bytes, world: int, rank: int) -> Any:
        handle = self.r.ncclUniqueId()
        handle.internal = uid
        return self._check(self.r.ncclCommInitRank(world, handle, rank))

    def abort(self, comm: Any) -> None:
        self.r.ncclCommAbort(comm)


def _raw_stream(stream: Any) -> int:
    """The stream handle as the integer the bindings take (cuda-bindings' CUstream and
    hip-python's hipStream_t both convert with int())."""
    return int(stream)


def open_communicator(env: LaunchEnv, vendor: str) -> Communicator:
    """Join the world of `env` (the device of LOCAL_RANK must be current): the library's
    unique id goes from rank 0 to the others through the rendezvous."""
    lib = _Nccl() if vendor == "nvidia" else _Rccl()
    uid = share_bytes(env, lib.unique_id() if env.rank == 0 else None)
    return Communicator(lib, lib.init(uid, env.world, env.rank), env.rank, env.world, _raw_stream)
