"""``posthoc-ema sweep`` and ``posthoc_cli.sweep``: real recordings, a real evaluation command run as a
process (tests/sweep_eval.py), the installed entry point, several sweeps at once, Ctrl-C and kills."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sweep_model
from posthoc_cli import EvaluationError, load_synthesized, sweep
from posthoc_cli.choice.claims import Claims
from posthoc_cli.choice.evaluation import read_metric
from posthoc_cli.choice.results import Results
from posthoc_cli.choice.search import log_grid, next_point
from test_e2e import entry_point

HERE = Path(__file__).resolve().parent
EVAL = f"{shlex.quote(sys.executable)} {shlex.quote(str(HERE / 'sweep_eval.py'))} {{weights}} {{sigma_rel}} {{seed}} {{device}}"
TIMEOUT = 300


@pytest.fixture(scope="session")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep") / "ckpts"
    sweep_model.record(folder)
    return folder


@pytest.fixture
def ckpts(recorded: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpts"
    shutil.copytree(recorded, folder)
    return folder


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "SWEEP_LOG": str(tmp_path / "log.jsonl"), **extra}


def run_sweep(folder: Path, *args: str, env: dict[str, str], rc: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [entry_point(), "sweep", str(folder), "--eval", EVAL, *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=folder.parent,
    )
    assert result.returncode == rc, result.stdout + result.stderr
    return result


def start_sweep(folder: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [entry_point(), "sweep", str(folder), "--eval", EVAL, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=folder.parent,
    )


def log_lines(tmp_path: Path) -> list[dict]:
    path = tmp_path / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def gone(pid: int) -> bool:
    """Whether a process has ended (a zombie no parent reaped has too: in a container, PID 1 may not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def loss_of(folder: Path, target: float | str, **kw: object) -> float:
    return sweep_model.val_loss({k: v.numpy() for k, v in load_synthesized(folder, target, **kw).items()})


# -- the sweep finds the best ----------------------------------------------------------------------


def test_a_real_sweep_finds_the_best_length(ckpts: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "best.safetensors", tmp_path / "sweep.png"
    done = run_sweep(ckpts, "--json", "--out", str(out), "--plot", str(plot), env=_env(tmp_path))
    doc = json.loads(done.stdout)
    rows, best = doc["rows"], doc["best"]
    evaluations = log_lines(tmp_path)
    assert len(evaluations) == len(rows) <= 12  # grid 7 + recorded 2 + refine 3
    assert all(row["status"] == "ok" for row in rows)
    assert sum(row["refined"] for row in rows) == 3
    lo, hi = doc["faithful_band"][str(best["step"])]
    assert all(lo <= row["sigma_rel"] <= hi for row in rows)
    # Within 0.2 % of the best of a fine grid of 30 faithful lengths, evaluated in this process.
    fine = min(loss_of(ckpts, float(s)) for s in np.geomspace(lo, hi, 30))
    assert best["metric"] <= fine * 1.002
    assert lo < best["sigma_rel"] < hi  # this model's optimum is inside the band
    # The rows' metrics are what the command printed for each candidate's weights.
    for row in rows:
        assert row["metric"] == loss_of(ckpts, row["target"])
    assert sweep_model.val_loss({k: v for k, v in __import__("safetensors.numpy").numpy.load_file(out).items()}) == best["metric"]
    assert plot.stat().st_size > 10_000
    assert not files_under(ckpts / "sweeps" / Path(doc["results"]).with_suffix(".candidates").name)
    # Run again: nothing is evaluated twice, and the same table comes from the results file.
    again = run_sweep(ckpts, env=_env(tmp_path))
    assert len(log_lines(tmp_path)) == len(rows)
    assert "<- best" in again.stdout and f"Best: {best['target']} at t={best['step']}" in again.stdout


def test_the_python_api_gives_the_rows_of_the_cli(ckpts: Path, tmp_path: Path) -> None:
    cli = json.loads(run_sweep(ckpts, "--json", env=_env(tmp_path)).stdout)
    calls: list[str] = []

    def evaluate(state_dict, target) -> float:
        calls.append(target.spec)
        return sweep_model.val_loss({k: v.numpy() for k, v in state_dict.items()})

    result = sweep(ckpts, evaluate)
    keys = ("target", "sigma_rel", "step", "metric", "metrics", "status", "profile_error")
    assert [{k: getattr(r, k) for k in keys} for r in result.rows] == [{k: r[k] for k in keys} for r in cli["rows"]]
    assert (result.best.target, result.best.sigma_rel, result.best.step, result.best.metric) == tuple(
        cli["best"][k] for k in ("target", "sigma_rel", "step", "metric")
    )
    assert result.results.parent == ckpts / "sweeps" and result.results != Path(cli["results"])
    assert len(calls) == len(result.rows)
    # A notebook calling again resumes from the results file: nothing is evaluated again.
    assert sweep(ckpts, evaluate).best == result.best and len(calls) == len(result.rows)
    result.plot(tmp_path / "api.png")
    assert (tmp_path / "api.png").stat().st_size > 10_000


def test_python_api_failures_are_rows_and_all_failing_raises(ckpts: Path, tmp_path: Path) -> None:
    def picky(state_dict, target) -> float:
        if target.sigma_rel == 0.1:
            raise RuntimeError("out of memory, say")
        return sweep_model.val_loss({k: v.numpy() for k, v in state_dict.items()})

    result = sweep(ckpts, picky, [0.05, 0.1, 0.12], results=tmp_path / "r.jsonl")
    failed = [r for r in result.rows if r.status == "failed"]
    assert [r.sigma_rel for r in failed] == [0.1] and "out of memory" in failed[0].error
    assert result.best.sigma_rel == 0.12
    with pytest.raises(EvaluationError, match="every evaluation failed"):
        sweep(ckpts, lambda sd, target: float("nan"), [0.05, 0.1], results=tmp_path / "nan.jsonl")


# -- results that survive anything -----------------------------------------------------------------


def _wait_for(predicate, what: str, limit: float = TIMEOUT) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_ctrl_c_keeps_finished_evaluations_and_a_rerun_continues(ckpts: Path, tmp_path: Path) -> None:
    env = _env(tmp_path)
    process = start_sweep(ckpts, env={**env, "SWEEP_BLOCK_AFTER": "3"})  # the 4th runs until interrupted
    blocked = tmp_path / "log.jsonl.blocked"
    _wait_for(lambda: blocked.exists() and any(Results(p).rows() for p in ckpts.glob("sweeps/*.jsonl")), "the 4th evaluation")
    _wait_for(lambda: len(Results(next(ckpts.glob("sweeps/*.jsonl"))).rows()) == 3, "3 recorded evaluations")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("Error: interrupted")
    sweeps = ckpts / "sweeps"
    assert not [p for p in files_under(sweeps) if not p.name.endswith(".jsonl")]  # no candidate, no claim left
    assert len(Results(next(sweeps.glob("*.jsonl"))).latest()) == 3
    done = json.loads(run_sweep(ckpts, "--json", env=env).stdout)
    evaluations = log_lines(tmp_path)
    assert len(evaluations) == len(done["rows"]) == len({e["sigma_rel"] for e in evaluations})


def test_two_sweeps_at_once_split_the_work(ckpts: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, SWEEP_TMP=str(tmp_path / "candidates"))
    both = [start_sweep(ckpts, "--json", "--tmp", str(tmp_path / "candidates"), env=env) for _ in range(2)]
    docs = []
    for process in both:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, stderr
        docs.append(json.loads(stdout))
    evaluations = log_lines(tmp_path)
    assert len(evaluations) == len({e["sigma_rel"] for e in evaluations}) == len(docs[0]["rows"])  # each once
    assert docs[0]["best"] == docs[1]["best"] and docs[0]["rows"] == docs[1]["rows"]
    assert len({row["run"] for row in Results(docs[0]["results"]).rows()}) == 2  # both did a share of the work
    assert max(e["candidates"] for e in evaluations) <= 2  # one candidate file per running evaluation


def test_a_claim_left_by_a_killed_sweep_is_taken_over(ckpts: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "hung.pid"
    env = _env(tmp_path, SWEEP_HANG="0.05", SWEEP_HANG_PID=str(pid_file))
    process = start_sweep(ckpts, "--sigma-rel", "0.05", "--sigma-rel", "0.1", env=env)
    try:
        _wait_for(pid_file.exists, "the evaluation to start")
    finally:
        process.kill()  # SIGKILL: no clean-up at all
        process.communicate()
        with contextlib.suppress(OSError, ValueError):  # its evaluation, in a session of its own
            os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
    claims = list((ckpts / "sweeps").rglob("*.claim"))
    assert len(claims) == 1
    # The same host and a dead process: taken over at once.
    done = run_sweep(ckpts, "--sigma-rel", "0.05", "--sigma-rel", "0.1", "--json", env=_env(tmp_path))
    assert [r["status"] for r in json.loads(done.stdout)["rows"]] == ["ok", "ok"]
    assert not list((ckpts / "sweeps").rglob("*.claim"))


def test_claims_of_live_owners_are_kept_and_silent_ones_taken_over(tmp_path: Path) -> None:
    claims = Claims(tmp_path / "claims", timeout=60)
    assert claims.take("a")
    path = claims.path("a")
    path.write_text(json.dumps({"host": "another-host", "pid": 1, "key": "'a'"}))
    assert not claims.take("a")  # another host's claim, touched recently: its owner is alive
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert claims.take("a")  # silent for an hour: its host is gone
    assert json.loads(path.read_text())["pid"] == os.getpid()


# -- failures are rows -----------------------------------------------------------------------------


def test_failures_are_rows_and_the_best_comes_from_the_rest(ckpts: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "hung.pid"
    env = _env(tmp_path, SWEEP_FAIL="0.07", SWEEP_SILENT="0.09", SWEEP_NAN="0.12", SWEEP_HANG="0.15",
               SWEEP_HANG_PID=str(pid_file))
    targets = [a for s in ("0.05", "0.07", "0.09", "0.1", "0.12", "0.15") for a in ("--sigma-rel", s)]
    done = run_sweep(ckpts, *targets, "--timeout", "4", "--jobs", "2", "--json", env=env)
    rows = {r["sigma_rel"]: r for r in json.loads(done.stdout)["rows"]}
    assert {s for s, r in rows.items() if r["status"] == "ok"} == {0.05, 0.1}
    assert rows[0.07]["error"].startswith("exit code 1") and rows[0.07]["metric"] is None
    assert "no metric" in rows[0.09]["error"] and "nan" in rows[0.12]["error"]
    assert rows[0.15]["error"].startswith("timed out after 4 s")
    assert gone(int(pid_file.read_text()))  # the hung evaluation was killed with its group
    assert json.loads(done.stdout)["best"]["sigma_rel"] == 0.1
    assert "Warning: 4 of 6 candidates failed" in done.stderr
    results = Results(json.loads(done.stdout)["results"])
    assert "something broke" in next(r for r in results.rows() if r["sigma_rel"] == 0.07)["stderr"]
    # Failed rows are not evaluated again, unless asked.
    run_sweep(ckpts, *targets, env=_env(tmp_path))
    assert len(results.rows()) == 6
    retried = json.loads(run_sweep(ckpts, *targets, "--retry-failed", "--json", env=_env(tmp_path)).stdout)
    assert all(r["status"] == "ok" for r in retried["rows"]) and len(results.rows()) == 10


def test_a_retried_failure_keeps_the_search_points_already_evaluated(ckpts: Path, tmp_path: Path) -> None:
    first = json.loads(run_sweep(ckpts, "--json", env=_env(tmp_path, SWEEP_FAIL="0.159")).stdout)
    assert [r["sigma_rel"] for r in first["rows"] if r["status"] == "failed"] == [0.159]
    searched = [r["target"] for r in first["rows"] if r["refined"]]
    assert len(searched) == 3
    again = json.loads(run_sweep(ckpts, "--retry-failed", "--json", env=_env(tmp_path)).stdout)
    assert all(r["status"] == "ok" for r in again["rows"])
    assert [r["target"] for r in again["rows"] if r["refined"]] == searched  # where they were, not placed anew
    assert len(again["rows"]) == len(log_lines(tmp_path)) == 12  # every evaluation is a row; one evaluated twice
    assert again["best"]["metric"] == min(r["metric"] for r in again["rows"])


def test_commands_that_cannot_work(ckpts: Path, tmp_path: Path) -> None:
    bad = subprocess.run([entry_point(), "sweep", str(ckpts), "--eval", "python eval.py"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "{weights}" in bad.stderr
    assert not (ckpts / "sweeps").exists()
    missing = subprocess.run(
        [entry_point(), "sweep", str(ckpts), "--eval", "no-such-evaluator-xyz {weights}", "--sigma-rel", "0.05", "--sigma-rel", "0.1"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith("Error: every evaluation failed") and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    late = subprocess.run([entry_point(), "sweep", str(ckpts), "--eval", EVAL, "--step", "99999"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert late.returncode == 2 and late.stderr.startswith("Error: --step 99999 is outside the recorded range t=200..6000")
    never = subprocess.run([entry_point(), "sweep", str(ckpts), "--eval", EVAL, "--claim-timeout", "0"],
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert never.returncode == 2 and never.stderr.startswith("Error: --claim-timeout 0 is not positive")


# -- other options ---------------------------------------------------------------------------------


def test_metric_key_and_maximize(ckpts: Path, tmp_path: Path) -> None:
    targets = ["--sigma-rel", "0.05", "--sigma-rel", "0.1", "--sigma-rel", "0.14"]
    keyed = json.loads(run_sweep(ckpts, *targets, "--metric", "loss", "--json", env=_env(tmp_path, SWEEP_JSON="1")).stdout)
    assert [r["metric"] for r in keyed["rows"]] == [loss_of(ckpts, s) for s in (0.05, 0.1, 0.14)]
    higher = json.loads(run_sweep(ckpts, *targets, "--maximize", "--json", env=_env(tmp_path, SWEEP_NEGATE="1")).stdout)
    assert higher["best"]["target"] == keyed["best"]["target"] == "sigma_rel=0.14"
    assert higher["best"]["metric"] == -keyed["best"]["metric"]


def test_repeats_average_a_noisy_metric(ckpts: Path, tmp_path: Path) -> None:
    targets = ["--sigma-rel", "0.05", "--sigma-rel", "0.14"]
    done = run_sweep(ckpts, *targets, "--repeats", "3", env=_env(tmp_path, SWEEP_NOISE="0.001"))
    assert " ± " in done.stdout
    doc = json.loads(run_sweep(ckpts, *targets, "--repeats", "3", "--json", env=_env(tmp_path, SWEEP_NOISE="0.001")).stdout)
    assert sorted((e["sigma_rel"], e["seed"]) for e in log_lines(tmp_path)) == [
        (s, str(k)) for s in ("0.05", "0.14") for k in range(3)
    ]
    for row in doc["rows"]:
        clean = loss_of(ckpts, row["sigma_rel"])
        noise = [0.001 * np.random.default_rng(k).standard_normal() for k in range(3)]
        assert row["metrics"] == [clean + n for n in noise]
        assert row["metric"] == pytest.approx(np.mean(row["metrics"]), rel=1e-12)
        assert row["std"] == pytest.approx(np.std(row["metrics"], ddof=1), rel=1e-9)


def test_devices_give_each_job_its_own_and_disk_holds_one_candidate_per_job(ckpts: Path, tmp_path: Path) -> None:
    candidates = tmp_path / "candidates"
    targets = [a for s in ("0.05", "0.07", "0.1", "0.12") for a in ("--sigma-rel", s)]
    run_sweep(ckpts, *targets, "--devices", "0,1", "--tmp", str(candidates),
              env=_env(tmp_path, SWEEP_TMP=str(candidates), CUDA_VISIBLE_DEVICES="7"))
    evaluations = log_lines(tmp_path)
    assert len(evaluations) == 4
    assert all(e["cuda"] == e["device"] and e["device"] in ("0", "1") for e in evaluations)
    assert max(e["candidates"] for e in evaluations) <= 2  # --jobs defaults to one per device
    assert not files_under(candidates)
    single = tmp_path / "single"
    run_sweep(ckpts, *targets, "--tmp", str(single), "--keep", "--results", str(tmp_path / "one.jsonl"),
              env=_env(tmp_path, SWEEP_TMP=str(single), CUDA_VISIBLE_DEVICES="7"))
    later = log_lines(tmp_path)[4:]
    assert [e["candidates"] for e in later] == [1, 2, 3, 4]  # --keep keeps each one; one job at a time
    assert all(e["cuda"] == "7" and e["device"] == "" for e in later)  # without --devices, left alone


# -- the parts -------------------------------------------------------------------------------------


def test_reading_the_metric() -> None:
    assert read_metric("epoch 3\n0.25\nsaved\n") == 0.25
    assert read_metric('{"fid": 3.5}\n{"fid": 2.5, "is": 9}\nbye\n', "fid") == 2.5
    for text, key, message in [
        ("nothing here\n", None, "no line"), ("0.5\nnan\n", None, "nan"), ("inf\n", None, "inf"),
        ('{"is": 9}\n', "fid", "no key 'fid'"), ("0.5\n", "fid", "no line of its output is a JSON object"),
        ('{"fid": true}\n', "fid", "not a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            read_metric(text, key)


def test_a_torn_line_is_skipped_and_the_next_starts_fresh(tmp_path: Path) -> None:
    results = Results(tmp_path / "r.jsonl")
    row = {"target": "sigma_rel=0.1", "step": 5, "repeat": 0, "status": "ok", "metric": 1.0}
    results.append(row)
    with open(results.path, "a") as f:
        f.write('{"target": "sigma_rel=0.2", "st')  # a crash in the middle of a line
    results.append({**row, "repeat": 1})
    assert [r["repeat"] for r in results.rows()] == [0, 1]


def test_the_search_converges_inside_the_band() -> None:
    def curve(s: float) -> float:
        return (np.log(s) - np.log(0.137)) ** 2

    points = {s: curve(s) for s in (0.03, 0.05, 0.08, 0.1, 0.13, 0.2, 0.25)}
    for _ in range(3):
        s = next_point(points, points, 0.03, 0.25)
        assert s is not None and 0.03 <= s <= 0.25 and s not in points
        points[s] = curve(s)
    assert min(points, key=points.get) == pytest.approx(0.137, rel=2e-3)
    # An optimum at the edge of the band: the search stays inside it.
    edge = {s: -s for s in (0.03, 0.1, 0.25)}
    s = next_point(edge, edge, 0.03, 0.25)
    assert s is not None and 0.1 < s < 0.25


def test_a_grid_over_time_and_sigma_rel(ckpts: Path, tmp_path: Path) -> None:
    args = ("--step", "3000", "--step", "6000", "--grid", "3", "--refine", "1")
    doc = json.loads(run_sweep(ckpts, *args, "--json", env=_env(tmp_path)).stdout)
    rows = doc["rows"]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows) and {r["step"] for r in rows} == {3000, 6000}
    for step in (3000, 6000):  # the grid (3 across that time's faithful band) and the recorded lengths, at each time
        here = [r for r in rows if r["step"] == step and not r["refined"]]
        lo, hi = doc["faithful_band"][str(step)]
        assert sorted(r["sigma_rel"] for r in here) == sorted(set(log_grid(lo, hi, 3)) | {0.05, 0.1})
    (searched,) = [r for r in rows if r["refined"]]
    best_grid = min((r for r in rows if not r["refined"]), key=lambda r: r["metric"])
    assert searched["step"] == best_grid["step"]  # the search refines at the best time
    for row in rows:
        assert row["metric"] == loss_of(ckpts, row["target"], t=row["step"])
    table = run_sweep(ckpts, *args, env=_env(tmp_path)).stdout
    assert table.splitlines()[0].split()[:2] == ["t", "sigma_rel"]


def test_candidates_as_hugging_face_shards(ckpts: Path, tmp_path: Path) -> None:
    """With --max-shard-size, {weights} is a folder of shards, and --out the best one's folder."""
    out = tmp_path / "best"
    doc = json.loads(run_sweep(ckpts, "--sigma-rel", "0.05", "--sigma-rel", "0.14", "--max-shard-size", "8KB",
                               "--out", str(out), "--json", env=_env(tmp_path)).stdout)
    assert [r["metric"] for r in doc["rows"]] == [loss_of(ckpts, 0.05), loss_of(ckpts, 0.14)]
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert doc["out"] == str(out) and doc["best"]["sigma_rel"] == 0.14
