"""Run under torchrun (2 processes, gloo): Lightning ``ModelParallelStrategy`` (FSDP2 via ``fully_shard``) on CPU
with PosthocEMA, and beside it a sharded Recorder driven by hand from the module's own hooks.

Usage: ``torchrun --nproc_per_node 2 lightning_fsdp2_worker.py OUT_DIR [--resume CKPT]``. Writes the callback's
snapshots to OUT_DIR/ema, the hand-driven ones to OUT_DIR/hand (not when resuming), and a distributed Lightning
checkpoint every two steps to OUT_DIR/ckpt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning_ddp_worker import fit_and_report
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from posthoc_cli import Recorder
from posthoc_cli.integrations.lightning import PosthocEMA


class Lit(L.LightningModule):
    def __init__(self, hand: Path | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        # 16 rows split evenly over 2 ranks, 3 rows unevenly.
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.hand = hand
        self.reference: Recorder | None = None

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8, 8, generator=g)  # one global batch per epoch: a resumed run replays it exactly
        data = TensorDataset(x, x[:, :3] * 2 - 1)
        return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=False))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    # The reference: a sharded Recorder driven by hand, once per optimizer step at the global step.
    def on_train_start(self) -> None:
        if self.hand is not None:
            self.reference = Recorder(self, self.hand, (0.05, 0.10), snapshot_every=4, async_write=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.reference is not None:
            self.reference.update(step=self.global_step)

    def on_train_end(self) -> None:
        if self.reference is not None:
            self.reference.snapshot()
            self.reference.close()


def main() -> None:
    out = Path(sys.argv[1])
    resume = Path(sys.argv[sys.argv.index("--resume") + 1]) if "--resume" in sys.argv else None
    callbacks: list[L.Callback] = [
        PosthocEMA(out / "ema", (0.05, 0.10), snapshot_every=4),
        L.callbacks.ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", save_top_k=-1, every_n_train_steps=2),
    ]
    strategy = L.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=10, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=callbacks, default_root_dir=out,
    )
    fit_and_report(trainer, Lit(None if resume else out / "hand"), resume, out)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # Tear the gloo group down here, as the other workers do: left to interpreter exit, its threads
    # can be destroyed still joinable ("terminate called without an active exception", SIGABRT).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
