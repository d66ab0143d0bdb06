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

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names below load on first use
    from .errors import (
        CatalogueError,
        InvalidValueError,
        NonFiniteError,
        OutputError,
        PosthocError,
        ResumeError,
        SnapshotFileError,
        WriterError,
    )
    from .merge import load_synthesized, plan, synthesize
    from .profiles import (
        SIGMA_REL_MAX,
        beta_to_sigma_rel,
        gamma_to_sigma_rel,
        sigma_rel_to_beta,
        sigma_rel_to_gamma,
        solve_weights,
    )
    from .recorder import Recorder
    from .snapshots import read_snapshot, scan

# Public name -> the module that defines it. Nothing is imported with the package itself: the
# `posthoc-ema` entry point imports this package before it can handle Ctrl-C, and `Recorder` needs
# torch, which the CLI's light commands never import (PEP 562 module __getattr__ below).
_HOMES = {
    **dict.fromkeys(
        ["CatalogueError", "InvalidValueError", "NonFiniteError", "OutputError", "PosthocError",
         "ResumeError", "SnapshotFileError", "WriterError"],
        ".errors",
    ),
    **dict.fromkeys(["load_synthesized", "plan", "synthesize"], ".merge"),
    **dict.fromkeys(
        ["SIGMA_REL_MAX", "beta_to_sigma_rel", "gamma_to_sigma_rel", "sigma_rel_to_beta", "sigma_rel_to_gamma",
         "solve_weights"],
        ".profiles",
    ),
    "Recorder": ".recorder",
    **dict.fromkeys(["read_snapshot", "scan"], ".snapshots"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "SIGMA_REL_MAX",
    "CatalogueError",
    "InvalidValueError",
    "NonFiniteError",
    "OutputError",
    "PosthocError",
    "Recorder",
    "ResumeError",
    "SnapshotFileError",
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
    "synthesize",
]
