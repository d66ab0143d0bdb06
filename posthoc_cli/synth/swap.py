"""A synthesized EMA swapped into a live model for a while: evaluate any target during training.

>>> with swapped(model, "ckpts", 0.15) as ema_model:  # doctest: +SKIP
...     val_loss = evaluate(ema_model)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..ema.trackers import Target
from ..errors import CatalogueError, few
from ..format.catalogue import scan
from ..format.keys import strip_wrappers
from .synthesis import load_synthesized

if TYPE_CHECKING:
    from torch import nn


@contextlib.contextmanager
def swapped(
    model: nn.Module, ckpt_dir: str | os.PathLike[str], target: float | str | Target, *, t: int | None = None
) -> Iterator[nn.Module]:
    """Put the synthesized EMA of ``target`` (a sigma_rel, a spec string) into ``model``; the training weights come back after.

    Inside the block the model holds exactly :func:`load_synthesized`'s tensors (cast to the
    model's dtypes); afterwards its own values return bit for bit, also when the block raises.
    Frozen weights stored once are left as the model holds them. Plain and DDP-wrapped
    (``module.``) or compiled (``_orig_mod.``) models alike; the model is the one yielded.
    """
    import torch

    weights = load_synthesized(ckpt_dir, target, t=t)
    once = {name for frozen in scan(ckpt_dir).frozen for name in frozen.tensors}
    mine = {strip_wrappers(n): x for n, x in model.state_dict(keep_vars=True).items()}
    missing = sorted(n for n in weights if n not in mine)
    if missing:
        raise CatalogueError(
            f"{ckpt_dir} holds tensors the model lacks: {few(missing)}", "pass the model these snapshots were recorded from"
        )
    pairs = [(mine[n], w) for n, w in weights.items() if n not in once]
    with torch.no_grad():  # only around the copies: the block itself runs in the caller's grad mode
        backup = [x.detach().clone() for x, _ in pairs]
    try:
        with torch.no_grad():
            for x, w in pairs:
                x.copy_(w)
        yield model
    finally:
        with torch.no_grad():
            for (x, _), saved in zip(pairs, backup):
                x.copy_(saved)


__all__ = ["swapped"]
