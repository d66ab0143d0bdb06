"""Property-based fuzzing: mutated snapshot files and random solver inputs.

A mutated file (bit flips anywhere, truncation at any length, header byte edits,
a rewritten header length, inserted or appended garbage) dropped into a folder of
good snapshots must never crash, hang or be misread. ``read_snapshot``, ``scan``,
``plan``/``load_synthesized`` and ``posthoc-ema inspect``/``synthesize`` either
succeed or raise a :class:`PosthocError`. What they accept is checked against
independent oracles: the reference ``safetensors`` reader must agree on every
tensor's name, dtype, shape and bytes; a file that a scan ignores must leave the
result exactly as without it; results are finite or a :class:`NonFiniteError`.
"""

from __future__ import annotations

import atexit
import json
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from posthoc_cli import (
    InvalidValueError,
    NonFiniteError,
    PosthocError,
    load_synthesized,
    read_snapshot,
    scan,
)
from posthoc_cli.cli.main import app
from posthoc_cli.ema.profiles import SIGMA_REL_MAX, sigma_rel_to_gamma
from posthoc_cli.ema.solve import fit, solve_weights
from posthoc_cli.format.atomic import write_file
from posthoc_cli.format.container import load_tensors
from posthoc_cli.format.snapshot import NotASnapshot, snapshot_metadata, snapshot_name

FILE_EXAMPLES = 100  # per kind of mutation
SOLVER_EXAMPLES = 400
COUNTS: dict[str, int] = {}
TARGET = 0.07


def _tensors(t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    return {
        "fc.weight": torch.randn(4, 3, generator=g),
        "fc.bias": torch.randn(4, generator=g),
        "steps": torch.tensor(t, dtype=torch.int64),
        "scale": torch.randn((), generator=g),
    }


def _make_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for sigma_rel in (0.05, 0.10):
        for t in (10, 20, 30):
            meta = snapshot_metadata(sigma_rel=sigma_rel, gamma=sigma_rel_to_gamma(sigma_rel), t=t, time_unit="step", updates=t, dtype="float32")
            write_file(root / snapshot_name(sigma_rel, t), _tensors(t).items(), meta)
    return root


_SCRATCH = tempfile.mkdtemp(prefix="posthoc-fuzz-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
BASE = _make_folder(Path(_SCRATCH) / "ckpts")
NAMES = sorted(p.name for p in BASE.iterdir())
ORIGINAL = {name: (BASE / name).read_bytes() for name in NAMES}
HEADER_END = {name: 8 + int.from_bytes(data[:8], "little") for name, data in ORIGINAL.items()}
RESULT = load_synthesized(BASE, TARGET)


@contextmanager
def no_hang(seconds: int = 20):
    """A hung call fails the example instead of hanging the suite (hypothesis deadlines only time finished calls)."""

    def fire(*_: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


KINDS = ["bit flips", "truncate", "header bytes", "header length", "insert", "append", "data bytes", "record values"]
JSON_VALUES = st.one_of(
    st.sampled_from([1, 2, 0, -1, 0.05, 0.1, 0.2, "snapshot", "synthesized", "float16", "bfloat16", "step", 10, 20, 40]),
    st.integers(1, 100),
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(0, 3), max_size=2),
)


def mutate(draw: st.DrawFn, name: str, kind: str) -> bytes:
    """The bytes of snapshot ``name`` after one mutation of ``kind``."""
    data = bytearray(ORIGINAL[name])
    header_end = HEADER_END[name]
    if kind == "bit flips":  # anywhere: length field, header, tensor data
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "header bytes":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(8, header_end - 1))
            data[i] = draw(st.sampled_from(list(b'{}[]",:0123456789-.eE \\tnfu') + [0, 0xFF, 0xC3]))
    elif kind == "header length":
        n = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(data)), st.integers(header_end - 24, header_end + 8)))
        data[:8] = max(n, 0).to_bytes(8, "little")
    elif kind == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    elif kind == "record values":  # a valid container whose posthoc_ema record says something else
        n = header_end - 8
        header = json.loads(data[8:header_end])
        info = json.loads(header["__metadata__"]["posthoc_ema"])
        for _ in range(draw(st.integers(1, 3))):
            info[draw(st.sampled_from(sorted(info)))] = draw(JSON_VALUES)
        header["__metadata__"]["posthoc_ema"] = json.dumps(info)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        data = bytearray(len(text).to_bytes(8, "little") + text + data[8 + n :])
    else:  # only tensor bytes: the header stays valid, the values change (NaN and Inf included)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(header_end, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    return bytes(data)


def _agrees_with_safetensors(path: Path) -> None:
    """What we accepted, the reference reader reads the same way: names, dtypes, shapes, bytes, metadata."""
    ours = load_tensors(read_snapshot(path).header)
    with safetensors.safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(ours)
        assert f.metadata() == read_snapshot(path).header.metadata
        for name in f.keys():
            theirs = f.get_tensor(name)
            assert theirs.dtype == ours[name].dtype and theirs.shape == ours[name].shape
            assert torch.equal(theirs.reshape(-1).view(torch.uint8), ours[name].reshape(-1).view(torch.uint8))


def _finite(result: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in result.values() if v.is_floating_point())


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=FILE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_mutated_snapshot_files_never_crash_or_mislead(kind, data):
    name = data.draw(st.sampled_from(NAMES), label="file")
    data = data.draw(st.composite(lambda draw: mutate(draw, name, kind))(), label="mutated bytes")
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    with tempfile.TemporaryDirectory() as scratch, no_hang():
        folder = Path(scratch) / "ckpts"
        shutil.copytree(BASE, folder)
        path = folder / name
        path.write_bytes(data)

        # the file alone
        try:
            snap = read_snapshot(path)
        except (PosthocError, NotASnapshot):
            snap = None
        else:
            _agrees_with_safetensors(path)
            header_intact = data[: HEADER_END[name]] == ORIGINAL[name][: HEADER_END[name]]
            if header_intact:
                assert snap.info == read_snapshot(BASE / name).info

        # the folder
        catalogue = scan(folder)
        places = [s.path for s in catalogue.snapshots] + [s.path for s in catalogue.ignored + catalogue.broken]
        assert places.count(path) == 1  # used, ignored or broken: exactly one
        fate = "used" if path in places[: len(catalogue.snapshots)] else "ignored" if path in [
            s.path for s in catalogue.ignored] else "broken"
        COUNTS[f"file {fate}"] = COUNTS.get(f"file {fate}", 0) + 1

        try:
            result = load_synthesized(folder, TARGET)
        except NonFiniteError as e:
            assert str(path) in str(e)
            result = None
        except PosthocError:
            result = None
        COUNTS["synthesis ok" if result is not None else "synthesis refused"] = COUNTS.get(
            "synthesis ok" if result is not None else "synthesis refused", 0) + 1
        if result is not None:
            assert _finite(result)
            if path in [s.path for s in catalogue.ignored]:  # a file left out changes nothing
                without = Path(scratch) / "without"
                shutil.copytree(BASE, without)
                (without / name).unlink()
                try:
                    expected = load_synthesized(without, TARGET)
                except PosthocError:
                    expected = None
                assert expected is not None and all(torch.equal(result[k], expected[k]) for k in expected)
            if data == ORIGINAL[name]:
                assert all(torch.equal(result[k], RESULT[k]) for k in RESULT)

        # the command line, in this process
        runner = CliRunner()
        inspected = runner.invoke(app, ["inspect", str(folder), "--json"])
        assert inspected.exit_code == 0 and inspected.exception is None or isinstance(inspected.exception, SystemExit), (
            inspected.output
        )
        assert inspected.exit_code == 0, inspected.output
        report = json.loads(inspected.stdout)
        assert all(np.isfinite(row["profile_error"]) for row in report["grid"])
        out = Path(scratch) / "out.safetensors"
        made = runner.invoke(app, ["synthesize", str(folder), "-s", str(TARGET), "--out", str(out)])
        assert made.exception is None or isinstance(made.exception, SystemExit), made.output
        if result is not None:
            assert made.exit_code == 0, made.output
            with safetensors.safe_open(out, framework="pt") as f:
                assert all(torch.equal(f.get_tensor(k), result[k]) for k in result)
        else:
            assert made.exit_code in (1, 2) and made.stderr.startswith("Error: ") and not out.exists(), made.output
        assert sorted(p.name for p in Path(scratch).iterdir() if p.name.startswith("out")) == (["out.safetensors"] if result is not None else [])


def test_fuzz_counts_are_reported():
    """Runs after the file fuzz: how many examples of each kind ran, and where the mutated file ended up."""
    print(f"\nfile fuzz examples: {COUNTS} (mutations: {sum(COUNTS.get(k, 0) for k in KINDS)})")
    # Each kind that ran in this process (pytest-xdist spreads the kinds over workers, each with its own COUNTS).
    assert all(COUNTS[k] >= FILE_EXAMPLES // 2 for k in KINDS if k in COUNTS)


# -- the solver -------------------------------------------------------------------------------------

sigma_rels = st.one_of(
    st.sampled_from([0.05, 0.10, 0.15, 0.2, 0.28]),
    st.floats(1e-4, SIGMA_REL_MAX, exclude_max=True),
    st.floats(1e-12, 1e-4),
)
times = st.one_of(st.integers(1, 1000), st.integers(1, 10**7), st.integers(1, 2**53))


@st.composite
def schedules(draw: st.DrawFn) -> tuple[list[int], list[float], list[int], list[float]]:
    n = draw(st.integers(1, 40))
    if draw(st.booleans()):  # a regular schedule of a few sigma_rels, as the Recorder writes
        recorded = draw(st.lists(sigma_rels, min_size=1, max_size=3, unique=True))
        every = draw(st.integers(1, 10**5))
        count = max(1, n // len(recorded))
        t_in = [every * (k + 1) for _ in recorded for k in range(count)]
        s_in = [s for s in recorded for _ in range(count)]
    else:  # anything: duplicates, near-duplicates, wild times
        t_in = draw(st.lists(times, min_size=n, max_size=n))
        s_in = draw(st.lists(sigma_rels, min_size=n, max_size=n))
    targets = draw(st.integers(1, 5))
    t_out = draw(st.lists(st.one_of(st.sampled_from(t_in), times), min_size=targets, max_size=targets))
    s_out = draw(st.lists(st.one_of(st.sampled_from(s_in), sigma_rels), min_size=targets, max_size=targets))
    return t_in, s_in, t_out, s_out


@settings(max_examples=SOLVER_EXAMPLES, deadline=None, derandomize=True)
@given(schedules())
def test_solver_gives_finite_weights_summing_to_one_or_a_clear_error(schedule):
    t_in, s_in, t_out, s_out = schedule
    COUNTS["solver"] = COUNTS.get("solver", 0) + 1
    with no_hang():
        try:
            result = fit(t_in, s_in, t_out, s_out)
        except InvalidValueError as e:  # a target before every snapshot, or one they cannot represent at all
            assert e.what and e.fix and e.exit_code == 2
            return
    w = result.weights  # => [inputs, targets]
    assert w.shape == (len(t_in), len(t_out))
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(result.profile_error)) and np.all(np.isfinite(result.sum_abs_weights))
    for j, (t_r, s_r) in enumerate(zip(t_out, s_out)):
        column = w[:, j]
        assert abs(column.sum() - 1.0) <= 1e-9 * max(1.0, float(np.abs(column).sum()))
        assert np.all(column[np.asarray(t_in) > t_r] == 0)  # never uses the future
        assert result.sum_abs_weights[j] >= 1.0 - 1e-9 and result.profile_error[j] >= 0
        exact = [i for i, (t, s) in enumerate(zip(t_in, s_in)) if t == t_r and s == s_r]
        if exact:  # a recorded EMA is copied, not approximated
            assert column[exact[0]] == 1.0 and np.count_nonzero(column) == 1
    assert np.array_equal(solve_weights(t_in, s_in, t_out, s_out), w)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10)), min_size=1, max_size=4),
       st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10)), min_size=1, max_size=4))
def test_solver_rejects_invalid_values_with_invalid_value_error(t_values, s_values):
    """Any numbers at all, NaN, inf, negative, zero: a result or InvalidValueError, nothing else."""
    COUNTS["solver invalid"] = COUNTS.get("solver invalid", 0) + 1
    n = min(len(t_values), len(s_values))
    try:
        result = fit(t_values[:n], s_values[:n], [t_values[0]], [s_values[0]])
    except InvalidValueError:
        return
    assert np.all(np.isfinite(result.weights)) and abs(result.weights.sum() - 1) < 1e-6 * result.sum_abs_weights.sum()


# -- regressions found by fuzzing ----------------------------------------------------------------


def test_tiny_target_sigma_rel_is_a_clear_error():
    with pytest.raises(InvalidValueError):
        fit([10, 20], [0.05, 0.10], 20, 1e-200)


@settings(max_examples=200, deadline=None, derandomize=True, phases=(Phase.generate,))  # no shrinking while it fails
@given(st.one_of(st.floats(0, 1), st.floats(1e-30, 1e-3), st.floats(0.999, 1)), st.integers(1, 10**9), st.integers(1, 100),
       st.one_of(st.floats(0, SIGMA_REL_MAX), st.floats(1e-300, 1e-3)))
def test_classical_ema_conversions_give_a_value_or_a_clear_error(beta, steps, every, sigma_rel):
    from posthoc_cli.ema.classical import beta_to_sigma_rel, sigma_rel_to_beta

    COUNTS["conversions"] = COUNTS.get("conversions", 0) + 1
    with no_hang():
        try:
            value = beta_to_sigma_rel(beta, steps, every)
            assert np.isfinite(value) and value >= 0
        except InvalidValueError:
            pass
        try:
            b = sigma_rel_to_beta(sigma_rel, steps, every)
            assert 0 < b < 1
        except InvalidValueError:
            pass
