"""The outputs of a plan, one per target: name and path, what each holds, its header record,
and the refusals made before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..dtypes import FLOAT_DTYPES
from ..ema.profiles import sigma_rel_to_gamma
from ..ema.targets import closest_power
from ..ema.trackers import Power, Target
from ..errors import InvalidValueError, OutputError, arg, spelled
from ..format.frozen import tag
from ..format.frozen_set import FrozenSet
from ..format.keys import SUFFIX, library_info, utc_now
from ..format.snapshot import encode_metadata, synthesized_name
from .outputs import Output, check_folder, hf_folder, parse_size, single_file
from .plan import Plan, frozen_part, output_entries


def output_name(target: Target, t: int) -> str:
    """Default file name: ``ema-s0.150-t100000.safetensors`` for a power target,
    ``ema-<spec>-t<t>.safetensors`` for others (``ema-beta0.9999-t100000.safetensors``)."""
    if isinstance(target, Power):
        return synthesized_name(target.sigma_rel, t)
    return f"ema-{target.label()}-t{t}{SUFFIX}"


def output_paths(
    p: Plan, out: str | os.PathLike[str] | None, *, max_shard_size: int | str | None = None
) -> list[Path]:
    """One target: ``out`` is the file, unless it is a folder or ends with a slash. Several: ``out``
    is a folder. Default: the current folder.

    With ``max_shard_size`` every output is a Hugging Face folder: ``out`` itself for
    one target, else a subfolder of ``out`` (default: the current folder) per target.
    """
    names = [output_name(target, p.t) for target in p.targets]
    if len(names) != len(set(names)):
        raise InvalidValueError("the same target is asked for twice", f"give each {spelled('target', '--sigma-rel, --beta or --ema')} once")
    if max_shard_size is not None:
        parse_size(max_shard_size)
        if len(names) == 1 and out is not None:
            return [Path(out)]
        folder = Path(out) if out is not None else Path.cwd()
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder} is a file, but several targets need a folder", f"pass a folder as {arg('out')}")
        return [folder / name.removesuffix(SUFFIX) for name in names]
    folder_named = out is not None and str(out).endswith(("/", os.sep))  # Path() would drop the slash
    if len(p.targets) == 1 and out is not None and not Path(out).is_dir() and not folder_named:
        return [Path(out)]
    folder = Path(out) if out is not None else Path.cwd()
    if folder.suffix == SUFFIX and not folder.is_dir():
        raise OutputError(f"{folder} looks like a file name, but several targets need a folder", f"pass a folder as {arg('out')}")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, but several targets need a folder", f"pass a folder as {arg('out')}")
    return [folder / name for name in names]


def check_outputs(p: Plan, paths: list[Path], force: bool, *, folders: bool = False) -> None:
    """Refuse outputs that are inputs, or exist (without ``force``), before any work starts."""
    inputs = {s.path.resolve() for s in [*p.inputs, p.fixed_from]}
    if p.frozen is not None and p.frozen.file is not None:
        stored = p.frozen.file
        inputs |= {f.path.resolve() for f in stored.files} if isinstance(stored, FrozenSet) else {stored.path.resolve()}
    for path in paths:
        if path.resolve() in inputs or (folders and any(path.resolve() in i.parents for i in inputs)):
            raise OutputError(f"{path} is one of the input snapshots", "write the output somewhere else")
        if folders:
            check_folder(path, force)
            continue
        if path.is_dir():
            raise OutputError(f"{path} is a folder", f"pass a file path as {arg('out')}, or remove that folder")
        if path.exists() and not force:
            raise OutputError(f"{path} already exists", f"use {arg('force', True)} to overwrite it, or choose another {arg('out')}")


def outputs_for(
    p: Plan,
    paths: list[Path],
    *,
    dtype: str | None = None,
    accumulate: str = "float32",
    max_shard_size: int | str | None = None,
    created: str | None = None,
    trainable_only: bool = False,
) -> list[Output]:
    """What each target's output holds: tensors (the frozen ones stored once last, unless
    ``trainable_only``), header metadata, and shards when ``max_shard_size``."""
    out_name = dtype or p.input_dtype
    layout = [
        (e.name, FLOAT_DTYPES[out_name] if e.is_floating_point else e.code, e.shape)
        for e in output_entries(p, trainable_only)
    ] + [(e.name, e.code, e.shape) for e in frozen_part(p, trainable_only)]
    created = created or utc_now()
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    outputs = []
    for j, path in enumerate(paths):
        metadata = tag(_metadata(p, j, out_name, accumulate, created), "trainable" if trainable_only else None, "contents")
        outputs.append(single_file(path, layout, metadata) if limit is None else hf_folder(path, layout, metadata, limit))
    return outputs


def _metadata(p: Plan, j: int, out_dtype: str, accumulate: str, created: str) -> dict[str, str]:
    target = p.targets[j]
    # sigma_rel/gamma: the target's own for a power target; for any other, those of the power EMA
    # closest to it in profile (so every reader sees a valid record); `target` says what it is.
    sigma_rel = target.sigma_rel if target.sigma_rel is not None else closest_power(target, p.t)[0]
    return encode_metadata(
        {
            "format": 1,
            "kind": "synthesized",
            "sigma_rel": sigma_rel,
            "gamma": sigma_rel_to_gamma(sigma_rel),
            "target": target.describe(),
            "initial_weight": target.initial_weight(p.t),
            "t": p.t,
            "time_unit": p.fixed_from.time_unit,
            "updates": 0,
            "dtype": out_dtype,
            "library": library_info(),
            "created": created,
            "inputs": [{"file": s.path.name, "sigma_rel": s.sigma_rel, "t": s.t} for s in p.inputs],
            "weights": [float(w) for w in p.fit.weights[:, j]],
            "profile_error": float(p.fit.profile_error[j]),
            "sum_abs_weights": float(p.fit.sum_abs_weights[j]),
            "accumulate": accumulate,
        }
    )
