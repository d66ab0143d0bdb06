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
"""

from ._version import __version__
from .errors import (
    CatalogueError,
    InvalidValueError,
    ModelChangedError,
    NonFiniteError,
    OutputError,
    ParallelError,
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

__all__ = [
    "SIGMA_REL_MAX",
    "CatalogueError",
    "InvalidValueError",
    "ModelChangedError",
    "NonFiniteError",
    "OutputError",
    "ParallelError",
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
