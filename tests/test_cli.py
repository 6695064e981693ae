"""The command line as a user runs it: training on CPU, and bad input that ends with
one line on stderr, a non-zero exit and no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def gptc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gptc", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptc: error:"), result.stderr
    assert expected in lines[0], lines[0]


def test_300_cpu_steps_lower_the_loss(tmp_path):
    text = (ROOT / "README.md").read_text() + (ROOT / "gptc" / "compiler" / "dsl.py").read_text()
    data = tmp_path / "data.txt"
    data.write_text(text * 3)
    out = tmp_path / "run"
    result = gptc("train", "--preset", "tiny", "--device", "cpu", "--data", str(data), "--steps", "300", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 300
    first, last = losses[0], sum(losses[-10:]) / 10
    assert last <= 0.7 * first, f"loss {first:.3f} -> {last:.3f}"
    assert (out / "spec.toml").is_file()


@pytest.mark.parametrize("args,expected", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "tiny", "--data", "does-not-exist.txt"], "does not exist"),
    (["--preset", "tiny", "--data", "{empty}"], "is empty"),
    (["--preset", "tiny", "--data", "{binary}"], "binary"),
    (["--preset", "tiny", "--data", "{latin1}"], "not valid UTF-8"),
    (["{bad_toml}"], "not valid TOML"),
    (["{bad_option}"], "unknown option 'd_modle'"),
    (["{bad_heads}"], "divisible"),
    (["{fp8}"], "train.precision = 'fp8' is not one of: fp32, bf16"),
    (["--preset", "tiny", "--steps", "0"], "train.steps must be positive"),
])
def test_bad_input(tmp_path, args, expected):
    files = {
        "empty": b"", "binary": b"\x00\x01\x02" * 100, "latin1": "caf\u00e9 ".encode("latin-1") * 100,
        "bad_toml": b"[model\nd_model = 3", "bad_option": b"[model]\nd_modle = 64\n",
        "bad_heads": b"preset = 'tiny'\n[model]\nd_model = 33\n",
        "fp8": b"preset = 'tiny'\n[train]\nprecision = 'fp8'\n",
    }
    resolved = []
    for a in args:
        if a.startswith("{"):
            name = a.strip("{}")
            path = tmp_path / (name + (".toml" if name in ("bad_toml", "bad_option", "bad_heads", "fp8") else ".txt"))
            path.write_bytes(files[name])
            a = str(path)
        resolved.append(a)
    assert_one_line_error(gptc("train", *resolved, "--device", "cpu"), expected)
