"""Run under torchrun (2 processes, gloo): Lightning DDP on CPU with PosthocEMA, or 1 process with the same global batch.

Usage: ``torchrun --nproc_per_node 2 lightning_ddp_worker.py OUT_DIR [--resume CKPT]`` or
``python lightning_ddp_worker.py OUT_DIR --single``. Writes snapshots to OUT_DIR/ema (and, with
two processes, a Lightning checkpoint every two steps to OUT_DIR/ckpt).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from posthoc_cli.integrations.lightning import PosthocEMA  # noqa: E402


class Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        # One global batch per epoch: every step sees the same data, so a resumed run replays exactly
        # whichever batch position Lightning restarts from (its mid-epoch restart is not exact under DDP).
        x = torch.randn(8, 8, generator=g)
        data = TensorDataset(x, x[:, :3] * 2 - 1)
        if self.trainer.world_size == 1:
            return DataLoader(data, batch_size=8, shuffle=False)
        # Global batch 8: rank r takes samples r, r+2, ... in order, so the two halves make the one-process batch.
        sampler = DistributedSampler(data, shuffle=False)
        return DataLoader(data, batch_size=8 // self.trainer.world_size, sampler=sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit_and_report(trainer: L.Trainer, module: L.LightningModule, resume: Path | None, out: Path) -> None:
    """Fit (resuming from ``resume``), then write this rank's ``rank{R}-of-{W}.done`` to ``out``: the global
    step reached and whether its PosthocEMA's Recorder writes files, for the test to read."""
    trainer.fit(module, ckpt_path=resume)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, PosthocEMA)]
    assert callback.recorder is not None
    done = f"{trainer.global_step} writes={callback.recorder.writes}"
    (out / f"rank{trainer.global_rank}-of-{trainer.world_size}.done").write_text(done)


def main() -> None:
    out, single = Path(sys.argv[1]), "--single" in sys.argv
    resume = Path(sys.argv[sys.argv.index("--resume") + 1]) if "--resume" in sys.argv else None
    # No BatchNorm: its statistics are per rank under DDP, so they could not match one process.
    callbacks: list[L.Callback] = [PosthocEMA(out / "ema", (0.05, 0.10), snapshot_every=4)]
    if not single:  # a checkpoint every two steps, for the resume test
        callbacks.append(L.callbacks.ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", save_top_k=-1,
                                                     every_n_train_steps=2))
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if single else 2, strategy="auto" if single else "ddp", max_steps=10,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=not single,
        use_distributed_sampler=False, callbacks=callbacks, default_root_dir=out,
    )
    fit_and_report(trainer, Lit(), resume, out)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # Tear the gloo group down here, as the other workers do: left to interpreter exit, its threads
    # can be destroyed still joinable ("terminate called without an active exception", SIGABRT).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
