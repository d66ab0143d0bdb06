"""Issue 17 through the installed ``posthoc-ema`` script: closed pipes, flags in help, snapshots one level down,
errors that name Python arguments to Python and flags on the command line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_startup import entry_point

TIMEOUT = 120
COMMANDS = ["synthesize", "inspect", "plan", "plot", "beta-to-sigma", "sigma-to-beta", "demo"]


def cli(*args: object, cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([entry_point(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, **kwargs)  # type: ignore[call-overload]


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# -- a closed pipe ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["inspect", "{folder}"], ["inspect", "{folder}", "--json"], ["beta-to-sigma", "0.999"]])
def test_a_reader_that_went_away_ends_the_command_like_sigpipe(recorded, args):
    """`… | head -1`: the status of a death by SIGPIPE, nothing on stderr."""
    argv = [a.format(folder=recorded) for a in args]
    read, write = os.pipe()
    with os.fdopen(read, "rb") as reader:
        with subprocess.Popen([entry_point(), *argv], stdout=write, stderr=subprocess.PIPE, text=True) as process:
            os.close(write)
            reader.readline()  # `head -1`: one line, then the reader is gone
            reader.close()
            _, stderr = process.communicate(timeout=TIMEOUT)
    # A writer that finished before the reader left saw no closed pipe: only then is 0 right.
    assert process.returncode in (141, -13) or (process.returncode == 0 and not stderr), (process.returncode, stderr)
    assert stderr == ""


@pytest.mark.parametrize("args", [["inspect", "{folder}"], ["inspect", "{folder}", "--json"], ["beta-to-sigma", "0.999"],
                                  ["plan", "--steps", "1000", "--snapshot-every", "100", "--record", "0.05", "--record", "0.1"]])
def test_a_pipe_closed_before_the_first_line(recorded, args):
    read, write = os.pipe()
    os.close(read)  # the reader left before anything was written: the first write fails
    try:
        result = subprocess.run([entry_point(), *(a.format(folder=recorded) for a in args)], stdout=write,
                                stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


# -- flags in --help --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_flags_without_a_value(command):
    result = cli(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout and "BOOLEAN" not in result.stdout
    flags = re.findall(r"(--(?:force|json|help|version|allow-nonfinite|trainable-only))\s+(\S+)", result.stdout)
    assert flags and all(not after.startswith("<") for _, after in flags), flags
    if command is not None:  # options with a value still show it
        assert re.search(r"--\w[\w-]*\s+(-\w\s+)?(<[^>]+>|[A-Z_.]+)\s", result.stdout), result.stdout
