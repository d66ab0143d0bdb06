"""PosthocEMACallback with the real Hugging Face Trainer (CPU, a tiny GPT-2 built from a config, no downloads)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from trainer_helpers import assert_same_snapshots, read_folder  # noqa: E402

from posthoc_cli import Recorder  # noqa: E402
from posthoc_cli.integrations.transformers import STATE_NAME, PosthocEMACallback  # noqa: E402

SIGMA_RELS = (0.05, 0.10)
POSTHOC_EMA = Path(sys.executable).with_name("posthoc-ema")


def tiny_config() -> Any:
    return transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: a resumed run replays exactly
    )


def tiny_gpt2() -> Any:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(tiny_config())


def dataset(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (n, 12), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


class ByHand(transformers.TrainerCallback):
    """A Recorder driven by hand: ``update()`` right after each ``optimizer.step()``, its own counter."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.recorder: Recorder | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.recorder = Recorder(model, self.folder, SIGMA_RELS, snapshot_every=4, async_write=False)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.recorder is not None
        self.recorder.update()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.recorder is not None
        self.recorder.snapshot()
        self.recorder.close()


def train(out: Path, callbacks: list[Any], resume: Path | None = None, **overrides: Any) -> Any:
    options: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=14,
        learning_rate=1e-2, save_strategy="steps", save_steps=2, logging_strategy="no", report_to=[],
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    options.update(overrides)
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=transformers.TrainingArguments(**options), train_dataset=dataset(), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 optimizer steps (accumulation 2), a checkpoint every 2 steps, and a Recorder driven by hand beside."""
    out = tmp_path_factory.mktemp("hf")
    train(out, [PosthocEMACallback(snapshot_every=4), ByHand(out / "by-hand")])
    return out


def test_accumulation_matches_a_recorder_driven_by_hand(uninterrupted: Path) -> None:
    # Default folder <output_dir>/posthoc-ema; snapshots at 4, 8, 12 and the final one at 14.
    assert assert_same_snapshots(uninterrupted / "posthoc-ema", uninterrupted / "by-hand") == 8
    assert {m["t"] for _, m in read_folder(uninterrupted / "posthoc-ema").values()} == {4, 8, 12, 14}


def test_each_checkpoint_carries_the_ema_state(uninterrupted: Path) -> None:
    state = torch.load(uninterrupted / "checkpoint-6" / STATE_NAME, weights_only=True)
    assert state["t"] == 6 and state["updates"] == [6, 6]


@pytest.mark.parametrize("step", [8, 6])
def test_resume_is_exact_and_sets_the_abandoned_future_aside(uninterrupted: Path, tmp_path: Path, step: int) -> None:
    # The interrupted run's output folder as it was at the end: checkpoints and every snapshot (a future after step).
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / f"checkpoint-{step}", out / f"checkpoint-{step}")
    shutil.copytree(uninterrupted / "posthoc-ema", out / "posthoc-ema")
    train(out, [PosthocEMACallback(snapshot_every=4)], resume=out / f"checkpoint-{step}")
    assert assert_same_snapshots(uninterrupted / "posthoc-ema", out / "posthoc-ema") == 8
    moved = read_folder(out / "posthoc-ema" / f".abandoned-after-t{step:012d}")
    assert {m["t"] for _, m in moved.values()} == {t for t in (4, 8, 12, 14) if t > step}


def test_gpt2_synthesized_with_the_cli_loads_with_from_pretrained(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema-0.15.safetensors"
    done = subprocess.run(
        # 14 steps: 0.15 is poor (--allow-poor); loading the output is what this checks
        [POSTHOC_EMA, "synthesize", uninterrupted / "posthoc-ema", "--sigma-rel", "0.15", "--allow-poor", "--out", out],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    weights = load_file(out)
    model = transformers.GPT2LMHeadModel(tiny_config())
    model.load_state_dict(weights)
    model.save_pretrained(tmp_path / "gpt2-ema")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2-ema")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    ids = torch.randint(0, 32, (1, 8))
    assert torch.isfinite(loaded(ids).logits).all()


def test_without_transformers_the_error_names_the_extra() -> None:
    code = "import sys; sys.modules['transformers'] = None\nimport posthoc_cli.integrations.transformers"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "pip install 'posthoc-ema[transformers]'" in done.stderr.splitlines()[-1]


def test_import_posthoc_cli_imports_no_trainer() -> None:
    code = (
        "import sys, posthoc_cli, posthoc_cli.integrations\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.stdout.strip() == "[]", done.stderr


def test_ddp_on_two_processes_world_process_zero_writes(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("transformers_ddp_worker.py")
    done = subprocess.run(
        [Path(sys.executable).with_name("torchrun"), "--nproc_per_node", "2", "--master_port", str(port), worker, tmp_path],
        timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [(r["writes"], r["world"], r["t"]) for r in ranks] == [(True, 2, 6), (False, 2, 6)]
    # Every rank tracked the same EMAs (DDP keeps the replicas equal); rank 0's are on disk.
    assert all(torch.equal(a, b) for ea, eb in zip(ranks[0]["emas"], ranks[1]["emas"]) for a, b in zip(ea, eb))
    assert {m["t"] for _, m in read_folder(tmp_path / "posthoc-ema").values()} == {2, 4, 6}
    assert not list((tmp_path / "posthoc-ema").glob("*.tmp"))
    assert (tmp_path / "checkpoint-3" / STATE_NAME).is_file() and (tmp_path / "checkpoint-6" / STATE_NAME).is_file()
