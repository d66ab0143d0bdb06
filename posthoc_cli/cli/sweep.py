"""``posthoc-ema sweep``: evaluate candidate EMAs with the user's own command and keep the best.

The work is :mod:`posthoc_cli.choice`'s (the space of candidates, the results
file, claims, the loop); this module parses, shows progress and prints the table.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..analysis.plotting import check_plotting
from ..choice.evaluation import PLACEHOLDERS, check_template
from ..choice.evaluators import CommandEvaluator
from ..choice.results import default_path
from ..choice.space import build
from ..choice.sweep import CLAIM_TIMEOUT, SweepResult, no_success, run
from ..ema.quality import POOR
from ..ema.targets import from_options
from ..errors import InvalidValueError, OutputError
from ..synth.outputs import parse_size
from ..synth.synthesis import synthesize as synthesize_file
from .common import Betas, Folder, SigmaRels, Specs, app, fmt, print_json, say, stdout, user_errors

_EVAL_HELP = (
    "Shell command run once per candidate; it prints the metric (its last line that is a number, or see --metric). "
    "Placeholders, shell-quoted: " + ", ".join("{" + p + "}" for p in PLACEHOLDERS) + ". {weights} is required."
)


@app.command(
    epilog=(
        "Examples:  posthoc-ema sweep ckpts --eval 'python eval.py {weights}'\n\n"
        "posthoc-ema sweep ckpts --eval 'python fid.py {weights} --seed {seed}' --jobs 4 --devices 0,1,2,3 "
        "--repeats 3 --plot sweep.png --out best.safetensors"
    ),
)
def sweep(
    folder: Folder = Path("ckpts"),
    eval_command: Annotated[str, typer.Option("--eval", metavar="CMD", help=_EVAL_HELP)] = "",
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    ema: Specs = None,
    step: Annotated[
        list[int] | None,
        typer.Option("--step", "-t", help="Synthesis time; repeatable for a grid over time (default: the latest complete one)."),
    ] = None,
    grid: Annotated[int, typer.Option(help="Without targets: sigma_rels log-spaced across the faithful band (plus the recorded ones).")] = 7,
    refine: Annotated[int, typer.Option(help="Without targets: more sigma_rels placed by a bracketing search around the best; 0: none.")] = 3,
    repeats: Annotated[int, typer.Option(help="Evaluations per candidate ({seed} = 0 … R−1); their mean decides.")] = 1,
    metric: Annotated[
        str | None, typer.Option("--metric", metavar="KEY", help="Read KEY from the last line of the output that is a JSON object.")
    ] = None,
    maximize: Annotated[bool, typer.Option("--maximize", help="Higher metrics are better (default: lower).")] = False,
    jobs: Annotated[int | None, typer.Option(min=1, help="Evaluations at once (default: one per --devices entry, or 1).")] = None,
    devices: Annotated[
        str | None,
        typer.Option(metavar="LIST", help="Devices for the jobs, e.g. 0,1,2,3: each job gets one as CUDA_VISIBLE_DEVICES and {device}."),
    ] = None,
    timeout: Annotated[float | None, typer.Option(metavar="S", help="Kill an evaluation (its whole process group) after S seconds: a failed row.")] = None,
    results: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Results file (default: DIR/sweeps/<name>.jsonl, named by CMD and the snapshots).")
    ] = None,
    tmp: Annotated[Path | None, typer.Option(metavar="DIR", help="Folder for the candidates' files (default: beside the results file).")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep each candidate's file after its evaluation.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Evaluate again the candidates that failed in earlier runs.")] = False,
    claim_timeout: Annotated[
        float, typer.Option(metavar="S", help="Take over a candidate whose owner (another host) gave no sign of life for S seconds.")
    ] = CLAIM_TIMEOUT,
    out: Annotated[
        str | None, typer.Option("--out", "-o", metavar="PATH", help="Write the best candidate's weights here, as synthesize would.")
    ] = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option("--max-shard-size", metavar="SIZE", help="Candidates and --out as Hugging Face folders of shards of at most SIZE."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
    allow_poor: Annotated[
        bool, typer.Option("--allow-poor", help=f"Evaluate targets the snapshots reproduce poorly (profile error > {POOR:g}) too.")
    ] = False,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png", help="Draw the metric against sigma_rel (needs the \\[plot] extra).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of the table.")] = False,
) -> None:
    """Find the best EMA by your own metric: evaluate candidates with a command, resumably and in parallel.

    Each candidate EMA is synthesized into a file, CMD runs on it, and the metric it
    prints is appended to a results file. Without targets the candidates are
    --grid sigma_rels across the band the folder reproduces faithfully (profile
    error < 0.01), plus the recorded ones, then --refine more around the best.
    Rerunning the same command resumes; the same command on several hosts sharing
    the folder splits the work (each candidate is evaluated once). A failed
    evaluation (non-zero exit, no metric, NaN, --timeout) is a failed row; the sweep
    exits 1 only if none succeeded. Ctrl-C keeps every finished evaluation.
    """
    with user_errors("interrupted — finished evaluations are kept in the results file; rerun to continue"):
        if not eval_command:
            raise InvalidValueError("no evaluation command", "pass --eval 'python eval.py {weights}'")
        check_template(eval_command)
        if max_shard_size is not None:
            parse_size(max_shard_size)
        if plot is not None:
            check_plotting()
        if out is not None and Path(out).exists() and not force:
            raise OutputError(f"{out} exists", "pass --force to overwrite it, or choose another --out")
        device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices is not None else []
        if devices is not None and not device_list:
            raise InvalidValueError(f"--devices {devices!r} names no device", "pass e.g. --devices 0,1")
        if not claim_timeout > 0:
            raise InvalidValueError(
                f"--claim-timeout {claim_timeout:g} is not positive", f"pass a number of seconds, e.g. --claim-timeout {CLAIM_TIMEOUT:g}"
            )
        if timeout is not None and not timeout > 0:
            raise InvalidValueError(f"--timeout {timeout:g} is not positive", "pass a number of seconds, e.g. --timeout 600")
        targets = from_options(sigma_rel, beta, ema, required=False)
        space = build(
            folder, targets, steps=step, grid=grid, refine=refine, repeats=repeats, maximize=maximize, allow_poor=allow_poor
        )
        path = results or default_path(space.folder, eval_command, space.catalogue.snapshots, metric)
        evaluator = CommandEvaluator(
            space.folder, eval_command, tmp or path.with_suffix(".candidates"), metric=metric, timeout=timeout,
            devices=device_list, keep=keep, max_shard_size=max_shard_size, prefix=path.stem.rsplit("-", 1)[-1] + "-",
        )
        try:
            with _terminated_is_interrupted(), _progress(sys.stderr.isatty()) as progress:
                result = run(
                    space, path, evaluator, claim_timeout=claim_timeout, jobs=jobs or max(1, len(device_list)),
                    retry_failed=retry_failed, progress=progress,
                )
        finally:
            with contextlib.suppress(OSError):  # only once empty (another process may be writing into it)
                evaluator.tmp.rmdir()
        if result.best is None:
            raise no_success(result)
        written = None
        if out is not None:
            best = result.best
            written = synthesize_file(
                space.folder, best.target, t=best.step, out=out, max_shard_size=max_shard_size, force=force, allow_poor=True
            )[0]
        if plot is not None:
            result.plot(plot)
        if as_json:
            print_json({**result.document(), "out": None if written is None else str(written)})
        else:
            _print(result, space.folder, written, len(step or ()) > 1)
        failed = [row for row in result.rows if row.status != "ok"]
        if failed:
            say(f"Warning: {len(failed)} of {len(result.rows)} candidates failed; the first, {failed[0].target} "
                f"at t={failed[0].step}: {failed[0].error}")


@contextlib.contextmanager
def _terminated_is_interrupted() -> Iterator[None]:
    """SIGTERM (a batch scheduler cancelling the job) stops the sweep as Ctrl-C does: nothing half-done is kept."""

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt), signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before[0])
        if before[1] is not None:  # the handler ignores Ctrl-C while the sweep unwinds: a caller's comes back
            signal.signal(signal.SIGINT, before[1])


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """done/total, how many run here, and the time left; on stderr, when a person watches."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[running]} running"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr, highlight=False), transient=True) as bar:
        task = bar.add_task("sweep", total=None, running=0)

        def update(finished: int, expected: int, running: int) -> None:
            bar.update(task, completed=finished, total=expected, running=running)

        yield update


def _print(result: SweepResult, folder: Path, written: Path | None, by_time: bool) -> None:
    console = stdout()
    rows, best = result.rows, result.best
    assert best is not None
    power = all(row.target == f"sigma_rel={row.sigma_rel!r}" for row in rows)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    headers = (["t"] if by_time else []) + ["sigma_rel" if power else "target", "metric", "profile error", "Σ|w|", "status", "seconds", ""]
    for header in headers:
        table.add_column(header, justify="left" if header in ("target", "status", "") else "right")
    for row in rows:
        metric = "-" if row.metric is None else f"{row.metric:.6g}" + (f" ± {row.std:.2g}" if row.std is not None else "")
        cells = [str(row.step)] if by_time else []
        cells += [
            f"{row.sigma_rel:g}" if power else escape(row.target), metric, fmt(row.profile_error, 2),
            f"{row.sum_abs_weights:.3g}", row.status + (" (search)" if row.refined else ""), f"{row.seconds:.1f} s",
            "<- best" if row is best else "",
        ]
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"\nBest: {escape(best.target)} at t={best.step}, metric {best.metric:.6g} "
        f"({'highest' if result.maximize else 'lowest'} of {sum(r.status == 'ok' for r in rows)} evaluated; "
        f"results in {escape(str(result.results))})."
    )
    if written is not None:
        console.print(f"Wrote its weights to {escape(str(written))}.")
    else:
        spec = f"--sigma-rel {best.sigma_rel!r}" if best.target == f"sigma_rel={best.sigma_rel!r}" else f"--ema '{best.target}'"
        console.print(f"Write it with:  posthoc-ema synthesize {escape(str(folder))} {spec} --step {best.step} --out ema.safetensors")
