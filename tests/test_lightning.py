"""PosthocEMA with the real Lightning Trainer (CPU, a tiny module, seconds per fit)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from conftest import make_tiny_model  # noqa: E402
from trainer_helpers import assert_same_snapshots, read_folder  # noqa: E402

from posthoc_cli import Recorder, ResumeError  # noqa: E402
from posthoc_cli.integrations.lightning import PosthocEMA  # noqa: E402

SIGMA_RELS = (0.05, 0.10)


def data(n: int = 8, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, x[:, :3] * 2 - 1), batch_size=2, shuffle=False)


class Lit(L.LightningModule):
    """TinyNet (BatchNorm buffers included) with Adam; ``reference`` is a Recorder driven by hand per optimizer step."""

    def __init__(self, reference_dir: Path | None = None, fail_validation_at: int | None = None) -> None:
        super().__init__()
        self.net = make_tiny_model(0)
        self.reference_dir = reference_dir
        self.reference: Recorder | None = None
        self.fail_validation_at = fail_validation_at
        self.seen_in_validation: list[tuple[int, torch.Tensor]] = []
        self.after_training_step: torch.Tensor | None = None
        self.restored_checks = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.after_training_step is not None:  # training continues with its own weights after validation
            assert torch.equal(self.net.fc1.weight, self.after_training_step)
            self.restored_checks += 1
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after_training_step = self.net.fc1.weight.detach().clone()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.fail_validation_at is not None and self.global_step >= self.fail_validation_at:
            raise RuntimeError("validation failed on purpose")
        self.seen_in_validation.append((self.global_step, self.net.fc1.weight.detach().clone()))
        if self.reference is not None:  # the EMA of sigma_rel 0.10 of a Recorder driven by hand, at this step
            assert torch.equal(self.net.fc1.weight, self.reference.ema_state_dict(0.10)["net.fc1.weight"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def on_train_start(self) -> None:
        if self.reference_dir is not None:
            self.reference = Recorder(self, self.reference_dir, SIGMA_RELS, snapshot_every=4, async_write=False)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.reference is not None:
            self.reference.update()  # by hand: once per optimizer step, its own counter

    def on_train_end(self) -> None:
        if self.reference is not None:
            self.reference.snapshot()
            self.reference.close()


def trainer(tmp: Path, max_steps: int, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=tmp,
    )
    options.update(kwargs)
    if not any(isinstance(c, L.callbacks.ModelCheckpoint) for c in callbacks):
        options.setdefault("enable_checkpointing", False)
    return L.Trainer(callbacks=callbacks, **options)


def every_two_steps(folder: Path) -> L.callbacks.ModelCheckpoint:
    """A checkpoint every two optimizer steps, named by step. (Lightning resumes these exactly; from
    checkpoints saved at the end of an epoch, Lightning 2.6 itself replays the data differently.)"""
    return L.callbacks.ModelCheckpoint(dirpath=folder, filename="{step}", save_top_k=-1, every_n_train_steps=2)


def test_accumulation_matches_a_recorder_driven_by_hand(tmp_path: Path) -> None:
    module = Lit(reference_dir=tmp_path / "by-hand")
    trainer(tmp_path, 14, [PosthocEMA(tmp_path / "ema", SIGMA_RELS, snapshot_every=4)]).fit(module, data())
    assert module.global_step == 14 and module.reference is not None and module.reference.t == 14
    # Snapshots at 4, 8, 12 and the final one at 14, bit for bit the hand-driven Recorder's.
    assert assert_same_snapshots(tmp_path / "ema", tmp_path / "by-hand") == 8
    assert {m["t"] for _, m in read_folder(tmp_path / "ema").values()} == {4, 8, 12, 14}
    assert {m["updates"] for _, m in read_folder(tmp_path / "ema").values()} == {4, 8, 12, 14}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of 14 steps with a checkpoint every two steps (2, 4, ..., 14)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    callbacks = [PosthocEMA(tmp / "ema", SIGMA_RELS, snapshot_every=4), every_two_steps(tmp / "ckpt")]
    trainer(tmp, 14, callbacks).fit(Lit(), data())
    return tmp


@pytest.mark.parametrize("save_state", [True, False])
def test_resume_at_a_snapshot_time_is_exact(uninterrupted: Path, tmp_path: Path, save_state: bool) -> None:
    # The run stopped after step 8: its folder holds the snapshots up to 8 only.
    (tmp_path / "ema").mkdir()
    for name, (_, meta) in read_folder(uninterrupted / "ema").items():
        if int(meta["t"]) <= 8:  # type: ignore[call-overload]
            shutil.copy(uninterrupted / "ema" / name, tmp_path / "ema" / name)
    callback = PosthocEMA(tmp_path / "ema", SIGMA_RELS, snapshot_every=4, save_state=save_state)
    trainer(tmp_path, 14, [callback]).fit(Lit(), data(), ckpt_path=uninterrupted / "ckpt" / "step=8.ckpt")
    assert assert_same_snapshots(uninterrupted / "ema", tmp_path / "ema") == 8


def test_resume_between_snapshots_sets_the_abandoned_future_aside(uninterrupted: Path, tmp_path: Path) -> None:
    # The folder holds everything the first run wrote (8, 12, the final 14): resuming at step 6 abandons them.
    shutil.copytree(uninterrupted / "ema", tmp_path / "ema")
    before = read_folder(tmp_path / "ema")
    callback = PosthocEMA(tmp_path / "ema", SIGMA_RELS, snapshot_every=4)
    trainer(tmp_path, 14, [callback]).fit(Lit(), data(), ckpt_path=uninterrupted / "ckpt" / "step=6.ckpt")
    assert assert_same_snapshots(uninterrupted / "ema", tmp_path / "ema") == 8
    aside = tmp_path / "ema" / ".abandoned-after-t000000000006"
    moved = read_folder(aside)
    assert sorted(moved) == sorted(n for n, (_, m) in before.items() if int(m["t"]) > 6)  # type: ignore[call-overload]
    for name, (tensors, _) in moved.items():  # moved, not rewritten
        assert all(torch.equal(v, before[name][0][k]) for k, v in tensors.items())


def test_checkpoint_carries_the_ema_state(uninterrupted: Path) -> None:
    checkpoint = torch.load(uninterrupted / "ckpt" / "step=6.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("PosthocEMA")]
    recorder = state["recorder"]
    assert recorder["t"] == 6 and recorder["t_ema"] == [6, 6] and recorder["updates"] == [6, 6]
    n_float = sum(t.numel() for t in Lit().state_dict().values() if t.is_floating_point())
    assert sum(x.numel() for ema in recorder["emas"] for x in ema) == len(SIGMA_RELS) * n_float


def test_a_fresh_fit_refuses_a_folder_of_another_run(uninterrupted: Path, tmp_path: Path) -> None:
    shutil.copytree(uninterrupted / "ema", tmp_path / "ema")
    with pytest.raises(ResumeError, match="holds snapshots up to t=14 of an earlier run"):
        trainer(tmp_path, 4, [PosthocEMA(tmp_path / "ema", SIGMA_RELS, snapshot_every=4)]).fit(Lit(), data())
    assert sorted(os.listdir(tmp_path / "ema")) == sorted(os.listdir(uninterrupted / "ema"))  # nothing moved


def test_evaluate_with_swaps_the_ema_in_for_validation_only(tmp_path: Path) -> None:
    module = Lit(reference_dir=tmp_path / "by-hand")
    callback = PosthocEMA(tmp_path / "ema", SIGMA_RELS, snapshot_every=4, evaluate_with=0.10)
    trainer(tmp_path, 8, [callback], limit_val_batches=1).fit(module, data(), data(2, seed=2))
    # Validation after every epoch: steps 2, 4, 6, 8.
    steps = [s for s, _ in module.seen_in_validation]
    assert steps == [2, 4, 6, 8]
    assert callback.recorder is not None
    final_ema = callback.recorder.ema_state_dict(0.10)["net.fc1.weight"]
    assert torch.equal(module.seen_in_validation[-1][1], final_ema)  # the last one ran at step 8 with the EMA
    assert not torch.equal(final_ema, module.net.fc1.weight)  # ... and training kept its own weights
    assert module.restored_checks > 0


def test_evaluate_with_restores_the_training_weights_when_validation_raises(tmp_path: Path) -> None:
    module = Lit(fail_validation_at=4)
    callback = PosthocEMA(tmp_path / "ema", SIGMA_RELS, snapshot_every=4, evaluate_with=0.05)
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer(tmp_path, 8, [callback], limit_val_batches=1).fit(module, data(), data(2, seed=2))
    assert module.after_training_step is not None and module.global_step == 4
    assert torch.equal(module.net.fc1.weight, module.after_training_step)


def test_without_lightning_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
        "import posthoc_cli.integrations.lightning"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "pip install 'posthoc-ema[lightning]'" in done.stderr.splitlines()[-1]


def free_port() -> int:
    """A port free now (Lightning under torchrun needs a real MASTER_PORT, not 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def two_processes(worker: Path, *args: object, timeout: float) -> str:
    """Run ``worker`` under torchrun on 2 processes; its stderr, once it has succeeded."""
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), worker, *args],
        timeout=timeout, env=worker_env(), capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_ddp_on_two_processes_matches_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("lightning_ddp_worker.py")
    subprocess.run([sys.executable, worker, tmp_path / "one", "--single"], check=True, timeout=300, env=worker_env(),
                   capture_output=True)
    two_processes(worker, tmp_path / "two", timeout=300)
    assert (tmp_path / "one" / "rank0-of-1.done").read_text() == "10 writes=True"
    assert (tmp_path / "two" / "rank0-of-2.done").read_text() == "10 writes=True"
    assert (tmp_path / "two" / "rank1-of-2.done").read_text() == "10 writes=False"
    assert not list((tmp_path / "two" / "ema").glob("*.tmp"))
    # Same global batch: the averaged DDP gradient equals the one-process gradient up to float32 rounding.
    assert assert_same_snapshots(tmp_path / "one" / "ema", tmp_path / "two" / "ema", exact=False) == 6
    # Resume the 2-process run at step 6 into a copy of its folder (which holds the future 8 and 10).
    shutil.copytree(tmp_path / "two" / "ema", tmp_path / "again" / "ema")
    two_processes(worker, tmp_path / "again", "--resume", tmp_path / "two" / "ckpt" / "step=6.ckpt", timeout=300)
    assert assert_same_snapshots(tmp_path / "two" / "ema", tmp_path / "again" / "ema") == 6
    aside = read_folder(tmp_path / "again" / "ema" / ".abandoned-after-t000000000006")
    assert {m["t"] for _, m in aside.values()} == {8, 10}


def test_fsdp2_model_parallel_on_two_processes_writes_every_shard_and_resumes_exactly(tmp_path: Path) -> None:
    """ModelParallelStrategy with fully_shard (FSDP2) on 2 CPU processes (gloo): each rank writes its rank files."""
    from shardsets import assert_same_snapshots as same_sets

    worker = Path(__file__).with_name("lightning_fsdp2_worker.py")
    two_processes(worker, tmp_path / "run", timeout=150)
    for rank in (0, 1):  # every rank holds a shard, so every rank writes
        assert (tmp_path / "run" / f"rank{rank}-of-2.done").read_text() == "10 writes=True"
    sets = sorted(p for p in (tmp_path / "run" / "ema").iterdir() if not p.name.startswith("."))
    assert len(sets) == 6 and all(sorted(q.name for q in p.iterdir()) == ["rank-00000.safetensors",
                                                                          "rank-00001.safetensors"] for p in sets)
    # The callback's snapshots (4, 8, final 10) are, bit for bit, those of a sharded Recorder driven by hand.
    assert same_sets(tmp_path / "run" / "ema", tmp_path / "run" / "hand") == 6
    # Each rank's EMA state lies beside the snapshots (Lightning keeps callback state from rank 0 only).
    assert (tmp_path / "run" / "ema" / ".trainer-state" / "t000000000006" / "rank-00001.pt").is_file()
    # Resume at step 6 (between snapshots) into a copy of the folder holding the future 8 and 10.
    shutil.copytree(tmp_path / "run" / "ema", tmp_path / "again" / "ema")
    two_processes(worker, tmp_path / "again", "--resume", tmp_path / "run" / "ckpt" / "step=6.ckpt", timeout=150)
    assert same_sets(tmp_path / "again" / "ema", tmp_path / "run" / "ema") == 6
    aside = tmp_path / "again" / "ema" / ".abandoned-after-t000000000006"
    assert sorted(p.name for p in aside.iterdir()) == [p.name for p in sets if int(p.name[-12:]) > 6]
    # Without the per-rank state files the EMAs continue from the snapshots, with a warning (exact at a snapshot time).
    shutil.copytree(tmp_path / "run" / "ema", tmp_path / "lost" / "ema")
    shutil.rmtree(tmp_path / "lost" / "ema" / ".trainer-state")
    stderr = two_processes(worker, tmp_path / "lost", "--resume", tmp_path / "run" / "ckpt" / "step=8.ckpt", timeout=150)
    assert "no EMA state file" in stderr
    assert same_sets(tmp_path / "lost" / "ema", tmp_path / "run" / "ema") == 6


class TwoOptimizers(L.LightningModule):
    """Manual optimization with two optimizers: each batch takes two optimizer steps (the global step grows by 2)."""

    def __init__(self, reference_dir: Path) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = make_tiny_model(0)
        self.reference_dir = reference_dir
        self.reference: Recorder | None = None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():  # type: ignore[union-attr]
            opt.zero_grad()
            self.manual_backward(torch.nn.functional.mse_loss(self.net(x), y))
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.net.fc1.parameters(), lr=0.05), torch.optim.Adam(self.net.fc2.parameters(), lr=0.01)]

    def on_train_start(self) -> None:
        self.reference = Recorder(self, self.reference_dir, SIGMA_RELS, snapshot_every=4, async_write=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.reference is not None
        self.reference.update(step=self.global_step)  # by hand, after the batch's two optimizer steps

    def on_train_end(self) -> None:
        assert self.reference is not None
        self.reference.snapshot()
        self.reference.close()


def test_manual_optimization_with_two_optimizers_updates_once_per_batch_at_the_global_step(tmp_path: Path) -> None:
    module = TwoOptimizers(tmp_path / "by-hand")
    callback = PosthocEMA(tmp_path / "ema", SIGMA_RELS, snapshot_every=4)
    trainer(tmp_path, 14, [callback], accumulate_grad_batches=1).fit(module, data())
    assert module.global_step == 14 and callback.recorder is not None and callback.recorder.t == 14
    assert assert_same_snapshots(tmp_path / "ema", tmp_path / "by-hand") == 8
    # Seven batches of two steps each: seven updates, each with Δ = 2; snapshots where t crosses 4, 8, 12.
    assert {(m["t"], m["updates"]) for _, m in read_folder(tmp_path / "ema").values()} == {(4, 2), (8, 4), (12, 6), (14, 7)}
