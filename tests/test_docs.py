"""The docs are tested: every console block of every page runs and prints what the page shows, every example
is shown and run, the CLI reference lists every option of every command, and code on pages comes from examples/.

The walk through a page is in tests/doc_pages.py (and ``python tests/doc_pages.py --update PAGE`` rewrites
stale outputs for review).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch
import typer

from doc_pages import EXAMPLES, ROOT, SNIPPET, blocks, matches, pages, prepare, run, transcript, walk
from posthoc_cli.cli.main import app

PAGES = [p for p in pages() if "```console" in p.read_text(encoding="utf-8")]


@pytest.fixture(scope="session")
def setups(tmp_path_factory: pytest.TempPathFactory):
    """Runs a page's ``test-setup`` command once per session; each page gets a copy of what it made."""
    made: dict[str, Path] = {}

    def setup(command: str, folder: Path) -> None:
        if command not in made:
            where = tmp_path_factory.mktemp("setup")
            prepare(where)
            output, code = run(command, where)
            assert code == 0, (command, output)
            made[command] = where
        shutil.copytree(made[command], folder, dirs_exist_ok=True)

    return setup


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_console_block_prints_what_the_page_shows(page, tmp_path, setups, request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo and tiny models run in-process: a thread team only contends on a busy machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    prepare(tmp_path)
    problems, ran = walk(page, tmp_path, setup=setups)
    assert ran
    assert not problems, "\n\n".join(problems) + f"\n\n(to review the real output: python tests/doc_pages.py --update {page})"


def test_every_example_is_shown_on_a_page_and_run_there():
    shown, ran = set(), set()
    for page in pages():
        text = page.read_text(encoding="utf-8")
        shown |= {m.group(1) for lang, body, _ in blocks(text) if lang == "python" and (m := SNIPPET.match(body.strip()))}
        for lang, body, _ in blocks(text):
            if lang == "console":
                ran |= {word for command, _ in transcript(body) for word in command.split() if word.endswith(".py")}
    examples = {p.name for p in EXAMPLES.glob("*.py")}
    assert {Path(s).name for s in shown if s.startswith("examples/")} == examples
    assert examples <= ran, f"examples no page runs: {examples - ran}"


def test_pages_include_their_python_from_examples():
    """No Python code block on the site is a copy: each includes a file of examples/ (pymdownx.snippets)."""
    for page in pages()[1:]:  # the README is checked by test_readme.py (GitHub cannot include a file)
        for lang, body, _ in blocks(page.read_text(encoding="utf-8")):
            if lang in ("python", "py"):
                match = SNIPPET.match(body.strip())
                assert match and (ROOT / match.group(1)).is_file(), f"{page.name}: a Python block that is not an example file"


def test_the_ellipsis_matches_any_lines_and_nothing_else():
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"]) and matches(["a", "...", "b"], ["a", "b"])
    assert not matches(["a", "...", "d"], ["a", "b", "c"]) and not matches(["a"], ["a", "b"])


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "hooks" / "cli_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(command, path="posthoc-ema"):
    """(path, visible long options) of the app's root and every command under it, however many there are."""
    found = [(path, [o for p in command.params if not getattr(p, "hidden", False) for o in [*p.opts, *p.secondary_opts]])]
    for name, sub in getattr(command, "commands", {}).items():
        if not getattr(sub, "hidden", False):
            found += _commands(sub, f"{path} {name}")
    return found


def test_the_cli_reference_lists_every_command_and_option():
    reference = _cli_reference()
    page = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    assert reference.MARKER in page.splitlines()
    assert "docs/hooks/cli_reference.py" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    rendered = reference.on_page_markdown(page, None, None, None)
    commands = _commands(typer.main.get_command(app))
    assert len(commands) > 5
    for path, options in commands:
        section = rendered.split(f"# `{path}`\n", 1)[1]
        section = re.split(r"\n#+ `posthoc-ema ", section, maxsplit=1)[0]
        for option in options:
            assert f"`{option}" in section or f" {option}" in section, f"{path} {option} is not in the CLI reference"


def test_the_site_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in pages()[1:]:
        assert str(page.relative_to(ROOT / "docs")) in nav, page
