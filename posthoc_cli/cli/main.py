"""The ``posthoc-ema`` command line assembled: every command registered, the root options, and :func:`main`.

The console script is :func:`posthoc_cli._entry.main`, which installs the Ctrl-C
handler before it imports this module.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from .._version import __version__
from ..errors import PosthocError, cli_text

# Importing a command module registers its commands; `--help` lists them in this order.
from . import convert, demo, inspect, plan, prune, synthesize, sweep  # noqa: F401, I001
from .common import RUN, app, closed_pipe, say

# Start-up: a command that touches no tensor data must not import torch (1.5-2 s), only Typer, Rich,
# numpy and the torch-free modules (ema, format, analysis, and synth's, which import torch when a synthesis starts). The commands that
# read or write tensors are listed here and import torch inside their body (`from . import demo_run`
# in `demo`; synth imports torch when a synthesis starts), never at the top of a command module. Keep a new command light by importing only torch-free modules at the top
# of its module, or add it below if it needs tensors: tests/test_startup.py checks every command.
TENSOR_COMMANDS = frozenset({"synthesize", "demo", "sweep"})


def _version(value: bool) -> None:
    if value:
        try:
            sys.stdout.write(f"posthoc-ema {__version__}\n")
            sys.stdout.flush()  # here, not in Click, which would exit 1 on a closed pipe
        except BrokenPipeError:
            raise typer.Exit(closed_pipe()) from None
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Post-hoc EMA: record a few EMAs during training, choose the EMA length afterwards."""


# Click's UsageError, from whichever click Typer runs on (recent Typer vendors its own copy).
_USAGE_ERROR: type[Exception] = typer.BadParameter.__mro__[1]
_COMMANDS = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback is not None}


def main() -> None:
    """Run the app; a stray PosthocError still becomes one ``Error:`` line (the console script is _entry.main)."""
    RUN.interrupt_reported = RUN.peer_lost = False
    try:
        code = app(prog_name="posthoc-ema", standalone_mode=False)  # errors come here, not to Typer's boxes
    except _USAGE_ERROR as e:  # unparsable option, missing argument, ...: one line like every error
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `posthoc-ema`: the help is printed already
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "posthoc-ema"
        if ctx is None and len(sys.argv) > 1 and sys.argv[1] in _COMMANDS:  # e.g. an option missing its value
            where += f" {sys.argv[1]}"
        message = " ".join(e.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
        say(f"Error: {message} — see '{where} --help'")
        sys.exit(getattr(e, "exit_code", 2))
    except PosthocError as e:
        say(f"Error: {cli_text(e)}")
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        say("Error: interrupted")
        sys.exit(130)
    if code == 130 and not RUN.interrupt_reported:
        say("Error: interrupted")
    try:
        sys.stdout.flush()  # what is still buffered: a reader gone by now is a closed pipe too
    except BrokenPipeError:
        code = closed_pipe()
    code = code if isinstance(code, int) else 0
    if RUN.peer_lost:  # see RunState.quiet_rank; every file is closed or flushed by now, temporary files removed
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


__all__ = ["TENSOR_COMMANDS", "app", "main"]
