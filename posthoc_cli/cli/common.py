"""What every command shares: the Typer app they register on, the target options, and the terminal.

Results go to stdout (a Rich table, or one JSON document with ``--json``);
progress, warnings and errors go to stderr. A mistake of the user's becomes one
line ``Error: <what> — <what to do>`` and the exit code of its
:class:`~posthoc_cli.errors.PosthocError` (1 for files, 2 for bad values), never
a traceback. Only the modules of this package print or import Rich.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..ema.targets import ACCEPTED
from ..errors import PosthocError, cli_text

app = typer.Typer(
    name="posthoc-ema",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # a local can be a multi-GB tensor
    add_completion=True,
    help=(
        "Post-hoc EMA: record a few EMAs of a model during training, choose the EMA length afterwards.\n\n"
        "Snapshots written by posthoc_cli.Recorder go in a folder (default: ckpts); these commands read only "
        "that folder. Method: Karras et al. 2023, arXiv 2312.02696."
    ),
    epilog="Start with:  posthoc-ema demo --out demo-ckpts   then   posthoc-ema inspect demo-ckpts",
)

# Typer's Rich help prints a value type after every option, flags included (`--force <bool>`), as if
# `--force true` were the syntax. A flag takes no value, so it shows none: for every command's flags
# and the ones Typer adds (--help, --version, --install-completion), hence here and not per option.
_option_type = getattr(typer.core.TyperOption, "display_type_rich", None)  # absent in older Typer (0.15): left as it is


def _flag_shows_no_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    return None if self.is_flag or _option_type is None else _option_type(self, ctx)


if _option_type is not None:
    typer.core.TyperOption.display_type_rich = _flag_shows_no_type  # type: ignore[method-assign]

# -- the options several commands take -------------------------------------------------------------

Folder = Annotated[Path, typer.Argument(metavar="DIR", help="Snapshot folder written by the Recorder.")]
# The targets: the same options on synthesize, inspect, plan and plot.
SigmaRels = Annotated[
    list[float] | None,
    typer.Option("--sigma-rel", "-s", help="Target power EMA length, in (0, 0.2887); repeatable."),
]
Betas = Annotated[
    list[float] | None,
    typer.Option("--beta", help="Target classical EMA of constant decay B (= --ema beta=B); repeatable."),
]
Specs = Annotated[
    list[str] | None,
    typer.Option(
        "--ema", metavar="SPEC",
        help="Target of any kind; repeatable. " + ACCEPTED.replace("[", "\\[") + ". See 'Choosing the EMA' in the docs.",
    ),
]

# -- terminal plumbing ------------------------------------------------------------------------------


class Results(Console):
    """Rich's console, except that a closed pipe is reported like any other (Rich itself exits 1)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def stdout() -> Console:
    """Results. Outside a terminal, a fixed wide page so tables never fold in pipes and logs."""
    tty = sys.stdout.isatty()
    return Results(file=sys.stdout, highlight=False, width=None if tty else 160, soft_wrap=not tty)


def say(message: str) -> None:
    """One plain line on stderr (never wrapped, so it stays greppable)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


# A reader that went away (`| head -1`) ends a command the way it ends any Unix tool: quietly, with
# the status of a death by SIGPIPE (Python ignores the signal and gets BrokenPipeError instead).
CLOSED_PIPE = 141  # 128 + SIGPIPE (13)


def closed_pipe() -> int:
    """Point stdout at /dev/null, so the exit flush cannot fail again ("Exception ignored …"), and say 141."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return CLOSED_PIPE


def fail(message: str, code: int) -> typer.Exit:
    say(f"Error: {message}")
    return typer.Exit(code)


@dataclass
class RunState:
    """How this run's errors have been reported so far (one command per process; main() resets it)."""

    # Whether an interruption was reported already: Typer turns a Ctrl-C that no command caught
    # (while parsing the command line, say) into a silent exit code 130, and main() then reports it.
    interrupt_reported: bool = False
    # A rank other than 0 prints nothing (rank 0 reports every rank's error), except when its peers are
    # gone: rank 0 may be among them. Then it speaks on the stderr kept here, and the process ends with
    # os._exit, past the destructors of the broken gloo group (which can abort: SIGABRT instead of 1).
    quiet_rank: tuple[int, int] | None = None  # (rank, the stderr its fd 2 no longer is)
    peer_lost: bool = False


RUN = RunState()


def _lost_peer(error: PosthocError) -> None:
    RUN.peer_lost = True
    if RUN.quiet_rank is not None:
        rank, stderr = RUN.quiet_rank
        with contextlib.suppress(OSError):
            os.write(stderr, f"Error: rank {rank}: {cli_text(error)}\n".encode())


@contextlib.contextmanager
def user_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """Turn the library's errors (and the OS's) into ``Error: …`` and an exit code."""
    try:
        yield
    except PosthocError as e:
        if getattr(e, "lost_peer", False):
            _lost_peer(e)
        raise fail(cli_text(e), e.exit_code) from None
    except BrokenPipeError:
        raise typer.Exit(closed_pipe()) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise fail(f"{where}{e.strerror or e} — check the path and its permissions", 1) from None
    except KeyboardInterrupt:
        RUN.interrupt_reported = True
        raise fail(interrupted, 130) from None


def print_json(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.{digits - 1}e}"


@contextlib.contextmanager
def progress_bar(*, enabled: bool, in_bytes: bool = True, transient: bool = False) -> Iterator[Progress | None]:
    """A progress bar on stderr (bytes done and rate, or percent), only when a person is watching it."""
    if not enabled:
        yield None
        return
    amount = (DownloadColumn(), TransferSpeedColumn()) if in_bytes else (TaskProgressColumn(),)
    columns = (TextColumn("{task.description}"), BarColumn(), *amount, TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr, highlight=False), transient=transient) as bar:
        yield bar
