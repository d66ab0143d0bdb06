"""Classical, library and window targets synthesized from real snapshots of a real run.

Oracles: in one training run, Recorders keep power EMAs (snapshots dense and
sparse) while torch's AveragedModel tracks a classical EMA directly and the full
trajectory is kept, so each library's float64 simulation gives its tracked EMA
exactly. ``plan`` is checked against ``inspect`` on a folder recorded with the
planned settings; the CLI through the installed entry point.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from conftest import make_tiny_model
from test_e2e import cli
from test_targets import (
    sim_diffusers,
    sim_ema_pytorch,
    sim_litema,
    sim_supergradients,
    sim_timm,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from posthoc_cli import Recorder, load_synthesized, plan, scan, synthesize
from posthoc_cli.analysis.recording_plan import plan_report, recommend
from posthoc_cli.analysis.report import inspect_report

STEPS = 1000
TRACKED = {  # spec → the float64 simulation of that library's formula (weights on θ_0..θ_T)
    "diffusers:decay=0.999": lambda: sim_diffusers(STEPS, decay=0.999),
    "litema:decay=0.999": lambda: sim_litema(STEPS, 0.999, True),
    "timm:decay=0.995,use_warmup=true": lambda: sim_timm(STEPS, decay=0.995, use_warmup=True),
    "ema-pytorch:beta=0.995,update_every=5,update_after_step=20":
        lambda: sim_ema_pytorch(STEPS, beta=0.995, update_every=5, update_after_step=20),
    "supergradients:decay=0.998,total_steps=1000": lambda: sim_supergradients(STEPS, 0.998, "exp", 15.0, 1000),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One training run: two Recorders (snapshots every 20 and every 100 steps), AveragedModel(0.99),
    and every parameter vector θ_0..θ_T (float64) for the simulated trackers."""
    root = tmp_path_factory.mktemp("oracle")
    model = make_tiny_model(3)
    names = [n for n, _ in model.named_parameters()]
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    trajectory = [torch.cat([p.detach().double().flatten() for p in model.parameters()])]
    generator = torch.Generator().manual_seed(7)
    dense = Recorder(model, root / "dense", sigma_rels=(0.05, 0.10), snapshot_every=20)
    sparse = Recorder(model, root / "sparse", sigma_rels=(0.05, 0.10), snapshot_every=100)
    with torch.no_grad():
        for _ in range(STEPS):
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator) + 0.002)
            dense.update()
            sparse.update()
            averaged.update_parameters(model)
            trajectory.append(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
    dense.close()
    sparse.close()
    theta = torch.stack(trajectory).numpy()  # => [steps + 1, parameters]
    tracked = {spec: sim() @ theta for spec, sim in TRACKED.items()}
    tracked["beta=0.99"] = torch.cat([p.detach().double().flatten() for p in averaged.module.parameters()]).numpy()
    tracked["window=300"] = theta[-300:].mean(axis=0)
    return {"root": root, "names": names, "tracked": tracked}


def _flat(state: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return torch.cat([state[n].double().flatten() for n in names]).numpy()


def test_synthesized_targets_match_the_directly_tracked_emas(run: dict) -> None:
    errors: dict[str, dict[str, float]] = {}
    for folder in ("dense", "sparse"):
        ckpts = run["root"] / folder
        for spec, tracked in run["tracked"].items():
            # poor targets too, on purpose: denser snapshots must reproduce them better
            profile_error = float(plan(ckpts, [spec], allow_poor=True).fit.profile_error[0])
            got = _flat(load_synthesized(ckpts, spec, accumulate="float64", allow_poor=True), run["names"])
            error = float(np.linalg.norm(got - tracked) / np.linalg.norm(tracked))
            errors.setdefault(spec, {})[folder] = error
            if profile_error < 0.01:
                assert error < 1e-3, (folder, spec, profile_error, error)
    faithful = [s for s in errors if float(plan(run["root"] / "dense", [s], allow_poor=True).fit.profile_error[0]) < 0.01]
    assert len(faithful) >= 5, errors  # the oracle covers most kinds, not a lucky one
    # denser snapshots reproduce every tracker at least as well, and better overall
    assert sum(e["dense"] for e in errors.values()) < sum(e["sparse"] for e in errors.values())
    assert errors["beta=0.99"]["dense"] < errors["beta=0.99"]["sparse"]


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_mixed_targets_in_one_pass_are_the_same_bits_as_each_alone(run: dict, tmp_path: Path, accumulate: str) -> None:
    ckpts = run["root"] / "dense"
    targets = [0.08, "beta=0.99", "window=300", "diffusers:decay=0.999", "litema:decay=0.995"]
    together = synthesize(ckpts, targets, out=tmp_path / "together", accumulate=accumulate)
    for target, path in zip(targets, together):
        alone = synthesize(ckpts, target, out=tmp_path / "alone" / path.name, accumulate=accumulate)[0]
        a, b = safetensors.torch.load_file(path), safetensors.torch.load_file(alone)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), target


def test_output_metadata_records_the_target(run: dict, tmp_path: Path) -> None:
    ckpts = run["root"] / "dense"
    paths = synthesize(ckpts, [0.08, "beta=0.99,every=2", "window=300"], out=tmp_path, allow_poor=True)  # every=2: 0.094
    assert [p.name for p in paths] == [
        "ema-s0.080-t1000.safetensors", "ema-beta0.99-every2-t1000.safetensors", "ema-window300-t1000.safetensors"
    ]
    for path, spec in zip(paths, ["sigma_rel=0.08", "beta=0.99,every=2", "window=300"]):
        with safetensors.safe_open(path, "pt") as f:
            info = json.loads(f.metadata()["posthoc_ema"])
        assert info["target"]["spec"] == spec and info["kind"] == "synthesized"
        assert 0 < info["sigma_rel"] < 0.2887 and info["profile_error"] >= 0 and info["sum_abs_weights"] >= 1 - 1e-12
    # the outputs sit next to the snapshots without disturbing a scan
    assert len(scan(tmp_path).ignored) == 3 and not scan(tmp_path).broken


def test_plan_agrees_with_inspect_on_the_recorded_folder(record, tmp_path: Path) -> None:
    targets = ["beta=0.99", "window=100", "litema:decay=0.995", 0.07]
    folder = record(tmp_path / "ckpts", (0.05, 0.10), steps=400, snapshot_every=50)
    seen = inspect_report(scan(folder), targets)
    planned = plan_report(steps=400, snapshot_every=50, record=(0.05, 0.10), targets=targets)
    assert planned["latest_t"] == seen["latest_t"] == 400
    assert planned["grid"] == seen["grid"]
    assert planned["targets"] == seen["targets"]


def test_recommend_covers_what_is_wanted() -> None:
    r = recommend(steps=100_000, want=(0.05, 0.15), targets=["beta=0.9999"], max_error=0.01)
    assert r["record"] is not None and len(r["record"]) in (2, 3)
    report = plan_report(steps=100_000, snapshot_every=r["snapshot_every"], record=r["record"],
                         targets=[0.05, 0.1, 0.15, "beta=0.9999"])
    assert all(row["profile_error"] <= 0.01 for row in report["targets"])
    assert r["snapshots"] == report["snapshots"]


def test_cli_targets_end_to_end(run: dict, tmp_path: Path) -> None:
    ckpts = run["root"] / "dense"
    out = cli("synthesize", ckpts, "-s", 0.08, "--beta", 0.99, "--ema", "window=300", "--out", f"{tmp_path}/o/",
              "--json", cwd=tmp_path)
    doc = json.loads(out.stdout)
    assert [o["target"] for o in doc["outputs"]] == ["sigma_rel=0.08", "beta=0.99", "window=300"]
    assert doc["outputs"][1]["sigma_rel"] is None and Path(doc["outputs"][1]["path"]).exists()
    seen = json.loads(cli("inspect", ckpts, "--beta", 0.99, "--ema", "window=300", "--json", cwd=tmp_path).stdout)
    assert [row["target"] for row in seen["targets"]] == ["beta=0.99", "window=300"]
    planned = json.loads(cli("plan", "--steps", STEPS, "--snapshot-every", 20, "--record", 0.05, "--record", 0.1,
                             "--beta", 0.99, "--ema", "window=300", "--json", cwd=tmp_path).stdout)
    assert planned["targets"] == seen["targets"]
    bad = cli("synthesize", ckpts, "--ema", "diffusers:dekay=0.9", cwd=tmp_path, check_rc=2)
    assert bad.stderr.count("\n") == 1 and "diffusers has no parameter 'dekay'" in bad.stderr
    bad = cli("synthesize", ckpts, "--ema", "window=5000", cwd=tmp_path, check_rc=2)
    assert "longer than the run" in bad.stderr and bad.stderr.count("\n") == 1
    number = cli("beta-to-sigma", 0.999, "--steps", 100_000, cwd=tmp_path)
    assert math.isclose(float(number.stdout), 0.009995, rel_tol=1e-3) and "closest" in number.stderr
