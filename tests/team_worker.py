"""The README's parallel synthesis from Python, run under torchrun: ``team_worker.py CKPTS OUT``.

Every rank runs the same two calls with a :class:`~posthoc_cli.synth.team.Team` coordinator;
rank 0 prints the output paths.
"""

from __future__ import annotations

import sys

from posthoc_cli.synth.synthesis import plan_outputs, synthesize_iter
from posthoc_cli.synth.team import Team

ckpts, out = sys.argv[1:3]
with Team.join() as team:  # joins (or reuses) the process group torchrun describes
    p, paths = plan_outputs(team, ckpts, [0.15], out=out, max_shard_size=300)
    for progress in synthesize_iter(p, paths, coordinator=team, max_shard_size=300):
        pass
    if team.rank == 0:
        print(*paths)
