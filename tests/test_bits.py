"""A target's bits depend on its inputs alone: not on the other targets, the slicing, the rank split or the CPU.

The oracle is the summation order the design fixes, written out in numpy: per
element ``y = w₀x₀``, then ``y += wᵢxᵢ`` for each input in order, every product
and sum rounded on its own in the accumulation dtype. IEEE arithmetic rounds
each of those operations the same on every machine, so equality with it holds
on any CPU and BLAS. A matrix product (what synthesis used before) picks its
own order by CPU and shape, which these shapes and target counts expose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import drift
from test_parallel import same_tree, torchrun
from torch import nn

from posthoc_cli import Recorder, plan, synthesize
from posthoc_cli.format.container import load_tensors
from posthoc_cli.synth import inputs as synth_inputs
from posthoc_cli.synth import stream

# Power targets and others, so the pass mixes weight rows of every kind (poor ones too: beta=0.99 and
# 0.25 at t=400, hence allow_poor: these tests are about bits, not fidelity).
NINE = [0.06, "beta=0.99", 0.09, "window=120", 0.12, "diffusers:decay=0.999", 0.15, "litema:decay=0.995", 0.2]


class Odd(nn.Module):
    """Tensors of odd sizes (97, 333, 129, 7): no length is a multiple of a vector width."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(97, 7))
        self.b = nn.Parameter(torch.randn(333))
        self.c = nn.Parameter(torch.randn(129, 3))
        self.d = nn.Parameter(torch.randn(7))


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def recorded(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param) / "ckpts"
    torch.manual_seed(3)
    model = Odd().to(getattr(torch, request.param))
    with Recorder(model, folder, (0.05, 0.10), snapshot_every=25, async_write=False) as rec:
        drift(model, [rec], 400, seed=4)
    return folder


def fixed_order(folder: Path, target: float | str, accumulate: str) -> dict[str, np.ndarray]:
    """The oracle: each target's sum in input order, operation by operation, in numpy."""
    p = plan(folder, [target], allow_poor=True)
    acc = np.dtype(accumulate)
    weights = p.fit.weights[:, 0].astype(acc)
    inputs = [load_tensors(s.header) for s in p.inputs]
    out: dict[str, np.ndarray] = {}
    for name, first in inputs[0].items():
        y = acc.type(weights[0]) * first.to(torch.float64).numpy().astype(acc)
        for w, tensors in zip(weights[1:], inputs[1:]):
            y = y + acc.type(w) * tensors[name].to(torch.float64).numpy().astype(acc)
        out[name] = y
    return out


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_every_target_is_the_fixed_order_sum_alone_with_8_and_with_9(recorded, tmp_path, accumulate):
    for count in (1, 8, 9):
        targets = NINE[:count]
        paths = synthesize(recorded, targets, out=tmp_path / f"n{count}", accumulate=accumulate, allow_poor=True)
        for target, path in zip(targets, paths):
            got = safetensors.torch.load_file(path)
            want = fixed_order(recorded, target, accumulate)
            for name, y in want.items():
                # rounded once, from the accumulation dtype to the output dtype (the input dtype)
                expected = torch.from_numpy(y).to(got[name].dtype)
                assert torch.equal(got[name], expected), (count, target, name)


@pytest.mark.parametrize("slice_bytes", [1, 4 * 7, 333 * 4 * 3, 1 << 30])
def test_slices_of_one_row_or_many_give_the_same_bits(recorded, tmp_path, monkeypatch, slice_bytes):
    whole = safetensors.torch.load_file(synthesize(recorded, NINE, out=tmp_path / "whole", allow_poor=True)[2])
    monkeypatch.setattr(stream, "SLICE_BYTES", slice_bytes)
    monkeypatch.setattr(synth_inputs, "_MAP_MIN_BYTES", 1)  # map even the narrowest slices
    for mmap in ("1", "0"):
        monkeypatch.setenv("POSTHOC_EMA_MMAP", mmap)
        sliced = safetensors.torch.load_file(synthesize(recorded, [NINE[2], 0.25], out=tmp_path / f"s{mmap}", allow_poor=True)[0])
        assert all(torch.equal(sliced[k], whole[k]) for k in whole), (slice_bytes, mmap)


def test_three_ranks_write_the_bytes_of_one_process(recorded, tmp_path):
    args = [a for t in NINE for a in ("--ema", t if isinstance(t, str) else f"sigma_rel={t}")]
    synthesize(recorded, NINE, out=tmp_path / "one", max_shard_size=5000, allow_poor=True)
    result = torchrun(
        3, "synthesize", recorded, *args, "--allow-poor", "--max-shard-size", "5000", "--out", tmp_path / "many", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    same_tree(tmp_path / "one", tmp_path / "many")
