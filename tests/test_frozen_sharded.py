"""Sharded (DTensor) models with frozen tensors: stored once as a set of rank files, synthesized bit for bit.

``frozen_sharded_worker.py`` runs under real torchrun (gloo, CPU) a Recorder on a
model whose fc1 is frozen and sharded, and on rank 0 an unsharded Recorder on a
copy fed the same weights. The snapshot sets hold only the trainable chunks; the
frozen chunks sit once in ``frozen/``; complete and ``--trainable-only`` outputs
equal those of the unsharded recording, bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from sharded_worker import Net
from test_sharded_synthesis import same_bits

import posthoc_cli
from posthoc_cli.format.container import read_header
from posthoc_cli.format.frozen_set import FrozenSet

WORKER = Path(__file__).with_name("frozen_sharded_worker.py")
TIMEOUT = 150
POSTHOC = Path(sys.executable).with_name("posthoc-ema")


def record(mode: str, ranks: int, root: Path, steps: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(WORKER), mode, str(root), str(steps), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def synthesize(folder: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    result = subprocess.run([str(POSTHOC), "synthesize", str(folder), "-s", "0.07", "--out", str(out), *extra], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return safetensors.torch.load_file(out)


@pytest.mark.parametrize(("mode", "ranks"), [("fsdp2", 2), ("tp", 2), ("hsdp", 4)])
def test_frozen_layers_of_a_sharded_model_are_stored_once_and_synthesize_to_the_unsharded_bits(tmp_path, mode, ranks):
    record(mode, ranks, tmp_path, 6)
    record(mode, ranks, tmp_path, 12)  # resumed: each rank checks its frozen chunks against the set
    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    catalogue = posthoc_cli.scan(sharded)
    assert not catalogue.broken and not catalogue.incomplete and len(catalogue.snapshots) == 6
    for snap in catalogue.snapshots:  # the trainable chunks and buffers only
        assert snap.sharded and not any(n.startswith("fc1.") for n in snap.layout)
        assert {"fc2.weight", "fc2.bias", "scale", "count"} == set(snap.layout)
    (stored,) = catalogue.frozen
    assert isinstance(stored, FrozenSet) and stored.complete and set(stored.tensors) == {"fc1.weight", "fc1.bias"}
    files = sorted((sharded / "frozen").iterdir())
    writers = ranks // 2 if mode == "hsdp" else ranks  # HSDP on a 2×2 mesh: one replica writes
    assert [f.name for f in files] == [f"rank-{r:05d}.safetensors" for r in range(writers)]
    assert all("DCP_SHARDING_INFO" in read_header(f).metadata for f in files)
    full = synthesize(sharded, tmp_path / "full.safetensors")
    want = synthesize(plain, tmp_path / "want.safetensors")
    assert list(full) == list(want) and same_bits(full, want)
    net = Net()  # the model's own class loads the complete output strictly
    net.load_state_dict(full, strict=True)
    adapter = synthesize(sharded, tmp_path / "adapter.safetensors", "--trainable-only")
    plain_adapter = synthesize(plain, tmp_path / "adapter-plain.safetensors", "--trainable-only")
    assert not any(n.startswith("fc1.") for n in adapter) and list(adapter) == list(plain_adapter)
    assert same_bits(adapter, plain_adapter)


def test_a_missing_frozen_rank_file_is_an_incomplete_set_and_complete_outputs_are_refused(tmp_path):
    record("fsdp2", 2, tmp_path, 4)
    sharded = tmp_path / "sharded"
    stray = sharded / "stray.safetensors"  # a rank file moved out of its set: chunks, never whole tensors
    stray.write_bytes((sharded / "frozen" / "rank-00000.safetensors").read_bytes())
    assert [b.path for b in posthoc_cli.scan(sharded).broken] == [stray]
    stray.unlink()
    (sharded / "frozen" / "rank-00001.safetensors").unlink()
    catalogue = posthoc_cli.scan(sharded)
    assert catalogue.frozen == [] and len(catalogue.incomplete) == 1
    # 4 updates: 0.07 is poor (--allow-poor), the missing frozen rank file is what counts
    result = subprocess.run([str(POSTHOC), "synthesize", str(sharded), "-s", "0.07", "--allow-poor", "--out", str(tmp_path / "o.safetensors")], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1 and "missing" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.safetensors").exists()
    adapter = subprocess.run([str(POSTHOC), "synthesize", str(sharded), "-s", "0.07", "--allow-poor", "--trainable-only", "--out", str(tmp_path / "a.safetensors")], capture_output=True, text=True, timeout=TIMEOUT)
    assert adapter.returncode == 0, adapter.stderr


def test_a_resume_whose_frozen_shard_differs_from_the_stored_chunks_is_refused(tmp_path):
    record("fsdp2", 2, tmp_path, 4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "sharded" / "frozen").iterdir()}
    failed = record("fsdp2", 2, tmp_path, 8, "--perturb", check=False)
    assert failed.returncode != 0 and "FrozenWeightsError" in failed.stderr and "fc1.weight" in failed.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "sharded" / "frozen").iterdir()} == before  # never rewritten
    assert len(posthoc_cli.scan(tmp_path / "sharded").snapshots) == 2  # nothing written after t=4
