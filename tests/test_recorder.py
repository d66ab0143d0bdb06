"""The Recorder: exact Δ-aware power EMAs, snapshots on schedule, wrappers, dtypes, resume, swapping."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from posthoc_cli import (
    InvalidValueError,
    Recorder,
    ResumeError,
    scan,
    sigma_rel_to_gamma,
)
from posthoc_cli.format.container import load_tensors


class Net(nn.Module):
    """A small real model: parameters, a float buffer (BatchNorm stats) and an integer buffer."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)
        self.to(dtype)


def perturb(model: nn.Module, t: int) -> None:
    """A deterministic 'optimizer step' that makes the weights at time t a known function of t."""
    g = torch.Generator().manual_seed(t)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype), alpha=0.1)
        model.bn.running_mean.add_(0.01)
        model.bn.num_batches_tracked.add_(1)


def float_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: v.detach().double().numpy().copy() for n, v in model.state_dict().items() if v.is_floating_point()}


def test_update_every_tenth_step_matches_float64_simulation(tmp_path):
    """update(step=k) only every 10th step equals a float64 power EMA with Δ = 10."""
    torch.manual_seed(0)
    model = Net()
    rec = Recorder(model, tmp_path, sigma_rels=(0.05, 0.10), snapshot_every=10**9)
    gammas = [sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
    sims: list[dict[str, np.ndarray]] = [{}, {}]
    t_prev = 0
    for t in range(10, 501, 10):
        perturb(model, t)
        rec.update(step=t)
        state = float_state(model)
        for k, g in enumerate(gammas):
            beta = (1 - (t - t_prev) / t) ** (g + 1)
            sims[k] = {n: beta * sims[k].get(n, 0) + (1 - beta) * v for n, v in state.items()}
        t_prev = t
    rec.close()
    for k, s in enumerate((0.05, 0.10)):
        ema = rec.ema_state_dict(s)
        for name, expected in sims[k].items():
            np.testing.assert_allclose(ema[name].double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_each_step_contributes_its_closed_form_weight(tmp_path):
    """With one-hot 'weights' per step, the EMA holds exactly (t_k^(g+1) − t_prev^(g+1)) / t_n^(g+1)."""
    steps = [3, 7, 8, 20, 21, 40]
    lin = nn.Linear(len(steps), 1, bias=False)
    rec = Recorder(lin, tmp_path, sigma_rels=(0.10,), snapshot_every=10**9)
    for k, t in enumerate(steps):
        with torch.no_grad():
            lin.weight.zero_()
            lin.weight[0, k] = 1.0
        rec.update(step=t)
    g = sigma_rel_to_gamma(0.10)
    prev = [0, *steps[:-1]]
    expected = [(tk ** (g + 1) - tp ** (g + 1)) / steps[-1] ** (g + 1) for tk, tp in zip(steps, prev)]
    got = rec.ema_state_dict(0.10)["weight"][0].double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert abs(got.sum() - 1) < 1e-5
    rec.close()


def test_update_every_k_equals_explicit_steps(tmp_path):
    """update_every=5 called every step equals update(step=...) called every 5th step."""
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    rec_a = Recorder(a, tmp_path / "a", snapshot_every=10**9, update_every=5)
    rec_b = Recorder(b, tmp_path / "b", snapshot_every=10**9)
    for t in range(1, 101):
        perturb(a, t)
        perturb(b, t)
        rec_a.update()
        if t % 5 == 0:
            rec_b.update(step=t)
    for s in (0.05, 0.10):
        for name, v in rec_a.ema_state_dict(s).items():
            assert torch.equal(v, rec_b.ema_state_dict(s)[name]), name
    rec_a.close()
    rec_b.close()


def test_snapshots_on_schedule_with_metadata(tmp_path):
    model = Net()
    with Recorder(model, tmp_path, sigma_rels=(0.05, 0.10), snapshot_every=25, update_every=10) as rec:
        for t in range(1, 101):
            perturb(model, t)
            rec.update()
        for name, tensor in rec.ema_state_dict(0.10).items():
            last = tensor
    catalogue = scan(tmp_path)
    assert sorted(catalogue.series) == [0.05, 0.10]
    assert [s.t for s in catalogue.series[0.10]] == [25, 50, 75, 100]
    snap = catalogue.series[0.10][-1]
    assert snap.updates == 12  # 10, 20, 25, 35, 45, 50, 60, 70, 75, 85, 95, 100
    assert snap.dtype == "float32" and snap.time_unit == "step"
    stored = load_tensors(snap.header)
    assert torch.equal(stored[name], last)
    # integer buffers are stored as they are in the model at that time
    assert stored["bn.num_batches_tracked"].dtype == torch.int64
    assert int(stored["bn.num_batches_tracked"]) == 100


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_keeps_float32_ema(tmp_path, dtype):
    model = Net(dtype)
    with Recorder(model, tmp_path, snapshot_every=50, snapshot_dtype=dtype) as rec:
        for t in range(1, 51):
            perturb(model, t)
            rec.update()
        assert all(v.dtype == torch.float32 for n, v in rec.ema_state_dict(0.05).items() if v.is_floating_point())
    snap = scan(tmp_path).series[0.05][-1]
    tensors = load_tensors(snap.header)
    assert tensors["fc1.weight"].dtype == dtype
    assert snap.dtype == str(dtype).removeprefix("torch.")


def test_wrapped_models_store_plain_names(tmp_path):
    inner = Net()
    compiled = torch.compile(inner)  # no forward call: nothing is compiled, the names are prefixed
    assert any(n.startswith("_orig_mod.") for n in compiled.state_dict())
    with Recorder(compiled, tmp_path, snapshot_every=1) as rec:
        rec.update()
    names = set(scan(tmp_path).series[0.05][0].tensors)
    assert names == set(inner.state_dict())


def test_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = torch.distributed.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = DistributedDataParallel(Net())
        with Recorder(model, tmp_path, snapshot_every=1) as rec:
            rec.update()
        assert set(scan(tmp_path).series[0.05][0].tensors) == set(Net().state_dict())
    finally:
        dist.destroy_process_group()


def test_model_that_cannot_be_deep_copied(tmp_path):
    model = Net()
    model.lock = threading.Lock()  # deepcopy of a lock fails
    with pytest.raises(TypeError):
        import copy

        copy.deepcopy(model)
    with Recorder(model, tmp_path, snapshot_every=2) as rec:
        for _ in range(4):
            perturb(model, rec.t + 1)
            rec.update()
    assert [s.t for s in scan(tmp_path).series[0.05]] == [2, 4]


def test_tied_weights_share_one_ema_and_keep_both_names(tmp_path):
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    with Recorder(model, tmp_path, snapshot_every=1) as rec:
        rec.update()
        assert len(rec._sources) == 1
    tensors = load_tensors(scan(tmp_path).series[0.05][0].header)
    assert torch.equal(tensors["emb.weight"], tensors["head.weight"])


def test_swapped_restores_training_weights_even_on_error(tmp_path):
    model = Net()
    with Recorder(model, tmp_path, snapshot_every=10**9) as rec:
        for t in range(1, 21):
            perturb(model, t)
            rec.update()
        before = {n: v.clone() for n, v in model.state_dict().items()}
        ema = rec.ema_state_dict(0.10)
        with rec.swapped(0.10) as m:
            assert torch.equal(m.fc1.weight, ema["fc1.weight"])
        with pytest.raises(RuntimeError):
            with rec.swapped(0.05):
                raise RuntimeError("evaluation failed")
        for n, v in model.state_dict().items():
            assert torch.equal(v, before[n]), n
        with pytest.raises(InvalidValueError):
            with rec.swapped(0.2):
                pass


def test_bad_arguments_are_refused(tmp_path):
    model = Net()
    with pytest.raises(InvalidValueError, match="sigma_rel"):
        Recorder(model, tmp_path, sigma_rels=(0.05, 0.3))
    with pytest.raises(InvalidValueError, match="snapshot_every"):
        Recorder(model, tmp_path, snapshot_every=0)
    with pytest.raises(InvalidValueError):
        Recorder(model, tmp_path, snapshot_dtype=torch.int8)
    with pytest.raises(InvalidValueError, match="time_unit"):
        Recorder(model, tmp_path, time_unit="step\n")
    rec = Recorder(model, tmp_path)
    with pytest.raises(InvalidValueError, match="nothing to snapshot"):
        rec.snapshot()
    rec.update(step=5)
    with pytest.raises(InvalidValueError, match="does not advance"):
        rec.update(step=5)
    rec.close()


def run(folder, last: int, *, start_model: nn.Module | None = None, update_every: int = 1, **kw) -> Recorder:
    """Train Net deterministically from the weights at time rec.t up to `last`, recording."""
    model = start_model or Net()
    rec = Recorder(model, folder, snapshot_every=50, update_every=update_every, **kw)
    torch.manual_seed(0)
    with torch.no_grad():  # the weights at time t are a pure function of t
        for p_new, p_ref in zip(model.parameters(), Net().parameters()):
            p_new.copy_(p_ref)
    for t in range(1, rec.t + 1):
        perturb(model, t)
    for t in range(rec.t + 1, last + 1):
        perturb(model, t)
        rec.update()
    rec.close()
    return rec


@pytest.mark.parametrize("update_every", [1, 3])
def test_resume_equals_uninterrupted_run(tmp_path, update_every):
    run(tmp_path / "full", 600, update_every=update_every)
    run(tmp_path / "split", 300, update_every=update_every)
    resumed = run(tmp_path / "split", 600, update_every=update_every)
    assert resumed.t == 600
    full, split = scan(tmp_path / "full"), scan(tmp_path / "split")
    for s in (0.05, 0.10):
        assert [x.t for x in full.series[s]] == [x.t for x in split.series[s]] == list(range(50, 601, 50))
        for a, b in zip(full.series[s], split.series[s]):
            ta, tb = load_tensors(a.header), load_tensors(b.header)
            assert a.updates == b.updates
            for name in ta:
                torch.testing.assert_close(ta[name], tb[name], rtol=1e-6, atol=1e-7)


def test_resume_refuses_what_differs(tmp_path):
    run(tmp_path, 100)
    with pytest.raises(ResumeError, match="sigma_rels"):
        Recorder(Net(), tmp_path, sigma_rels=(0.05, 0.15))
    with pytest.raises(ResumeError, match="another model"):
        Recorder(nn.Linear(3, 3), tmp_path)
    with pytest.raises(ResumeError, match="float32, not float16"):
        Recorder(Net(), tmp_path, snapshot_dtype=torch.float16)
    rec = Recorder(Net(), tmp_path)
    assert rec.t == 100
    with pytest.raises(InvalidValueError, match="does not advance"):
        rec.update(step=80)  # time going backwards
    rec.close()


def test_integer_like_steps_and_non_writing_ranks(tmp_path):
    model = Net()
    with Recorder(model, tmp_path / "w", snapshot_every=2) as rec:
        rec.update(step=np.int64(2))
        rec.update(step=torch.tensor(4))
        with pytest.raises(InvalidValueError, match="not an integer"):
            rec.update(step=5.5)
    assert [s.t for s in scan(tmp_path / "w").series[0.05]] == [2, 4]
    with Recorder(model, tmp_path / "quiet", snapshot_every=1, write=False) as rec:
        rec.update()
        rec.snapshot()
    assert not list((tmp_path / "quiet").iterdir())


def test_snapshots_are_written_even_without_close(tmp_path):
    """A script that never closes its Recorder still gets its snapshots (written at interpreter exit)."""
    import subprocess
    import sys

    script = (
        "import torch\nfrom torch import nn\nfrom posthoc_cli import Recorder\n"
        "m = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])\n"
        f"rec = Recorder(m, {str(tmp_path)!r}, snapshot_every=5)\n"
        "for _ in range(5):\n    rec.update()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert [s.t for s in scan(tmp_path).series[0.10]] == [5]


def test_a_failed_write_is_retried_and_costs_no_other_file(tmp_path, monkeypatch):
    from posthoc_cli.record import writer as writer_module

    real, calls = writer_module.write_file, []

    def flaky(path, *args, **kwargs):  # the first file hits a full disk, the rest succeed
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writer_module, "write_file", flaky)
    model = Net()
    rec = Recorder(model, tmp_path, snapshot_every=10, async_write=False)
    with pytest.raises(Exception, match="No space"):
        for _ in range(10):
            rec.update()
    assert [s.sigma_rel for s in scan(tmp_path).snapshots] == [0.10]  # the other file was still written
    rec.snapshot()  # retries the one that failed
    rec.close()
    assert sorted(s.sigma_rel for s in scan(tmp_path).snapshots) == [0.05, 0.10]


def test_a_stuck_disk_never_holds_up_training_beyond_the_copy(tmp_path, monkeypatch):
    """With every file write blocked, updates across two snapshot times still return."""
    from posthoc_cli.record import writer as writer_module

    real, gate = writer_module.write_file, threading.Event()

    def stuck(*args, **kwargs):
        gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_file", stuck)
    model = Net()
    rec = Recorder(model, tmp_path, snapshot_every=2, max_pending=4)

    def train() -> None:
        for _ in range(5):  # snapshots at t=2 and t=4, both queued behind the stuck disk
            perturb(model, rec.t + 1)
            rec.update()

    worker = threading.Thread(target=train)
    worker.start()
    worker.join(timeout=20)
    finished = not worker.is_alive()
    gate.set()
    worker.join()
    rec.close()
    assert finished, "update() waited for the disk"
    assert [s.t for s in scan(tmp_path).series[0.05]] == [2, 4]


def test_model_without_float_tensors_is_refused(tmp_path):
    model = nn.Module()
    model.register_buffer("count", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(InvalidValueError, match="no floating-point"):
        Recorder(model, tmp_path)


@pytest.mark.parametrize("form", ["wrapper", "inner-orig-params", "inner-flat-params"])
def test_fsdp1_is_refused_in_every_form(tmp_path: Path, form: str) -> None:
    """FSDP1 (FullyShardedDataParallel) re-points a model's parameters at flat-shard views: refused at
    construction, naming fully_shard, whether the Recorder gets the wrapper or the module inside it (its
    parameters then look like plain tensors of the wrong shapes, or are one flat parameter)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        wrapped = FSDP(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)), use_orig_params=form != "inner-flat-params", device_id=torch.device("cpu"))
        wrapped(torch.randn(2, 8)).sum().backward()
        model = wrapped if form == "wrapper" else wrapped.module
        with pytest.raises(InvalidValueError, match=r"FSDP1.* — shard the model with torch\.distributed\.fsdp\.fully_shard \(FSDP2\)"):
            Recorder(model, tmp_path / "ckpts", (0.05, 0.10), async_write=False)
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "ckpts").exists() or not any((tmp_path / "ckpts").iterdir())
