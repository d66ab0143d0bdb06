"""Lightning: ``PosthocEMA``, a callback that records post-hoc EMA snapshots of the LightningModule.

>>> from posthoc_cli.integrations.lightning import PosthocEMA  # doctest: +SKIP
>>> trainer = L.Trainer(max_steps=10_000, callbacks=[PosthocEMA("ckpts", snapshot_every=1000)])  # doctest: +SKIP
>>> trainer.fit(module)  # doctest: +SKIP

Time is ``trainer.global_step`` (optimizer steps). The callback updates the
EMAs at the end of every training batch after which the global step has
advanced, with ``step=trainer.global_step``: once per optimizer step under
gradient accumulation; when one batch takes several optimizer steps (manual
optimization with several optimizers) once at its end, the update's Δ
covering all of them. Its state (the EMAs, float32) goes into Lightning's
checkpoints, so ``trainer.fit(..., ckpt_path=...)`` continues them exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name ships the same Callback API
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        from ._common import missing_framework

        raise missing_framework("Lightning (lightning or pytorch_lightning)", "lightning") from e

import torch

from ..recorder import Recorder
from ._common import SHARDED_HINT, check_sigma_rels, open_recorder, refuse_sharded
from ..errors import InvalidValueError

# Strategies that shard parameters, by class name (the same in lightning and pytorch_lightning).
_SHARDED_STRATEGIES = {"FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"}


class PosthocEMA(pl.Callback):
    """Record power-function EMAs of the LightningModule during ``trainer.fit`` (post-hoc EMA).

    ``ckpt_dir``, ``sigma_rels``, ``snapshot_every`` and ``**recorder_options``
    (e.g. ``snapshot_dtype``, ``ema_device``, ``update_every``) go to
    :class:`posthoc_cli.Recorder`. ``evaluate_with=0.10`` runs every validation
    with that EMA's weights in the module and puts the training weights back
    afterwards (also when validation raises). ``save_state=False`` keeps the
    EMAs out of Lightning's checkpoints (smaller files; resuming is then exact
    only from a checkpoint at a snapshot time). Under DDP every rank keeps the
    EMAs and rank 0 writes.

    >>> trainer = L.Trainer(callbacks=[PosthocEMA("ckpts", evaluate_with=0.10)])  # doctest: +SKIP
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike[str],
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 1000,
        *,
        evaluate_with: float | None = None,
        save_state: bool = True,
        **recorder_options: Any,
    ) -> None:
        check_sigma_rels(sigma_rels, evaluate_with)
        if "write" in recorder_options:
            raise InvalidValueError("PosthocEMA decides which rank writes (rank 0)", "leave out write=")
        self.ckpt_dir = ckpt_dir
        self.evaluate_with = evaluate_with
        self.save_state = save_state
        self._options = dict(recorder_options, sigma_rels=tuple(sigma_rels), snapshot_every=snapshot_every)
        self.recorder: Recorder | None = None  # made at on_train_start, when the global step is known
        self._loaded: dict[str, Any] | None = None  # the Recorder state from the checkpoint being resumed
        self._last_step = 0
        self._is_global_zero = True
        self._swap = contextlib.ExitStack()

    @property
    def state_key(self) -> str:
        # Not the folder: a resumed run may spell its path differently (relative, moved machines).
        return self._generate_state_key(sigma_rels=self._options["sigma_rels"])

    # -- fit ---------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if type(trainer.strategy).__name__ in _SHARDED_STRATEGIES:
            raise InvalidValueError(f"PosthocEMA cannot record under {type(trainer.strategy).__name__} yet", SHARDED_HINT)
        refuse_sharded(pl_module, "the strategy")
        self._close()
        self._is_global_zero = trainer.is_global_zero
        step = trainer.global_step
        state, self._loaded = self._loaded, None
        self.recorder = open_recorder(
            pl_module, self.ckpt_dir, self._options, step=step, state=state,
            writer=trainer.is_global_zero, barrier=trainer.strategy.barrier,
        )
        self._last_step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.recorder is not None and step > self._last_step:  # accumulation: only after a real step
            self.recorder.update(step=step)
            self._last_step = step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None and self.recorder.t > 0:
            self.recorder.snapshot()  # the final one; skipped inside when t was a snapshot time
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap.close()  # the training weights come back, whatever failed
        with contextlib.suppress(Exception):  # the trainer's exception matters more than a write error
            self._close()

    def _close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()  # snapshots written so far are on disk; the EMAs stay usable

    # -- validation with an EMA ------------------------------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The sanity check runs before on_train_start: this fit has no EMA yet (a previous fit's may linger).
        if self.evaluate_with is not None and self.recorder is not None and not trainer.sanity_checking:
            self._swap.enter_context(self.recorder.swapped(self.evaluate_with))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap.close()

    # -- Lightning checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if not self.save_state or self.recorder is None or not self._is_global_zero:
            return {}  # only rank 0's copy is saved: every rank holds the same EMAs
        self.recorder.flush()  # the snapshots up to this step are on disk before the checkpoint is
        return {"recorder": self.recorder.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("recorder")


__all__ = ["PosthocEMA"]
