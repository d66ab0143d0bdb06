"""What the trainer callbacks share, free of any trainer import: opening a Recorder at a trainer's step."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..errors import InvalidValueError, ResumeError
from ..record.recorder import Recorder
from ..record.rewind import set_aside_after

SHARDED_HINT = (
    "with Lightning use ModelParallelStrategy (FSDP2 through fully_shard in configure_model) or DDP; "
    "elsewhere DDP, or drive posthoc_cli.Recorder yourself on the DTensor (FSDP2) model"
)


def missing_framework(framework: str, extra: str) -> ModuleNotFoundError:
    """The error raised when an integration is imported without its trainer installed."""
    return ModuleNotFoundError(f"posthoc_cli.integrations.{extra} needs {framework} — pip install 'posthoc-ema[{extra}]'")


def check_sigma_rels(sigma_rels: Sequence[float], evaluate_with: float | None) -> None:
    """``evaluate_with`` must be one of the tracked sigma_rels (checked when the callback is made, not mid-fit)."""
    if evaluate_with is not None and not any(abs(evaluate_with - s) <= 1e-12 * s for s in sigma_rels):
        raise InvalidValueError(
            f"evaluate_with={evaluate_with} is not one of sigma_rels {tuple(sigma_rels)}",
            "pass one of the tracked sigma_rels, or add it to sigma_rels",
        )


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensors (FSDP2, tensor parallel): the Recorder records them shard by shard."""
    return any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in model.parameters())


def refuse_sharded(model: nn.Module, where: str, hint: str = SHARDED_HINT) -> None:
    """Refuse sharded parameters (DTensor; DeepSpeed ZeRO-3) where the caller does not record them."""
    if is_sharded(model) or any(hasattr(p, "ds_numel") for p in model.parameters()):
        raise InvalidValueError(f"{where} shards the model's parameters", hint)


def open_recorder(
    model: nn.Module,
    ckpt_dir: str | os.PathLike[str],
    recorder_options: dict[str, Any],
    *,
    step: int,
    state: dict[str, Any] | None,
    writer: bool,
    barrier: Callable[[], None],
) -> Recorder:
    """A Recorder that continues at the trainer's global ``step`` (0: a fresh run).

    With ``state`` (the Recorder state saved in the trainer's checkpoint at ``step``)
    the EMAs continue exactly. Without it, from the snapshots at or before ``step``:
    exact when ``step`` is a snapshot time. Either way the writing rank first sets
    aside the snapshots written after ``step`` (an abandoned future), and every rank
    waits for that at ``barrier`` before it reads the folder. A sharded (DTensor)
    model's state is this rank's shards, and its Recorder decides which ranks write
    (each holding a shard): ``writer`` then only names the one rank that sets aside.
    """
    if step > 0:
        if writer:
            set_aside_after(ckpt_dir, step)
        barrier()
    options = dict(recorder_options)
    if not is_sharded(model):
        options.setdefault("write", writer)
    recorder = Recorder(model, ckpt_dir, **options)
    if state is not None:
        if state.get("t") != step:
            recorder.close()
            raise ResumeError(
                f"the EMA state in the checkpoint is at t={state.get('t')!r}, but the trainer resumes at step {step}",
                "resume from a checkpoint written by this callback",
            )
        recorder.load_state_dict(state)
    elif recorder.t > step:  # step 0 only: a later one set the future aside above
        recorder.close()
        raise ResumeError(
            f"{ckpt_dir} holds snapshots up to t={recorder.t} of an earlier run, but training starts at step {step}",
            "record into a new folder, or resume the earlier run from its trainer checkpoint",
        )
    elif step > 0 and recorder.t != step:
        # Not an error: a run resumed from a checkpoint saved without the EMA state still gets its EMAs,
        # only with the steps between the last snapshot and the checkpoint folded into the next update.
        warnings.warn(
            f"posthoc-ema: the trainer checkpoint at step {step} holds no EMA state; the EMAs continue from the "
            f"snapshots at t={recorder.t} (exact only when a checkpoint lies at a snapshot time)",
            stacklevel=3,
        )
    return recorder
