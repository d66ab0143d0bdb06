"""What a synthesis will do: which snapshots, with which weights, for which targets at which time.

:func:`plan` scans the folder, fits every target's weights and refuses a target the
snapshots reproduce poorly. It reads headers alone and imports no torch, so light
commands (``plan``, ``inspect``) use it too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import dtypes
from ..dtypes import unit_roundoff
from ..ema.classical import sigma_rel_to_beta
from ..ema.quality import NOISE_BOUND, POOR, reproduced
from ..ema.solve import Fit
from ..ema.targets import check_initial, fit_targets, parse_targets, target_name
from ..ema.trackers import Target
from ..errors import CatalogueError, InvalidValueError, PoorTargetError, arg, spelled
from ..format.catalogue import Catalogue, layout_problems, no_snapshots, scan
from ..format.container import TensorEntry
from ..format.frozen_set import FrozenRef
from ..format.snapshot import Snapshot

_EXAMPLE_TARGETS = spelled("sigma_rels=0.15 or sigma_rels='beta=0.9999'", "--sigma-rel 0.15 or --beta 0.9999")
# NOISE_BOUND: relative rounding error we accept in a synthesized tensor before warning (see Plan.warnings).


@dataclass(frozen=True)
class Plan:
    """What a synthesis will do: which snapshots, with which weights, for which targets."""

    folder: Path
    t: int
    targets: tuple[Target, ...]
    inputs: list[Snapshot]  # the snapshots with a non-zero weight, by (t, sigma_rel)
    fit: Fit  # weights => [inputs, targets]
    fixed_from: Snapshot  # the latest input: integer buffers are copied from it
    skipped_files: int  # files in the folder that are not snapshots
    frozen: FrozenRef | None = None  # the frozen weights stored once that complete the inputs' state dict
    incomplete: int = 0  # sharded snapshots a crash left unfinished: never used
    t_reason: str | None = None  # why the default time is earlier than the newest snapshot (None when it is not)

    @property
    def sigma_rels(self) -> tuple[float | None, ...]:
        """Each target's sigma_rel (None for targets that are not power-function EMAs)."""
        return tuple(target.sigma_rel for target in self.targets)

    @property
    def entries(self) -> list[TensorEntry]:
        """The tensors of the output, in file order (global shapes; for a sharded set, offsets
        as in the single file our writer would make, so that inputs are grouped alike)."""
        if not self.fixed_from.sharded:
            return sorted(self.fixed_from.tensors.values(), key=lambda e: e.begin)
        return virtual_entries(self.fixed_from)

    @property
    def chunked(self) -> bool:
        """Whether some input is a sharded set: then every input is read chunk by chunk."""
        return any(s.sharded for s in [*self.inputs, self.fixed_from])

    @property
    def input_dtype(self) -> str:
        return self.fixed_from.dtype

    def warnings(self) -> list[str]:
        """Targets whose weights amplify the snapshots' storage rounding beyond :data:`NOISE_BOUND`."""
        unit = unit_roundoff(self.input_dtype)
        notes = []
        for target, amp in zip(self.targets, self.fit.sum_abs_weights):
            noise = float(amp) * unit
            if noise > max(NOISE_BOUND, 2 * unit):
                notes.append(
                    f"{target_name(target)}: Σ|w| = {amp:.3g} amplifies {self.input_dtype} rounding to ~{noise:.1e} "
                    f"relative error (bound {NOISE_BOUND:g}); record this length or a shorter one, or store float32"
                )
        return notes


def plan(
    ckpt_dir: str | os.PathLike[str],
    sigma_rels: Sequence[float | str | Target],
    *,
    t: int | None = None,
    allow_poor: bool = False,
) -> Plan:
    """Solve for the weights of each target at time ``t`` (default: the latest time at which every
    recorded sigma_rel has a snapshot, see :attr:`Catalogue.complete_t`).

    Targets are sigma_rels, spec strings (``"beta=0.9999"``, ``"diffusers:decay=0.999"``, …)
    or :mod:`posthoc_cli.ema.targets` objects, mixed freely. A target whose profile error
    exceeds :data:`~posthoc_cli.ema.quality.POOR` is refused (:class:`PoorTargetError`, naming
    the lengths the snapshots do reproduce) unless ``allow_poor``.

    >>> p = plan("ckpts", [0.15])  # doctest: +SKIP
    >>> p.fit.profile_error  # doctest: +SKIP
    array([0.0021])
    """
    targets = tuple(parse_targets(sigma_rels))
    if not targets:
        raise InvalidValueError("no target given", f"pass at least one, e.g. {_EXAMPLE_TARGETS}")
    catalogue = scan(ckpt_dir)
    catalogue.raise_if_broken()
    if not catalogue.series:
        raise no_snapshots(catalogue.folder, "record some with posthoc_cli.Recorder, or pass the folder it wrote")
    snaps = catalogue.snapshots
    t_reason = None
    if t is None:
        t, t_reason = catalogue.complete_t, _default_t_reason(catalogue)
    check_time(catalogue, t)
    recorded = sorted(catalogue.series)
    if len(recorded) == 1 and any(target.sigma_rel != recorded[0] for target in targets):
        raise CatalogueError(
            f"only sigma_rel {recorded[0]} was recorded in {catalogue.folder}: other lengths cannot be synthesized from one",
            "record at least two sigma_rels (e.g. 0.05 and 0.10) to choose the EMA length afterwards",
        )
    usable = [s for s in snaps if s.t <= t]
    problems = layout_problems(usable)
    if problems:
        raise CatalogueError(problems[0], "remove the snapshots of the other model or run from one folder per model")
    for target in targets:
        check_initial(target, t)
    result = fit_targets([s.t for s in usable], [s.sigma_rel for s in usable], targets, t)
    if not allow_poor:
        _refuse_poor(targets, result.profile_error, usable, t, catalogue.complete_t)
    keep = np.flatnonzero(np.any(result.weights != 0, axis=1))  # zero rows need not be read at all
    weights = result.weights[keep]
    return Plan(
        folder=catalogue.folder,
        t=t,
        targets=targets,
        inputs=[usable[i] for i in keep],
        fit=Fit(weights, result.profile_error, result.sum_abs_weights),
        fixed_from=usable[-1],
        skipped_files=len(catalogue.ignored),
        frozen=catalogue.frozen_for(usable),
        incomplete=len(catalogue.incomplete),
        t_reason=t_reason,
    )


def check_time(catalogue: Catalogue, t: int) -> None:
    """Refuse a synthesis time outside the recorded range (``catalogue`` holds snapshots)."""
    first, latest = catalogue.snapshots[0].t, catalogue.latest_t
    if not first <= t <= latest:
        raise InvalidValueError(
            f"{arg('t', t)} is outside the recorded range t={first}..{latest}", f"pick a time in {first}..{latest}"
        )


def _default_t_reason(catalogue: Catalogue) -> str | None:
    """Why the default time is not the newest snapshot's: some series lack a snapshot there."""
    t, latest = catalogue.complete_t, catalogue.latest_t
    if t == latest:
        return None
    ahead = ", ".join(f"{s:g}" for s, group in sorted(catalogue.series.items()) if group[-1].t == latest)
    return (
        f"t={t} is the latest time at which every sigma_rel has a complete snapshot; at t={latest} only "
        f"sigma_rel {ahead} has one (a run stopped while writing?), and a fit there would rest on it alone"
    )


def _refuse_poor(targets: Sequence[Target], errors: np.ndarray, usable: list[Snapshot], t: int, complete_t: int) -> None:
    """Raise :class:`PoorTargetError` for the first target above :data:`POOR`, saying what the snapshots do reproduce.

    ``complete_t``: the latest time every series reached, suggested when ``t`` is later."""
    poor = [(target, float(e)) for target, e in zip(targets, errors) if e > POOR]
    if not poor:
        return
    target, error = poor[0]
    more = f" (and {len(poor) - 1} more poor target{'s' if len(poor) > 2 else ''})" if len(poor) > 1 else ""
    span = reproduced([s.t for s in usable], [s.sigma_rel for s in usable], t)
    if span is None:
        can = f"these snapshots reproduce no sigma_rel within {POOR:g} at t={t}"
    else:
        lo, hi = span
        betas = f" (≈ beta {_beta(lo, t)}..{_beta(hi, t)})" if t > 0 else ""
        can = f"these snapshots reproduce sigma_rel {lo:g}..{hi:g}{betas} within {POOR:g} at t={t}"
    last = usable[-1].t  # the end of a profile after the last snapshot is recorded by none
    if last < t:
        where = f"use {arg('t', last)}"
    elif complete_t < t:  # some series stop before t: the fit rests on the others
        where = f"pick a target in that range, or use {arg('t', complete_t)} (every sigma_rel has a snapshot there)"
    else:
        where = "pick a target in that range"
    raise PoorTargetError(
        f"{target_name(target)}: profile error {error:.2g} is above {POOR:g}{more}; {can}",
        f"{where}, or pass {arg('allow_poor', True)} to write it anyway",
    )


def _beta(sigma_rel: float, t: int) -> str:
    """The beta of about the same length, with two significant digits of 1 - beta (0.983, 0.99967)."""
    beta = sigma_rel_to_beta(sigma_rel, t)
    return f"{beta:.{max(1, 1 - math.floor(math.log10(1 - beta)))}f}"


def virtual_entries(snap: Snapshot) -> list[TensorEntry]:
    """Tensor entries of a snapshot's global layout, placed one after another from offset 0."""
    entries, offset = [], 0
    for name, (code, shape) in snap.layout.items():
        nbytes = math.prod(shape) * dtypes.SAFETENSORS_DTYPES[code].itemsize
        entries.append(TensorEntry(name, code, shape, offset, offset + nbytes))
        offset += nbytes
    return entries


def output_entries(p: Plan, trainable_only: bool) -> list[TensorEntry]:
    """The snapshot tensors an output holds: all, or the averaged (floating-point) ones alone."""
    return [e for e in p.entries if e.is_floating_point] if trainable_only else p.entries


def frozen_part(p: Plan, trainable_only: bool) -> list[TensorEntry]:
    """The stored-once tensors a complete output copies in (after the snapshot tensors), in file order."""
    if trainable_only or p.frozen is None:
        return []
    return sorted(p.frozen.require().tensors.values(), key=lambda e: e.begin)
