"""The embedded demo: train a small model, record two EMAs, then choose the EMA length afterwards.

A small MLP learns a fixed random "teacher" function from noisy samples with
plain SGD at a high constant learning rate, so its raw weights keep bouncing
around the optimum and averaging them clearly helps. A :class:`Recorder` tracks
two power-function EMAs (sigma_rel 0.05 and 0.10) and writes snapshots; then a
:func:`~posthoc_cli.choice.sweep.sweep` evaluates, on held-out data, lengths across
the band the snapshots reproduce faithfully and homes in on the best. Everything is built in
(seeded, no downloads) and runs in seconds on two CPU cores. Nothing here prints:
:func:`run_demo` returns a :class:`DemoResult` and the CLI renders it.

>>> result = run_demo("demo-ckpts")  # doctest: +SKIP
>>> result.best.label, result.best.sigma_rel  # doctest: +SKIP
('synthesized', 0.1669)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..format.keys import SWEEPS_FOLDER
from ..choice.sweep import sweep
from ..ema.trackers import Target
from ..errors import InvalidValueError, OutputError
from ..record.recorder import Recorder

RECORDED = (0.05, 0.10)
STEPS = 6000
SNAPSHOT_EVERY = 200
RESULTS = f"{SWEEPS_FOLDER}/demo.jsonl"  # inside the snapshot folder, where scans never look

# progress(stage, done, total); stages: "train", "evaluate"
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoRow:
    """One set of weights and its validation loss."""

    label: str  # "raw weights", "recorded EMA" or "synthesized"
    sigma_rel: float | None  # None for the raw weights
    val_loss: float
    profile_error: float | None = None  # synthesized rows only
    searched: bool = False  # placed by the sweep's search, after its grid


@dataclass(frozen=True)
class DemoResult:
    """What the demo did and found."""

    folder: Path
    results: Path  # the sweep's results file
    steps: int
    snapshot_every: int
    snapshots: int
    parameters: int
    rows: list[DemoRow]
    train_seconds: float
    sweep_seconds: float

    @property
    def best(self) -> DemoRow:
        """The row with the lowest validation loss."""
        return min(self.rows, key=lambda r: r.val_loss)


class _MLP(nn.Module):
    """The student's architecture; a randomly initialised copy also serves as the target function."""

    def __init__(self, width: int = 64, inputs: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_model(seed: int = 0) -> nn.Module:
    """The demo's model (an MLP 16 → 64 → 64 → 1), initialised from ``seed``."""
    torch.manual_seed(seed)
    return _MLP()


@dataclass(frozen=True)
class _Data:
    teacher: nn.Module
    x_val: torch.Tensor
    y_val: torch.Tensor
    noise: float

    def batch(self, g: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, self.x_val.shape[1], generator=g)
        with torch.no_grad():
            y = self.teacher(x) + self.noise * torch.randn(size, 1, generator=g)
        return x, y


def _data(seed: int, noise: float = 1.0, val_size: int = 4096) -> _Data:
    teacher = make_model(seed + 1000)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(2.0)  # a wigglier target than the default initialisation gives
    g = torch.Generator().manual_seed(seed + 2000)
    x_val = torch.randn(val_size, 16, generator=g)
    with torch.no_grad():
        y_val = teacher(x_val)  # noise-free: the loss measures the learned function
    return _Data(teacher, x_val, y_val, noise)


@torch.no_grad()
def _val_loss(model: nn.Module, data: _Data) -> float:
    return float(nn.functional.mse_loss(model(data.x_val), data.y_val))


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Tiny matmuls run fastest on one or two threads; the caller's setting comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(
    folder: str | os.PathLike[str],
    *,
    steps: int = STEPS,
    snapshot_every: int = SNAPSHOT_EVERY,
    seed: int = 0,
    lr: float = 0.1,
    batch_size: int = 8,
    threads: int = 1,
    progress: ProgressCallback | None = None,
) -> DemoResult:
    """Train, record, then sweep EMA lengths (synthesized in memory) by their validation loss.

    ``folder`` must be empty or absent; it receives the snapshots and, in its
    ``sweeps`` sub-folder, the sweep's results file.
    """
    root = Path(folder)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise OutputError(f"{root} already exists and is not an empty folder", "pass a new folder to --out")
    if steps < 2 * snapshot_every:
        raise InvalidValueError(f"steps={steps} is too short", f"train for at least {2 * snapshot_every} steps")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {root} ({e.strerror})", "pass another folder to --out") from e
    report = progress or (lambda stage, done, total: None)
    with _threads(threads):
        data = _data(seed)
        model = make_model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        with Recorder(model, root, sigma_rels=RECORDED, snapshot_every=snapshot_every) as rec:
            for step in range(1, steps + 1):
                x, y = data.batch(g, batch_size)
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rec.update()
                if step % 100 == 0 or step == steps:
                    report("train", step, steps)
            if rec.t % snapshot_every:
                rec.snapshot()
            rows = [DemoRow("raw weights", None, _val_loss(model, data))]
            for sigma_rel in RECORDED:
                with rec.swapped(sigma_rel) as ema_model:
                    rows.append(DemoRow("recorded EMA", sigma_rel, _val_loss(ema_model, data)))
        train_seconds = time.perf_counter() - start

        start = time.perf_counter()

        def evaluate(state_dict: dict[str, torch.Tensor], target: Target) -> float:
            model.load_state_dict(state_dict)
            return _val_loss(model, data)

        found = sweep(root, evaluate, results=root / RESULTS, progress=lambda done, total, _: report("evaluate", done, total))
        sweep_seconds = time.perf_counter() - start
        rows += [
            DemoRow("synthesized", row.sigma_rel, row.metric, row.profile_error, row.refined)
            for row in found.rows if row.metric is not None
        ]
    return DemoResult(
        folder=root,
        results=root / RESULTS,
        steps=steps,
        snapshot_every=snapshot_every,
        snapshots=sum(1 for _ in root.glob("*.safetensors")),
        parameters=sum(w.numel() for w in model.parameters()),
        rows=rows,
        train_seconds=train_seconds,
        sweep_seconds=sweep_seconds,
    )


__all__ = ["RECORDED", "STEPS", "DemoResult", "DemoRow", "make_model", "run_demo"]
