"""End to end: DTensor models recorded shard by shard synthesize to the bits of an unsharded Recorder.

``sharded_worker.py`` runs under real torchrun (gloo, CPU): a Recorder on the
FSDP2 / tensor-parallel / HSDP model, and on rank 0 a Recorder on an unsharded
copy fed the same full weights every step. Synthesis from the sharded sets (in
one process, and in parallel on a different number of ranks) must give the
same bits as synthesis from the single files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
from test_parallel import TIMEOUT, torchrun
from test_sharded_synthesis import same_bits

import posthoc_cli

WORKER = Path(__file__).with_name("sharded_worker.py")


def record(mode: str, ranks: int, root: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(WORKER), mode, str(root), "40"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(("mode", "ranks"), [("fsdp2", 3), ("tp", 2), ("hsdp", 4)])
def test_dtensor_recordings_synthesize_to_the_bits_of_an_unsharded_recorder(tmp_path, mode, ranks):
    record(mode, ranks, tmp_path)
    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    catalogue = posthoc_cli.scan(sharded)
    assert not catalogue.broken and not catalogue.incomplete and len(catalogue.snapshots) == 8
    assert all(s.sharded for s in catalogue.snapshots)
    for sigma_rel in (0.07, 0.15):  # 4 snapshots a series: both are poor (allow_poor), the bits are what counts
        want = posthoc_cli.load_synthesized(plain, sigma_rel, allow_poor=True)
        assert same_bits(posthoc_cli.load_synthesized(sharded, sigma_rel, allow_poor=True), want)
    if mode == "fsdp2":  # and in parallel, on another number of ranks than recorded
        args = ["-s", "0.07", "--allow-poor", "--out", tmp_path / "par.safetensors"]
        result = torchrun(2, "synthesize", sharded, *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        want = posthoc_cli.load_synthesized(plain, 0.07, allow_poor=True)
        assert same_bits(safetensors.torch.load_file(tmp_path / "par.safetensors"), want)
