"""The docs as the tests read them: the README and docs/*.md, their console blocks and the examples they show.

A page is run top to bottom in an empty folder holding a copy of ``examples/``:
``<!-- test-setup: COMMAND -->`` lines (invisible on the page) run first where they
stand, then every ``$ COMMAND`` line of a ``console`` block, whose output must be
the one shown under it. ``posthoc-ema …`` runs in-process (stdout and stderr, as a
terminal shows them), ``python X.py`` and ``torchrun … X.py`` in a subprocess
(stdout; library warnings on stderr vary with versions). A shown line ``...``
stands for any number of lines; timings (``in 0.02 s``) are normalised; a command
ending in ``; echo "exit code $?"`` shows its exit code, every other must exit 0.

``python tests/doc_pages.py --update PAGE...`` runs pages and writes the real output
into their console blocks that elide nothing (to review with ``git diff``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SETUP = re.compile(r"^<!-- test-setup: (.+?) -->$", re.M)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$')
EXIT_CODE = '; echo "exit code $?"'
TIMEOUT = 600


def pages() -> list[Path]:
    """The README and every page of the site."""
    return [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "hooks" not in p.parts)]


def blocks(text: str) -> list[tuple[str, str, re.Match[str]]]:
    """(kind, body, match) in page order: kind is a fence's language, or ``setup`` for a test-setup line."""
    found = [(m.group(1), m.group(2), m) for m in FENCE.finditer(text)]
    found += [("setup", m.group(1), m) for m in SETUP.finditer(text)]
    return sorted(found, key=lambda b: b[2].start())


def transcript(body: str) -> list[tuple[str, list[str]]]:
    """``$ command`` lines of a console block, each with the output lines shown under it."""
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def normalise(text: str) -> list[str]:
    """Lines without trailing blanks or timings (the only parts of an output that vary between runs)."""
    text = re.sub(r"\bin \d+(\.\d+)? s\b", "in <time> s", text)
    # A table's column of durations (sweep's "seconds"): the same width, so the columns stay aligned.
    text = re.sub(r"(?<![\w.])\d+\.\d s\b", lambda m: "<t> s".rjust(len(m[0])), text)
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def matches(shown: list[str], actual: list[str]) -> bool:
    """Whether the shown output is the actual one, a shown ``...`` line standing for any lines."""
    pattern = "".join(r"(?:[^\n]*\n)*?" if line == "..." else re.escape(line) + r"\n" for line in shown)
    return re.fullmatch(pattern, "".join(line + "\n" for line in actual)) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subprocess(words: list[str], cwd: Path) -> tuple[str, int]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))  # this checkout's package, as installed -e
    done = subprocess.run(words, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    if done.returncode:
        sys.stderr.write(done.stderr[-5000:])
    return done.stdout, done.returncode


def run(command: str, cwd: Path) -> tuple[str, int]:
    """Run one ``$`` line of a page in ``cwd``: (what it printed, exit code)."""
    words = shlex.split(command.removesuffix(EXIT_CODE))
    if words[0] == "posthoc-ema":
        from typer.testing import CliRunner

        from posthoc_cli.cli.main import app

        here = Path.cwd()
        os.chdir(cwd)
        try:
            # As in the reader's activated environment: `python` in a sweep's --eval is this interpreter.
            path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
            result = CliRunner().invoke(app, words[1:], prog_name="posthoc-ema", env={"PATH": path})
        finally:
            os.chdir(here)
        return result.output, result.exit_code
    if words[0] == "python":
        return _subprocess([sys.executable, *words[1:]], cwd)
    if words[0] == "torchrun":
        port = ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
        return _subprocess([sys.executable, "-m", "torch.distributed.run", *port, *words[1:]], cwd)
    raise AssertionError(f"a page runs only posthoc-ema, python and torchrun: {command}")


def prepare(folder: Path) -> None:
    """An empty folder as a reader makes it: the examples copied in, nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    for example in EXAMPLES.glob("*.py"):
        shutil.copy(example, folder / example.name)


def walk(page: Path, folder: Path, *, setup=None, update: bool = False) -> tuple[list[str], list[str]]:
    """Run ``page`` in ``folder``: (its problems, the commands run). ``setup(command, folder)`` runs a
    test-setup line (default: :func:`run`); with ``update`` the real outputs are written into the page."""
    text = page.read_text(encoding="utf-8")
    problems: list[str] = []
    ran: list[str] = []
    replacements: list[tuple[re.Match[str], str]] = []
    for kind, body, match in blocks(text):
        if kind == "setup":
            if setup is not None:
                setup(body, folder)
            else:
                output, code = run(body, folder)
                if code:
                    problems.append(f"{page.name}: setup `{body}` exited {code}")
            continue
        if kind != "console":
            continue
        new_body = []
        for command, shown in transcript(body):
            output, code = run(command, folder)
            ran.append(command)
            if command.endswith(EXIT_CODE):
                output += f"exit code {code}\n"
            elif code:
                problems.append(f"{page.name}: `{command}` exited {code}:\n{output}")
                continue
            same = matches(normalise("\n".join(shown)), normalise(output))
            if not same:
                problems.append(f"{page.name}: `{command}` printed\n{output}\ninstead of\n" + "\n".join(shown))
            keep = same or "..." in shown  # an elided output is edited by hand
            new_body += [f"$ {command}", *(shown if keep else [line.rstrip() for line in output.rstrip("\n").splitlines()])]
        replacements.append((match, "\n".join(new_body) + "\n"))
    if update:
        for match, new_body in reversed(replacements):
            text = text[: match.start(2)] + new_body + text[match.end(2):]
        page.write_text(text, encoding="utf-8")
    return problems, ran


if __name__ == "__main__":
    import tempfile

    assert sys.argv[1:2] == ["--update"], "usage: python tests/doc_pages.py --update PAGE..."
    for name in sys.argv[2:]:
        with tempfile.TemporaryDirectory() as tmp:
            prepare(Path(tmp))
            found, _ = walk(Path(name).resolve(), Path(tmp), update=True)
            print(f"{name}: {len(found)} stale output(s) rewritten")
