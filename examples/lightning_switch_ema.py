"""Lightning: bounded disk (max_snapshots) and Switch EMA, the EMA of sigma_rel 0.05 copied into the model at each epoch end."""

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc_cli.integrations.lightning import PosthocEMA


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class SwitchEMA(L.Callback):
    def __init__(self, ema):
        self.ema = ema

    def on_train_epoch_end(self, trainer, pl_module):
        self.ema.recorder.copy_to_model(0.05)


torch.manual_seed(0)
x = torch.randn(512, 16)
data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).sin()), batch_size=16, shuffle=True)
ema = PosthocEMA("switch-ckpts", sigma_rels=(0.05, 0.10), snapshot_every=4, max_snapshots=20)  # Recorder options pass on
model = Regressor()
trainer = L.Trainer(max_epochs=5, callbacks=[ema, SwitchEMA(ema)], accelerator="cpu",
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, data)
switched = ema.recorder.ema_state_dict(0.05)
print("after fit the model holds the EMA of sigma_rel 0.05:", all(torch.equal(model.state_dict()[n], w) for n, w in switched.items()))
print(f"{len(list(ema.recorder.ckpt_dir.glob('ema-*')))} snapshots kept of {2 * trainer.global_step // 4} written")
