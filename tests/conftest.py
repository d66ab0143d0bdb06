"""Shared fixtures: a tiny real model, a deterministic synthetic training run, a recorded folder.

``record(folder, sigma_rels)`` runs a real :class:`~posthoc_cli.Recorder` over
a trajectory that depends only on the seeds, so two calls (two folders, two sets
of sigma_rels) see bit-identical weights at every step: an EMA tracked directly
in one folder is the oracle for what synthesis makes from the other.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from posthoc_cli import Recorder

# Tests that send Ctrl-C to the CLI need it to arrive as at a terminal. A suite started as a
# background job (`cmd &` in a script) inherits SIGINT ignored, and so would every command it
# starts: give this process Python's own handler, so its children start with the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


class TinyNet(nn.Module):
    """Parameters, float buffers (BatchNorm statistics) and an integer buffer (num_batches_tracked)."""

    def __init__(self, inputs: int = 8, hidden: int = 16, outputs: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def make_tiny_model(seed: int = 0, **sizes: int) -> TinyNet:
    """A freshly initialised :class:`TinyNet`, identical for identical seeds."""
    torch.manual_seed(seed)
    return TinyNet(**sizes)


def train_step(model: nn.Module, generator: torch.Generator) -> None:
    """A deterministic stand-in for an optimizer step: drift plus noise, and a forward pass in train mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator) + 0.002)
        model.train()
        model(torch.randn(32, 8, generator=generator))  # updates BatchNorm's running stats and counter


def drift(model: nn.Module, recorders: Sequence[Recorder], steps: int, *, seed: int, noise: float = 0.01, bias: float = 0.002) -> None:
    """A synthetic trajectory like SGD's: each step moves every parameter by ``noise · N(0, 1) + bias`` and
    updates each Recorder; the Recorders are closed at the end."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=generator) + bias)
            for rec in recorders:
                rec.update()
    for rec in recorders:
        rec.close()


def record_run(
    folder: str | Path,
    sigma_rels: Sequence[float] = (0.05, 0.10),
    *,
    steps: int = 200,
    snapshot_every: int = 20,
    seed: int = 0,
    final_snapshot: bool = False,
    **recorder_kwargs: Any,
) -> Path:
    """Train :class:`TinyNet` for ``steps`` steps, recording with a real Recorder; returns the folder."""
    model = make_tiny_model(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with Recorder(model, folder, sigma_rels=sigma_rels, snapshot_every=snapshot_every, **recorder_kwargs) as rec:
        for _ in range(steps):
            train_step(model, generator)
            rec.update()
        if final_snapshot:
            rec.snapshot()
    return Path(folder)


def record_with_a_frozen_layer(folder: Path, tmp_path: Path, *, sharded: bool) -> None:
    """Linear(48, 48), frozen (stored once), then Linear(48, 16), trained: 20 updates, snapshots every 5. The
    frozen layer goes to frozen.safetensors, or to a frozen/ rank-file set when ``sharded`` (FSDP2 on a 1-rank
    gloo world)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.Linear(48, 16))
    model[0].requires_grad_(False)
    if sharded:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if sharded:
            fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with Recorder(model, folder, (0.05, 0.10), snapshot_every=5, async_write=False) as rec:
            for _ in range(20):
                with torch.no_grad():
                    for q in model[1].parameters():
                        q.add_(0.01)
                rec.update()
    finally:
        if sharded:
            dist.destroy_process_group()
    assert (folder / ("frozen" if sharded else "frozen.safetensors")).exists()


@pytest.fixture(scope="session")
def make_model() -> Callable[..., TinyNet]:
    """Factory for the tiny real model: ``make_model(seed=0)``."""
    return make_tiny_model


@pytest.fixture(scope="session")
def record() -> Callable[..., Path]:
    """Factory that records a deterministic run: ``record(folder, sigma_rels=(0.05, 0.10), steps=200, ...)``."""
    return record_run


@pytest.fixture(scope="session")
def _recorded_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_run(tmp_path_factory.mktemp("recorded") / "ckpts")


@pytest.fixture
def recorded(tmp_path: Path, _recorded_once: Path) -> Path:
    """A folder of real snapshots: sigma_rels (0.05, 0.10), t = 20, 40, ..., 200 (10 each).

    Recorded once per session by a real Recorder and copied into each test's
    ``tmp_path``, so a test may damage its copy freely.
    """
    return Path(shutil.copytree(_recorded_once, tmp_path / "ckpts"))
