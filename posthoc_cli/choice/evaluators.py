"""The two ways to evaluate a candidate: a command run on a synthesized file, or a function given the weights in memory."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..ema.trackers import Target
from ..errors import PosthocError, cli_text
from ..synth.coordinator import OneProcess
from ..synth.synthesis import load_synthesized, plan_outputs, synthesize_iter
from .engine import Job
from .evaluation import STDERR_TAIL, Outcome, render, run_command

if TYPE_CHECKING:
    import torch

Evaluator = Callable[[dict[str, "torch.Tensor"], Target], float]  # what posthoc_cli.sweep calls


def candidate_name(job: Job, prefix: str = "") -> str:
    """``<prefix>sigma_rel-0.1-t2000-r0``: a candidate file's name, from its spec, time and repeat (the
    prefix tells apart the sweeps that share a ``--tmp`` folder)."""
    spec = re.sub(r"[^A-Za-z0-9._-]+", "-", job.candidate.spec.replace("=", "-")).strip("-.")
    return f"{prefix}{spec}-t{job.candidate.step}-r{job.repeat}"


@dataclass(frozen=True)
class CommandEvaluator:
    """Synthesizes each candidate into ``tmp``, runs the command on it, removes the file (unless ``keep``)."""

    folder: Path
    command: str
    tmp: Path
    metric: str | None = None
    timeout: float | None = None
    devices: Sequence[str] = ()
    keep: bool = False
    max_shard_size: str | None = None
    prefix: str = ""  # of the candidates' file names

    def __call__(self, job: Job, stop: threading.Event) -> Outcome | None:
        c = job.candidate
        device = self.devices[job.slot % len(self.devices)] if self.devices else ""
        name = candidate_name(job, self.prefix)
        out = self.tmp / (name if self.max_shard_size else name + ".safetensors")
        started = time.perf_counter()
        try:
            try:
                if not self._synthesize(job, out, stop):
                    return None
            except Exception as e:  # this candidate cannot be made (non-finite values, a full disk, …): a failed row
                return Outcome(None, f"synthesis failed: {_reason(e)}", None, time.perf_counter() - started)
            values = {
                "weights": str(out), "target": c.spec, "sigma_rel": repr(c.sigma_rel), "step": str(c.step),
                "seed": str(job.repeat), "device": device,
            }
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": device} if self.devices else None
            outcome = run_command(render(self.command, values), env=env, timeout=self.timeout, stop=stop, metric=self.metric)
            return None if outcome is None else dataclasses.replace(outcome, seconds=time.perf_counter() - started)
        finally:
            if not self.keep:
                _remove(out)

    def _synthesize(self, job: Job, out: Path, stop: threading.Event) -> bool:
        c = job.candidate
        p, paths = plan_outputs(
            OneProcess(), self.folder, [c.target], t=c.step, out=out, max_shard_size=self.max_shard_size, allow_poor=True
        )
        steps = synthesize_iter(p, paths, force=True, max_shard_size=self.max_shard_size)
        with contextlib.closing(steps):  # closed early: the output is not left behind
            for _ in steps:
                if stop.is_set():
                    return False
        return True


def _reason(error: Exception) -> str:
    if isinstance(error, PosthocError):
        return cli_text(error)
    return f"{type(error).__name__}: {error}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class FunctionEvaluator:
    """Synthesizes each candidate in memory and calls ``evaluate(state_dict, target)``: no file is written."""

    folder: Path
    evaluate: Evaluator

    def __call__(self, job: Job, stop: threading.Event) -> Outcome | None:
        c = job.candidate
        started = time.perf_counter()
        try:
            state = load_synthesized(self.folder, c.target, t=c.step, allow_poor=True)
            value = float(self.evaluate(state, c.target))
        except PosthocError as e:
            return Outcome(None, f"synthesis failed: {cli_text(e)}", None, time.perf_counter() - started)
        except Exception as e:  # the user's function failed on this candidate: a failed row, the sweep goes on
            tail = traceback.format_exc()[-STDERR_TAIL:]
            return Outcome(None, f"{type(e).__name__}: {e}", tail, time.perf_counter() - started)
        if not math.isfinite(value):
            return Outcome(None, f"no metric: the metric is {value}", None, time.perf_counter() - started)
        return Outcome(value, None, None, time.perf_counter() - started)


def identity(evaluate: Any) -> str:
    """What names a Python evaluator's results file: its module and qualified name."""
    return f"python:{getattr(evaluate, '__module__', '?')}.{getattr(evaluate, '__qualname__', type(evaluate).__name__)}"


__all__ = ["CommandEvaluator", "Evaluator", "FunctionEvaluator", "candidate_name", "identity"]
