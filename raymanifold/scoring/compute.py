"""Tasks or actors: how ``raymanifold score`` (``--compute auto``, the default) runs a job on Ray Data.

Two ways to run the scorer (:mod:`raymanifold.distributed.scoring`):

* ``actors``: a fresh ``ActorPoolStrategy`` pool per job. Every job pays the start of new processes (imports of
  torch and Ray Data, the model built): about 11 s per job on this 2-core machine (docs/ray.md).
* ``tasks``: Ray Data tasks in Ray's pooled worker processes, which keep their imports and the built model
  between the jobs of one driver: about 0.8 s per job once warm.

A job's time is about ``startup + work / (workers x efficiency)``; the start-up favours tasks, so they win every
small job. The rule: **tasks when the job's estimated work is below** :data:`CROSSOVER_WORK_S` **seconds, actors
above.** The work is ``rows x sec_per_row``, with ``sec_per_row`` timed in the driver on a trial batch (one torch
thread; :func:`raymanifold.scoring.prepared.prepare` with ``time_rows``). The crossover is measured by
``benchmarks/scoring_compute.py`` (docs/ray.md, "Tasks or actors: the rule"), which fits start-up and
throughput of both on jobs of several sizes in one driver and prints the work at which actors become the faster
choice; without an estimate (``sec_per_row`` None) the rule falls back to actors, the former default.
"""
from __future__ import annotations

from typing import Optional

COMPUTES = ("auto", "actors", "tasks")

#: single-thread seconds of scoring work per job above which actors are chosen: benchmarks/scoring_compute.py measured
#: the lines crossing at 322 s (650,000 rows of its model; tasks 1.15 s + W / 2.14, actors 13.25 s + W / 2.32, one run
#: of 3 sizes under load ~20, the slopes' difference about one standard error: docs/ray.md, "Tasks or actors: the rule")
CROSSOVER_WORK_S = 300.0


def choose_compute(n_rows: int, sec_per_row: Optional[float], workers: int,
                   crossover_work_s: float = CROSSOVER_WORK_S) -> tuple[str, str]:
    """``("tasks" | "actors", reason)`` for a job of ``n_rows`` rows costing ``sec_per_row`` single-thread seconds
    each on ``workers`` concurrent scorers (module doc)."""
    if sec_per_row is None:
        return "actors", "no work estimate: actors"
    work = n_rows * float(sec_per_row)
    pick = "tasks" if work < crossover_work_s else "actors"
    return pick, (f"estimated work {work:.1f} s ({n_rows} rows x {1e3 * sec_per_row:.3g} ms, {workers} worker(s)) "
                  f"{'<' if pick == 'tasks' else '>='} crossover {crossover_work_s:g} s: {pick}")
