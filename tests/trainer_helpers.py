"""Helpers for the trainer-integration tests: reading a snapshot folder for bit-for-bit comparison."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def read_folder(folder: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, object]]]:
    """Every snapshot file at the top of ``folder``: its tensors and its metadata without the creation time."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["posthoc_ema"])
            meta.pop("created")
            out[path.name] = ({k: f.get_tensor(k) for k in f.keys()}, meta)
    return out


def assert_same_snapshots(a: Path, b: Path, *, exact: bool = True) -> int:
    """The two folders hold the same snapshot files, tensors equal bit for bit (or to float32 rounding)."""
    left, right = read_folder(a), read_folder(b)
    assert sorted(left) == sorted(right), (sorted(left), sorted(right))
    assert left, f"no snapshots in {a}"
    for name, (tensors, meta) in left.items():
        other, other_meta = right[name]
        assert meta == other_meta, name
        assert tensors.keys() == other.keys(), name
        for key, value in tensors.items():
            if exact:
                assert torch.equal(value, other[key]), (name, key)
            else:
                torch.testing.assert_close(value, other[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
    return len(left)
