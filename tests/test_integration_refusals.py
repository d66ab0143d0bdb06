"""What the integrations refuse, with a message that says what to do: set-ups they do not record sharded, bad options.

Lightning's ModelParallelStrategy (FSDP2) is recorded: see tests/test_lightning.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from posthoc_cli import InvalidValueError
from posthoc_cli.integrations._common import is_sharded, refuse_sharded


def test_dtensor_parameters_are_refused_where_not_recorded_saying_what_works(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make_tiny_model(0)
        mesh = init_device_mesh("cpu", (1,))
        model.fc1.weight = torch.nn.Parameter(distribute_tensor(model.fc1.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(InvalidValueError, match="shards the model's parameters — with Lightning use ModelParallelStrategy"):
            refuse_sharded(model, "the strategy")
        assert is_sharded(model) and not is_sharded(make_tiny_model(0))
        refuse_sharded(make_tiny_model(0), "the strategy")  # plain parameters pass
    finally:
        dist.destroy_process_group()


def test_lightning_options_are_checked_when_the_callback_is_made(tmp_path: Path) -> None:
    lightning = pytest.importorskip("posthoc_cli.integrations.lightning")
    with pytest.raises(InvalidValueError, match="evaluate_with=0.2 is not one of sigma_rels"):
        lightning.PosthocEMA(tmp_path, (0.05, 0.10), evaluate_with=0.2)
    with pytest.raises(InvalidValueError, match="leave out write="):
        lightning.PosthocEMA(tmp_path, write=True)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_lightning_refuses_fsdp1_and_deepspeed_naming_model_parallel(tmp_path: Path, strategy: str) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from posthoc_cli.integrations.lightning import PosthocEMA

    # A strategy of that name: constructing the real ones needs CUDA (FSDP1) or the deepspeed package.
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    trainer.strategy.__class__ = type(strategy, (type(trainer.strategy),), {})
    with pytest.raises(InvalidValueError, match=f"cannot record under {strategy} — use ModelParallelStrategy"):
        PosthocEMA(tmp_path).on_train_start(trainer, L.LightningModule())


def test_transformers_refuses_the_trainers_fsdp_naming_what_works(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from posthoc_cli.integrations.transformers import PosthocEMACallback

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[])
    args.fsdp = "full_shard"  # what the Trainer keeps after parsing fsdp=...; on CPU Accelerate never shards
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    with pytest.raises(InvalidValueError, match=r"FSDP \(args.fsdp\) — train with DDP, or record FSDP2 with"):
        PosthocEMACallback().on_train_begin(args, state, control, model=make_tiny_model(0))
