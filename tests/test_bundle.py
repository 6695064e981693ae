"""Bundles without a GPU: `gptc compile` for AMD and NVIDIA targets, what a bundle
holds, the generated executor, `gptc inspect`, and the refusals."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptc.runtime.bundle import Bundle, BundleError

ROOT = Path(__file__).resolve().parent.parent


def gptc(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gptc", *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module", params=["cuda:sm_90", "hip:gfx90a"])
def bundle_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    result = gptc("compile", "--preset", "tiny", "-o", str(out), "--target", request.param)
    assert result.returncode == 0, result.stderr
    return out, request.param


def test_bundle_contents(bundle_dir):
    out, target = bundle_dir
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["arch"] == target.split(":")[1]
    assert set(manifest["steps"]) == {"train", "eval", "prefill", "prefill_8", "decode"}  # (prefill_lengths)
    for step, table in manifest["steps"].items():
        files = sorted((out / "kernels" / step).glob("*.hip"))
        assert len(files) == len(table["launches"])
        for launch in table["launches"]:
            assert (out / manifest["code"][launch["symbol"]]["file"]).stat().st_size > 0
            assert set(launch["args"]) <= set(table["buffers"])
    source = next((out / "kernels" / "train").glob("*.hip")).read_text()
    assert "Computes these graph nodes" in source and "#include" not in source
    assert (out / "spec.toml").is_file()


def test_generated_executor_is_straight_line(bundle_dir):
    out, _ = bundle_dir
    manifest = json.loads((out / "manifest.json").read_text())
    tree = ast.parse((out / "executor.py").read_text())
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert set(functions) == {"train", "eval", "prefill", "prefill_8", "decode"}
    for step, fn in functions.items():
        calls = [s for s in fn.body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)]
        assert [c.value.args[0].value for c in calls] == list(range(len(manifest["steps"][step]["launches"])))


def test_inspect(bundle_dir, tmp_path):
    out, target = bundle_dir
    dot = tmp_path / "fusion.dot"
    result = gptc("inspect", str(out), "--dot", str(dot))
    assert result.returncode == 0, result.stderr
    assert target in result.stdout and "k000_" in result.stdout and "MB moved" in result.stdout
    assert dot.read_text().startswith("digraph") and "->" in dot.read_text()
    result = gptc("inspect", str(out), "--step", "prefill_8")  # tiny's context 32: prefills of 32 and 8
    assert result.returncode == 0 and "prefill_8 step:" in result.stdout, result.stderr
    result = gptc("inspect", str(out), "--step", "prefill_9")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "no step 'prefill_9'; give --step one of" in result.stderr and "prefill_8" in result.stderr


def test_bundle_from_another_version_is_refused(bundle_dir, tmp_path):
    out, _ = bundle_dir
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["versions"]["gptc"] = "0.0.1"
    copy = tmp_path / "old"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="made by gptc 0.0.1"):
        Bundle(copy)
    result = gptc("inspect", str(copy))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "compile it again" in result.stderr


@pytest.mark.parametrize("args,expected", [
    (["--target", "cuda:sm_77"], "unknown target 'cuda:sm_77'"),
    (["--target", "gfx9000"], "unknown target"),
])
def test_compile_bad_input(tmp_path, args, expected):
    result = gptc("compile", "--preset", "tiny", "-o", str(tmp_path / "b"), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert expected in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_compile_refuses_to_overwrite_a_directory_that_is_not_a_bundle(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    result = gptc("compile", "--preset", "tiny", "-o", str(target), "--target", "cuda:sm_90")
    assert result.returncode == 2 and "holds files that are not part of a bundle (notes.txt)" in result.stderr
    assert (target / "notes.txt").read_text() == "keep me"


def test_recompiling_into_a_bundle_keeps_other_files(bundle_dir, tmp_path):
    import shutil
    out, target = bundle_dir
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    (copy / "notes.txt").write_text("keep me")
    result = gptc("compile", "--preset", "tiny", "-o", str(copy), "--target", target)
    assert result.returncode == 2 and "notes.txt" in result.stderr and "Traceback" not in result.stderr
    assert (copy / "notes.txt").read_text() == "keep me" and (copy / "manifest.json").is_file()


def test_bundle_directory_has_the_usual_mode(bundle_dir):
    out, _ = bundle_dir
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask


@pytest.mark.parametrize("case,expected", [("a_file", "exists and is not a directory"),
                                           ("a_file/b", "is a file")])
def test_compile_output_path_checked_before_compiling(tmp_path, case, expected):
    import time
    (tmp_path / "a_file").write_text("x")
    path = tmp_path / case
    started = time.perf_counter()
    result = gptc("compile", "--preset", "gpt2", "-o", str(path), "--target", "hip:gfx90a")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert expected in result.stderr and result.stderr.count("\n") == 1
    assert time.perf_counter() - started < 20, "refused only after planning"


def test_output_path_in_a_folder_without_write_permission(tmp_path, monkeypatch):
    from gptc.runtime.bundle import check_output_dir
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # as for a user without rights
    with pytest.raises(BundleError, match=f"cannot create .*: no permission to write in '{tmp_path}'"):
        check_output_dir(tmp_path / "new" / "bundle")


def test_not_a_bundle(tmp_path):
    result = gptc("inspect", str(tmp_path))
    assert result.returncode == 2 and "not a gptc bundle" in result.stderr


class _FakeDevice:
    """What cached_bundle needs of a device: its target."""

    def __init__(self, target: str) -> None:
        from gptc.target import parse_target
        self.target = parse_target(target)


def test_cached_bundle_follows_the_generated_kernels(tmp_path, monkeypatch):
    """The bundle cache is keyed on what makes the code (rendered kernels, plan tables,
    compiler, target): a changed template or planner must not reuse stale kernels, and
    an unchanged spec must hit the cache."""
    import dataclasses

    import gptc
    from gptc.compiler.codegen import kernels
    from gptc.runtime.bundle import cached_bundle
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path))
    spec, device, logged = gptc.preset("tiny"), _FakeDevice("cuda:sm_90"), []
    compiles = lambda: sum("compiling the model" in line for line in logged)  # noqa: E731
    first = cached_bundle(spec, device, log=logged.append)
    assert compiles() == 1 and "compiled" in logged[-1]
    assert cached_bundle(spec, device, log=logged.append).path == first.path and compiles() == 1  # a hit

    render_launch = kernels.render_launch  # a template edit: every kernel source changes

    def edited(*args, **kwargs):
        k = render_launch(*args, **kwargs)
        return dataclasses.replace(k, source=k.source + "// edited template\n")

    monkeypatch.setattr(kernels, "render_launch", edited)
    changed = cached_bundle(spec, device, log=logged.append)
    assert changed.path != first.path and compiles() == 2
    assert next((changed.path / "kernels" / "train").glob("*.hip")).read_text().endswith("// edited template\n")


def _damage(manifest: dict, how: str) -> object:
    if how == "a launch without its grid":
        del manifest["steps"]["train"]["launches"][0]["grid"]
    elif how == "a size that is a string":
        manifest["steps"]["eval"]["arena_bytes"]["activations"] = "12"
    elif how == "a step missing":
        del manifest["steps"]["decode"]
    elif how == "an unknown buffer":
        manifest["steps"]["train"]["launches"][1]["args"][0] = "nowhere"
    elif how == "a code object missing":
        manifest["code"].pop(manifest["steps"]["prefill"]["launches"][0]["symbol"])
    elif how == "the target missing":
        del manifest["target"]
    elif how == "a shorter prefill without launches":
        del manifest["steps"][next(s for s in manifest["steps"] if s.startswith("prefill_"))]["launches"]
    elif how == "a list":
        return [manifest]
    return manifest


@pytest.mark.parametrize("how,expected", [
    ("a launch without its grid", "steps.train.launches[0].grid is missing"),
    ("a size that is a string", "steps.eval.arena_bytes.activations should be int, not str"),
    ("a step missing", "steps.decode is missing"),
    ("an unknown buffer", "steps.train names buffer 'nowhere'"),
    ("a code object missing", "which has no code object"),
    ("the target missing", "target is missing"),
    ("a shorter prefill without launches", ".launches is missing"),
    ("a list", "is damaged: it should be an object"),
])
def test_damaged_manifest_is_one_line(bundle_dir, tmp_path, how, expected):
    out, _ = bundle_dir
    manifest = _damage(json.loads((out / "manifest.json").read_text()), how)
    copy = tmp_path / "damaged"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=re_escape(expected)):
        Bundle(copy)
    result = gptc("inspect", str(copy))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert expected in result.stderr


def re_escape(text: str) -> str:
    import re
    return re.escape(text)
