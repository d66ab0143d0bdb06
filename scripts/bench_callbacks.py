"""Step-time overhead of the trainer callbacks: the same Lightning / HF Trainer run with and without them.

Prints, per trainer, the median time per optimizer step without the callback,
with it, their ratio; the median time spent inside the callback's per-step hook
(robust to a noisy machine); and the median of a Recorder.update() alone on the
same model, alone and inside a hand-written training loop (what the callback is
expected to add: the training step evicts the EMAs from cache, so the update is
slower there than alone). One process run; the runs
alternate (without, with, without, with) so drift affects both alike.

    python scripts/bench_callbacks.py [--steps 300] [--width 512]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from posthoc_cli import Recorder  # noqa: E402

WARMUP = 20  # first steps left out (allocator, threads warming up)
INSIDE: dict[str, list[float]] = {"Lightning": [], "HF Trainer": []}  # time spent inside the callback's step hook


def mlp(width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(x, x[:, :1]) for x in torch.randn(n, 32, 64, generator=g)]


def lightning_steps(steps: int, width: int, with_callback: bool) -> list[float]:
    import lightning.pytorch as L

    from posthoc_cli.integrations.lightning import PosthocEMA

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(width)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            times.append(time.perf_counter())

    class TimedPosthocEMA(PosthocEMA):
        def on_train_batch_end(self, *args: Any) -> None:
            start = time.perf_counter()
            super().on_train_batch_end(*args)
            INSIDE["Lightning"].append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        callbacks: list[Any] = [Timer()]
        if with_callback:
            callbacks.append(TimedPosthocEMA(Path(tmp) / "ema", snapshot_every=10**9))
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
        batches = torch.utils.data.DataLoader(data(steps), batch_size=None)  # type: ignore[arg-type, var-annotated]
        trainer.fit(Lit(), batches)
    return [b - a for a, b in zip(times, times[1:])][WARMUP:]


def hf_steps(steps: int, width: int, with_callback: bool) -> list[float]:
    import transformers

    from posthoc_cli.integrations.transformers import PosthocEMACallback

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(width)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.mse_loss(self.net(x), labels)}

    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter())

    class TimedPosthocEMACallback(PosthocEMACallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            super().on_step_end(*args, **kwargs)
            INSIDE["HF Trainer"].append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        callbacks: list[Any] = [Timer()]
        if with_callback:
            callbacks.append(TimedPosthocEMACallback(snapshot_every=10**9))
        args = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=32, max_steps=steps, save_strategy="no",
            logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        )
        rows = [{"x": x, "labels": y} for batch in data(steps) for x, y in zip(*batch)]
        transformers.Trainer(model=Model(), args=args, train_dataset=rows, callbacks=callbacks).train()
    return [b - a for a, b in zip(times, times[1:])][WARMUP:]


def update_in_a_plain_loop(steps: int, width: int) -> list[float]:
    """Recorder.update() timed inside a hand-written training loop (the training step evicts the EMAs from cache)."""
    model = mlp(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = []
    with tempfile.TemporaryDirectory() as tmp, Recorder(model, tmp, snapshot_every=10**9) as rec:
        for x, y in data(steps):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            start = time.perf_counter()
            rec.update()
            out.append(time.perf_counter() - start)
    return out[WARMUP:]


def update_alone(steps: int, width: int) -> list[float]:
    model = mlp(width)
    out = []
    with tempfile.TemporaryDirectory() as tmp, Recorder(model, tmp, snapshot_every=10**9) as rec:
        for _ in range(steps):
            start = time.perf_counter()
            rec.update()
            out.append(time.perf_counter() - start)
    return out[WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    n_params = sum(p.numel() for p in mlp(args.width).parameters())
    print(f"MLP with {n_params / 1e6:.2f}M parameters, {args.steps} steps per run, torch {torch.__version__}")
    alone = statistics.median(update_alone(args.steps, args.width))
    in_loop = statistics.median(update_in_a_plain_loop(args.steps, args.width))
    print(f"Recorder.update() (2 EMAs): median {alone * 1e3:.3f} ms alone, {in_loop * 1e3:.3f} ms inside a plain training loop")
    for name, runner in (("Lightning", lightning_steps), ("HF Trainer", hf_steps)):
        try:
            runs = {False: [], True: []}  # type: dict[bool, list[float]]
            for with_callback in (False, True, False, True):
                runs[with_callback] += runner(args.steps, args.width, with_callback)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        without, with_ = statistics.median(runs[False]), statistics.median(runs[True])
        print(
            f"{name}: step median without {without * 1e3:.3f} ms, with callback {with_ * 1e3:.3f} ms, "
            f"ratio {with_ / without:.3f}, added {(with_ - without) * 1e3:+.3f} ms"
        )
        inside = statistics.median(INSIDE[name][WARMUP:])
        print(f"{name}: inside the callback's step hook median {inside * 1e3:.3f} ms (Recorder.update in a plain loop {in_loop * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()
