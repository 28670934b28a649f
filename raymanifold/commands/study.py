"""The one shape of a study command: parse, then the study, then finish (docs/architecture.md, "Adding a study").

A :class:`Study` is a small value object, no base class and no hooks. A command makes one after parsing its flags
(:func:`raymanifold.commands.options.parse_options`) and uses it to

- get each model role: loaded from ``--model ROLE=URI`` or trained from the role's config through the run service
  (:func:`raymanifold.runs.train`), the family checked (a given model before it is used, a config before training),
  recording the loadable URI as ``info["<role>_model"]`` and the training wall time as
  ``info["<role>_train_wall_s"]`` (:meth:`Study.model`, :meth:`Study.train`);
- print what it will train before training anything, each config with its steps and an estimate in minutes from a
  measured rate (:func:`rate_of`), and stop there with ``--dry-run`` (:meth:`Study.plan`);
- print numbered stage lines with the time since the study began (:meth:`Study.stage`);
- finish: the report folder written complete or not at all (:func:`raymanifold.reports.report_dir`) by the
  family's writer, then one MLflow run tagged ``family`` and ``study`` holding the report (:meth:`Study.finish`).

Family code never imports this module: family study functions take their ``train`` / ``load`` callables as
arguments (``tests/test_imports.py``).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from raymanifold.commands import UsageError
from raymanifold.commands.options import StudyOptions


class DryRun(Exception):
    """``--dry-run``: the plan was printed; the command stops before any work (exit status 0)."""


#: a measured time in a config's header line (``# <stem>: <what>; about 4 min here (247 s, ...)``): seconds in
#: parentheses (a range ``87-101 s``: its upper end), else ``N s`` or ``N min`` (``6-8 min``: the upper end)
_SECONDS = re.compile(r"\((?:[^)]*?-)?(\d[\d,]*(?:\.\d+)?) s\b")
_PLAIN = re.compile(r"(?:\d[\d.]*-)?(\d[\d,]*(?:\.\d+)?) (s|min)\b")


def header_seconds(line: str) -> Optional[float]:
    """The training time a config's header line records, in seconds; None when it records none ("not measured",
    "not timed", "not run", or no time at all)."""
    text = line.partition(";")[2] if ";" in line else line
    if re.search(r"not (yet )?(measured|timed|run)", text):
        return None
    m = _SECONDS.search(text)
    if m:
        return float(m.group(1).replace(",", ""))
    m = _PLAIN.search(text)
    if m:
        return float(m.group(1).replace(",", "")) * (60.0 if m.group(2) == "min" else 1.0)
    return None


def _config_file(name: str) -> Optional[Path]:
    from raymanifold.commands import REPO_ROOT

    hits = sorted((REPO_ROOT / "jobs" / "configs").glob(f"*/{name}.yaml"))
    return hits[0] if hits else None


#: name suffixes a study adds to a config's name for one of its runs (seeds, restarts, phases, routes' sides)
_RUN_SUFFIX = re.compile(r"_(seed\d+|restart\d+|phase\d+|continued|guided|reference)$")


def name_candidates(name: str) -> list:
    """``name`` and the names it derives from, most specific first: ``x_route_bin_continued_seed0`` ->
    ``[x_route_bin_continued_seed0, x_route_bin_continued, x_route_bin]`` (a study's run of a config trains the
    config's model at the config's batch, so the config's own rate is the next best guess)."""
    out = [name]
    while (m := _RUN_SUFFIX.search(out[-1])) and m.start() > 0:
        out.append(out[-1][:m.start()])
    return out


def rate_of(cfg, tracking_uri: Optional[str] = None) -> tuple[Optional[float], str]:
    """(training steps per second, where that rate comes from) of ``cfg``: the newest finished run of the same name
    in the MLflow store (:func:`raymanifold.tracking.latest_rate`: this machine, any backend); else the time in
    the header line of ``jobs/configs/*/<name>.yaml`` over that file's ``train.steps``; else (None, "rate
    unknown"). Each lookup falls back to the names the run's name derives from (:func:`name_candidates`: a
    ``_seed1`` or ``_phase2`` run of a config is timed by that config). Minutes = ``cfg.train.steps`` / rate / 60:
    a rough guide (load, backend and workers change it)."""
    from raymanifold import tracking

    for name in name_candidates(cfg.name):
        r = tracking.latest_rate(name, tracking_uri)
        if r:
            of = "" if name == cfg.name else f" of {name}"
            return r["steps_per_s"], (f"{r['steps_per_s']:.3g} steps/s measured by MLflow run {r['run_id'][:8]}{of} "
                                      f"of {r['start']}: {r['steps']:,} steps in {r['wall_s']:.0f} s")
    path = next((p for p in map(_config_file, name_candidates(cfg.name)) if p is not None), None)
    if path is not None:
        from raymanifold.config import read_yaml

        with open(path) as f:
            first = f.readline()
        secs = header_seconds(first)
        steps = ((read_yaml(path).get("train") or {}).get("steps")) if secs else None
        if secs and isinstance(steps, int) and steps > 0:
            return steps / secs, (f"{steps / secs:.3g} steps/s from the header of {path.parent.name}/{path.name}: "
                                  f"{steps:,} steps in {secs:.0f} s")
    return None, "rate unknown"


def minutes_text(steps: int, rate: Optional[float]) -> str:
    """``~4.1 min`` (``<0.1 min`` for tiny runs), or ``? min`` without a rate."""
    if not rate:
        return "? min"
    m = steps / rate / 60.0
    return "<0.1 min" if m < 0.1 else f"~{m:.1f} min" if m < 10 else f"~{m:.0f} min"


def _families(family) -> tuple:
    return (family,) if isinstance(family, str) else tuple(family)


@dataclass
class Study:
    name: str                       # the command name ("table1", "gridvae-two-digit"): MLflow tag `study`
    family: str                     # MLflow tag `family`: the studied family ("" for a cross-family study)
    experiment: str                 # MLflow experiment of the study run
    options: StudyOptions
    stages: int = 0                 # total numbered stages for "[i/n]" (0: no total shown)
    run_name: str = ""              # default "study_" + name with "-" -> "_"
    info: dict = field(default_factory=dict)       # the report's "Run" facts; logged as params
    handles: dict = field(default_factory=dict)    # role -> RunHandle of the runs trained here
    t0: float = field(default_factory=time.perf_counter)
    _stage: int = 0

    # ------------------------------------------------------------------------- progress
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stage(self, text: str) -> None:
        """``[i/n] text  (+12.3 s)``: numbered, with the time since the study began."""
        self._stage += 1
        total = f"/{max(self.stages, self._stage)}" if self.stages else ""
        print(f"\n[{self._stage}{total}] {text}  (+{self.elapsed():.1f} s)", flush=True)

    # ------------------------------------------------------------------------- models
    def given(self, role: str) -> Optional[str]:
        return self.options.models.get(role)

    def check_family(self, role: str, cfg, family, what: str) -> None:
        fams = _families(family)
        if cfg.family not in fams:
            raise UsageError(f"{what}: a {cfg.family!r} model; the {role} role needs {' or '.join(map(repr, fams))}")

    def load(self, role: str, uri: str, *, family, stage: bool = True):
        """``(model, cfg, recipe)`` of a given model, its family checked; records ``info["<role>_model"]``."""
        from raymanifold import runs

        if stage:
            self.stage(f"{role}: loading {uri}")
        model, cfg, recipe = runs.load(uri)
        self.check_family(role, cfg, family, f"--model {role}")
        self.info[f"{role}_model"] = uri
        return model, cfg, recipe

    def train(self, role: str, cfg, *, family=None, fresh: Optional[bool] = None, tags: Optional[dict] = None,
              verbose: bool = True, stage: bool = True, key: Optional[str] = None):
        """Train ``cfg`` for ``role`` through the run service (``--no-ray``: in this process); returns the
        :class:`raymanifold.runs.RunHandle`. Records ``info["<key>_model"]`` (``runs:/<id>``) and
        ``info["<key>_train_wall_s"]`` (``key`` defaults to ``role``; several runs of one role use their own keys).
        ``fresh``: None = ``--fresh``."""
        from raymanifold import runs

        if family is not None:
            self.check_family(role, cfg, family, f"the {role} config {cfg.name!r}")
        if stage:
            self.stage(f"{role}: training {cfg.name} ({cfg.train.steps} steps, {self.options.where})")
        h = runs.train(cfg, backend=self.options.backend, tracking_uri=self.options.tracking_uri,
                       fresh=self.options.fresh if fresh is None else fresh, verbose=verbose,
                       tags={"study": self.name, "role": role, **(tags or {})})
        key = key or role
        self.handles[key] = h
        self.info[f"{key}_model"] = h.model_uri
        self.info[f"{key}_train_wall_s"] = round(h.wall_s, 1)
        return h

    def trainer(self, role: str, *, family=None, fresh: Optional[bool] = None, tags: Optional[dict] = None,
                verbose: bool = True) -> Callable:
        """``train(cfg) -> RunHandle`` for a role trained as several runs (restarts, arms x seeds, phases, routes),
        to hand to a family study function: trains like :meth:`train` without a stage line, appends each run's
        URI to ``info["<role>_runs"]`` and adds its wall time to ``info["<role>_train_wall_s"]``."""
        def train(cfg, **more_tags):
            from raymanifold import runs

            if family is not None:
                self.check_family(role, cfg, family, f"the {role} config {cfg.name!r}")
            h = runs.train(cfg, backend=self.options.backend, tracking_uri=self.options.tracking_uri,
                           fresh=self.options.fresh if fresh is None else fresh, verbose=verbose,
                           tags={"study": self.name, "role": role, **(tags or {}), **more_tags})
            self.info.setdefault(f"{role}_runs", []).append(h.model_uri)
            wall = self.info.get(f"{role}_train_wall_s") or 0.0
            self.info[f"{role}_train_wall_s"] = round(wall + h.wall_s, 1)
            return h
        return train

    def model(self, role: str, cfg=None, *, family, fresh: Optional[bool] = None, tags: Optional[dict] = None):
        """``(model, cfg, recipe)`` of ``role``: ``--model ROLE=URI`` when given (loaded, family checked), else
        trained from ``cfg`` (family checked before training) and loaded from its checkpoint."""
        from raymanifold import runs

        uri = self.given(role)
        if uri:
            return self.load(role, uri, family=family)
        if cfg is None:
            raise UsageError(f"--model {role}=URI: required (this study trains no {role} model)")
        h = self.train(role, cfg, family=family, fresh=fresh, tags=tags)
        return runs.load(str(h.checkpoint))

    # ------------------------------------------------------------------------- plan
    def plan(self, trains: list, given: Optional[dict] = None) -> None:
        """Print what the study will train before it trains anything: ``trains`` is ``[(role, cfg), ...]``,
        ``given`` the roles given as models (default: ``--model``). Each config gets its steps and an estimate in
        minutes from a measured rate, saying where the rate comes from (:func:`rate_of`). With ``--dry-run`` stop
        here (:class:`DryRun`)."""
        given = self.options.models if given is None else given
        lines, total, unknown, rates = [], 0.0, 0, {}
        for role, cfg in trains:
            if cfg.name not in rates:
                rates[cfg.name] = rate_of(cfg, self.options.tracking_uri)
            rate, where = rates[cfg.name]
            if rate:
                total += cfg.train.steps / rate / 60.0
            else:
                unknown += 1
            lines.append(f"  {role}: {cfg.name} ({cfg.family}), {cfg.train.steps:,} steps of batch "
                         f"{cfg.train.batch_size}, {self.options.where}, {minutes_text(cfg.train.steps, rate)} "
                         f"({where})")
        for role, uri in given.items():
            lines.append(f"  {role}: given {uri}")
        head = (f"[plan] {self.name} trains {len(trains)} model{'s' if len(trains) != 1 else ''}"
                + (f", uses {len(given)} given" if given else ""))
        if trains and unknown == len(trains):
            head += "; training time unknown (no measured rate)"
        elif trains:
            head += (f"; training about {total:.1f} min" if total < 10 else f"; training about {total:.0f} min")
            head += f" + {unknown} of {len(trains)} models at unknown rate" if unknown else ""
        print("\n".join([head, *lines]), flush=True)
        if self.options.dry_run:
            raise DryRun()

    # ------------------------------------------------------------------------- finish
    def finish(self, out, write: Callable, metrics: dict, *, config: Optional[dict] = None,
               tags: Optional[dict] = None, params: bool = True) -> str:
        """Write the report with ``write(folder)`` into ``out`` (complete or not at all), then log it to one MLflow
        run ``run_name`` in ``experiment``: ``config`` (+ ``info`` when ``params``) as params, the finite values of
        ``metrics`` (+ ``study_wall_s``) as metrics, tags ``family``, ``study``. Returns the MLflow run id."""
        import torch

        from raymanifold import runs
        from raymanifold.reports import report_dir

        self.info.setdefault("study_wall_s", round(self.elapsed(), 1))
        self.info.setdefault("torch_threads", torch.get_num_threads())
        with report_dir(out) as tmp:
            write(tmp)
        conf = {**(config or {}), **(self.info if params else {})}
        base_tags = {"study": self.name, **({"family": self.family} if self.family else {})}
        return runs.log_study(self.run_name or "study_" + self.name.replace("-", "_"), self.experiment, conf or None,
                              {**metrics, "study_wall_s": self.info["study_wall_s"]}, out,
                              tracking_uri=self.options.tracking_uri, tags={**base_tags, **(tags or {})})
