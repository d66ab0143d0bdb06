"""``posthoc-ema synthesize``: write the EMA of any length or kind, from the recorded snapshots.

The command parses and reports; planning and the streaming pass are
:mod:`posthoc_cli.synth`'s, run by one orchestrator on this process alone or, under
torchrun, on a :class:`~posthoc_cli.synth.team.Team` of ranks that split the work. Torch is imported only once synthesis starts
(see ``TENSOR_COMMANDS`` in :mod:`.main`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich import box
from rich.filesize import decimal as human_bytes
from rich.markup import escape
from rich.table import Table

from ..dtypes import ACCUMULATE, FLOAT_DTYPES, choose
from ..ema.profiles import sigma_rel_to_gamma
from ..ema.quality import POOR
from ..ema.targets import from_options, target_name
from ..synth.coordinator import Coordinator, OneProcess, launched
from ..synth.outputs import parse_size
from ..synth.plan import Plan
from ..synth.synthesis import plan_outputs, synthesize_iter
from .common import (
    RUN,
    Betas,
    Folder,
    SigmaRels,
    Specs,
    app,
    fmt,
    print_json,
    progress_bar,
    say,
    stdout,
    user_errors,
)


@app.command(
    epilog=(
        "Example:  posthoc-ema synthesize ckpts --sigma-rel 0.15 --out ema.safetensors\n\n"
        "To pick the length by your own metric:  posthoc-ema sweep ckpts --eval 'python eval.py {weights}'"
    ),
)
def synthesize(
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    ema: Specs = None,
    folder: Folder = Path("ckpts"),
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
    To choose the length by your own metric, `posthoc-ema sweep` synthesizes and evaluates candidates for you.
    """
    with user_errors("interrupted — no output was written"), contextlib.ExitStack() as stack:
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
            with progress_bar(enabled=sys.stderr.isatty() and coordinator.rank == 0) as bar:
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
            print_json(_synthesis_document(p, paths, dtype, accumulate, total, seconds, warnings))
        else:
            _print_synthesis(p, paths, total, seconds)
        for warning in warnings:
            say(f"Warning: {warning}")


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
        RUN.quiet_rank = (team.rank, os.dup(sys.stderr.fileno()))
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, sys.stdout.fileno())
        os.dup2(quiet, sys.stderr.fileno())
    return team


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
    console = stdout()
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
            fmt(float(p.fit.profile_error[j]), 2),
            f"{float(p.fit.sum_abs_weights[j]):.3g}",
            escape(str(path)),
        )
    console.print(table)
