"""What the integrations refuse, with a message that says what to do: sharded parameters, bad options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from posthoc_cli import InvalidValueError
from posthoc_cli.integrations._common import refuse_sharded

from conftest import make_tiny_model


def test_dtensor_parameters_are_refused_until_sharded_recording_is_connected(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make_tiny_model(0)
        mesh = init_device_mesh("cpu", (1,))
        model.fc1.weight = torch.nn.Parameter(distribute_tensor(model.fc1.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(InvalidValueError, match="shards the model's parameters — use the DDP strategy"):
            refuse_sharded(model, "the strategy")
        refuse_sharded(make_tiny_model(0), "the strategy")  # plain parameters pass
    finally:
        dist.destroy_process_group()


def test_lightning_options_are_checked_when_the_callback_is_made(tmp_path: Path) -> None:
    lightning = pytest.importorskip("posthoc_cli.integrations.lightning")
    with pytest.raises(InvalidValueError, match="evaluate_with=0.2 is not one of sigma_rels"):
        lightning.PosthocEMA(tmp_path, (0.05, 0.10), evaluate_with=0.2)
    with pytest.raises(InvalidValueError, match="leave out write="):
        lightning.PosthocEMA(tmp_path, write=True)


def test_lightning_refuses_sharded_strategies(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from posthoc_cli.integrations.lightning import PosthocEMA

    strategy = L.strategies.ModelParallelStrategy()
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False)
    module = L.LightningModule()
    with pytest.raises(InvalidValueError, match="cannot record under ModelParallelStrategy yet"):
        PosthocEMA(tmp_path).on_train_start(trainer, module)
