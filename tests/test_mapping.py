"""Inputs mapped side by side (Linux) give the same synthesis as inputs read into a buffer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import drift
from torch import nn

from posthoc_cli import Recorder, SnapshotFileError, load_synthesized, plan, synthesize
from posthoc_cli.synth import mapping, stream
from posthoc_cli.synth.output_plan import output_paths
from posthoc_cli.synth.synthesis import synthesize_iter

needs_mapping = pytest.mark.skipif(not mapping.supported(), reason="mapping files side by side is Linux-only")


def record_wide(folder: Path, steps: int = 240) -> Path:
    """A model whose weights span several pages (mapped) and whose biases do not (read)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 40))
    drift(model, [Recorder(model, folder, sigma_rels=(0.05, 0.10), snapshot_every=20)], steps, seed=4, bias=0.001)
    return folder


def repad(path: Path, extra: int) -> None:
    """Rewrite ``path`` with ``extra`` more spaces after its JSON header: same tensors, data moved."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n] + b" " * extra
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_wide(tmp_path_factory.mktemp("wide") / "ckpts")


def synthesized(folder: Path, targets: list[float], out: Path, monkeypatch: pytest.MonkeyPatch, *, mapped: bool) -> list[dict[str, torch.Tensor]]:
    with monkeypatch.context() as m:
        m.setenv("POSTHOC_EMA_MMAP", "1" if mapped else "0")
        paths = synthesize(folder, targets, out=out, force=True)
    return [safetensors.torch.load_file(p) for p in paths]


def test_rows_are_the_files_bytes(tmp_path):
    if not mapping.supported():
        pytest.skip("Linux-only")
    page = mapping.PAGE
    blobs = [os.urandom(5 * page) for _ in range(3)]
    fds = []
    for k, blob in enumerate(blobs):
        (tmp_path / f"f{k}").write_bytes(blob)
        fds.append(os.open(tmp_path / f"f{k}", os.O_RDONLY))
    try:
        offsets = [100, page + 100, 3 * page + 100]
        with mapping.MappedRows(slots=3, slot_bytes=page + 50) as rows:
            x = rows.view(0, list(zip(fds, offsets)), page + 50)
            assert x.shape == (3, page + 50)
            for k, (blob, offset) in enumerate(zip(blobs, offsets)):
                assert bytes(x[k].numpy()) == blob[offset : offset + page + 50]
            with pytest.raises(ValueError, match="same position"):
                rows.view(0, [(fds[0], 100), (fds[1], 101)], 64)
            with pytest.raises(ValueError, match="larger"):
                rows.view(0, [(fds[0], 0)], 4 * page)
    finally:
        for fd in fds:
            os.close(fd)


@needs_mapping
@pytest.mark.parametrize("slice_bytes", [stream.SLICE_BYTES, 40 * 4096 + 12])
def test_mapped_equals_read(wide, tmp_path, monkeypatch, slice_bytes):
    """Same bytes either way, also when slices start mid-page and split the tensors."""
    monkeypatch.setattr(stream, "SLICE_BYTES", slice_bytes)
    targets = [0.07, 0.15]
    mapped = synthesized(wide, targets, tmp_path / "mapped", monkeypatch, mapped=True)
    read = synthesized(wide, targets, tmp_path / "read", monkeypatch, mapped=False)
    for a, b in zip(mapped, read):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    single = synthesized(wide, [0.07], tmp_path / "single.safetensors", monkeypatch, mapped=True)[0]
    assert all(torch.equal(t, single[name]) for name, t in load_synthesized(wide, 0.07).items())


@needs_mapping
def test_headers_of_other_lengths(wide, tmp_path, monkeypatch):
    """Snapshots whose data starts at other positions in a page (or unaligned) still sum correctly,
    and to the same bits read or mapped, alone or with other targets, in slices of any size."""
    expected = synthesized(wide, [0.12], tmp_path / "a.safetensors", monkeypatch, mapped=False)[0]
    folder = Path(shutil.copytree(wide, tmp_path / "ckpts"))
    files = sorted(folder.glob("*.safetensors"))
    for k, path in enumerate(files):
        repad(path, [0, 8, 4096 + 16, 24][k % 4])  # four groups of rows at different page positions
    for odd in (False, True):
        if odd:
            repad(files[-1], 1)  # the latest one with its data at an odd offset: read, not mapped
        got = synthesized(folder, [0.12], tmp_path / "b.safetensors", monkeypatch, mapped=True)[0]
        for name, tensor in expected.items():  # summed group by group: rounded a little differently
            torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-7)
        cases = [(False, [0.12], stream.SLICE_BYTES), (True, [0.05, 0.12, 0.2], stream.SLICE_BYTES), (True, [0.12], 40 * 4096 + 12)]
        for mapped, targets, slice_bytes in cases:
            monkeypatch.setattr(stream, "SLICE_BYTES", slice_bytes)
            out = tmp_path / "c"
            again = synthesized(folder, targets, out / "c.safetensors" if len(targets) == 1 else out, monkeypatch, mapped=mapped)
            for name, tensor in got.items():
                assert torch.equal(again[targets.index(0.12)][name], tensor), (odd, mapped, targets, slice_bytes, name)
        monkeypatch.undo()


@needs_mapping
def test_file_truncated_after_planning(wide, tmp_path):
    """A file cut short between planning and reading is a clean error, never a crash (SIGBUS)."""
    folder = Path(shutil.copytree(wide, tmp_path / "ckpts"))
    p = plan(folder, [0.12])
    victim = p.inputs[0].path
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(SnapshotFileError, match="truncated"):
        for _ in synthesize_iter(p, output_paths(p, tmp_path / "out.safetensors")):
            pass
    assert not (tmp_path / "out.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_write_failing_late_reports_the_first_error(wide, tmp_path):
    """Outputs over the file-size limit at any of their last slices: the user sees that error, nothing is left."""
    size = synthesize(wide, 0.07, out=tmp_path / "whole.safetensors")[0].stat().st_size
    script = f"""
import resource
from posthoc_cli import OutputError, synthesize
from posthoc_cli.synth import stream
stream.SLICE_BYTES = 40 * 4096  # many slices, so writes keep coming after the one that fails
for short in (10, 200, 700, 2_000, 5_000, 9_000, 14_000):
    resource.setrlimit(resource.RLIMIT_FSIZE, ({size} - short, resource.RLIM_INFINITY))
    try:
        synthesize({str(wide)!r}, [0.07, 0.15], out={str(tmp_path / "out")!r})
    except OutputError as e:
        print(short, e)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 7 and all("file too large" in line for line in lines), proc.stdout
    assert not (tmp_path / "out").exists()


def test_a_failed_mapping_leaves_the_rows_usable(tmp_path):
    if not mapping.supported():
        pytest.skip("Linux-only")
    (tmp_path / "f").write_bytes(os.urandom(3 * mapping.PAGE))
    unreadable = os.open(tmp_path / "f", os.O_WRONLY)  # mapping it for reading is refused
    readable = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with mapping.MappedRows(slots=2, slot_bytes=mapping.PAGE) as rows:
            with pytest.raises(OSError):
                rows.view(0, [(readable, 0), (unreadable, 0)], 100)
            x = rows.view(0, [(readable, 8), (readable, 8)], 100)
            assert bytes(x[1].numpy()) == (tmp_path / "f").read_bytes()[8:108]
    finally:
        os.close(unreadable)
        os.close(readable)
