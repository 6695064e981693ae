"""Starting a multi-GPU run without a GPU: the launchers' environment (torchrun, srun,
mpirun), the TCP rendezvous that shares the library's unique id, and `gptc train
--gpus N`'s watching of its ranks (fake ranks: a rank that dies stops all, with one
message and a non-zero exit)."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from gptc.runtime.comm import LaunchEnv, RankFailure, gather_bytes, launch_env, share_bytes
from gptc.spec import GptcError, SpecError
from gptc.tools.cli import main
from gptc.tools.launch import free_port, run_ranks, strip_option

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}


def test_no_launcher_is_one_rank():
    assert launch_env({}) == LaunchEnv(0, 1, 0, "127.0.0.1", 0)
    assert launch_env({"WORLD_SIZE": "1", "RANK": "0"}).world == 1


def test_torchrun_environment():
    assert launch_env(TORCHRUN) == LaunchEnv(1, 4, 1, "node0", 29500)
    # torchrun's agent serves its own store on MASTER_PORT: gptc takes the next port
    assert launch_env({**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "True"}).master_port == 29501


def test_slurm_and_open_mpi_environments():
    base = {"MASTER_ADDR": "n0", "MASTER_PORT": "1234"}
    assert launch_env({**base, "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == \
        LaunchEnv(5, 8, 1, "n0", 1234)
    assert launch_env({**base, "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "0"}) == LaunchEnv(2, 3, 0, "n0", 1234)


@pytest.mark.parametrize("change,message", [
    ({"RANK": "4"}, r"\$RANK must be in \[0, 4\)"),
    ({"WORLD_SIZE": "two"}, r"\$WORLD_SIZE must be an integer"),
    ({"WORLD_SIZE": "0"}, r"at least 1"),
    ({"LOCAL_RANK": "-1"}, r"\$LOCAL_RANK must not be negative"),
    ({"MASTER_ADDR": ""}, r"needs \$MASTER_ADDR"),
    ({"MASTER_PORT": "70000"}, r"TCP port"),
])
def test_bad_environment_is_one_line(change, message):
    with pytest.raises(SpecError, match=message) as e:
        launch_env({**TORCHRUN, **change})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("world", [2, 3])
def test_rendezvous_shares_the_id_and_gathers(world):
    port = free_port()
    envs = [LaunchEnv(r, world, r, "127.0.0.1", port) for r in range(world)]
    got, gathered = [None] * world, [[] for _ in range(world)]

    def rank(r):  # the id, then three gathers back to back (a rank done with one knocks for the next at once)
        got[r] = share_bytes(envs[r], b"unique-id" if r == 0 else None, timeout=30)
        for i in range(3):
            gathered[r].append(gather_bytes(envs[r], bytes([r + i]) * (r + 1), timeout=30))

    threads = [threading.Thread(target=rank, args=(r,)) for r in reversed(range(world))]  # rank 0 last
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == [b"unique-id"] * world
    assert gathered[0] == [[bytes([r + i]) * (r + 1) for r in range(world)] for i in range(3)]
    assert gathered[1:] == [[None] * 3] * (world - 1)


def test_rendezvous_without_rank_zero_times_out():
    with pytest.raises(RankFailure, match="could not reach rank 0"):
        share_bytes(LaunchEnv(1, 2, 1, "127.0.0.1", free_port()), None, timeout=1)


def _fake_rank(code: str) -> list[str]:
    return [sys.executable, "-c", "import os, sys, time\nrank = int(os.environ['RANK'])\n" + code]


def test_ranks_that_succeed():
    run_ranks(_fake_rank("assert os.environ['WORLD_SIZE'] == '3' and os.environ['LOCAL_RANK'] == str(rank)\n"
                         "assert os.environ['MASTER_ADDR'] == '127.0.0.1' and int(os.environ['MASTER_PORT']) > 0"), 3)


def test_a_rank_that_dies_stops_all(tmp_path):
    marker = tmp_path / "survivor"
    started = time.monotonic()
    with pytest.raises(GptcError) as e:
        # rank 1 fails at once; rank 0 would run for a minute (a collective waiting forever)
        run_ranks(_fake_rank(f"if rank == 1: sys.exit(3)\ntime.sleep(60)\nopen({str(marker)!r}, 'w').close()"),
                  2, grace_s=2)
    assert str(e.value).startswith("rank 1 of 2 exited with status 3; stopped the other 1 rank")
    assert time.monotonic() - started < 30 and not marker.exists()


def test_a_rank_that_ignores_sigterm_is_killed():
    with pytest.raises(GptcError, match="rank 0 of 3 was killed by SIGKILL|rank 2 of 3 exited with status 1"):
        run_ranks(_fake_rank("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                             "if rank == 2: time.sleep(0.3); sys.exit(1)\ntime.sleep(60)"), 3, grace_s=1)


def test_train_gpus_failure_is_one_line_and_non_zero(tmp_path, capsys, monkeypatch):
    # A run of 2 ranks on a machine without GPUs: each rank fails; gptc says so once.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["train", "--preset", "hipgpt", "--gpus", "2", "--steps", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("gptc: error: rank ") and "stopped the other 1 rank" in err[-1]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "0"], "--gpus must be at least 1"),
    (["--gpus", "2", "--device", "cpu"], "--gpus trains on GPUs"),
])
def test_train_gpus_bad_input(argv, message, capsys):
    assert main(["train", "--preset", "hipgpt", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gptc: error: {message}") and "\n" not in err


def test_train_gpus_under_a_launcher_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--preset", "hipgpt", "--gpus", "2"]) == 2
    assert "under a launcher" in capsys.readouterr().err


def test_a_launched_rank_refuses_the_cpu(monkeypatch, capsys, tmp_path):
    for k, v in {**TORCHRUN, "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    assert main(["train", "--preset", "hipgpt", "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    assert "trains on GPUs" in capsys.readouterr().err


def test_strip_option():
    assert strip_option(["--preset", "x", "--gpus", "2", "--steps=3"], "--gpus") == ["--preset", "x", "--steps=3"]
    assert strip_option(["--gpus=4", "a"], "--gpus") == ["a"]
