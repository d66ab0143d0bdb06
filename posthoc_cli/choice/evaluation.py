"""One evaluation: the user's command run on a candidate's weights, and the metric read from what it prints.

The command is a shell command template; its placeholders are replaced,
shell-quoted, by the candidate's values. It runs in a session of its own, so
that stopping it (a timeout, Ctrl-C) stops everything it started: its whole
process group is killed. Its output goes to temporary files, never a pipe that
could fill up and block it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InvalidValueError

PLACEHOLDERS = ("weights", "target", "sigma_rel", "step", "seed", "device")
_FIELD = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
STDERR_TAIL = 2000  # characters of a failed command's stderr kept in its results line
_GRACE = 3.0  # seconds a stopped command gets to exit on SIGTERM before SIGKILL


@dataclass(frozen=True)
class Outcome:
    """How one evaluation went: a finite metric, or the reason it failed."""

    metric: float | None
    error: str | None = None
    stderr: str | None = None  # the tail of the command's stderr, kept when it failed
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def check_template(command: str) -> None:
    """Refuse a template that could not evaluate anything, before anything runs."""
    if "{weights}" not in command:
        raise InvalidValueError(
            f"the evaluation command {command!r} has no {{weights}} placeholder",
            "put {weights} where your command takes the weights file, e.g. --eval 'python eval.py {weights}'",
        )


def render(command: str, values: Mapping[str, str]) -> str:
    """The template with each placeholder replaced by its value, shell-quoted."""
    return _FIELD.sub(lambda m: shlex.quote(values[m[1]]), command)


def read_metric(stdout: str, key: str | None = None) -> float:
    """The metric in a command's output: its last line that is a number, or with ``key`` the value of
    ``key`` in its last line that is a JSON object. ValueError says what is missing."""
    lines = [line.strip() for line in reversed(stdout.splitlines()) if line.strip()]
    if key is None:
        for line in lines:
            try:
                value = float(line)
            except ValueError:
                continue
            return _finite(value)
        raise ValueError("no line of its output is a number")
    for line in lines:
        try:
            document = json.loads(line)
        except ValueError:
            continue
        if isinstance(document, dict):
            if key not in document:
                raise ValueError(f"its last JSON line has no key {key!r}")
            value = document[key]
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"{key!r} in its last JSON line is {value!r}, not a number")
            return _finite(float(value))
    raise ValueError(f"no line of its output is a JSON object (looking for {key!r})")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"the metric is {value}")
    return value


def run_command(
    command: str, *, env: Mapping[str, str] | None, timeout: float | None, stop: threading.Event, metric: str | None
) -> Outcome | None:
    """Run ``command`` to its end and read its metric; None when ``stop`` was set first (it was killed)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            env=None if env is None else dict(env), start_new_session=True,
        )
        timed_out = False
        try:
            while process.poll() is None:
                if stop.wait(0.02):
                    _kill(process, graceful=True)
                    return None
                if timeout is not None and time.perf_counter() - started > timeout:
                    _kill(process, graceful=False)
                    timed_out = True
        except BaseException:
            _kill(process, graceful=False)
            raise
        _kill_group(process.pid, signal.SIGKILL)  # what it left running in the background
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")[-STDERR_TAIL:] or None
    if timed_out:
        return Outcome(None, f"timed out after {timeout:g} s (its process group was killed)", stderr, seconds)
    code = process.returncode
    if code != 0:
        what = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        last = stderr.strip().splitlines()[-1] if stderr and stderr.strip() else "no output on stderr"
        return Outcome(None, f"{what}: {last}", stderr, seconds)
    try:
        return Outcome(read_metric(stdout, metric), None, None, seconds)
    except ValueError as e:
        return Outcome(None, f"no metric: {e}", stderr, seconds)


def _kill(process: subprocess.Popen[bytes], *, graceful: bool) -> None:
    """Stop the command and everything it started; SIGTERM first when ``graceful``."""
    if graceful:
        _kill_group(process.pid, signal.SIGTERM)
        try:
            process.wait(_GRACE)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(process.pid, signal.SIGKILL)
    process.wait()


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["PLACEHOLDERS", "Outcome", "check_template", "read_metric", "render", "run_command"]
