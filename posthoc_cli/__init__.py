"""posthoc-ema: record once, choose the EMA later.

Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of
Diffusion Models", arXiv 2312.02696) for PyTorch. A :class:`Recorder` keeps a
few power-function EMAs during training and writes them as safetensors
snapshots; :func:`synthesize` turns them into the EMA of any length afterwards.

>>> from posthoc_cli import Recorder, synthesize  # doctest: +SKIP
>>> with Recorder(model, "ckpts", sigma_rels=(0.05, 0.10)) as rec:  # doctest: +SKIP
...     for step in range(rec.t, 10_000):
...         train_step(model)
...         rec.update()
>>> synthesize("ckpts", 0.15, out="ema-0.15.safetensors")  # doctest: +SKIP

The public names are loaded on first use, so ``import posthoc_cli`` is instant and
imports neither torch nor numpy; ``Recorder`` brings torch in.
"""

from __future__ import annotations

from ._version import __version__

TYPE_CHECKING = False  # not typing's: importing typing would add ~10 ms before the CLI handles Ctrl-C
if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names below load on first use
    from types import ModuleType
    from typing import Any

    from .choice.sweep import SweepResult, sweep
    from .ema.classical import beta_to_sigma_rel, sigma_rel_to_beta
    from .ema.profiles import SIGMA_REL_MAX, gamma_to_sigma_rel, sigma_rel_to_gamma
    from .ema.solve import solve_weights
    from .errors import (
        CatalogueError,
        EvaluationError,
        FrozenWeightsError,
        InvalidValueError,
        ModelChangedError,
        NonFiniteError,
        OutputError,
        ParallelError,
        PoorTargetError,
        PosthocError,
        ResumeError,
        SnapshotFileError,
        WriterError,
    )
    from .format.catalogue import scan
    from .format.snapshot_set import read_snapshot
    from .record.recorder import Recorder
    from .synth.plan import plan
    from .synth.swap import swapped
    from .synth.synthesis import load_synthesized, synthesize

# Nothing is imported with the package itself: the `posthoc-ema` entry point imports this package
# before it can handle Ctrl-C, and `Recorder` needs torch, which the CLI's light commands never
# import. Each public name is imported from its module on first use (PEP 562 module __getattr__),
# with plain import statements: no string ever chooses what is imported.
_ERRORS = frozenset(
    {"CatalogueError", "EvaluationError", "FrozenWeightsError", "InvalidValueError", "ModelChangedError", "NonFiniteError", "OutputError",
     "ParallelError", "PoorTargetError", "PosthocError", "ResumeError",
     "SnapshotFileError", "WriterError"}
)
_PROFILES = frozenset({"SIGMA_REL_MAX", "gamma_to_sigma_rel", "sigma_rel_to_gamma"})
_CLASSICAL = frozenset({"beta_to_sigma_rel", "sigma_rel_to_beta"})


def __getattr__(name: str) -> Any:
    home: ModuleType
    if name in _ERRORS:
        from . import errors as home
    elif name in _PROFILES:
        from .ema import profiles as home
    elif name in _CLASSICAL:
        from .ema import classical as home
    elif name == "solve_weights":
        from .ema import solve as home
    elif name == "plan":
        from .synth import plan as home
    elif name in ("load_synthesized", "synthesize"):
        from .synth import synthesis as home
    elif name == "swapped":
        from .synth import swap as home
    elif name in ("sweep", "SweepResult"):
        from .choice import sweep as home
    elif name == "Recorder":
        from .record import recorder as home
    elif name == "read_snapshot":
        from .format import snapshot_set as home
    elif name == "scan":
        from .format import catalogue as home
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(home, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "SIGMA_REL_MAX",
    "CatalogueError",
    "EvaluationError",
    "FrozenWeightsError",
    "InvalidValueError",
    "ModelChangedError",
    "NonFiniteError",
    "OutputError",
    "ParallelError",
    "PoorTargetError",
    "PosthocError",
    "Recorder",
    "ResumeError",
    "SnapshotFileError",
    "SweepResult",
    "WriterError",
    "__version__",
    "beta_to_sigma_rel",
    "gamma_to_sigma_rel",
    "load_synthesized",
    "plan",
    "read_snapshot",
    "scan",
    "sigma_rel_to_beta",
    "sigma_rel_to_gamma",
    "solve_weights",
    "swapped",
    "sweep",
    "synthesize",
]
