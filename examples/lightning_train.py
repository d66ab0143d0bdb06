"""Lightning: record the post-hoc EMA with the PosthocEMA callback, validating with the EMA of sigma_rel 0.10."""

from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc_cli.integrations.lightning import PosthocEMA

torch.manual_seed(0)
x = torch.randn(512, 16)
y = x.sum(dim=1, keepdim=True).sin()
train = DataLoader(TensorDataset(x[:448], y[:448]), batch_size=16, shuffle=True)
val = DataLoader(TensorDataset(x[448:], y[448:]), batch_size=64)


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):  # runs with the EMA's weights (evaluate_with)
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


ema = PosthocEMA("lightning-ckpts", sigma_rels=(0.05, 0.10), snapshot_every=20, evaluate_with=0.10)
# Step-based checkpoints resume exactly; the callback keeps the EMAs in them.
checkpoints = ModelCheckpoint(dirpath="lightning-run", every_n_train_steps=100, save_last=True)
trainer = L.Trainer(max_steps=200, accumulate_grad_batches=2, callbacks=[ema, checkpoints], accelerator="cpu",
                    logger=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Regressor(), train, val)
# To continue this run later: trainer.fit(Regressor(), train, val, ckpt_path="lightning-run/last.ckpt")
print(f"{len(list(Path('lightning-ckpts').glob('ema-*')))} snapshots in lightning-ckpts;",
      "checkpoints:", ", ".join(sorted(p.name for p in Path("lightning-run").iterdir())))
