"""A small regression model whose validation loss against sigma_rel has a minimum inside the band its
recording reproduces (for the sweep tests), and that loss in numpy alone, so that an evaluation run
as a process starts in a fraction of a second.

An MLP learns a fixed random teacher from noisy samples with plain SGD at a high learning rate: its
raw weights bounce around the optimum, short EMAs keep that noise, very long ones remember early
weights, and the best length lies between. Recorded: sigma_rel 0.05 and 0.10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUTS, WIDTH = 16, 64
NAMES = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias")


def _layers(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    state = {}
    for (w, b), (fan_in, fan_out) in zip(zip(NAMES[::2], NAMES[1::2]), [(INPUTS, WIDTH), (WIDTH, WIDTH), (WIDTH, 1)]):
        bound = scale / np.sqrt(fan_in)
        state[w] = rng.uniform(-bound, bound, (fan_out, fan_in))
        state[b] = rng.uniform(-bound, bound, (fan_out,))
    return state


def forward(state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.tanh(x @ state[NAMES[0]].T + state[NAMES[1]])
    h = np.tanh(h @ state[NAMES[2]].T + state[NAMES[3]])
    return h @ state[NAMES[4]].T + state[NAMES[5]]


_TEACHER = _layers(np.random.default_rng(1000), 2.0)
_X_VAL = np.random.default_rng(2000).standard_normal((2048, INPUTS))
_Y_VAL = forward(_TEACHER, _X_VAL)


def val_loss(state: dict[str, np.ndarray]) -> float:
    """Mean squared error on noise-free validation data, computed in float64 in a fixed order."""
    y = forward({n: np.asarray(state[n], dtype=np.float64) for n in NAMES}, _X_VAL)
    return float(np.mean((y - _Y_VAL) ** 2))


def record(folder: Path, *, steps: int = 6000, every: int = 200) -> None:
    """Train and record sigma_rel 0.05 and 0.10 into ``folder`` (a few seconds on one core)."""
    import torch
    from torch import nn

    from posthoc_cli import Recorder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(INPUTS, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1))
    net = nn.Module()
    net.net = model
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Recorder(net, folder, sigma_rels=(0.05, 0.10), snapshot_every=every) as rec:
            for _ in range(steps):
                x = rng.standard_normal((8, INPUTS))
                y = forward(_TEACHER, x) + rng.standard_normal((8, 1))
                xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
                loss = nn.functional.mse_loss(net.net(xt), yt)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rec.update()
    finally:
        torch.set_num_threads(threads)
