"""The sweep loop: claim, evaluate and record each evaluation the space proposes, ``jobs`` at a time.

Every decision is taken from the results file, re-read at each turn, so any
number of processes (on one host or several sharing the folder) can run the same
sweep: each evaluation is claimed before it starts (:mod:`.claims`), recorded
when it ends (:mod:`.results`), and only then released. A process that finds
everything left claimed by others waits for their lines, taking over a claim
whose owner is gone. When interrupted, a process stops its evaluations, records
none of them and releases their claims: they run again next time.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from ..format.keys import utc_now
from .claims import HOST, Claims
from .evaluation import Outcome
from .results import Results
from .space import Candidate, Key, Space

_POLL = 0.2  # seconds between looks at the shared results while waiting


@dataclass(frozen=True)
class Job:
    """One evaluation being run, and the slot (0 … jobs−1) it runs in: which device it gets."""

    candidate: Candidate
    repeat: int
    slot: int

    @property
    def key(self) -> Key:
        return self.candidate.key(self.repeat)


Evaluate = Callable[[Job, threading.Event], "Outcome | None"]  # None: stopped before it finished
Progress = Callable[[int, int, int], None]  # (finished, expected, running here)


class Engine:
    """Runs a :class:`Space`'s evaluations until every one is recorded, by this process or another."""

    def __init__(
        self,
        space: Space,
        results: Results,
        claims: Claims,
        evaluate: Evaluate,
        *,
        jobs: int = 1,
        retry_failed: bool = False,
        inline: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.space, self.results, self.claims, self.evaluate = space, results, claims, evaluate
        self.jobs, self.retry_failed, self.inline = jobs, retry_failed, inline
        self.progress = progress or (lambda finished, expected, running: None)
        self.run_id = uuid.uuid4().hex[:12]
        self._earlier: set[Any] = set()  # runs whose failures --retry-failed runs again
        self._recorded: set[Key] = set()  # evaluations this run has recorded (or dropped, when cut short)

    def finished(self, latest: dict[Key, dict[str, Any]] | None = None) -> dict[Key, dict[str, Any]]:
        """The recorded evaluations that count as done (failures of earlier runs do not, when retried),
        of ``latest`` (default: the results file read now)."""
        latest = self.results.latest() if latest is None else latest
        return {key: row for key, row in latest.items() if row["status"] == "ok" or row.get("run") not in self._earlier}

    def run(self) -> dict[Key, dict[str, Any]]:
        """Evaluate until the space is complete; the finished evaluations."""
        if self.retry_failed:
            self._earlier = {row.get("run") for row in self.results.rows()}
        stop, quit_beat = threading.Event(), threading.Event()
        running: dict[Future[Outcome | None], Job] = {}
        free = list(range(self.jobs))
        pool = None if self.inline else ThreadPoolExecutor(self.jobs, thread_name_prefix="posthoc-ema-sweep")
        beat = threading.Thread(target=self._heartbeat, args=(quit_beat,), daemon=True, name="posthoc-ema-claims")
        beat.start()
        try:
            while True:
                latest = self.results.latest()  # read once a turn
                done = self.finished(latest)
                wanted, final = self.space.evaluations(done, latest)
                mine = {job.key for job in running.values()}
                todo = [(c, r) for c, r in wanted if c.key(r) not in done and c.key(r) not in mine]
                self.progress(sum(c.key(r) in done for c, r in wanted), max(len(wanted), self.space.total()), len(running))
                if not todo and not running and final:
                    return done
                for candidate, repeat in todo:
                    if not free:
                        break
                    key = candidate.key(repeat)
                    if not self.claims.take(key):
                        continue  # another process evaluates it
                    try:
                        if key in self.finished():  # its owner recorded it and let go just before we looked
                            self.claims.release(key)
                            continue
                        job = Job(candidate, repeat, free.pop(0))
                        running[self._start(pool, job, stop)] = job
                    except BaseException:
                        self.claims.release(key)
                        raise
                if not running:
                    time.sleep(_POLL)  # the rest is claimed by others, or waits for their results
                    continue
                ended, _ = wait(running, timeout=_POLL, return_when=FIRST_COMPLETED)
                for future in ended:
                    self._record(running[future], future)
                    free.append(running.pop(future).slot)
        except BaseException:
            stop.set()  # each running evaluation kills its command and removes its files
            for future, job in running.items():  # one that ended before the stop is kept; those it cut short are not
                with contextlib.suppress(BaseException):
                    self._record(job, future)
            raise
        finally:
            quit_beat.set()
            if pool is not None:
                pool.shutdown(wait=True)

    def _heartbeat(self, quit_beat: threading.Event) -> None:
        """Touch this process's claims while it evaluates (also while an in-memory evaluation holds the main thread)."""
        while not quit_beat.wait(min(self.claims.timeout / 4, 10.0)):
            self.claims.touch_held()

    def _start(self, pool: ThreadPoolExecutor | None, job: Job, stop: threading.Event) -> Future[Outcome | None]:
        if pool is not None:
            return pool.submit(self.evaluate, job, stop)
        future: Future[Outcome | None] = Future()  # in this thread: an in-memory evaluator may not like others
        future.set_result(self.evaluate(job, stop))
        return future

    def _record(self, job: Job, future: Future[Outcome | None]) -> None:
        """Append the evaluation's line (none for one cut short), then release its claim; once per job."""
        if job.key in self._recorded:
            return
        self._recorded.add(job.key)
        try:
            outcome = future.result()
            if outcome is not None:
                self.results.append(self._row(job, outcome))
        finally:
            self.claims.release(job.key)  # after the line: a process that claims it next sees it done

    def _row(self, job: Job, outcome: Outcome) -> dict[str, Any]:
        c = job.candidate
        return {
            "target": c.spec, "sigma_rel": c.sigma_rel, "step": c.step, "repeat": job.repeat,
            "metric": outcome.metric, "status": "ok" if outcome.ok else "failed", "seconds": round(outcome.seconds, 3),
            "error": outcome.error, "stderr": outcome.stderr,
            "profile_error": c.profile_error, "sum_abs_weights": c.sum_abs_weights, "refined": c.refined,
            "host": HOST, "run": self.run_id, "finished": utc_now(),
        }


__all__ = ["Engine", "Evaluate", "Job", "Progress"]
