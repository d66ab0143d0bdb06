"""Malformed and hostile files: validated before use, rejected with the file's name, never executed.

Each case is one file dropped into a folder of good snapshots. The library must
raise :class:`SnapshotFileError` naming the file; ``scan`` lists it as broken;
``posthoc-ema synthesize`` prints ``Error: <file>: <what>`` and exits 1 without a
traceback or an output; ``posthoc-ema inspect`` lists it and exits 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import drift
from typer.testing import CliRunner

import posthoc_cli
from posthoc_cli import (
    CatalogueError,
    Recorder,
    SnapshotFileError,
    plan,
    read_snapshot,
    scan,
)
from posthoc_cli.cli.main import app
from posthoc_cli.ema.profiles import sigma_rel_to_gamma
from posthoc_cli.format.atomic import write_file
from posthoc_cli.format.snapshot import snapshot_metadata, snapshot_name

PACKAGE = Path(posthoc_cli.__file__).parent
G05 = sigma_rel_to_gamma(0.05)
DROP = object()  # marks a record key to remove


def good_tensors(t: int = 30) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) + t, "b": torch.full((3,), float(t))}


def record(**changes: object) -> dict[str, object]:
    info = json.loads(snapshot_metadata(sigma_rel=0.05, gamma=G05, t=30, time_unit="step", updates=30, dtype="float32")["posthoc_ema"])
    for key, value in changes.items():
        if value is DROP:
            info.pop(key)
        else:
            info[key] = value
    return info


def layout(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, object], bytes]:
    header: dict[str, object] = {}
    data, offset = b"", 0
    for name, tensor in tensors.items():
        raw = tensor.numpy().tobytes()
        code = {torch.float32: "F32", torch.int64: "I64"}[tensor.dtype]
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    return header, data


def assemble(header_text: bytes, data: bytes, *, length: int | None = None) -> bytes:
    header_text += b" " * (-(8 + len(header_text)) % 8)
    n = len(header_text) if length is None else length
    return struct.pack("<Q", n) + header_text + data


def snapshot_file(*, info: object = None, metadata: object = None, edit: Callable[[dict], None] | None = None,
                  data_edit: Callable[[bytes], bytes] | None = None, tensors: dict[str, torch.Tensor] | None = None,
                  length: int | None = None) -> bytes:
    """A snapshot's bytes, with one thing changed."""
    header, data = layout(tensors if tensors is not None else good_tensors())
    record_text = json.dumps(record() if info is None else info) if not isinstance(info, str) else info
    header = {"__metadata__": {"posthoc_ema": record_text} if metadata is None else metadata, **header}
    if edit is not None:
        edit(header)
    if data_edit is not None:
        data = data_edit(data)
    return assemble(json.dumps(header).encode(), data, length=length)


def raw_header(text: bytes, data: bytes = b"") -> bytes:
    return assemble(text, data)


def entry(name: str, **changes: object) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        header[name].update(changes)

    return edit


def _dup_key(key_json: str) -> bytes:
    header, data = layout(good_tensors())
    text = json.dumps({"__metadata__": {"posthoc_ema": json.dumps(record())}, **header})
    return assemble(text[:-1].encode() + f", {key_json}}}".encode(), data)


# (id, bytes of the file, a fragment the message must contain)
CASES: list[tuple[str, bytes, str]] = [
    # -- the container -------------------------------------------------------------------------
    ("empty file", b"", "too short"),
    ("five bytes", b"\x01\x00\x00\x00\x00", "too short"),
    ("header length larger than the file", snapshot_file(length=10_000), "header length 10000 exceeds the file"),
    ("header length 2**63", snapshot_file(length=2**63), f"header length {2**63} exceeds"),
    ("header length 2**64-1", snapshot_file(length=2**64 - 1), "exceeds the file"),
    ("header length zero", snapshot_file(length=0), "invalid safetensors header"),
    ("header JSON is a list", raw_header(b"[1, 2, 3]"), "header JSON is not an object"),
    ("header JSON is a string", raw_header(b'"snapshot"'), "header JSON is not an object"),
    ("header JSON is null", raw_header(b"null"), "header JSON is not an object"),
    ("header is not JSON", raw_header(b"{'w': 1}"), "invalid safetensors header"),
    ("header JSON cut short", snapshot_file(length=40), "invalid safetensors header"),
    ("header is invalid UTF-8", raw_header(b'{"w\xff\xfe": {}}'), "utf-8"),
    ("header padded with NUL bytes", raw_header(b'{}\x00\x00\x00\x00\x00\x00'), "invalid safetensors header"),
    ("duplicate tensor names", _dup_key('"b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}'), "duplicate key"),
    ("duplicate __metadata__", _dup_key('"__metadata__": {}'), "duplicate key"),
    ("deeply nested header JSON", raw_header(b"[" * 100_000 + b"]" * 100_000), "invalid safetensors header"),
    ("deeply nested tensor entry", raw_header(b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "invalid safetensors header"),
    ("integer literal of 5000 digits", raw_header(b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}'), "invalid safetensors header"),
    ("offsets overlap", snapshot_file(edit=entry("b", data_offsets=[20, 32])), "overlaps another"),
    ("offsets leave a gap", snapshot_file(edit=entry("b", data_offsets=[28, 40]), data_edit=lambda d: d + b"\0" * 4), "leaves a gap"),
    ("offsets exceed the file", snapshot_file(edit=lambda h: (entry("w", shape=[2, 4], data_offsets=[0, 32])(h), entry("b", data_offsets=[32, 44])(h))), "ends at byte"),
    ("bytes after the last tensor", snapshot_file(data_edit=lambda d: d + b"trailing"), "the file has"),
    ("offsets disagree with shape x dtype", snapshot_file(edit=entry("w", shape=[3, 3])), "needs 36"),
    ("offsets disagree with dtype size", snapshot_file(edit=entry("w", dtype="F64")), "needs 48"),
    ("offsets reversed", snapshot_file(edit=entry("w", data_offsets=[24, 0])), "spans bytes 24..0"),
    ("negative offset", snapshot_file(edit=entry("w", data_offsets=[-24, 0])), "spans bytes -24..0"),
    ("offsets of three numbers", snapshot_file(edit=entry("w", data_offsets=[0, 12, 24])), "invalid data_offsets"),
    ("offsets as floats", snapshot_file(edit=entry("w", data_offsets=[0.0, 24.0])), "invalid data_offsets"),
    ("offsets missing", snapshot_file(edit=lambda h: h["w"].pop("data_offsets")), "invalid data_offsets"),
    ("unknown dtype", snapshot_file(edit=entry("w", dtype="F128")), "unknown dtype 'F128'"),
    ("lower-case dtype", snapshot_file(edit=entry("w", dtype="f32")), "unknown dtype 'f32'"),
    ("dtype as a list", snapshot_file(edit=entry("w", dtype=["F32"])), "unknown dtype"),
    ("dtype as an object", snapshot_file(edit=entry("w", dtype={"F32": 1})), "unknown dtype"),
    ("negative shape dim", snapshot_file(edit=entry("w", shape=[-2, -3])), "invalid shape"),
    ("shape dim as float", snapshot_file(edit=entry("w", shape=[2.0, 3])), "invalid shape"),
    ("shape dim as bool", snapshot_file(edit=entry("b", shape=[True, 3], data_offsets=[24, 36])), "invalid shape"),
    ("shape not a list", snapshot_file(edit=entry("w", shape="2x3")), "invalid shape"),
    ("empty tensor with an absurd dim", snapshot_file(edit=lambda h: h.update(z={"dtype": "F32", "shape": [0, 2**70], "data_offsets": [36, 36]})), "invalid shape"),
    ("tensor entry not an object", snapshot_file(edit=lambda h: h.update(z=[1, 2])), "not an object"),
    ("empty tensor name", snapshot_file(edit=lambda h: h.update({"": {"dtype": "F32", "shape": [0], "data_offsets": [36, 36]}})), "not an object"),
    ("tensor name with a lone surrogate", raw_header(b'{"w\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "surrogates not allowed"),
    ("metadata key with a lone surrogate", snapshot_file(metadata={"posthoc_ema": json.dumps(record()), "\udc80": "x"}), "surrogates not allowed"),
    ("__metadata__ value not a string", snapshot_file(metadata={"posthoc_ema": {"format": 1}}), "__metadata__ is not a map"),
    ("__metadata__ a list", snapshot_file(metadata=["posthoc_ema"]), "__metadata__ is not a map"),
    ("__metadata__ an empty list", snapshot_file(metadata=[]), "__metadata__ is not a map"),
    # -- the posthoc_ema record ----------------------------------------------------------------
    ("metadata not JSON", snapshot_file(info="{format: 1}"), "invalid posthoc_ema metadata"),
    ("metadata JSON cut short", snapshot_file(info=json.dumps(record())[:-5]), "invalid posthoc_ema metadata"),
    ("metadata a JSON list", snapshot_file(info="[1]"), "not a JSON object"),
    ("metadata deeply nested", snapshot_file(info="[" * 100_000 + "]" * 100_000), "invalid posthoc_ema metadata"),
    ("format 2", snapshot_file(info=record(format=2)), "unsupported format 2"),
    ("format missing", snapshot_file(info=record(format=DROP)), "unsupported format None"),
    ("format as string", snapshot_file(info=record(format="1")), "unsupported format '1'"),
    ("format as float", snapshot_file(info=record(format=1.0)), "unsupported format 1.0"),
    ("format as bool", snapshot_file(info=record(format=True)), "unsupported format True"),
    ("kind unknown", snapshot_file(info=record(kind="checkpoint")), "unknown kind 'checkpoint'"),
    ("kind missing", snapshot_file(info=record(kind=DROP)), "unknown kind None"),
    ("kind as a list", snapshot_file(info=record(kind=["snapshot"])), "unknown kind"),
    ("sigma_rel NaN", snapshot_file(info=json.dumps(record()).replace('"sigma_rel": 0.05', '"sigma_rel": NaN')), "sigma_rel nan"),
    ("sigma_rel Infinity", snapshot_file(info=json.dumps(record()).replace('"sigma_rel": 0.05', '"sigma_rel": Infinity')), "sigma_rel inf"),
    ("sigma_rel negative", snapshot_file(info=record(sigma_rel=-0.05)), "sigma_rel -0.05 is not in"),
    ("sigma_rel zero", snapshot_file(info=record(sigma_rel=0)), "sigma_rel 0 is not in"),
    ("sigma_rel above 1/sqrt(12)", snapshot_file(info=record(sigma_rel=0.3)), "sigma_rel 0.3 is not in"),
    ("sigma_rel so small gamma overflows", snapshot_file(info=record(sigma_rel=1e-200)), "sigma_rel 1e-200 is too small"),
    ("sigma_rel as string", snapshot_file(info=record(sigma_rel="0.05")), "sigma_rel '0.05'"),
    ("sigma_rel as bool", snapshot_file(info=record(sigma_rel=True)), "sigma_rel True"),
    ("sigma_rel missing", snapshot_file(info=record(sigma_rel=DROP)), "sigma_rel None"),
    ("gamma inconsistent with sigma_rel", snapshot_file(info=record(gamma=6.94)), "gamma 6.94 does not match sigma_rel 0.05"),
    ("gamma NaN", snapshot_file(info=json.dumps(record(gamma=123.0)).replace("123.0", "NaN")), "gamma nan does not match"),
    ("gamma missing", snapshot_file(info=record(gamma=DROP)), "gamma None does not match"),
    ("t negative", snapshot_file(info=record(t=-30)), "t -30 is not a positive integer"),
    ("t zero", snapshot_file(info=record(t=0)), "t 0 is not a positive integer"),
    ("t as float", snapshot_file(info=record(t=30.0)), "t 30.0 is not a positive integer"),
    ("t as bool", snapshot_file(info=record(t=True)), "t True is not a positive integer"),
    ("t as string", snapshot_file(info=record(t="30")), "t '30' is not a positive integer"),
    ("t absurdly large", snapshot_file(info=record(t=2**70)), f"t {2**70} is not a positive integer"),
    ("t missing", snapshot_file(info=record(t=DROP)), "t None is not a positive integer"),
    ("updates above t", snapshot_file(info=record(updates=31)), "updates 31 is not an integer in [0, t]"),
    ("updates negative", snapshot_file(info=record(updates=-1)), "updates -1"),
    ("updates as float", snapshot_file(info=record(updates=3.5)), "updates 3.5"),
    ("time_unit not a string", snapshot_file(info=record(time_unit=5)), "time_unit 5 is not a printable string"),
    ("time_unit with a terminal escape", snapshot_file(info=record(time_unit="step\x1b[2J")), "is not a printable string"),
    ("time_unit with a lone surrogate", snapshot_file(info=json.dumps(record()).replace('"step"', '"st\\ud800ep"')), "is not a printable string"),
    ("dtype unknown", snapshot_file(info=record(dtype="float8")), "dtype 'float8' is not one of"),
    ("dtype as a list", snapshot_file(info=record(dtype=["float32"])), "dtype ['float32'] is not one of"),
    ("dtype disagrees with the tensors", snapshot_file(info=record(dtype="float16")), "metadata says float16 but the file holds F32"),
]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Good snapshots of sigma_rel 0.05 and 0.10 at t = 10, 20, 30."""
    root = tmp_path / "ckpts"
    root.mkdir()
    for sigma_rel in (0.05, 0.10):
        for t in (10, 20, 30):
            gamma = sigma_rel_to_gamma(sigma_rel)
            meta = snapshot_metadata(sigma_rel=sigma_rel, gamma=gamma, t=t, time_unit="step", updates=t, dtype="float32")
            write_file(root / snapshot_name(sigma_rel, t), good_tensors(t).items(), meta)
    return root


def snapshot_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


def check_rejected_everywhere(folder: Path, bad: Path, fragment: str, tmp_path: Path) -> None:
    """The library names the file; synthesize fails cleanly with nothing written; inspect lists it."""
    catalogue = scan(folder)
    [broken] = catalogue.broken
    assert broken.path == bad and fragment in broken.reason
    with pytest.raises(CatalogueError) as caught:
        plan(folder, [0.07])
    assert str(caught.value).startswith(f"{bad}: ") and fragment in str(caught.value)

    before = snapshot_bytes(folder)
    out = tmp_path / "out.safetensors"
    runner = CliRunner()
    result = runner.invoke(app, ["synthesize", str(folder), "--sigma-rel", "0.07", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"Error: {bad}: "), result.stderr
    assert fragment in result.stderr and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob("out.safetensors*"))
    assert snapshot_bytes(folder) == before  # inputs untouched

    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert bad.name in result.stdout and "Traceback" not in result.output
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [b["path"] for b in report["broken"]] == [str(bad)]
    assert fragment in report["broken"][0]["reason"]
    assert len(report["series"]) == 2 and all(s["snapshots"] == 3 for s in report["series"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_file_is_rejected_with_its_name(case, folder, tmp_path):
    _, content, fragment = case
    bad = folder / "ema-s0.050-t000000000040.safetensors"
    bad.write_bytes(content)
    with pytest.raises(SnapshotFileError) as caught:
        read_snapshot(bad)
    assert caught.value.path == str(bad)
    assert str(caught.value).startswith(f"{bad}: ") and fragment in str(caught.value), str(caught.value)
    check_rejected_everywhere(folder, bad, fragment, tmp_path)


def test_the_base_file_of_the_cases_is_valid(folder):
    path = folder / "extra.safetensors"
    path.write_bytes(snapshot_file())
    snap = read_snapshot(path)
    assert (snap.sigma_rel, snap.t, snap.kind) == (0.05, 30, "snapshot")
    assert scan(folder).ignored[0].reason == "duplicate of ema-s0.050-t000000000030.safetensors"


def test_duplicate_sigma_rel_and_t_with_different_contents_is_broken(folder, tmp_path):
    twin = folder / "zz-copy-of-t20.safetensors"  # sorts after the original
    meta = snapshot_metadata(sigma_rel=0.05, gamma=G05, t=20, time_unit="step", updates=20, dtype="float32")
    tensors = good_tensors(20)
    tensors["w"][0, 0] += 1e-6  # one value differs
    write_file(twin, tensors.items(), meta)
    check_rejected_everywhere(folder, twin, "differs from ema-s0.050-t000000000020.safetensors", tmp_path)


def test_identical_duplicates_are_used_once(folder, tmp_path):
    reference = posthoc_cli.load_synthesized(folder, 0.07)
    shutil.copy(folder / snapshot_name(0.05, 20), folder / "a-backup-t20.safetensors")  # sorts first
    # same tensors, another header (`created` and `updates` differ): still the same snapshot
    meta = snapshot_metadata(sigma_rel=0.10, gamma=sigma_rel_to_gamma(0.10), t=30, time_unit="step", updates=7, dtype="float32")
    write_file(folder / "zz-rewritten-t30.safetensors", good_tensors(30).items(), meta)
    catalogue = scan(folder)
    assert not catalogue.broken and [len(s) for s in catalogue.series.values()] == [3, 3]
    assert sorted(s.reason for s in catalogue.ignored) == [
        "duplicate of ema-s0.050-t000000000020.safetensors",
        "duplicate of ema-s0.100-t000000000030.safetensors",
    ]
    # the Recorder's file is the one used, the copy the one skipped, whichever sorts first
    assert sorted(s.path.name for s in catalogue.ignored) == ["a-backup-t20.safetensors", "zz-rewritten-t30.safetensors"]
    again = posthoc_cli.load_synthesized(folder, 0.07)
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    result = CliRunner().invoke(app, ["synthesize", str(folder), "-s", "0.07", "--out", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 0, result.output


def _alarm(seconds: int):  # type: ignore[no-untyped-def]
    def fire(*_: object) -> None:
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    return previous


def test_special_files_under_a_snapshot_name_never_hang_or_crash(folder, tmp_path):
    fifo = folder / "fifo.safetensors"
    os.mkfifo(fifo)
    previous = _alarm(20)
    try:
        check_rejected_everywhere(folder, fifo, "is not a regular file", tmp_path)
        fifo.unlink()
        device = folder / "device.safetensors"
        device.symlink_to("/dev/zero")
        check_rejected_everywhere(folder, device, "is not a regular file", tmp_path)
        device.unlink()
        dangling = folder / "dangling.safetensors"
        dangling.symlink_to(folder / "nowhere")
        check_rejected_everywhere(folder, dangling, "cannot read (No such file or directory)", tmp_path)
        dangling.unlink()
        unreadable = folder / "unreadable.safetensors"
        unreadable.write_bytes(snapshot_file())
        unreadable.chmod(0)
        if os.geteuid() != 0:  # root reads it anyway
            check_rejected_everywhere(folder, unreadable, "cannot read (Permission denied)", tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_foreign_and_synthesized_files_are_skipped_not_broken(folder, tmp_path):
    write_file(folder / "foreign.safetensors", [("x", torch.ones(2))], {"format": "pt"})
    (folder / "notes.txt").write_text("hello")
    (folder / "sub.safetensors").mkdir()
    posthoc_cli.synthesize(folder, 0.07, out=folder / "ema-s0.070-t30.safetensors")
    (folder / "half.safetensors.tmp").write_bytes(b"\x10\x00")  # after: synthesis removes a dead run's leftovers
    catalogue = scan(folder)
    assert not catalogue.broken and sum(len(s) for s in catalogue.series.values()) == 6
    reasons = {s.path.name: s.reason for s in catalogue.ignored}
    assert reasons == {
        "foreign.safetensors": "safetensors file without posthoc_ema metadata",
        "notes.txt": "not a .safetensors file",
        "half.safetensors.tmp": "temporary file of an unfinished write",
        "ema-s0.070-t30.safetensors": "synthesized file, not a snapshot",
    }
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0 and all(name in result.stdout for name in reasons), result.output


def test_many_hostile_files_at_once_through_the_installed_command(folder, tmp_path):
    """The real entry point in a fresh process: one line of error, exit 1, no traceback; inspect lists all."""
    chosen = [c for c in CASES if c[0] in ("header length 2**63", "deeply nested header JSON", "offsets overlap",
                                            "sigma_rel NaN", "t as float", "time_unit with a terminal escape")]
    names = []
    for k, (_, content, _) in enumerate(chosen):
        names.append(f"bad{k}.safetensors")
        (folder / names[-1]).write_bytes(content)
    exe = shutil.which("posthoc-ema")
    command = [exe] if exe else [sys.executable, "-m", "posthoc_cli"]
    out = tmp_path / "o.safetensors"
    run = subprocess.run([*command, "synthesize", str(folder), "-s", "0.07", "--out", str(out)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    assert re.fullmatch(rf"Error: {re.escape(str(folder / 'bad0.safetensors'))}: .* \(and 5 more problems\) — .*\n", run.stderr)
    assert "Traceback" not in run.stderr and not out.exists()
    run = subprocess.run([*command, "inspect", str(folder)], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr + run.stdout
    assert all(name in run.stdout for name in names)
    assert "\x1b[2J" not in run.stdout


FORBIDDEN = [
    (r"\bpickle\b|\bcPickle\b|\bdill\b|\bcloudpickle\b|\bjoblib\b", "unpickling"),
    (r"\bmarshal\b|\bshelve\b", "unmarshalling"),
    (r"(?<![\w.])(?:eval|exec|compile)\(", "eval/exec"),  # the builtins, not model.eval() or re.compile()
    (r"\b__import__\(|\bimportlib\.import_module\(", "dynamic import"),
    (r"yaml\.load\(|yaml\.unsafe_load|allow_pickle\s*=\s*True", "unsafe loaders"),
]


def test_no_code_execution_from_files():
    """Nothing in the package unpickles or evaluates: grep every source file."""
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for pattern, what in FORBIDDEN:
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                offences.append(f"{path.name}:{line}: {what}: {match.group(0)}")
        # torch.load / numpy.load only with weights_only=True / without pickles
        for match in re.finditer(r"\b(?:torch|np|numpy)\.load\(", text):
            call = text[match.start() : text.find(")", match.end()) + 1]
            if "weights_only=True" not in call:
                line = text.count("\n", 0, match.start()) + 1
                offences.append(f"{path.name}:{line}: {call}")
    assert offences == []


def test_the_grep_would_catch_an_offence():
    sample = "import pickle\nx = torch.load(f)\ny = torch.load(f, weights_only=True)\neval('1')\nmodel.eval()\n"
    hits = [what for pattern, what in FORBIDDEN if re.search(pattern, sample)]
    assert hits == ["unpickling", "eval/exec"]
    assert [what for pattern, what in FORBIDDEN if re.search(pattern, "code = compile(src, 'f', 'exec')\n")] == ["eval/exec"]
    assert [what for pattern, what in FORBIDDEN if re.search(pattern, "NAME = re.compile(r'x')\n")] == []
    loads = [m for m in re.finditer(r"\b(?:torch|np|numpy)\.load\(", sample)
             if "weights_only=True" not in sample[m.start() : sample.find(")", m.end()) + 1]]
    assert len(loads) == 1


# -- numerical safety -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_values_are_reported_with_tensor_and_file(folder, tmp_path, bad):
    victim = folder / snapshot_name(0.10, 20)
    meta = snapshot_metadata(sigma_rel=0.10, gamma=sigma_rel_to_gamma(0.10), t=20, time_unit="step", updates=20, dtype="float32")
    tensors = good_tensors(20)
    tensors["b"][1] = bad
    victim.unlink()
    write_file(victim, tensors.items(), meta)
    assert read_snapshot(victim).t == 20 and not scan(folder).broken  # the header is fine: values are checked when read
    with pytest.raises(posthoc_cli.NonFiniteError, match=rf"tensor 'b' in {re.escape(str(victim))} holds NaN or Inf"):
        posthoc_cli.load_synthesized(folder, 0.07)
    out = tmp_path / "o.safetensors"
    with pytest.raises(posthoc_cli.NonFiniteError, match="allow_nonfinite=True"):
        posthoc_cli.synthesize(folder, 0.07, out=out)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    result = CliRunner().invoke(app, ["synthesize", str(folder), "-s", "0.07", "--out", str(out)])
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: tensor 'b' in {victim} holds NaN or Inf")
    assert not out.exists()
    # the option proceeds and writes what the arithmetic gives
    result = CliRunner().invoke(app, ["synthesize", str(folder), "-s", "0.07", "--out", str(out), "--allow-nonfinite"])
    assert result.exit_code == 0, result.output
    written = safetensors_load(out)
    assert not torch.isfinite(written["b"][1]) and torch.isfinite(written["w"]).all()
    posthoc_cli.synthesize(folder, 0.07, out=tmp_path / "lib.safetensors", allow_nonfinite=True)
    # in memory too, as its error says (allow_nonfinite=True)
    in_memory = posthoc_cli.load_synthesized(folder, 0.07, allow_nonfinite=True)["b"]
    torch.testing.assert_close(in_memory, written["b"], rtol=0, atol=0, equal_nan=True)  # the same bits, NaN/Inf included
    # a target that gives the broken snapshot no weight is not affected
    assert torch.isfinite(posthoc_cli.load_synthesized(folder, 0.05, t=30)["b"]).all()


def test_overflow_of_the_output_dtype_is_reported(tmp_path):
    """Finite float16 inputs whose weighted sum leaves float16's range (weights > 1 and < 0 exist)."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for sigma_rel in (0.05, 0.10):
        for t in (10, 20, 30):
            meta = snapshot_metadata(sigma_rel=sigma_rel, gamma=sigma_rel_to_gamma(sigma_rel), t=t, time_unit="step", updates=t, dtype="float16")
            value = 65000.0 if sigma_rel == 0.10 else -65000.0
            write_file(folder / snapshot_name(sigma_rel, t), [("w", torch.full((4,), value, dtype=torch.float16))], meta)
    with pytest.raises(posthoc_cli.NonFiniteError, match="tensor 'w' overflows float16 after averaging — use dtype='float32'"):
        posthoc_cli.load_synthesized(folder, 0.15, allow_poor=True)  # poor on purpose: it needs weights < 0
    assert torch.isfinite(posthoc_cli.load_synthesized(folder, 0.15, dtype="float32", allow_poor=True)["w"]).all()


def safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(path)


def _record_both(tmp_path: Path) -> tuple[Path, Path]:
    """One trajectory recorded twice: float32 and float16 snapshots of (0.05, 0.10) at t = 10, 20, ..., 100."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    paths = tmp_path / "f32", tmp_path / "f16"
    recs = [Recorder(model, paths[0], snapshot_every=10), Recorder(model, paths[1], snapshot_every=10, snapshot_dtype=torch.float16)]
    drift(model, recs, 100, seed=1, noise=0.05, bias=0.01)
    return paths


def test_float16_snapshots_warn_when_weights_amplify_rounding(tmp_path):
    f32, f16 = _record_both(tmp_path)
    unit = 2.0**-11  # float16 unit roundoff
    for target, warned in ((0.03, True), (0.02, True), (0.07, False), (0.10, False)):
        p = plan(f16, [target], allow_poor=True)  # the short lengths amplifying rounding are poor too
        amplification = float(p.fit.sum_abs_weights[0])
        notes = p.warnings()
        assert bool(notes) == warned == (amplification * unit > 1e-3), (target, amplification, notes)
        if warned:
            assert f"sigma_rel {target}: Σ|w| = {amplification:.3g} amplifies float16 rounding" in notes[0]
            assert "bound 0.001" in notes[0]
        assert not plan(f32, [target], allow_poor=True).warnings()  # float32 storage: the same weights are harmless
        # the stated amplification is an honest bound on what float16 storage costs
        low = posthoc_cli.load_synthesized(f16, target, dtype="float32", allow_poor=True)
        high = posthoc_cli.load_synthesized(f32, target, allow_poor=True)
        num = sum(float((low[k].double() - high[k].double()).norm() ** 2) for k in high) ** 0.5
        den = sum(float(high[k].double().norm() ** 2) for k in high) ** 0.5
        assert num / den <= (amplification + 1) * unit, (target, num / den, amplification)
    result = CliRunner().invoke(app, ["synthesize", str(f16), "-s", "0.03", "--allow-poor", "--out", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 0 and "Warning: sigma_rel 0.03: Σ|w|" in result.stderr, result.output
