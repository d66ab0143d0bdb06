"""A bounded folder while recording: Recorder(max_snapshots=N, keep_faithful=band), and Switch EMA (copy_to_model).

Tiny tensors: which snapshots go depends on times and sigma_rels alone, so a Linear(3, 2)
recorded at every step gives the 200-per-series folders of the goal in a second or two.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from posthoc_cli import (
    InvalidValueError,
    Recorder,
    load_synthesized,
    read_snapshot,
    scan,
)
from posthoc_cli.cli.main import app
from posthoc_cli.ema.thinning import band_sigma_rels, errors
from posthoc_cli.format.container import load_tensors

BAND = (0.03, 0.20)


def weights_at(model: torch.nn.Module, step: int) -> None:
    """The weights after optimizer step ``step``: a pure function of the step, so runs can stop and resume."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(math.sin(step / 30 + i) + 0.1 * torch.randn(p.shape, generator=g))


def run(folder: Path, steps: int = 200, **options: Any) -> Path:
    """Record steps rec.t+1..steps with a snapshot at every step: 200 per series by default."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with Recorder(model, folder, (0.05, 0.10), snapshot_every=1, **options) as rec:
        for step in range(rec.t + 1, steps + 1):
            weights_at(model, step)
            rec.update()
    return folder


def band_error(folder: Path) -> float:
    snaps = scan(folder).snapshots
    return float(errors([s.t for s in snaps], [s.sigma_rel for s in snaps], band_sigma_rels(BAND), [snaps[-1].t]).max())


def test_thinning_keeps_n_per_series_the_band_faithful_and_the_bits_of_an_unthinned_recording(tmp_path):
    thinned = run(tmp_path / "thinned", max_snapshots=40, keep_faithful=BAND)
    full = run(tmp_path / "full")
    catalogue = scan(thinned)
    assert {s: len(g) for s, g in catalogue.series.items()} == {0.05: 40, 0.10: 40}
    assert all(g[-1].t == 200 for g in catalogue.series.values())  # the newest is never removed
    assert not catalogue.ignored and not [p for p in thinned.iterdir() if p.name.startswith(".")]
    assert len(scan(full).snapshots) == 400  # without max_snapshots nothing is removed
    assert band_error(thinned) <= 0.01
    # The kept files hold what the unthinned run wrote at those times; synthesis from them is the same bits.
    kept = tmp_path / "kept"
    kept.mkdir()
    for snap in catalogue.snapshots:
        shutil.copy(full / snap.path.name, kept / snap.path.name)
    for sigma_rel in (0.03, 0.07, 0.15, 0.20):
        got, want = load_synthesized(thinned, sigma_rel), load_synthesized(kept, sigma_rel)
        assert got.keys() == want.keys()
        assert all(got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]) for n in want)


def test_resume_continues_a_thinned_folder_as_if_never_stopped(tmp_path):
    straight = run(tmp_path / "straight", 120, max_snapshots=20, keep_faithful=BAND)
    stopped = run(tmp_path / "stopped", 70, max_snapshots=20, keep_faithful=BAND)
    run(stopped, 120, max_snapshots=20, keep_faithful=BAND)
    names = sorted(p.name for p in straight.iterdir())
    assert names == sorted(p.name for p in stopped.iterdir())
    for name in names:  # the same snapshots kept, holding the same bits
        a, b = (load_tensors(read_snapshot(f / name).header) for f in (straight, stopped))
        assert all(torch.equal(a[n], b[n]) for n in a), name


def test_inspect_shows_the_thinning_and_no_holes(tmp_path):
    folder = run(tmp_path / "ckpts", 60, max_snapshots=12, keep_faithful=BAND)
    result = CliRunner().invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["thinned"] == {"recorder": {"max_snapshots": 12, "keep_faithful": [0.03, 0.2]}}
    assert not [p for p in report["problems"] if "no snapshot" in p]
    text = CliRunner().invoke(app, ["inspect", str(folder)]).output
    assert "Thinned while recording: at most 12 snapshots per sigma_rel, keeping 0.03..0.2 faithful" in text


@pytest.mark.parametrize(("option", "value"), [("max_snapshots", 1), ("max_snapshots", 2.5), ("keep_faithful", (0.2, 0.03)),
                                               ("keep_faithful", (0.0, 0.1))])
def test_bad_thinning_options_are_refused(tmp_path, option, value):
    options = {"max_snapshots": 10, "keep_faithful": BAND, option: value}
    with pytest.raises(InvalidValueError, match=option if option == "max_snapshots" else "band|sigma_rel"):
        Recorder(torch.nn.Linear(2, 2), tmp_path / "ckpts", **options)


def test_copy_to_model_switches_the_weights_and_the_emas_go_on(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with Recorder(model, tmp_path / "a", (0.05, 0.10), snapshot_every=100) as rec, \
            Recorder(twin, tmp_path / "b", (0.05, 0.10), snapshot_every=100) as ref:
        for step in range(1, 31):
            weights_at(model, step)
            twin.load_state_dict(model.state_dict())
            rec.update()
            ref.update()
        emas = {s: rec.ema_state_dict(s) for s in (0.05, 0.10)}
        rec.copy_to_model(0.05)
        for name, value in model.state_dict().items():  # the model now is that EMA
            assert torch.equal(value, emas[0.05][name]), name
        for s in (0.05, 0.10):  # the switch itself touches no EMA: nothing restarted
            assert all(torch.equal(rec.ema_state_dict(s)[n], emas[s][n]) for n in emas[s])
        twin.load_state_dict(model.state_dict())  # a twin fed the switched weights, never switched
        rec.update()
        ref.update()
        assert rec.t == ref.t == 31
        for s in (0.05, 0.10):  # the next update folds the switched weights into EMAs that kept their history
            got, want = rec.ema_state_dict(s), ref.ema_state_dict(s)
            assert all(torch.equal(got[n], want[n]) for n in want)


def test_copy_to_model_brings_a_lagging_ema_to_now_first(tmp_path):
    """With update_every=2 the EMAs lag the model by a step at odd times: the switch copies the EMA of now."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    with Recorder(model, tmp_path / "a", (0.05, 0.10), snapshot_every=100, update_every=2) as rec, \
            Recorder(model, tmp_path / "b", (0.05, 0.10), snapshot_every=100, update_every=2) as ref:
        for step in range(1, 8):  # t = 7: the EMAs were last updated at t = 6
            weights_at(model, step)
            rec.update()
            ref.update()
        ref.snapshot()  # which brings ref's EMAs to t = 7, from the same weights
        now = ref.ema_state_dict(0.05)
        rec.copy_to_model(0.05)
        assert all(torch.equal(model.state_dict()[n], now[n]) for n in now)


def test_plan_with_max_snapshots_predicts_the_thinned_folder(tmp_path):
    folder = run(tmp_path / "ckpts", 100, max_snapshots=20, keep_faithful=BAND)
    args = ["plan", "--steps", "100", "--snapshot-every", "1", "--record", "0.05", "--record", "0.10",
            "--max-snapshots", "20", "--keep-faithful", "0.03..0.20", "--params", "1000", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    planned = json.loads(result.output)
    assert (planned["snapshots"], planned["on_disk"], planned["disk_bytes"]) == (200, 40, 40 * 1000 * 4)
    inspected = json.loads(CliRunner().invoke(app, ["inspect", str(folder), "--json"]).output)
    assert planned["grid"] == inspected["grid"]  # the same snapshots kept: the same table
    text = CliRunner().invoke(app, args[:-1]).output
    assert "200 snapshots, 40 kept on disk (--max-snapshots 20), 160.0 kB of tensors (float32)" in text
