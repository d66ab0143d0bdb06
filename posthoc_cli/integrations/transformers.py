"""Hugging Face: ``PosthocEMACallback``, a ``transformers.TrainerCallback`` that records post-hoc EMA snapshots.

>>> from posthoc_cli.integrations.transformers import PosthocEMACallback  # doctest: +SKIP
>>> trainer = Trainer(model, args, train_dataset=data, callbacks=[PosthocEMACallback(snapshot_every=1000)])  # doctest: +SKIP
>>> trainer.train()  # doctest: +SKIP

Time is ``state.global_step``: the Trainer calls ``on_step_end`` once per
optimizer step (after ``gradient_accumulation_steps`` batches). Beside each
``checkpoint-N`` the callback saves the EMA state (``posthoc_ema_state.pt``),
so ``trainer.train(resume_from_checkpoint=...)`` continues the EMAs exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import transformers
except ImportError as e:
    from ._common import missing_framework

    raise missing_framework("transformers", "transformers") from e

import torch

from ..errors import InvalidValueError, OutputError
from ..format.catalogue import INTEGRATIONS_FOLDER
from ..record import ranks
from ..record.recorder import Recorder
from ._common import open_recorder, refuse_sharded

# The Trainer's FSDP runs through Accelerate, which turns it on for accelerators only (not on CPU), so
# this callback's FSDP path could not be tested here: refused, saying what records sharded models instead.
HF_SHARDED_HINT = (
    "train with DDP, or record FSDP2 with posthoc_cli.Recorder on the fully_shard model in your own or "
    "Accelerate loop, or with Lightning's ModelParallelStrategy and PosthocEMA"
)

STATE_NAME = "posthoc_ema_state.pt"  # beside the Trainer's files in each checkpoint-N folder


class PosthocEMACallback(transformers.TrainerCallback):
    """Record power-function EMAs of the model during ``Trainer.train`` (post-hoc EMA).

    ``ckpt_dir`` defaults to ``<output_dir>/posthoc-ema``; ``sigma_rels``,
    ``snapshot_every`` and ``**recorder_options`` go to :class:`posthoc_cli.Recorder`.
    ``save_state=False`` keeps the EMAs out of the checkpoints (resuming is then
    exact only from a checkpoint at a snapshot time). Under DDP every process
    keeps the EMAs and world process zero writes.

    >>> PosthocEMACallback(sigma_rels=(0.05, 0.10), snapshot_every=500)  # doctest: +SKIP
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike[str] | None = None,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 1000,
        *,
        save_state: bool = True,
        **recorder_options: Any,
    ) -> None:
        if "write" in recorder_options:
            raise InvalidValueError("PosthocEMACallback decides which process writes (world process zero)", "leave out write=")
        self.ckpt_dir = ckpt_dir
        self.save_state = save_state
        self._options = dict(recorder_options, sigma_rels=tuple(sigma_rels), snapshot_every=snapshot_every)
        self.recorder: Recorder | None = None

    def _folder(self, args: transformers.TrainingArguments) -> Path:
        return Path(self.ckpt_dir) if self.ckpt_dir is not None else Path(str(args.output_dir)) / INTEGRATIONS_FOLDER

    def on_train_begin(
        self, args: transformers.TrainingArguments, state: transformers.TrainerState,
        control: transformers.TrainerControl, model: torch.nn.Module | None = None, **kwargs: Any,
    ) -> None:
        if model is None:
            raise InvalidValueError("the Trainer passed no model to PosthocEMACallback", "use transformers.Trainer")
        if getattr(args, "fsdp", None):
            raise InvalidValueError("PosthocEMACallback does not record under the Trainer's FSDP (args.fsdp)", HF_SHARDED_HINT)
        refuse_sharded(model, "the training set-up", HF_SHARDED_HINT)
        if self.recorder is not None:
            self.recorder.close()
        step = state.global_step
        saved = self._find_state(args, step) if step > 0 and self.save_state else None
        self.recorder = open_recorder(
            model, self._folder(args), self._options, step=step,
            state=torch.load(saved, map_location="cpu", weights_only=True) if saved else None,
            writer=state.is_world_process_zero, barrier=ranks.barrier,
        )

    def _find_state(self, args: transformers.TrainingArguments, step: int) -> Path | None:
        """The EMA state of the checkpoint being resumed: the Trainer tells callbacks its step, not its path."""
        places = [Path(str(args.output_dir)) / f"checkpoint-{step}"]
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str):
            places.insert(0, Path(resume))
        for place in places:
            if (place / STATE_NAME).is_file():
                return place / STATE_NAME
        return None

    def on_step_end(
        self, args: transformers.TrainingArguments, state: transformers.TrainerState,
        control: transformers.TrainerControl, **kwargs: Any,
    ) -> None:
        if self.recorder is not None:
            self.recorder.update(step=state.global_step)

    def on_save(
        self, args: transformers.TrainingArguments, state: transformers.TrainerState,
        control: transformers.TrainerControl, **kwargs: Any,
    ) -> None:
        if not (self.save_state and self.recorder is not None and state.is_world_process_zero):
            return
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return  # a checkpoint saved elsewhere (hyper-parameter search runs): nothing to sit beside
        self.recorder.flush()  # the snapshots up to this step are on disk before the checkpoint is complete
        tmp = folder / (STATE_NAME + ".tmp")
        try:
            torch.save(self.recorder.state_dict(), tmp)
            os.replace(tmp, folder / STATE_NAME)
        except OSError as e:
            raise OutputError(f"cannot save the EMA state in {folder} ({e.strerror})", "check the disk") from e

    def on_train_end(
        self, args: transformers.TrainingArguments, state: transformers.TrainerState,
        control: transformers.TrainerControl, **kwargs: Any,
    ) -> None:
        if self.recorder is not None:
            if self.recorder.t > 0:
                self.recorder.snapshot()  # the final one; skipped inside when t was a snapshot time
            self.recorder.close()


__all__ = ["PosthocEMACallback", "STATE_NAME"]
