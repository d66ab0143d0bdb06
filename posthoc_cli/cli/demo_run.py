"""The embedded demo: train a small model, record two EMAs, then choose the EMA length afterwards.

A small MLP learns a fixed random "teacher" function from noisy samples with
plain SGD at a high constant learning rate, so its raw weights keep bouncing
around the optimum and averaging them clearly helps. A :class:`Recorder` tracks
two power-function EMAs (sigma_rel 0.05 and 0.10) and writes snapshots; then one
:func:`~posthoc_cli.synth.synthesis.synthesize_iter` pass produces a sweep of other
lengths, and each one is evaluated on held-out data. Everything is built in
(seeded, no downloads) and runs in seconds on two CPU cores. Nothing here prints:
:func:`run_demo` returns a :class:`DemoResult` and the CLI renders it.

>>> result = run_demo("demo-ckpts")  # doctest: +SKIP
>>> result.best.label, result.best.sigma_rel  # doctest: +SKIP
('synthesized', 0.15)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..errors import InvalidValueError, OutputError
from ..record.recorder import Recorder
from ..synth.output_plan import output_paths
from ..synth.plan import plan
from ..synth.synthesis import synthesize_iter

RECORDED = (0.05, 0.10)
SWEEP = (0.03, 0.05, 0.075, 0.10, 0.125, 0.15, 0.20, 0.25)
STEPS = 6000
SNAPSHOT_EVERY = 200
SYNTHESIZED_FOLDER = "synthesized"  # inside the snapshot folder; scans skip sub-folders

# progress(stage, done, total); stages: "train", "synthesize", "evaluate"
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoRow:
    """One set of weights and its validation loss."""

    label: str  # "raw weights", "recorded EMA" or "synthesized"
    sigma_rel: float | None  # None for the raw weights
    val_loss: float
    profile_error: float | None = None  # synthesized rows only
    path: Path | None = None  # where the weights are on disk, if they are


@dataclass(frozen=True)
class DemoResult:
    """What the demo did and found."""

    folder: Path
    synthesized_folder: Path
    steps: int
    snapshot_every: int
    snapshots: int
    parameters: int
    rows: list[DemoRow]
    train_seconds: float
    synthesize_seconds: float

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
    sweep: Sequence[float] = SWEEP,
    seed: int = 0,
    lr: float = 0.1,
    batch_size: int = 8,
    threads: int = 1,
    progress: ProgressCallback | None = None,
) -> DemoResult:
    """Train, record, synthesize a sweep of EMA lengths in one pass and evaluate each.

    ``folder`` must be empty or absent; it receives the snapshots and, in its
    ``synthesized`` sub-folder, one file per swept sigma_rel.
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
        p = plan(root, list(sweep), allow_poor=True)  # short runs: the table shows each profile error
        paths = output_paths(p, root / SYNTHESIZED_FOLDER)
        for done in synthesize_iter(p, paths):
            report("synthesize", done.done, done.total)
        synthesize_seconds = time.perf_counter() - start

        for j, (sigma_rel, path) in enumerate(zip(sweep, paths)):
            model.load_state_dict(safetensors.torch.load_file(path))
            error = float(p.fit.profile_error[j])
            rows.append(DemoRow("synthesized", sigma_rel, _val_loss(model, data), error, path))
            report("evaluate", j + 1, len(paths))
    return DemoResult(
        folder=root,
        synthesized_folder=root / SYNTHESIZED_FOLDER,
        steps=steps,
        snapshot_every=snapshot_every,
        snapshots=sum(1 for _ in root.glob("*.safetensors")),
        parameters=sum(w.numel() for w in model.parameters()),
        rows=rows,
        train_seconds=train_seconds,
        synthesize_seconds=synthesize_seconds,
    )


__all__ = ["RECORDED", "STEPS", "SWEEP", "DemoResult", "DemoRow", "make_model", "run_demo"]
