"""The README is tested: its two top commands, its coverage of the CLI, and its walkthrough, run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from posthoc_cli.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
DEMO_COMMAND = "pip install torch==2.13.0 && pip install -e . && posthoc-ema demo"
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q -n 2'
EXIT_CODE = '; echo "exit code $?"'


def test_exactly_two_commands_at_the_top():
    top = README.split("\n## ", 1)[0]
    assert [(lang, body.strip()) for lang, body in FENCE.findall(top)] == [
        ("bash", DEMO_COMMAND),
        ("bash", TEST_COMMAND),
    ]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci.splitlines()


def _commands() -> dict[str, list[str]]:
    """Each command of the app and its visible long options."""
    group = typer.main.get_command(app)
    found = {}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        options = [
            opt
            for param in command.params
            if not getattr(param, "hidden", False)
            for opt in param.opts
            if opt.startswith("--") and opt != "--help"
        ]
        found[name] = options
    return found


def test_every_command_and_option_is_documented():
    commands = _commands()
    assert set(commands) == {"synthesize", "inspect", "beta-to-sigma", "sigma-to-beta", "demo", "plan", "plot", "prune"}
    for name, options in commands.items():
        assert f"posthoc-ema {name}" in README, f"command {name} is not in the README"
        for option in options:
            assert option in README, f"{name} {option} is not in the README"
    assert "posthoc-ema --version" in README


def _normalise(text: str) -> list[str]:
    """Lines without trailing blanks or timings (the only parts of the output that vary between runs)."""
    text = re.sub(r"read in \d+(\.\d+)? s", "read in <time> s", text)
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def _transcript(body: str) -> list[tuple[str, str]]:
    """``$ command`` lines of a console block, each with the output shown under it."""
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in steps]


def test_walkthrough_runs_as_written(tmp_path, monkeypatch, request):
    """Every Python block and every shown command, in order, in an empty folder; outputs as shown."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fine-tuning example's tiny GPT-2: a thread team only contends on a busy machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    namespace: dict[str, object] = {"__name__": "__readme__"}
    ran = []
    for lang, body in FENCE.findall(README):
        if lang == "python":
            exec(compile(body, "README.md", "exec"), namespace)
        elif lang == "console":
            for command, shown in _transcript(body):
                words = shlex.split(command.removesuffix(EXIT_CODE))
                assert words[0] == "posthoc-ema", command
                if words[1] == "demo":
                    continue  # ten seconds of training; tests/test_e2e.py runs it through the entry point
                result = CliRunner().invoke(app, words[1:])
                output = result.output + (f"exit code {result.exit_code}\n" if command.endswith(EXIT_CODE) else "")
                if not command.endswith(EXIT_CODE):
                    assert result.exit_code == 0, (command, result.output)
                assert _normalise(output) == _normalise(shown), command
                ran.append(words[1])
    assert {"inspect", "synthesize", "beta-to-sigma", "sigma-to-beta"} <= set(ran)
    assert (tmp_path / "ema-0.15.safetensors").exists() and len(list((tmp_path / "emas").iterdir())) == 3


@pytest.mark.parametrize(
    "section",
    ["## Performance", "## Guarantees", "## Exit codes", "## Snapshot file format", "## Fine-tuning: record only what trains"],
)
def test_sections_exist(section):
    assert f"\n{section}" in README
