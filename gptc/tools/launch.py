"""`gptc train --gpus N`: one process per GPU of this host, started and watched here.

Each process is the same `gptc train` command with the environment torchrun would set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT: a free port), so the
trainer runs exactly as it does under torchrun, srun or mpirun (gptc/runtime/comm.py).

If a process fails, the others cannot finish their step (their collectives wait for it
forever): they are stopped (SIGTERM, then SIGKILL after a grace period) and one line
says which rank failed. Rank 0 writes checkpoints into a temporary directory and moves
it into place, so a stopped run never leaves a half-written checkpoint."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Mapping, Sequence

from gptc.spec import GptcError

GRACE_S = 10.0  # how long a stopped rank gets to exit before SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def run_ranks(command: Sequence[str], world: int, poll_s: float = 0.1, grace_s: float = GRACE_S) -> None:
    """Run `command` once per rank (rank r with LOCAL_RANK r: GPU r) and wait for all.
    Raises GptcError naming the first rank that failed, after stopping the others."""
    if world < 1:
        raise GptcError(f"--gpus must be at least 1, got {world}")
    port = free_port()
    procs = [subprocess.Popen(list(command), env=rank_env(r, world, port)) for r in range(world)]
    failed: tuple[int, int] | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                return
            time.sleep(poll_s)
    except KeyboardInterrupt:
        # The terminal sent SIGINT to every rank too: each saves a checkpoint after its
        # step; give them time to finish, then stop what is left.
        _stop(procs, grace_s * 6, first=None)
        raise
    _stop(procs, grace_s, first=signal.SIGTERM)
    rank, code = failed
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    others = world - 1
    raise GptcError(f"rank {rank} of {world} {how}; stopped the other {others} rank{'s' if others != 1 else ''} "
                    "(the newest complete checkpoint is intact)")


def _stop(procs: Sequence[subprocess.Popen], grace_s: float, first: int | None) -> None:
    """Send `first` to the ranks still running (None: none), wait up to grace_s, then SIGKILL."""
    if first is not None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(first)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_train(argv: Sequence[str], gpus: int, out: str | None, default_out: str | None) -> None:
    """Run `gptc train argv` (without --gpus) on `gpus` GPUs of this host. Every rank
    must name the same run directory: --out, else default_out (None: resuming, the run's)."""
    command = [sys.executable, "-m", "gptc", "train", *argv]
    if out is None and default_out is not None:
        command += ["--out", default_out]
    run_ranks(command, gpus)


def strip_option(argv: Sequence[str], option: str, takes_value: bool = True) -> list[str]:
    """argv without `option` (as "--opt V" or "--opt=V", or a flag)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == option:
            skip = takes_value
            continue
        if takes_value and a.startswith(option + "="):
            continue
        out.append(a)
    return out
