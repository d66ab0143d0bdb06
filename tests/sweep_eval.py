"""The evaluation command of the sweep tests: load the weights file, print the validation loss.

Usage: sweep_eval.py WEIGHTS [SIGMA_REL SEED DEVICE]. What it does besides is set by
environment variables, so one script plays every part:

- SWEEP_LOG: append one JSON line per finished evaluation (what it saw), just before printing.
- SWEEP_FAIL / SWEEP_SILENT / SWEEP_NAN / SWEEP_HANG: a sigma_rel for which it exits 1,
  prints nothing, prints nan, or sleeps for ever (after writing its pid to SWEEP_HANG_PID).
- SWEEP_JSON=1: print a JSON line {"loss": …, "other": 1} after a decoy number.
- SWEEP_NEGATE=1: print minus the loss (a metric to maximize).
- SWEEP_NOISE: add noise of this scale, drawn from SEED (repeats differ).
- SWEEP_BLOCK_AFTER: once SWEEP_LOG holds this many lines, sleep for ever instead (after touching
  SWEEP_LOG + ".blocked"): an evaluation certainly running when the test interrupts the sweep.
- SWEEP_TMP: count the candidate files under this folder while it runs (into the log line).
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_model import val_loss  # noqa: E402

weights = Path(sys.argv[1])
sigma_rel, seed, device = (sys.argv[2:5] + ["", "0", ""])[:3] if len(sys.argv) > 2 else ("", "0", "")
env = os.environ


def matches(name: str) -> bool:
    return bool(sigma_rel) and env.get(name) == sigma_rel


log_path = Path(env.get("SWEEP_LOG", "/nonexistent"))
if env.get("SWEEP_BLOCK_AFTER") and log_path.exists() and len(log_path.read_text().splitlines()) >= int(env["SWEEP_BLOCK_AFTER"]):
    Path(str(log_path) + ".blocked").touch()
    while True:
        time.sleep(1)
if matches("SWEEP_HANG"):
    Path(env["SWEEP_HANG_PID"]).write_text(str(os.getpid()))
    while True:
        time.sleep(1)
if matches("SWEEP_FAIL"):
    print("Traceback: something broke for this candidate", file=sys.stderr)
    sys.exit(1)
files = [weights] if weights.is_file() else sorted(weights.glob("*.safetensors"))
state = {}
for f in files:
    state.update(load_file(f))
loss = val_loss(state)
if env.get("SWEEP_NOISE"):
    loss += float(env["SWEEP_NOISE"]) * np.random.default_rng(int(seed)).standard_normal()
if env.get("SWEEP_LOG"):
    seen = {"sigma_rel": sigma_rel, "seed": seed, "device": device, "cuda": env.get("CUDA_VISIBLE_DEVICES"), "loss": loss}
    if env.get("SWEEP_TMP"):
        seen["candidates"] = sum(1 for p in Path(env["SWEEP_TMP"]).rglob("*") if p.is_file())
    with open(env["SWEEP_LOG"], "a") as log:
        log.write(json.dumps(seen) + "\n")
if matches("SWEEP_SILENT"):
    sys.exit(0)
if matches("SWEEP_NAN"):
    print("nan")
    sys.exit(0)
print("loading done")
if env.get("SWEEP_JSON"):
    print(1234.5)
    print(json.dumps({"loss": loss, "other": 1}))
else:
    print(-loss if env.get("SWEEP_NEGATE") else loss)
