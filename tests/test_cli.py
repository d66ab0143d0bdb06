"""The CLI in-process (typer.testing.CliRunner): every bad input of issue 3, exact exit codes and messages, outputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from posthoc_cli import beta_to_sigma_rel, load_synthesized, scan
from posthoc_cli.cli.main import app
from posthoc_cli.format.atomic import AtomicWriter, write_file
from posthoc_cli.format.container import load_tensors
from posthoc_cli.format.keys import METADATA_KEY
from posthoc_cli.format.snapshot import Snapshot

SIGMA_REL_MAX = 12**-0.5


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def run(*args: object):
    result = _runner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug, never a user-facing outcome
    return result


def error_line(result) -> str:
    """The single stderr line of a failed command."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty current folder: default outputs land here, and must not on errors."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def rewrite(snap: Snapshot, tensors: dict[str, torch.Tensor], **metadata: object) -> None:
    """Replace a snapshot file by one with other tensors (and metadata fields), keeping its name."""
    info = json.loads(snap.header.metadata[METADATA_KEY])
    info.update(metadata)
    snap.path.unlink()
    write_file(snap.path, tensors.items(), {METADATA_KEY: json.dumps(info)})


# -- synthesize: bad input ---------------------------------------------------------------------------


def test_missing_folder(work):
    result = run("synthesize", work / "nope", "--sigma-rel", 0.15)
    assert result.exit_code == 1
    assert error_line(result) == (
        f"Error: snapshot folder {work / 'nope'} does not exist — pass the folder the Recorder wrote (default: ckpts)"
    )
    assert files(work) == {}


def test_default_folder_is_ckpts(work):
    result = run("synthesize", "--sigma-rel", 0.15)
    assert result.exit_code == 1
    assert "snapshot folder ckpts does not exist" in error_line(result)


def test_empty_folder_and_folder_without_snapshots(work):
    empty = work / "empty"
    empty.mkdir()
    result = run("synthesize", empty, "-s", 0.15)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: no posthoc-ema snapshots in {empty} — record some")
    (empty / "notes.txt").write_text("hello")
    write_file(empty / "foreign.safetensors", [("w", torch.ones(3))], {})
    result = run("synthesize", empty, "-s", 0.15)
    assert result.exit_code == 1
    assert "no posthoc-ema snapshots" in error_line(result)
    assert sorted(files(work)) == ["foreign.safetensors", "notes.txt"]


@pytest.mark.parametrize("value", ["0", "-0.1", "0.2887", "0.3", "nan"])
def test_sigma_rel_out_of_range_is_bad_usage(recorded, work, value):
    before = files(recorded)
    result = run("synthesize", recorded, "--sigma-rel", value)
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith(f"Error: sigma_rel {float(value)!r} is out of range — choose a value in (0, 0.2887)")
    assert files(work) == {} and files(recorded) == before


def test_one_bad_sigma_rel_among_good_ones_writes_nothing(recorded, work):
    result = run("synthesize", recorded, "-s", 0.12, "-s", 0.3, "--out", work / "many")
    assert result.exit_code == 2
    assert "sigma_rel 0.3 is out of range" in error_line(result)
    assert not (work / "many").exists()


@pytest.mark.parametrize("step", [201, 19, 0, -5])
def test_step_outside_recorded_range(recorded, work, step):
    result = run("synthesize", recorded, "-s", 0.15, "--step", step)
    assert result.exit_code == 2
    assert error_line(result) == f"Error: --step {step} is outside the recorded range t=20..200 — pick a time in 20..200"
    assert files(work) == {}


def test_step_inside_range_uses_only_earlier_snapshots(recorded, work):
    result = run("synthesize", recorded, "-s", 0.12, "--step", 100, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["t"] == 100 and max(i["t"] for i in doc["inputs"]) <= 100
    assert (work / "ema-s0.120-t100.safetensors").exists()
    # between two snapshot times: the end of the profile is not recorded, and the refusal (or, with
    # --allow-poor, the warning) says what to do
    result = run("synthesize", recorded, "-s", 0.15, "--step", 110)
    assert result.exit_code == 2 and "— use --step 100, or pass --allow-poor" in error_line(result)
    result = run("synthesize", recorded, "-s", 0.15, "--step", 110, "--allow-poor")
    assert result.exit_code == 0, result.output
    assert "--step 110 is after the last snapshot at or before it (t=100); use --step 100" in result.stderr


def test_single_recorded_sigma_rel(tmp_path, work, record):
    folder = record(tmp_path / "one", (0.10,), steps=60)
    result = run("synthesize", folder, "-s", 0.15)
    assert result.exit_code == 1
    assert error_line(result).startswith(
        f"Error: only sigma_rel 0.1 was recorded in {folder}: other lengths cannot be synthesized from one"
    )
    assert files(work) == {}
    # the recorded length itself is still available
    assert run("synthesize", folder, "-s", 0.10).exit_code == 0


def test_truncated_file(recorded, work):
    victim = scan(recorded).series[0.05][3].path
    victim.write_bytes(victim.read_bytes()[:300])
    result = run("synthesize", recorded, "-s", 0.15)
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith(f"Error: {victim}: ") and "truncated" in line
    assert "`posthoc-ema inspect` lists all problems" in line
    assert files(work) == {}


def test_truncated_tensor_data(recorded, work):
    victim = scan(recorded).series[0.10][-1].path
    victim.write_bytes(victim.read_bytes()[:-4])
    result = run("synthesize", recorded, "-s", 0.15)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {victim}: ")
    assert files(work) == {}


@pytest.mark.parametrize(
    "header",
    [b"[1, 2, 3]", b"{not json", b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}'],
    ids=["array", "garbage", "bad-offsets"],
)
def test_corrupt_header(recorded, work, header):
    victim = scan(recorded).series[0.05][0].path
    victim.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    result = run("synthesize", recorded, "-s", 0.15)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {victim}: invalid safetensors header")
    assert files(work) == {}


def test_corrupt_metadata(recorded, work):
    snap = scan(recorded).series[0.05][0]
    rewrite(snap, load_tensors(snap.header), sigma_rel=0.7)
    result = run("synthesize", recorded, "-s", 0.15)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {snap.path}: invalid posthoc_ema metadata: sigma_rel 0.7")


def _disagree_names(snap: Snapshot) -> None:
    tensors = load_tensors(snap.header)
    del tensors["fc2.bias"]
    rewrite(snap, tensors)


def _disagree_shapes(snap: Snapshot) -> None:
    tensors = load_tensors(snap.header)
    tensors["fc1.weight"] = tensors["fc1.weight"][:, :4].contiguous()
    rewrite(snap, tensors)


def _disagree_dtypes(snap: Snapshot) -> None:
    tensors = {n: t.half() if t.is_floating_point() else t for n, t in load_tensors(snap.header).items()}
    rewrite(snap, tensors, dtype="float16")


def _disagree_time_unit(snap: Snapshot) -> None:
    rewrite(snap, load_tensors(snap.header), time_unit="sample")


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (_disagree_names, "lacks 'fc2.bias'"),
        (_disagree_shapes, "tensor 'fc1.weight' is F32[16, 4], not F32[16, 8]"),
        (_disagree_dtypes, "is F16[16, 8], not F32[16, 8]"),
        (_disagree_time_unit, "its time unit is 'sample', not 'step'"),
    ],
    ids=["names", "shapes", "dtypes", "time_unit"],
)
def test_snapshots_that_disagree(recorded, work, change, detail):
    snap = scan(recorded).series[0.05][2]
    change(snap)
    result = run("synthesize", recorded, "-s", 0.15)
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith(f"Error: {snap.path.name} disagrees with ") and detail in line
    assert files(work) == {}
    # inspect reports the same problem and does not fail
    result = run("inspect", recorded)
    assert result.exit_code == 0
    assert detail in result.stdout


def test_existing_output_needs_force(recorded, work):
    out = work / "ema.safetensors"
    out.write_bytes(b"keep me")
    result = run("synthesize", recorded, "-s", 0.15, "--out", out)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {out} already exists — use --force to overwrite it, or choose another --out"
    assert files(work) == {"ema.safetensors": b"keep me"}
    result = run("synthesize", recorded, "-s", 0.15, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert set(files(work)) == {"ema.safetensors"}  # replaced in place, no temp file left
    got = safetensors.torch.load_file(out)
    for name, tensor in load_synthesized(recorded, 0.15).items():
        assert torch.equal(got[name], tensor), name


def test_existing_output_among_several_targets_writes_none(recorded, work):
    folder = work / "out"
    folder.mkdir()
    (folder / "ema-s0.180-t200.safetensors").write_bytes(b"keep me")
    result = run("synthesize", recorded, "-s", 0.12, "-s", 0.18, "--out", folder)
    assert result.exit_code == 1
    assert "ema-s0.180-t200.safetensors already exists" in error_line(result)
    assert files(folder) == {"ema-s0.180-t200.safetensors": b"keep me"}


def test_out_ending_with_a_slash_is_a_folder(recorded, work):
    result = run("synthesize", recorded, "-s", 0.15, "--out", "new/")
    assert result.exit_code == 0, result.output
    assert set(files(work)) == {"ema-s0.150-t200.safetensors"}
    assert (work / "new" / "ema-s0.150-t200.safetensors").is_file()


def test_two_runs_writing_one_output_never_mix(recorded, work):
    """A live run's temp file is locked: a second run writing the same output stops instead of
    taking it over (which could put half a file under the final name); a dead run's is replaced."""
    out = work / "ema.safetensors"
    other = AtomicWriter(out, [("w", "F32", (4,))], {})  # another run, part-way through this output
    try:
        result = run("synthesize", recorded, "-s", 0.15, "--out", out)
        assert result.exit_code == 1
        assert error_line(result) == (
            f"Error: {out} is being written by another run (its temporary file ema.safetensors.tmp is in use)"
            " — wait for that run to finish, or choose another output"
        )
        other.write(torch.arange(4.0))
        other.commit()
    finally:
        other.abort()
    assert torch.equal(safetensors.torch.load_file(out)["w"], torch.arange(4.0))  # the other run's file, whole
    (work / "ema.safetensors.tmp").write_bytes(b"left by a run that died")  # no lock held on it
    result = run("synthesize", recorded, "-s", 0.15, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert set(files(work)) == {"ema.safetensors"}
    assert safetensors.torch.load_file(out).keys() == load_synthesized(recorded, 0.15).keys()


def test_output_under_a_regular_file_is_not_writable(recorded, work):
    # As root, permissions do not stop a write; a path through a regular file always fails.
    blocker = work / "blocker"
    blocker.write_text("a file, not a folder")
    result = run("synthesize", recorded, "-s", 0.15, "--out", blocker / "ema.safetensors")
    assert result.exit_code == 1
    assert str(blocker) in error_line(result)
    assert files(work) == {"blocker": b"a file, not a folder"}
    result = run("synthesize", recorded, "-s", 0.12, "-s", 0.18, "--out", blocker)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {blocker} is a file, but several targets need a folder — pass a folder as --out"


def test_output_that_is_an_input_is_refused(recorded):
    victim = scan(recorded).series[0.10][-1].path
    before = victim.read_bytes()
    result = run("synthesize", recorded, "-s", 0.15, "--out", victim, "--force")
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {victim} is one of the input snapshots — write the output somewhere else"
    assert victim.read_bytes() == before


@pytest.mark.parametrize(("option", "value"), [("--dtype", "int8"), ("--dtype", "float64"), ("--accumulate", "float16")])
def test_bad_dtype_options(recorded, work, option, value):
    result = run("synthesize", recorded, "-s", 0.15, option, value)
    assert result.exit_code == 2
    assert error_line(result).startswith(f"Error: {option} {value!r} is not supported — use one of")
    assert files(work) == {}


def test_nonfinite_snapshot_is_reported_and_can_be_allowed(recorded, work):
    snap = scan(recorded).series[0.05][-1]
    tensors = load_tensors(snap.header)
    tensors["fc1.weight"][0, 0] = float("nan")
    rewrite(snap, tensors)
    result = run("synthesize", recorded, "-s", 0.08)
    assert result.exit_code == 1
    line = error_line(result)
    assert f"tensor 'fc1.weight' in {snap.path} holds NaN or Inf" in line and "--allow-nonfinite" in line
    assert files(work) == {}
    result = run("synthesize", recorded, "-s", 0.08, "--allow-nonfinite")
    assert result.exit_code == 0
    assert torch.isnan(safetensors.torch.load_file(work / "ema-s0.080-t200.safetensors")["fc1.weight"][0, 0])


# -- synthesize: results -----------------------------------------------------------------------------


def test_synthesize_prints_a_summary_table(recorded, work):
    result = run("synthesize", recorded, "-s", 0.15, "-s", 0.08, "--out", "emas")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Synthesized 2 EMAs at t=200 (step) from 20 snapshots in {recorded}: ")
    header = lines[1].split()
    assert header[:2] == ["sigma_rel", "gamma"] and "Σ|w|" in header and header[-1] == "output"
    row = next(line for line in lines if line.split()[:1] == ["0.15"]).split()
    assert row[1] == "3.56" and row[2] == "20" and row[-1] == "emas/ema-s0.150-t200.safetensors"
    assert sorted(files(work)) == ["ema-s0.080-t200.safetensors", "ema-s0.150-t200.safetensors"]
    assert result.stderr == ""


def test_synthesize_json(recorded, work):
    result = run("synthesize", recorded, "-s", 0.15, "-s", 0.02, "--out", "emas", "--json", "--allow-poor")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)  # stdout is exactly one JSON document
    assert doc["t"] == 200 and doc["dtype"] == "float32" and doc["accumulate"] == "float32"
    assert len(doc["inputs"]) == 20 and doc["bytes_read"] > 0
    by_sigma = {o["sigma_rel"]: o for o in doc["outputs"]}
    assert set(by_sigma) == {0.15, 0.02}
    for sigma_rel, out in by_sigma.items():
        assert Path(out["path"]).exists()
        assert math.isclose(sum(out["weights"]), 1.0, rel_tol=1e-9)
        assert out["sum_abs_weights"] >= 1 and 0 <= out["profile_error"] < 1
        assert out["inputs_used"] == sum(w != 0 for w in out["weights"])
    assert by_sigma[0.15]["profile_error"] < 5e-2
    # 0.02 lies far below the recorded lengths: flagged in the document and on stderr
    assert any("sigma_rel 0.02: profile error" in w for w in doc["warnings"])
    assert "Warning: sigma_rel 0.02: profile error" in result.stderr


def test_float16_output_and_float64_accumulation(recorded, work):
    assert run("synthesize", recorded, "-s", 0.15, "--dtype", "float16", "--out", "half.safetensors").exit_code == 0
    assert run("synthesize", recorded, "-s", 0.15, "--accumulate", "float64", "--out", "wide.safetensors").exit_code == 0
    half, wide = (safetensors.torch.load_file(work / f) for f in ("half.safetensors", "wide.safetensors"))
    assert half["fc1.weight"].dtype == torch.float16 and half["bn.num_batches_tracked"].dtype == torch.int64
    torch.testing.assert_close(half["fc1.weight"].float(), wide["fc1.weight"], rtol=2e-3, atol=1e-3)


def test_float16_snapshots_warn_about_amplified_rounding(tmp_path, work, record):
    folder = record(tmp_path / "half", steps=200, snapshot_dtype=torch.float16)
    result = run("synthesize", folder, "-s", 0.01, "--json", "--allow-poor")
    assert result.exit_code == 0
    assert "amplifies float16 rounding" in result.stderr
    assert any("amplifies float16 rounding" in w for w in json.loads(result.stdout)["warnings"])


# -- inspect -----------------------------------------------------------------------------------------


def test_inspect_tables(recorded):
    result = run("inspect", recorded)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.splitlines()[0] == f"{recorded}: 20 snapshots of 2 sigma_rel(s), latest t=200 (step)"
    row = next(line for line in out.splitlines() if line.split()[:2] == ["0.05", "16.97"]).split()
    assert row[2:8] == ["10", "20..200", "20", "float32", "9", "259"]  # 259 averaged numbers in 9 tensors
    assert "Synthesizable at t=200 (faithful: profile error < 0.01)" in out
    grid_text, next_step = out.split("Synthesizable")[1].split("\nNext: ")
    grid = {line.split()[0]: line for line in grid_text.splitlines()[3:] if line.strip()}
    assert next_step.startswith("find the best") and "posthoc-ema sweep" in next_step  # inspect suggests sweep
    assert len(grid) == 28  # 0.01 .. 0.28, the recorded 0.05 and 0.1 among them
    assert grid["0.1"].split()[2:] == ["0", "1", "faithful", "(recorded)"]
    assert grid["0.01"].split()[-1] == "poor" and "Problems" not in out


def test_inspect_lists_broken_and_foreign_files_without_failing(recorded):
    (recorded / "notes.txt").write_text("hello")
    (recorded / "half.safetensors.tmp").write_bytes(b"partial")
    write_file(recorded / "foreign.safetensors", [("w", torch.ones(3))], {})
    (recorded / "hostile.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}")
    (recorded / "array.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]")
    result = run("inspect", recorded)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "20 snapshots of 2 sigma_rel(s)" in out
    assert f"{recorded / 'hostile.safetensors'}: header length {10**15} exceeds the file" in out
    assert f"{recorded / 'array.safetensors'}: invalid safetensors header: header JSON is not an object" in out
    assert f"skipped {recorded / 'foreign.safetensors'}: safetensors file without posthoc_ema metadata" in out
    assert f"skipped {recorded / 'notes.txt'}: not a .safetensors file" in out
    assert f"skipped {recorded / 'half.safetensors.tmp'}: temporary file" in out
    doc = json.loads(run("inspect", recorded, "--json").stdout)
    assert {Path(b["path"]).name for b in doc["broken"]} == {"hostile.safetensors", "array.safetensors"}
    assert {Path(i["path"]).name for i in doc["ignored"]} == {"notes.txt", "half.safetensors.tmp", "foreign.safetensors"}


def test_inspect_reports_gaps_and_missing_times(recorded):
    for snap in scan(recorded).series[0.10]:
        if snap.t in (80, 100, 120):
            snap.path.unlink()
    doc = json.loads(run("inspect", recorded, "--json").stdout)
    assert "sigma_rel 0.1: no snapshot between t=60 and t=140 (usual spacing 20)" in doc["problems"]
    assert "sigma_rel 0.1: no snapshot at t=80, 100, 120, which other sigma_rels have" in doc["problems"]
    assert {s["sigma_rel"]: s["spacing"] for s in doc["series"]} == {0.05: "20", 0.1: "20..80"}


def test_inspect_json(recorded):
    result = run("inspect", recorded, "--json")
    assert result.exit_code == 0 and result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["latest_t"] == 200 and doc["time_unit"] == "step" and doc["problems"] == []
    assert [s["sigma_rel"] for s in doc["series"]] == [0.05, 0.1]
    first = doc["series"][0]
    assert first["snapshots"] == 10 and (first["t_first"], first["t_last"]) == (20, 200)
    assert first["bytes"] == sum(s.header.file_size for s in scan(recorded).series[0.05])
    grid = {g["sigma_rel"]: g for g in doc["grid"]}
    assert sorted(grid) == [round(0.01 * k, 2) for k in range(1, 29)]
    assert grid[0.1]["recorded"] and grid[0.1]["profile_error"] == 0 and grid[0.1]["sum_abs_weights"] == 1
    assert grid[0.08]["faithful"] and not grid[0.01]["faithful"]
    assert all(g["sum_abs_weights"] >= 1 - 1e-9 for g in grid.values())


def test_inspect_single_sigma_rel_and_empty_folders(tmp_path, record):
    folder = record(tmp_path / "one", (0.10,), steps=60)
    doc = json.loads(run("inspect", folder, "--json").stdout)
    assert [g["sigma_rel"] for g in doc["grid"]] == [0.1]
    assert any("only sigma_rel 0.1 was recorded" in p for p in doc["problems"])
    result = run("inspect", tmp_path / "missing")
    assert result.exit_code == 1 and "does not exist" in error_line(result)
    (tmp_path / "empty").mkdir()
    result = run("inspect", tmp_path / "empty")
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: no posthoc-ema snapshots in {tmp_path / 'empty'}")


# -- beta-to-sigma / sigma-to-beta -------------------------------------------------------------------


def test_beta_to_sigma_with_steps_prints_only_the_number():
    result = run("beta-to-sigma", 0.999, "--steps", 100_000)
    # stdout is the bare number; the closest power EMA in profile goes to stderr (one line)
    assert result.exit_code == 0 and result.stderr.startswith("closest power-function EMA in profile: sigma_rel ")
    assert result.stderr.count("\n") == 1
    assert result.stdout.count("\n") == 1
    value = float(result.stdout)
    assert math.isclose(value, beta_to_sigma_rel(0.999, 100_000), rel_tol=1e-5)
    assert math.isclose(value, 0.999**0.5 / (0.001 * 100_000), rel_tol=1e-4)  # long-run approximation
    k10 = float(run("beta-to-sigma", 0.99, "--steps", 100_000, "--update-every", 10).stdout)
    assert math.isclose(k10, 10 * 0.99**0.5 / (0.01 * 100_000), rel_tol=1e-4)


@pytest.mark.parametrize(("beta", "steps", "why"), [(0.999, 1000, "≥ 1/√12"), (0.999, 100, "90% initial weights")])
def test_beta_to_sigma_flags_unreachable_lengths(beta, steps, why):
    result = run("beta-to-sigma", beta, "--steps", steps)
    assert result.exit_code == 1 and result.stdout == ""
    line = error_line(result)
    assert why in line and "no power-function EMA" in line


def test_beta_to_sigma_table():
    result = run("beta-to-sigma", 0.999)
    assert result.exit_code == 0
    out = result.stdout
    assert "half-life 692.8 steps; standard deviation of its profile 999.5 steps" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0][0].isdigit()}
    assert rows["10,000"][1] == "0.0999" and rows["100,000"][1] == "0.009995"
    assert "no power-function EMA" in " ".join(rows["1,000"])
    assert "relative to the training length" in out


@pytest.mark.parametrize("beta", ["0", "1", "1.5", "-0.5", "nan"])
def test_beta_outside_unit_interval(beta):
    for extra in ([], ["--steps", "1000"]):
        result = run("beta-to-sigma", *extra, "--", beta)  # `--`: a negative number is not an option
        assert result.exit_code == 2
        assert error_line(result) == f"Error: beta {float(beta)!r} is out of range — use a decay in (0, 1), e.g. 0.999"


def test_sigma_to_beta_inverts_beta_to_sigma():
    result = run("sigma-to-beta", 0.10, "--steps", 100_000)
    assert result.exit_code == 0 and result.stdout.count("\n") == 1
    beta = float(result.stdout)
    assert 0.9998 < beta < 0.99991
    assert math.isclose(float(run("beta-to-sigma", beta, "--steps", 100_000).stdout), 0.10, rel_tol=1e-5)


@pytest.mark.parametrize("sigma_rel", ["0", "0.3", str(SIGMA_REL_MAX)])
def test_sigma_to_beta_rejects_invalid_lengths(sigma_rel):
    result = run("sigma-to-beta", sigma_rel, "--steps", 1000)
    assert result.exit_code == 2
    assert "is out of range" in error_line(result)


@pytest.mark.parametrize("steps", [100_000, 10**11])
def test_sigma_to_beta_prints_a_beta_that_round_trips(steps):
    beta = float(run("sigma-to-beta", 0.1, "--steps", steps).stdout)
    assert math.isclose(beta_to_sigma_rel(beta, steps), 0.1, rel_tol=1e-6)


@pytest.mark.parametrize(("sigma_rel", "steps"), [(0.05, 10**18), (0.28, 10**16)])
def test_sigma_to_beta_says_when_float64_runs_out(sigma_rel, steps):
    """Refused, not answered 9% off: no float64 beta is close enough to 1."""
    result = run("sigma-to-beta", sigma_rel, "--steps", steps)
    assert result.exit_code == 2
    assert "needs a decay closer to 1 than a float64 can hold" in error_line(result)


def test_beta_to_sigma_too_short_an_ema_says_which_way_to_go():
    result = run("beta-to-sigma", 1e-300, "--steps", 1000)
    assert result.exit_code == 1 and result.stdout == ""
    assert error_line(result).endswith("shorter than any power-function EMA — use a larger beta or a shorter run")


def test_beta_to_sigma_table_for_a_tiny_beta_flags_every_row():
    result = run("beta-to-sigma", 1e-300)
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.count("shorter than any power-function EMA") == 5


def test_sigma_to_beta_needs_steps():
    assert run("sigma-to-beta", 0.1).exit_code == 2


# -- the app as a whole ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["synthesize", "inspect", "beta-to-sigma", "sigma-to-beta", "demo"])
def test_every_command_has_help_with_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.stdout and "Example" in result.stdout


def test_no_arguments_shows_help_and_version():
    assert "synthesize" in run().output
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("posthoc-ema ")


def test_importing_the_library_does_not_import_the_cli():
    code = "import sys, posthoc_cli; print(sorted(m for m in ('typer', 'rich', 'click') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_demo_refuses_a_folder_in_use(recorded):
    result = run("demo", "--out", recorded)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {recorded} already exists and is not an empty folder — pass a new folder to --out"


def test_demo_bad_arguments_create_nothing(tmp_path):
    out = tmp_path / "demo"
    result = run("demo", "--out", out, "--steps", 3)
    assert result.exit_code == 2 and "is too short" in error_line(result)
    assert not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("demo", "--out", blocker / "demo")
    assert result.exit_code == 1
    assert error_line(result).endswith("— pass another folder to --out")


def test_demo_short_run(tmp_path):
    out = tmp_path / "demo"
    result = run("demo", "--out", out, "--steps", 600, "--snapshot-every", 100)
    assert result.exit_code == 0, result.output
    table = result.stdout
    lines = table.splitlines()
    assert "raw weights" in table and sum(line.startswith("recorded EMA") for line in lines) == 2
    assert table.count("<- best") == 1
    assert f"posthoc-ema inspect {out}" in table
    assert sorted(scan(out).series) == [0.05, 0.1]
    swept = (out / "sweeps" / "demo.jsonl").read_text().splitlines()  # the demo's table is a sweep
    assert len(swept) == sum(line.startswith("synthesized") for line in lines) >= 3
