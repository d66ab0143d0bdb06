"""The README is the front page: its two top commands, its length, and its code, which is the examples' own."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
DEMO_COMMAND = "pip install torch==2.13.0 && pip install -e . && posthoc-ema demo"
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q -n 2'


def test_exactly_two_commands_at_the_top():
    top = README.split("\n## ", 1)[0]
    assert [(lang, body.strip()) for lang, body in FENCE.findall(top)] == [
        ("bash", DEMO_COMMAND),
        ("bash", TEST_COMMAND),
    ]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any(line == TEST_COMMAND or line == TEST_COMMAND + " || exit 1" for line in ci.splitlines())


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 250


def test_its_python_is_the_examples_own():
    """Each Python block is a whole file of examples/ (GitHub cannot include one), so it cannot drift."""
    examples = {p.read_text(encoding="utf-8") for p in (ROOT / "examples").glob("*.py")}
    blocks = [body for lang, body in FENCE.findall(README) if lang in ("python", "py")]
    assert blocks and all(body in examples for body in blocks)


def test_its_links_to_files_resolve():
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), target


def test_the_package_and_its_metadata_state_one_version():
    from posthoc_cli import __version__

    # pyproject.toml's `version = "…"` line (tomllib is Python 3.11+; the project supports 3.10)
    (declared,) = re.findall(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert declared == __version__
    assert f"## [{__version__}]" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
