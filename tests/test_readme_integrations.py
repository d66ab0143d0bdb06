"""The README's trainer-integration scripts run as written (each in a fresh folder, bounded in time)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from posthoc_cli import scan

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
SECTION = README.split("\n## Trainer integrations\n", 1)[1].split("\n## ", 1)[0]
SCRIPTS = re.findall(r"^```py\n(.*?)^```", SECTION, re.S | re.M)


def run(script: str, cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_section_has_three_scripts() -> None:
    assert [("lightning" in s, "transformers" in s, "accelerate" in s) for s in SCRIPTS] == [
        (True, False, False), (False, True, False), (False, False, True)
    ]


@pytest.mark.parametrize("index, folder, times", [(0, "lightning-ckpts", [50, 100, 150, 200]), (1, "hf-run/posthoc-ema", [10, 20, 30, 40]),
                                                  (2, "accelerate-ckpts", [100, 200, 300])])
def test_script_runs_and_records(tmp_path: Path, index: int, folder: str, times: list[int]) -> None:
    pytest.importorskip(["lightning", "transformers", "accelerate"][index])
    run(SCRIPTS[index], tmp_path)
    catalogue = scan(tmp_path / folder)
    assert sorted(catalogue.series) == [0.05, 0.10]
    assert [s.t for s in catalogue.series[0.10]] == times
    if index == 2:  # run again: it resumes from the Accelerate state at step 300 and adds nothing
        run(SCRIPTS[index], tmp_path)
        assert [s.t for s in scan(tmp_path / folder).series[0.10]] == times
