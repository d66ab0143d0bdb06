"""The Recorder on an accelerator: no host synchronisation per update, correct snapshots.

Skipped where CUDA is absent (CI never has a GPU); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posthoc_cli import Recorder, load_synthesized, scan
from posthoc_cli.format.container import load_tensors

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.Linear(128, 8)).to("cuda", dtype)


def step(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_never_synchronises(tmp_path, dtype):
    model = make_model(dtype)
    rec = Recorder(model, tmp_path, snapshot_every=10**9)
    rec.update()  # first call: lazy CUDA initialisation is allowed to sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            step(model)
            rec.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rec.close()


def test_snapshots_from_the_device_match_the_emas(tmp_path):
    model = make_model()
    with Recorder(model, tmp_path, snapshot_every=10) as rec:
        for _ in range(30):
            step(model)
            rec.update()
            if rec.t == 20:
                expected = {n: v.cpu() for n, v in rec.ema_state_dict(0.10).items()}
    snap = next(s for s in scan(tmp_path).series[0.10] if s.t == 20)
    stored = load_tensors(snap.header)
    for name, tensor in expected.items():
        assert torch.equal(stored[name], tensor), name
    load_synthesized(tmp_path, 0.15, allow_poor=True)  # and the files synthesize (30 steps: 0.15 is poor)


def test_ema_on_the_host(tmp_path):
    model = make_model()
    device_rec = Recorder(model, tmp_path / "dev", snapshot_every=10**9)
    host_rec = Recorder(model, tmp_path / "host", snapshot_every=10**9, ema_device="cpu")
    for _ in range(10):
        step(model)
        device_rec.update()
        host_rec.update()
    for name, value in host_rec.ema_state_dict(0.05).items():
        assert value.device.type == "cpu"
        torch.testing.assert_close(value, device_rec.ema_state_dict(0.05)[name].cpu())
    device_rec.close()
    host_rec.close()


@pytest.mark.parametrize("after", [0, 5])
def test_a_recorder_follows_the_model_to_cuda(tmp_path, after):
    """model.to("cuda") after the Recorder (issue 10): the EMAs follow the live tensors onto the device."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.Linear(128, 8))
    twin = make_model()  # on CUDA from the start: the oracle
    twin.load_state_dict(model.state_dict())
    rec = Recorder(model, tmp_path / "a", snapshot_every=10**9)
    oracle = Recorder(twin, tmp_path / "b", snapshot_every=10**9)
    g = torch.Generator().manual_seed(1)

    def drift(n: int) -> None:
        with torch.no_grad():
            for _ in range(n):
                deltas = [0.01 * torch.randn(p.shape, generator=g) for p in twin.parameters()]
                for m in (model, twin):
                    for p, d in zip(m.parameters(), deltas):
                        p.add_(d.to(p.device))
                rec.update()
                oracle.update()

    drift(after)
    model.to("cuda")
    drift(10)
    ours, theirs = rec.ema_state_dict(0.05), oracle.ema_state_dict(0.05)
    assert all(ours[k].is_cuda and torch.equal(ours[k], theirs[k]) for k in ours)
