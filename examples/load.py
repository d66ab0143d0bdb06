"""Load synthesized EMAs into the model of train.py: from the file the CLI wrote, or straight from Python."""

import safetensors.torch
from torch import nn

from posthoc_cli import load_synthesized, synthesize

model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))  # the architecture train.py recorded

# The file `posthoc-ema synthesize ckpts --sigma-rel 0.15 --out ema-0.15.safetensors` wrote:
model.load_state_dict(safetensors.torch.load_file("ema-0.15.safetensors"))

# The same from Python, without the CLI: in memory, or streamed to files.
model.load_state_dict(load_synthesized("ckpts", 0.15))
paths = synthesize("ckpts", [0.08, 0.12], out="emas-from-python")
print(*paths, sep="\n")
