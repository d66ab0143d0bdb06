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

Under ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``)
every rank averages its own shards and writes its rank file of each set.
Lightning saves callback state from rank 0 only, so each rank's EMA state goes
into a file of its own beside the snapshots,
``<ckpt_dir>/.trainer-state/t<step>/rank-<rank>.pt``, and the checkpoint
keeps only its step.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
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

from ..errors import InvalidValueError
from ..record.recorder import Recorder
from ._common import check_sigma_rels, is_sharded, open_recorder

# Strategies whose parameters the Recorder cannot see as DTensors, by class name (the same in lightning
# and pytorch_lightning): FSDP1 flattens them, DeepSpeed ZeRO partitions them its own way.
_REFUSED_STRATEGIES = {"FSDPStrategy", "DeepSpeedStrategy"}
_REFUSED_HINT = (
    "use ModelParallelStrategy and shard with torch.distributed.fsdp.fully_shard (FSDP2) in configure_model, "
    "or the DDP strategy"
)
STATE_FOLDER = ".trainer-state"  # per-rank EMA states of a sharded run; scans skip names starting with "."


def rank_state_path(ckpt_dir: str | os.PathLike[str], step: int, rank: int) -> Path:
    """Where rank ``rank`` keeps its EMA state for the Lightning checkpoint at ``step`` (sharded runs)."""
    return Path(ckpt_dir) / STATE_FOLDER / f"t{step:012d}" / f"rank-{rank:05d}.pt"


class PosthocEMA(pl.Callback):
    """Record power-function EMAs of the LightningModule during ``trainer.fit`` (post-hoc EMA).

    ``ckpt_dir``, ``sigma_rels``, ``snapshot_every`` and ``**recorder_options``
    (e.g. ``snapshot_dtype``, ``ema_device``, ``update_every``) go to
    :class:`posthoc_cli.Recorder`. ``evaluate_with=0.10`` runs every validation
    with that EMA's weights in the module and puts the training weights back
    afterwards (also when validation raises). ``save_state=False`` keeps the
    EMAs out of Lightning's checkpoints (smaller files; resuming is then exact
    only from a checkpoint at a snapshot time). Under DDP every rank keeps the
    EMAs and rank 0 writes; under ``ModelParallelStrategy`` (FSDP2) each rank
    averages and writes its shards, and keeps its EMA state in
    ``<ckpt_dir>/.trainer-state/`` (Lightning saves callback state from rank 0 only).

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
            raise InvalidValueError(
                "PosthocEMA decides which ranks write (rank 0; under FSDP2 each rank holding a shard)", "leave out write="
            )
        self.ckpt_dir = ckpt_dir
        self.evaluate_with = evaluate_with
        self.save_state = save_state
        self._options = dict(recorder_options, sigma_rels=tuple(sigma_rels), snapshot_every=snapshot_every)
        self.recorder: Recorder | None = None  # made at on_train_start, when the global step is known
        self._loaded: dict[str, Any] | None = None  # the Recorder state from the checkpoint being resumed
        self._last_step = 0
        self._is_global_zero = True
        self._sharded = False
        self._rank = 0
        self._sharded_at: int | None = None  # the step whose per-rank state files the checkpoint points to
        self._swap = contextlib.ExitStack()

    @property
    def state_key(self) -> str:
        # Not the folder: a resumed run may spell its path differently (relative, moved machines).
        return self._generate_state_key(sigma_rels=self._options["sigma_rels"])

    # -- fit ---------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(trainer.strategy).__name__
        if name in _REFUSED_STRATEGIES:
            raise InvalidValueError(f"PosthocEMA cannot record under {name}", _REFUSED_HINT)
        if any(hasattr(p, "ds_numel") for p in pl_module.parameters()):  # ZeRO-3 partitions, whatever the strategy
            raise InvalidValueError("DeepSpeed ZeRO partitions the model's parameters", _REFUSED_HINT)
        self._close()
        self._is_global_zero = trainer.is_global_zero
        self._sharded = is_sharded(pl_module)
        self._rank = trainer.global_rank
        step = trainer.global_step
        state, self._loaded = self._loaded, None
        sharded_at, self._sharded_at = self._sharded_at, None
        if self._sharded and sharded_at is not None:
            state = self._rank_state(sharded_at, step)
        self.recorder = open_recorder(
            pl_module, self.ckpt_dir, self._options, step=step, state=state,
            writer=trainer.is_global_zero, barrier=trainer.strategy.barrier,
        )
        self._last_step = step

    def _rank_state(self, sharded_at: int, step: int) -> dict[str, Any] | None:
        """This rank's EMA state saved beside the snapshots for the checkpoint being resumed (None: not there)."""
        path = rank_state_path(self.ckpt_dir, sharded_at, self._rank)
        if sharded_at != step or not path.is_file():
            # open_recorder then continues from the snapshots, with a warning when that is not exact.
            warnings.warn(f"posthoc-ema: no EMA state file {path} for this rank (another world size?)", stacklevel=3)
            return None
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return state

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
        if not self.save_state or self.recorder is None:
            return {}
        if self._sharded:
            # Every rank holds other shards, and Lightning keeps callback state from rank 0 only:
            # each rank writes its own file (atomically), the checkpoint records the step.
            self.recorder.flush()
            t = self.recorder.t
            path = rank_state_path(self.ckpt_dir, t, self._rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(self.recorder.state_dict(), tmp)
            os.replace(tmp, path)
            return {"sharded_state": t}
        if not self._is_global_zero:
            return {}  # only rank 0's copy is saved: every rank holds the same EMAs
        self.recorder.flush()  # the snapshots up to this step are on disk before the checkpoint is
        return {"recorder": self.recorder.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("recorder")
        at = state_dict.get("sharded_state")
        self._sharded_at = at if isinstance(at, int) else None


__all__ = ["PosthocEMA"]
