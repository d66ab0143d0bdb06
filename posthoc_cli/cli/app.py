"""The ``posthoc-ema`` command line: parsing and output around the library, nothing more.

Results go to stdout (a Rich table, or one JSON document with ``--json``);
progress, warnings and errors go to stderr. A mistake of the user's becomes one
line ``Error: <what> — <what to do>`` and the exit code of its
:class:`~posthoc_cli.errors.PosthocError` (1 for files, 2 for bad values), never
a traceback. This is the only module of the package that prints or imports Rich.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.filesize import decimal as human_bytes
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from .._version import __version__
from ..analysis.report import inspect_report
from ..dtypes import ACCUMULATE, FLOAT_DTYPES, choose
from ..ema.classical import (
    beta_half_life,
    beta_std_steps,
    beta_to_sigma_rel,
    sigma_rel_to_beta,
)
from ..ema.profiles import (
    SIGMA_REL_MAX,
    SIGMA_REL_MIN,
    check_sigma_rel,
    sigma_rel_to_gamma,
)
from ..ema.quality import FAITHFUL, POOR
from ..ema.targets import ACCEPTED, closest_power, from_options, target_name
from ..ema.trackers import Classical
from ..errors import InvalidValueError, PosthocError, cli_text
from ..format.catalogue import no_snapshots, scan
from ..synth.coordinator import Coordinator, OneProcess, launched
from ..synth.outputs import parse_size
from ..synth.plan import Plan
from ..synth.synthesis import plan_outputs, synthesize_iter

if TYPE_CHECKING:
    from . import demo as demo_lib

# Start-up: a command that touches no tensor data must not import torch (1.5-2 s), only Typer, Rich,
# numpy and the torch-free modules (profiles, container, snapshots, report, merge's planning).
# The commands that read or write tensors are listed here and import torch inside their body
# (`from . import demo as demo_lib` in `demo`; merge imports torch when synthesis starts), never at
# the top of this module. Keep a new command light by importing only torch-free modules here, or
# add it below if it needs tensors: tests/test_startup.py checks every command against this list.
TENSOR_COMMANDS = frozenset({"synthesize", "demo"})

# A classical EMA that still holds this much of the initial weights is no power-function EMA at all.
MOSTLY_INITIAL = 0.5

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

# -- terminal plumbing ------------------------------------------------------------------------------


class _Results(Console):
    """Rich's console, except that a closed pipe is reported like any other (Rich itself exits 1)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def _stdout() -> Console:
    """Results. Outside a terminal, a fixed wide page so tables never fold in pipes and logs."""
    tty = sys.stdout.isatty()
    return _Results(file=sys.stdout, highlight=False, width=None if tty else 160, soft_wrap=not tty)


def _say(message: str) -> None:
    """One plain line on stderr (never wrapped, so it stays greppable)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


# A reader that went away (`| head -1`) ends a command the way it ends any Unix tool: quietly, with
# the status of a death by SIGPIPE (Python ignores the signal and gets BrokenPipeError instead).
CLOSED_PIPE = 141  # 128 + SIGPIPE (13)


def _closed_pipe() -> int:
    """Point stdout at /dev/null, so the exit flush cannot fail again ("Exception ignored …"), and say 141."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return CLOSED_PIPE


def _fail(message: str, code: int) -> typer.Exit:
    _say(f"Error: {message}")
    return typer.Exit(code)


# Whether this run has reported an interruption already: Typer turns a Ctrl-C that no command caught
# (while parsing the command line, say) into a silent exit code 130, and main() then reports it.
_interrupt_reported = False
# A rank other than 0 prints nothing (rank 0 reports every rank's error), except when its peers are
# gone: rank 0 may be among them. Then it speaks on the stderr kept here, and the process ends with
# os._exit, past the destructors of the broken gloo group (which can abort: SIGABRT instead of 1).
_quiet_rank: tuple[int, int] | None = None  # (rank, the stderr its fd 2 no longer is)
_peer_lost = False


def _lost_peer(error: PosthocError) -> None:
    global _peer_lost
    _peer_lost = True
    if _quiet_rank is not None:
        rank, stderr = _quiet_rank
        with contextlib.suppress(OSError):
            os.write(stderr, f"Error: rank {rank}: {cli_text(error)}\n".encode())


@contextlib.contextmanager
def _user_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """Turn the library's errors (and the OS's) into ``Error: …`` and an exit code."""
    try:
        yield
    except PosthocError as e:
        if getattr(e, "lost_peer", False):
            _lost_peer(e)
        raise _fail(cli_text(e), e.exit_code) from None
    except BrokenPipeError:
        raise typer.Exit(_closed_pipe()) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise _fail(f"{where}{e.strerror or e} — check the path and its permissions", 1) from None
    except KeyboardInterrupt:
        global _interrupt_reported
        _interrupt_reported = True
        raise _fail(interrupted, 130) from None


def _json(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.{digits - 1}e}"


# -- targets (the same options on synthesize, inspect, plan and plot) --------------------------------

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
        help="Target of any kind; repeatable. " + ACCEPTED.replace("[", "\\[") + ". See the README.",
    ),
]


# -- synthesize -------------------------------------------------------------------------------------


@app.command(
    epilog="Example:  posthoc-ema synthesize ckpts --sigma-rel 0.15 --out ema.safetensors",
)
def synthesize(
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    ema: Specs = None,
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Snapshot folder written by the Recorder.")] = Path("ckpts"),
    step: Annotated[
        int | None,
        typer.Option("--step", "-t", help="Target training time (default: the latest at which every sigma_rel has a snapshot)."),
    ] = None,
    out: Annotated[
        str | None,  # a str, not a Path: a trailing slash ("--out new/") says "a folder"
        typer.Option(
            "--out", "-o", metavar="PATH",
            help="Output file (one target) or folder (several, or a path ending in /). Default: current folder.",
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Output dtype: float32, float16 or bfloat16 (default: the snapshots').")
    ] = None,
    accumulate: Annotated[str, typer.Option(help="Accumulation dtype: float32 or float64.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")] = False,
    allow_nonfinite: Annotated[
        bool, typer.Option("--allow-nonfinite", help="Write the result even if it holds NaN or Inf.")
    ] = False,
    allow_poor: Annotated[
        bool,
        typer.Option("--allow-poor", help=f"Write targets the snapshots reproduce poorly (profile error > {POOR:g}) too."),
    ] = False,
    trainable_only: Annotated[
        bool,
        typer.Option(
            "--trainable-only",
            help="Write only the averaged tensors (e.g. a LoRA adapter), not the frozen weights stored once.",
        ),
    ] = False,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            "--max-shard-size", metavar="SIZE",
            help="Write Hugging Face shards of at most SIZE (5GB, 500MB, 20KB or bytes) into the folder --out.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
) -> None:
    """Write the EMA of any length or kind, synthesized from the recorded snapshots.

    Solves for the weights of the snapshots that best reproduce each requested
    target (--sigma-rel, --beta, --ema; mixable) at the target time, then streams their weighted sum into one
    safetensors file per target, tensor by tensor, in a single pass over the
    inputs. The result loads with model.load_state_dict(safetensors.torch.load_file(path)):
    frozen weights stored once are copied in, bit for bit, unless --trainable-only.
    A target with a profile error above 0.05 is refused (the error says which lengths
    the snapshots reproduce) unless --allow-poor.
    An existing output is kept unless --force is given; a failed run leaves no output.
    """
    with _user_errors("interrupted — no output was written"), contextlib.ExitStack() as stack:
        coordinator = _join_team()  # under torchrun: the ranks split the work; rank 0 alone prints
        stack.callback(coordinator.close)
        if dtype is not None:
            choose("dtype", dtype, FLOAT_DTYPES)
        choose("accumulate", accumulate, ACCUMULATE)
        if max_shard_size is not None:
            parse_size(max_shard_size)
        targets = from_options(sigma_rel, beta, ema)
        options: dict[str, Any] = dict(
            dtype=dtype, accumulate=accumulate, force=force, allow_nonfinite=allow_nonfinite,
            max_shard_size=max_shard_size, trainable_only=trainable_only,
        )
        p, paths = plan_outputs(
            coordinator, folder, targets, t=step, out=out, max_shard_size=max_shard_size, allow_poor=allow_poor
        )
        steps = synthesize_iter(p, paths, coordinator=coordinator, **options)
        total, seconds = 0, 0.0
        try:
            with _progress(enabled=sys.stderr.isatty() and coordinator.rank == 0) as bar:
                task = bar.add_task("synthesizing", total=None) if bar else None
                for progress in steps:
                    total, seconds = progress.total, progress.seconds  # the work alone: no start-up, no planning
                    if bar is not None and task is not None:
                        bar.update(task, completed=progress.done, total=progress.total)
        finally:
            # Closing the generator now (not at garbage collection) removes the temporary files at once.
            steps.close()
        warnings = _synthesis_warnings(p)
        if coordinator.rank != 0:
            return
        if as_json:
            _json(_synthesis_document(p, paths, dtype, accumulate, total, seconds, warnings))
        else:
            _print_synthesis(p, paths, total, seconds)
        for warning in warnings:
            _say(f"Warning: {warning}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _join_team() -> Coordinator:
    """The ranks of a parallel synthesis when started by torchrun (this process alone otherwise).
    Ranks other than 0 print nothing: rank 0 reports their errors too."""
    if not launched():
        return OneProcess()  # which never imports torch.distributed
    from ..synth.team import Team

    # torchrun stops the other ranks with SIGTERM when one fails: unwind, so temporary files are removed.
    signal.signal(signal.SIGTERM, _interrupt)
    team = Team.join()
    if team.rank != 0:
        global _quiet_rank
        _quiet_rank = (team.rank, os.dup(sys.stderr.fileno()))
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, sys.stdout.fileno())
        os.dup2(quiet, sys.stderr.fileno())
    return team


@contextlib.contextmanager
def _progress(*, enabled: bool, in_bytes: bool = True, transient: bool = False) -> Iterator[Progress | None]:
    """A progress bar on stderr (bytes done and rate, or percent), only when a person is watching it."""
    if not enabled:
        yield None
        return
    amount = (DownloadColumn(), TransferSpeedColumn()) if in_bytes else (TaskProgressColumn(),)
    columns = (TextColumn("{task.description}"), BarColumn(), *amount, TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr, highlight=False), transient=transient) as bar:
        yield bar


def _inputs_used(p: Plan, j: int) -> int:
    return int(np.count_nonzero(p.fit.weights[:, j]))


def _synthesis_warnings(p: Plan) -> list[str]:
    notes = list(p.warnings())
    latest = p.fixed_from.t  # the last snapshot at or before the target time
    for target, error in zip(p.targets, p.fit.profile_error):
        if error > POOR:
            where = (  # the end of an EMA's profile lies after the last snapshot: nothing records it
                f"--step {p.t} is after the last snapshot at or before it (t={latest}); use --step {latest}"
                if latest < p.t
                else "`posthoc-ema inspect` shows which lengths are faithful"
            )
            notes.append(
                f"{target_name(target)}: profile error {error:.2g} — the snapshots represent this "
                f"{'length' if target.sigma_rel is not None else 'target'} only roughly; {where}"
            )
    if p.incomplete:
        notes.append(
            f"{p.incomplete} incomplete sharded snapshot(s) in {p.folder} were skipped: writes that did not finish "
            "(see `posthoc-ema inspect`)"
        )
    if p.skipped_files:
        notes.append(f"{p.skipped_files} file(s) in {p.folder} are not snapshots and were ignored (see `posthoc-ema inspect`)")
    return notes


def _synthesis_document(
    p: Plan, paths: list[Path], dtype: str | None, accumulate: str, total: int, seconds: float, warnings: list[str]
) -> dict[str, Any]:
    return {
        "folder": str(p.folder),
        "t": p.t,
        "time_unit": p.fixed_from.time_unit,
        "dtype": dtype or p.input_dtype,
        "accumulate": accumulate,
        "t_reason": p.t_reason,  # why t is earlier than the newest snapshot (null when it is not)
        "bytes_read": total,
        "synthesis_seconds": round(seconds, 4),  # from the start of streaming to the outputs in place
        "inputs": [{"file": str(s.path), "sigma_rel": s.sigma_rel, "t": s.t} for s in p.inputs],
        "outputs": [
            {
                "target": target.spec,
                "sigma_rel": target.sigma_rel,  # null for targets that are not power-function EMAs
                "gamma": None if target.sigma_rel is None else sigma_rel_to_gamma(target.sigma_rel),
                "initial_weight": target.initial_weight(p.t),
                "path": str(path),
                "inputs_used": _inputs_used(p, j),
                "profile_error": float(p.fit.profile_error[j]),
                "sum_abs_weights": float(p.fit.sum_abs_weights[j]),
                "weights": [float(w) for w in p.fit.weights[:, j]],
            }
            for j, (target, path) in enumerate(zip(p.targets, paths))
        ],
        "warnings": warnings,
    }


def _print_synthesis(p: Plan, paths: list[Path], total: int, seconds: float) -> None:
    console = _stdout()
    n = len(paths)
    console.print(
        f"Synthesized {n} EMA{'s' if n > 1 else ''} at t={p.t} ({escape(p.fixed_from.time_unit)}) "
        f"from {len(p.inputs)} snapshot{'s' if len(p.inputs) > 1 else ''} in {escape(str(p.folder))}: "
        f"{human_bytes(total)} read in {seconds:.2f} s of synthesis"
    )
    if p.t_reason:
        console.print(f"Default time: {escape(p.t_reason)}")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    first = "sigma_rel" if all(x.sigma_rel is not None for x in p.targets) else "target"
    for header in (first, "gamma", "inputs used", "profile error", "Σ|w|"):
        table.add_column(header, justify="right")
    table.add_column("output", overflow="fold")
    for j, (target, path) in enumerate(zip(p.targets, paths)):
        s = target.sigma_rel
        table.add_row(
            f"{s:g}" if s is not None else escape(target.spec),
            f"{sigma_rel_to_gamma(s):.2f}" if s is not None else "-",
            str(_inputs_used(p, j)),
            _fmt(float(p.fit.profile_error[j]), 2),
            f"{float(p.fit.sum_abs_weights[j]):.3g}",
            escape(str(path)),
        )
    console.print(table)


# -- inspect ----------------------------------------------------------------------------------------


@app.command(epilog="Example:  posthoc-ema inspect ckpts   (or --json for scripts)")
def inspect(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Snapshot folder written by the Recorder.")] = Path("ckpts"),
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    ema: Specs = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
) -> None:
    """Show what a snapshot folder holds and which EMA lengths it can synthesize, and how well.

    Reads headers only. Prints a table per recorded sigma_rel (snapshots, time
    range and spacing, dtype, tensors, parameters, bytes on disk), every problem
    found (files skipped and why, gaps in the schedule, snapshots whose tensors
    disagree), and for target lengths from 0.01 to 0.28 at the latest time the
    profile error and Σ|w| of the best mix of snapshots: lengths with an error
    below 0.01 are faithful. --sigma-rel, --beta and --ema add a row for each
    such target: how faithfully this folder reproduces it. Broken or foreign
    files are listed, never fatal; the exit code is 1 only when the folder holds
    no usable snapshot at all.
    """
    with _user_errors():
        targets = from_options(sigma_rel, beta, ema, required=False)
        catalogue = scan(folder)
        report = inspect_report(catalogue, targets)
        if as_json:
            _json(report)
        else:
            _print_inspect(report)
        if not catalogue.series:
            raise no_snapshots(catalogue.folder, "record some with posthoc_cli.Recorder, or pass the folder it wrote")


def _print_contents(console: Console, contents: dict[str, Any]) -> None:
    """What each snapshot averages and what the folder stores once (frozen weights)."""

    def part(p: dict[str, Any]) -> str:
        values = f"{p['parameters']:,} value{'s' if p['parameters'] != 1 else ''}"
        return f"{p['tensors']} tensor{'s' if p['tensors'] != 1 else ''} ({values}, {human_bytes(p['bytes'])})"

    line = f"Each snapshot averages {part(contents['averaged'])}"
    if contents["as_is"]["tensors"]:
        line += f" and keeps {part(contents['as_is'])} as they are (integer buffers)"
    once = contents["stored_once"]
    if once is None and contents["frozen_id"] is None:
        line += "; nothing is stored once (no frozen weights)"
    console.print(line)
    if once is not None:
        console.print(f"Stored once (frozen weights, not averaged): {part(once)} in {escape(once['path'])}")


def _print_inspect(report: dict[str, Any]) -> None:
    console = _stdout()
    series = report["series"]
    count = sum(s["snapshots"] for s in series)
    if series:
        console.print(
            f"{escape(report['folder'])}: {count} snapshots of {len(series)} sigma_rel(s), "
            f"latest t={report['latest_t']} ({escape(report['time_unit'])})"
        )
        table = Table(title="Recorded", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for header in ("sigma_rel", "gamma", "snapshots", "t range", "spacing", "dtype", "tensors", "parameters", "on disk"):
            table.add_column(header, justify="left" if header in ("t range", "dtype") else "right")
        for s in series:
            table.add_row(
                f"{s['sigma_rel']:g}", f"{s['gamma']:.2f}", str(s["snapshots"]), f"{s['t_first']}..{s['t_last']}",
                s["spacing"], s["dtype"], str(s["tensors"]), f"{s['parameters']:,}", human_bytes(s["bytes"]),
            )
        console.print(table)
        _print_contents(console, report["contents"])
    else:
        console.print(f"{escape(report['folder'])}: no posthoc-ema snapshots")
    if report["problems"] or report["ignored"] or report["incomplete"]:
        console.print("\nProblems:" if report["problems"] else "\nNotes:")
        for line in report["problems"]:
            console.print(f"  - {escape(line)}")
        for skipped in report["incomplete"]:
            console.print(f"  - incomplete sharded snapshot {escape(skipped['path'])}: {escape(skipped['reason'])} (never used)")
        for skipped in report["ignored"]:
            console.print(f"  - skipped {escape(skipped['path'])}: {escape(skipped['reason'])}")
        if report["broken"]:
            console.print("  synthesize refuses to run until the broken files above are moved out of the folder.")
    if report["grid"]:
        console.print()
        console.print(_grid_table(report["grid"], f"Synthesizable at t={report['t']} (faithful: profile error < {FAITHFUL:g})"))
        if report["t"] != report["latest_t"]:
            console.print(f"(t={report['t']}, synthesize's default: the latest time every sigma_rel has a snapshot)")
    if report.get("targets"):
        console.print()
        console.print(_targets_table(report["targets"], f"Asked-for targets at t={report['t']}"))


def _grid_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in ("sigma_rel", "gamma", "profile error", "Σ|w|", ""):
        table.add_column(header, justify="right" if header else "left")
    for row in rows:
        verdict = "faithful" if row["faithful"] else "approximate" if row["profile_error"] < POOR else "poor"
        if row["profile_error"] < FAITHFUL and not row["faithful"]:
            verdict = f"noisy (rounding ~{row['rounding_noise']:.0e})"
        table.add_row(
            f"{row['sigma_rel']:g}", f"{row['gamma']:.2f}", _fmt(row["profile_error"], 2),
            f"{row['sum_abs_weights']:.3g}", verdict + (" (recorded)" if row["recorded"] else ""),
        )
    return table


def _targets_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One row per asked-for target: profile error, Σ|w|, weight on the initial weights, nearest power EMA."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in ("target", "profile error", "Σ|w|", "initial", "closest power EMA", ""):
        table.add_column(header, justify="left" if header in ("target", "") else "right")
    for row in rows:
        if "refused" in row:
            table.add_row(escape(row["target"]), "-", "-", "-", "-", escape(f"refused: {row['refused']}"))
            continue
        verdict = "faithful" if row["faithful"] else "approximate" if row["profile_error"] < POOR else "poor"
        if row["profile_error"] < FAITHFUL and not row["faithful"]:
            verdict = f"noisy (rounding ~{row['rounding_noise']:.0e})"
        table.add_row(
            escape(row["target"]), _fmt(row["profile_error"], 2), f"{row['sum_abs_weights']:.3g}",
            _fmt(row["initial_weight"], 2),
            f"sigma_rel {row['closest_sigma_rel']:.4g} (distance {_fmt(row['closest_distance'], 2)})", verdict,
        )
    return table


# -- plan -------------------------------------------------------------------------------------------


@app.command(
    "plan",
    epilog="Examples:  posthoc-ema plan --steps 100000 --snapshot-every 5000 --record 0.05 --record 0.10 --beta 0.9999"
    "   |   posthoc-ema plan --steps 100000 --want 0.03..0.25 --beta 0.9999",
)
def plan_command(
    steps: Annotated[int, typer.Option("--steps", "-T", help="Training length T (the target time).")],
    snapshot_every: Annotated[
        int | None, typer.Option("--snapshot-every", help="Recorder's snapshot interval (with --record).")
    ] = None,
    record: Annotated[list[float] | None, typer.Option("--record", help="A sigma_rel to record; repeat.")] = None,
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    ema: Specs = None,
    want: Annotated[
        str | None, typer.Option("--want", metavar="LO..HI", help="Recommend a recording for this sigma_rel range.")
    ] = None,
    max_error: Annotated[float, typer.Option("--max-error", help="Profile error the recommendation must stay below.")] = FAITHFUL,
    params: Annotated[int | None, typer.Option("--params", min=1, help="Averaged parameters, for the disk cost.")] = None,
    dtype: Annotated[str, typer.Option(help="Snapshot dtype: float32, float16 or bfloat16.")] = "float32",
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png", help="Draw profile error vs sigma_rel.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
) -> None:
    """Before training: what a recording will reproduce, and what it costs; or the cheapest that suffices.

    With --snapshot-every and --record: the table `inspect` will print for that
    folder (profile error and Σ|w| of lengths 0.01..0.28, a row per target) and
    the disk it takes (with --params). Without --record: a recommendation, the
    cheapest pair (or triple) of sigma_rels and the largest snapshot interval
    whose profile error stays below --max-error for every --want length and target.
    """
    from ..analysis import recording_plan as planning

    with _user_errors():
        targets = from_options(sigma_rel, beta, ema, required=False)
        if record:
            if snapshot_every is None:
                raise InvalidValueError("--record needs --snapshot-every", "give the Recorder's snapshot interval")
            report = planning.plan_report(steps=steps, snapshot_every=snapshot_every, record=record,
                                          targets=targets, params=params, dtype=dtype)
            document: dict[str, Any] = report
        else:
            wanted = planning.parse_range(want) if want is not None else None
            document = planning.recommend(steps=steps, want=wanted, targets=targets, max_error=max_error,
                                          dtype=dtype, params=params)
            if document["record"] is None:
                raise _fail(f"no pair or triple of sigma_rels tried reaches profile error {max_error:g} for "
                            f"{', '.join(document['wanted'][:4])}{' …' if len(document['wanted']) > 4 else ''} — "
                            "allow a larger --max-error or narrow --want", 1)
            report = document["plan"]
        if plot is not None:
            from ..analysis.plotting import draw_plan

            draw_plan(report, plot)
        if as_json:
            _json(document)
            return
        console = _stdout()
        if not record:
            console.print(
                f"Recommended: --record {' --record '.join(f'{s:g}' for s in document['record'])} "
                f"--snapshot-every {document['snapshot_every']} ({document['snapshots']} snapshots; "
                f"worst profile error {document['worst_error']:.2g} ≤ {max_error:g})\n"
            )
        disk = "" if report["disk_bytes"] is None else f", {human_bytes(report['disk_bytes'])} of tensors ({report['dtype']})"
        console.print(
            f"Recording sigma_rel {', '.join(f'{s:g}' for s in report['record'])} every {report['snapshot_every']} steps "
            f"up to {report['steps']}: {report['snapshots']} snapshots{disk}; synthesis at t={report['latest_t']}"
        )
        console.print()
        console.print(_grid_table(report["grid"], f"Synthesizable at t={report['latest_t']} (faithful: profile error < {FAITHFUL:g})"))
        if report["targets"]:
            console.print()
            console.print(_targets_table(report["targets"], f"Targets at t={report['latest_t']}"))


# -- plot -------------------------------------------------------------------------------------------


@app.command(epilog="Example:  posthoc-ema plot ckpts --beta 0.9999 -s 0.1 --out ema.png   (needs pip install 'posthoc-ema[plot]')")
def plot(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Snapshot folder written by the Recorder.")] = Path("ckpts"),
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    ema: Specs = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE.png", help="The PNG to write.")] = Path("posthoc-ema.png"),
    step: Annotated[int | None, typer.Option("--step", "-t", help="Target training time (default: the latest).")] = None,
) -> None:
    """Draw each target's profile over training time next to its reconstruction from the snapshots
    (snapshot times marked), and the profile error against sigma_rel (recorded lengths marked,
    the faithful band shaded, other targets placed at their closest sigma_rel)."""
    from ..analysis.plotting import draw, plot_series

    with _user_errors():
        targets = from_options(sigma_rel, beta, ema, required=False)
        catalogue = scan(folder)
        catalogue.raise_if_broken()
        snaps = catalogue.snapshots
        if not snaps:
            raise no_snapshots(catalogue.folder, "pass the folder the Recorder wrote")
        t = catalogue.complete_t if step is None else step  # as synthesize
        dtype = max((s.dtype for s in snaps), key=lambda d: {"float32": 0, "bfloat16": 2, "float16": 1}[d])
        series = plot_series([s.t for s in snaps], [s.sigma_rel for s in snaps], t, targets, dtype)
        draw(series, out, time_unit=snaps[-1].time_unit)
        _say(f"wrote {out}")


# -- classical EMA ----------------------------------------------------------------------------------


def _classical(beta: float, steps: int, update_every: int) -> tuple[float, float, bool]:
    """(sigma_rel, weight left on the initial weights, whether a power-function EMA can match it)."""
    sigma_rel = beta_to_sigma_rel(beta, steps, update_every)
    initial = beta ** (steps // update_every)
    return sigma_rel, initial, SIGMA_REL_MIN <= sigma_rel < SIGMA_REL_MAX and initial < MOSTLY_INITIAL


def _unreachable(sigma_rel: float, initial: float) -> str:
    if initial >= MOSTLY_INITIAL:
        return f"the EMA is still {initial:.0%} initial weights: no power-function EMA matches it"
    if sigma_rel < SIGMA_REL_MIN:
        return f"sigma_rel {sigma_rel:.4g} < {SIGMA_REL_MIN:g}: the latest weights, shorter than any power-function EMA"
    return f"sigma_rel {sigma_rel:.4g} ≥ 1/√12 = {SIGMA_REL_MAX:.4f}: no power-function EMA is that long"


@app.command(
    "beta-to-sigma",
    epilog="Examples:  posthoc-ema beta-to-sigma 0.999   |   posthoc-ema beta-to-sigma 0.9999 --steps 100000",
)
def beta_to_sigma(
    beta: Annotated[float, typer.Argument(metavar="BETA", help="Decay of a classical EMA, in (0, 1), e.g. 0.999.")],
    steps: Annotated[
        int | None, typer.Option("--steps", "-T", min=1, help="Training length T; prints the sigma_rel alone.")
    ] = None,
    update_every: Annotated[int, typer.Option("--update-every", "-k", min=1, help="The EMA is updated every k steps.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead.")] = False,
) -> None:
    """Translate a classical EMA decay (beta) into the sigma_rel of post-hoc EMA.

    A constant-beta EMA averages over a fixed number of steps; sigma_rel is that
    width relative to the training length, so the answer depends on T. With
    --steps T only the number is printed on stdout (exact, including the weight
    the EMA still gives the initial weights). Lengths no power-function EMA can
    have (sigma_rel ≥ 1/√12, or an EMA that is still mostly its initial weights)
    are reported on stderr with exit code 1 instead. Without --steps a table
    for several training lengths is printed, with the half-life and the standard
    deviation of the EMA in steps. Equal standard deviation is not equal shape:
    the power-function EMA closest in profile (to the EMA as torch's AveragedModel
    keeps it, the first update a copy) is printed too, on stderr with --steps.
    """
    with _user_errors():
        half_life, std = beta_half_life(beta, update_every), beta_std_steps(beta, update_every)
        if steps is not None:
            sigma_rel, initial, ok = _classical(beta, steps, update_every)
            if not ok:
                too_short = sigma_rel < SIGMA_REL_MIN  # the other failures are EMAs too long for the run
                raise _fail(f"beta {beta} after {steps} steps: {_unreachable(sigma_rel, initial)} — "
                            f"use {'a larger beta or a shorter run' if too_short else 'a smaller beta or a longer run'}", 1)
            closest, distance = closest_power(Classical(beta, update_every), steps)
            if as_json:
                _json({"beta": beta, "steps": steps, "update_every": update_every, "sigma_rel": sigma_rel,
                       "initial_weight": initial, "closest_sigma_rel": closest, "profile_distance": distance})
                return
            _say(f"closest power-function EMA in profile: sigma_rel {closest:.6g} (relative profile distance {distance:.2g})")
            sys.stdout.write(f"{sigma_rel:.6g}\n")
            return
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for header in ("training length T", "sigma_rel", "gamma", "closest in profile", ""):
            table.add_column(header, justify="right" if header else "left")
        first = max(2, int(math.floor(math.log10(std))))
        rows: list[dict[str, Any]] = []
        for exponent in range(first, first + 5):  # every row is computed before anything is printed
            t = 10**exponent
            if t < update_every:
                continue
            sigma_rel, initial, ok = _classical(beta, t, update_every)
            row: dict[str, Any] = {"steps": t, "sigma_rel": sigma_rel if ok else None, "initial_weight": initial}
            if ok:
                row["closest_sigma_rel"], row["profile_distance"] = closest_power(Classical(beta, update_every), t)
                table.add_row(f"{t:,}", f"{sigma_rel:.4g}", f"{sigma_rel_to_gamma(sigma_rel):.2f}",
                              f"{row['closest_sigma_rel']:.4g} (distance {row['profile_distance']:.2g})", "")
            else:
                row["problem"] = _unreachable(sigma_rel, initial)
                table.add_row(f"{t:,}", "-", "-", "-", row["problem"])
            rows.append(row)
        if as_json:
            _json({"beta": beta, "update_every": update_every, "half_life": half_life, "std_steps": std, "rows": rows})
            return
        console = _stdout()
        every = "every step" if update_every == 1 else f"every {update_every} steps"
        console.print(f"Classical EMA with beta = {beta!r}, updated {every}")
        console.print(f"  half-life {half_life:,.1f} steps; standard deviation of its profile {std:,.1f} steps\n")
        console.print(table)
        console.print(
            "\nsigma_rel is relative to the training length: the same beta is a relatively longer EMA in a "
            "shorter run. Pass --steps T for the value at your T alone."
        )


@app.command("sigma-to-beta", epilog="Example:  posthoc-ema sigma-to-beta 0.10 --steps 100000")
def sigma_to_beta(
    sigma_rel: Annotated[float, typer.Argument(metavar="SIGMA_REL", help="Post-hoc EMA length, in (0, 0.2887).")],
    steps: Annotated[int, typer.Option("--steps", "-T", min=1, help="Training length T.")],
    update_every: Annotated[int, typer.Option("--update-every", "-k", min=1, help="The EMA is updated every k steps.")] = 1,
) -> None:
    """Find the classical EMA decay (beta) that has this sigma_rel after T steps.

    The inverse of beta-to-sigma: prints only the number, so scripts can use it.
    Of the two decays with the same spread it gives the one that has forgotten
    the initial weights (the smaller).
    """
    with _user_errors():
        check_sigma_rel(sigma_rel)
        sys.stdout.write(f"{sigma_rel_to_beta(sigma_rel, steps, update_every)!r}\n")  # repr: exact round trip


# -- demo -------------------------------------------------------------------------------------------


@app.command(epilog="Example:  posthoc-ema demo --out demo-ckpts   then   posthoc-ema inspect demo-ckpts")
def demo(
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Keep the snapshots in this new folder (default: a temporary one, removed)."),
    ] = None,
    steps: Annotated[int | None, typer.Option(hidden=True, min=1, help="Training steps (for quick tests).")] = None,
    snapshot_every: Annotated[int | None, typer.Option(hidden=True, min=1)] = None,
) -> None:
    """Train a small model on built-in data, record two EMAs, then pick the best EMA length afterwards.

    An MLP learns a noisy synthetic regression task with a high learning rate
    while a Recorder keeps EMAs with sigma_rel 0.05 and 0.10. Then one pass of
    synthesis makes a sweep of other lengths, and the validation loss of the raw
    weights, of both recorded EMAs and of every synthesized one is printed, best
    marked. Seeded, no downloads, a few seconds on a laptop CPU.
    """
    from . import demo as demo_lib  # torch: only this command trains a model

    steps = demo_lib.STEPS if steps is None else steps
    snapshot_every = demo_lib.SNAPSHOT_EVERY if snapshot_every is None else snapshot_every
    with _user_errors(), _demo_folder(out) as folder:
        with _progress(enabled=sys.stderr.isatty(), in_bytes=False, transient=True) as bar:
            tasks: dict[str, Any] = {}

            def report(stage: str, done: int, total: int) -> None:
                if bar is not None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total)
                    bar.update(tasks[stage], completed=done, total=total)

            result = demo_lib.run_demo(folder, steps=steps, snapshot_every=snapshot_every, progress=report)
        _print_demo(result, kept=out is not None)


@contextlib.contextmanager
def _demo_folder(out: Path | None) -> Iterator[Path]:
    if out is not None:
        yield out
        return
    scratch = Path(tempfile.mkdtemp(prefix="posthoc-ema-demo-"))
    try:
        yield scratch / "ckpts"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _print_demo(result: demo_lib.DemoResult, *, kept: bool) -> None:
    from . import demo as demo_lib

    console = _stdout()
    console.print(
        f"Trained a {result.parameters:,}-parameter MLP for {result.steps:,} steps in {result.train_seconds:.1f} s, "
        f"recording EMAs with sigma_rel {' and '.join(map(str, demo_lib.RECORDED))} "
        f"({result.snapshots} snapshots); synthesized {len(result.rows) - 3} lengths in one pass in "
        f"{result.synthesize_seconds:.2f} s."
    )
    raw = result.rows[0].val_loss
    best = result.best
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in ("weights", "sigma_rel", "profile error", "val loss", "vs raw", ""):
        table.add_column(header, justify="left" if header in ("weights", "") else "right")
    for row in result.rows:
        table.add_row(
            row.label,
            "-" if row.sigma_rel is None else f"{row.sigma_rel:g}",
            "-" if row.profile_error is None else _fmt(row.profile_error, 2),
            f"{row.val_loss:.4f}",
            f"{row.val_loss / raw - 1:+.1%}" if row is not result.rows[0] else "",
            "<- best" if row is best else "",
        )
    console.print(table)
    what = "the raw weights" if best.sigma_rel is None else f"the {best.label} EMA with sigma_rel {best.sigma_rel:g}"
    console.print(f"\nBest: {what}, validation loss {best.val_loss:.4f} ({best.val_loss / raw - 1:+.1%} vs raw weights).")
    if kept:
        folder = escape(str(result.folder))
        console.print(
            f"Snapshots kept in {folder} (synthesized files in {escape(str(result.synthesized_folder))}). Try:\n"
            f"  posthoc-ema inspect {folder}\n"
            f"  posthoc-ema synthesize {folder} --sigma-rel {best.sigma_rel or 0.15:g} --out ema.safetensors"
        )


# -- entry point ------------------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        try:
            sys.stdout.write(f"posthoc-ema {__version__}\n")
            sys.stdout.flush()  # here, not in Click, which would exit 1 on a closed pipe
        except BrokenPipeError:
            raise typer.Exit(_closed_pipe()) from None
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
    global _interrupt_reported, _peer_lost
    _interrupt_reported = _peer_lost = False
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
        _say(f"Error: {message} — see '{where} --help'")
        sys.exit(getattr(e, "exit_code", 2))
    except PosthocError as e:
        _say(f"Error: {cli_text(e)}")
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _say("Error: interrupted")
        sys.exit(130)
    if code == 130 and not _interrupt_reported:
        _say("Error: interrupted")
    try:
        sys.stdout.flush()  # what is still buffered: a reader gone by now is a closed pipe too
    except BrokenPipeError:
        code = _closed_pipe()
    code = code if isinstance(code, int) else 0
    if _peer_lost:  # see _quiet_rank; every file is closed or flushed by now, temporary files removed
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


__all__ = ["app", "main"]
