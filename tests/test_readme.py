"""The README's custom-model example runs as written and its loss falls."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_custom_model_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "ReferenceExecutor" in b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, "README.md", "exec"), {})
    loss = float(re.search(r"loss after 100 steps: ([0-9.]+)", out.getvalue()).group(1))
    assert loss < 1.0, out.getvalue()


VENV = "bash .ci/venv.sh && . .venv/bin/activate && "
CI_TAIL = "bash .ci/install-compilers.sh && python3 -m pip install -q -e '.[test]' && python3 -m pytest -q"


def two_commands() -> list[str]:
    """The command lines of the README's first sh block (comments dropped)."""
    block = re.search(r"```sh\n(.*?)```", README.read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_two_commands_install_into_a_virtual_environment():
    """Debian's and Ubuntu's own Python refuse `pip install` outside a virtual environment
    (PEP 668): both commands make and activate .venv before anything is installed, and the
    venv script installs python3-venv, which Debian needs for it, when it is missing."""
    main_job, tests = two_commands()
    assert main_job == VENV + "pip install -e '.[cuda]' && gptc demo"
    assert tests == VENV + CI_TAIL
    assert "python3-venv" in (README.parent / ".ci" / "venv.sh").read_text()


def test_readme_test_command_is_what_ci_runs():
    lines = (README.parent / ".ci" / "run").read_text().strip().splitlines()
    marker = lines.index("# --- the README's test command, verbatim ---")
    assert lines[marker + 1:] == [two_commands()[1]]
    assert lines[marker + 1].endswith(CI_TAIL)


def readme_commands() -> list[list[str]]:
    """The arguments of every `$ gptc ...` line of the README's examples."""
    return [shlex.split(line)[1:] for line in re.findall(r"^\$ (gptc .*)$", README.read_text(), re.M)]


def test_every_readme_command_parses():
    from gptc.tools.cli import build_parser
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"demo", "train", "generate", "compile", "inspect", "plan"}
    for argv in commands:
        build_parser().parse_args(argv)  # exits (a failed test) on an unknown option or a bad value


def test_the_demo_then_the_readme_generate_command(tmp_path, monkeypatch, capsys):
    """`gptc demo` trains in runs/demo, where the README's `gptc generate --checkpoint
    runs/demo ...` finds it; a second demo refuses to overwrite it."""
    from gptc.tools.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--preset", "tiny", "--steps", "2", "--device", "cpu", "--num-tokens", "3"]) == 0
    assert [p.name for p in (tmp_path / "runs" / "demo" / "checkpoints").iterdir()] == ["step-000002"]
    generate = next(c for c in readme_commands() if c[0] == "generate" and "--top-p" not in c)
    assert generate[generate.index("--checkpoint") + 1] == "runs/demo"
    capsys.readouterr()
    assert main(generate) == 0
    out = capsys.readouterr().out
    assert out.startswith("KING HENRY.") and out.endswith("\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["demo", "--preset", "tiny", "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptc: error: 'runs/demo' holds an earlier run") and "\n" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_readme_errors_are_what_gptc_prints(tmp_path, monkeypatch, capsys):
    """Each `$ gptc ...` example the README follows with a `gptc: error: ...` line prints
    exactly that line (and exits 2)."""
    from gptc.tools.cli import main
    examples = re.findall(r"^\$ gptc (.*)\n(gptc: error: .*)$", README.read_text(), re.M)
    assert examples
    monkeypatch.chdir(tmp_path)
    for command, error in examples:
        assert main(shlex.split(command)) == 2
        assert capsys.readouterr().err == error + "\n"


def test_venv_script_installs_python3_venv_when_it_is_missing(tmp_path):
    """A Python whose `-m venv` fails (Debian without python3-venv): the script installs
    the package with apt-get, then makes .venv; a second run keeps it."""
    import os
    import shutil
    import subprocess
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(README.parent / ".ci" / "venv.sh", repo / ".ci" / "venv.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    stubs = {  # apt-get records its arguments and 'installs' venv support; python3 needs it
        "apt-get": f'#!/bin/sh\necho "$@" >> {log}\ntouch {tmp_path}/venv-installed\n',
        "python3": f'#!/bin/sh\nif [ "$1" = "-c" ]; then echo 3.11; exit 0; fi\n'
                   f'[ -e {tmp_path}/venv-installed ] || exit 1\nmkdir -p .venv/bin && touch .venv/bin/python && '
                   'chmod +x .venv/bin/python\n',
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "python3"}
    if os.geteuid() != 0:
        (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
        (bin_dir / "sudo").chmod(0o755)
    for _ in range(2):
        result = subprocess.run(["bash", str(repo / ".ci" / "venv.sh")], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert (repo / ".venv" / "bin" / "python").exists()
    calls = log.read_text().splitlines()
    assert calls[0] == "update -qq" and "python3-venv python3.11-venv" in calls[1] and len(calls) == 2
