"""The robustness protocol every adversarial table uses (Table 1, the defence table, the sweeps).

One :class:`~.defended.Defence`, one set of examples, a list of :class:`Column` attacks. Each column
produces x_adv for the examples it runs on, and every x_adv is judged by the **deployed** defence, with
``draws`` independent runs per example when the defence is stochastic:

* ``accuracy`` (mean over draws; a bootstrap interval over examples) and ``worst_of_k`` (an example
  counts only if it is classified correctly in every draw; Wilson interval). Deterministic defences have
  one draw and the two agree.
* Non-adaptive columns (``adaptive=False``) run on all ``n`` examples; adaptive columns on the first
  ``n_adaptive`` (a prefix of the same fixed order). ``strongest``: per example, robust only if it
  survives *every* column, clean included (worst-of-k over draws); given on the adaptive subset with
  every column, and on all n with the non-adaptive columns. ``strongest_<threat>``: the same within one
  threat model.
* Every gradient column records its gradient health (:class:`.gradients.GradHealth`) and wall time.

:func:`sanity_checks` turns the results into the checks of Carlini et al. (2019) that apply; a failed
check is returned (and printed by the reports), never dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from raymanifold.adversarial.attacks import attack
from raymanifold.adversarial.budgets import AttackBudget
from raymanifold.adversarial.defended import Defence
from raymanifold.adversarial.gradients import GradHealth
from raymanifold.analysis.intervals import bootstrap_mean, wilson
from raymanifold.schema import ConfigError

GRADIENT_FREE = ("square", "patch_rs")
#: a gradient column passes the masking check when at most this fraction of its input-gradient entries is 0
ZERO_FRACTION_LIMIT = 0.01
#: per-example checks tolerate this fraction of violations (stochastic defences are judged on fresh draws)
VIOLATION_LIMIT = 0.02


@dataclass(frozen=True)
class Column:
    """One attack column. ``view``: transfer | bpda | backprop (gradient attacks, :mod:`.defended`) or
    square | patch_rs (gradient-free, on the deployed defence); ``eot``: draws averaged per gradient;
    ``threat``: linf | l2 | patch (for ``strongest_<threat>`` and the checks); ``queries``: gradient-free
    queries per example; ``early_stop``: an example leaves once it fools every draw (adaptive views)."""
    name: str
    budget: AttackBudget
    view: str = "transfer"
    eot: int = 1
    adaptive: bool = False
    threat: str = "linf"
    queries: int = 0
    early_stop: bool = False
    label: str = ""
    curve: bool = False

    def describe(self) -> str:
        b = self.budget
        what = b.method if self.view not in GRADIENT_FREE else self.view
        if b.method == "apgd" and self.view not in GRADIENT_FREE:
            what += f"-{b.loss}"
        parts = [what, f"{self.threat} eps {b.eps:g}"]
        if self.view in GRADIENT_FREE:
            parts.append(f"{self.queries} queries")
        else:
            parts.append(f"{b.iterations} it" + (f" x {b.restarts} restarts" if b.restarts > 1 else ""))
            parts.append(self.view + (f" + EOT {self.eot}" if self.eot > 1 else ""))
        return ", ".join(parts)


def check_protocol(n: int, n_adaptive: int, draws: int, available: int, prefix: str = "budgets"):
    """ConfigError naming the field for an impossible protocol (before any work)."""
    if n < 1:
        raise ConfigError(f"{prefix}.n: must be >= 1, got {n}")
    if n > available:
        raise ConfigError(f"{prefix}.n: {n} examples asked, the test split has {available}")
    if not 0 <= n_adaptive <= n:
        raise ConfigError(f"{prefix}.adaptive_n: must be in [0, n = {n}], got {n_adaptive}")
    if draws < 1:
        raise ConfigError(f"{prefix}.draws: must be >= 1, got {draws}")


def check_column(col: Column, prefix: str = "attack"):
    if col.eot < 1:
        raise ConfigError(f"{prefix}.eot: must be >= 1 (purifier draws averaged per gradient), got {col.eot}")
    if col.view in GRADIENT_FREE and col.queries < 1:
        raise ConfigError(f"{prefix}.queries: a gradient-free attack needs >= 1 query, got {col.queries}")


def summarize(ok: torch.Tensor) -> dict:
    """{n, draws, accuracy, accuracy_ci, worst_of_k, worst_of_k_ci} of a (k, m) bool matrix."""
    k, m = ok.shape
    per = ok.float().mean(0)
    worst = ok.all(0)
    acc = float(per.mean()) if m else float("nan")
    ci = wilson(int(worst.sum()), m) if k == 1 else bootstrap_mean(per.numpy())
    return {"n": m, "draws": k, "accuracy": acc, "accuracy_ci": ci,
            "worst_of_k": float(worst.float().mean()) if m else float("nan"),
            "worst_of_k_ci": wilson(int(worst.sum()), m)}


def _run(defence: Defence, col: Column, x, y, generator, batch: int, log,
         curve: Optional["Curve"] = None) -> tuple[torch.Tensor, Optional[dict]]:
    """x_adv of one column on (x, y), in batches; gradient health for gradient columns."""
    from raymanifold.adversarial import gradient_free

    if col.view == "square":
        fn = lambda v: defence.logits(v, generator, 1)[0]  # noqa: E731 (one draw per query)
        out = [gradient_free.square(fn, defence.classifier, x[i:i + batch], y[i:i + batch], norm=col.budget.norm,
                                    eps=col.budget.eps, queries=col.queries, seed=int(torch.randint(
                                        0, 2 ** 31, (1,), generator=generator)))
               for i in range(0, len(x), batch)]
        return torch.cat(out), None
    if col.view == "patch_rs":
        fn = lambda v: defence.logits(v, generator, 1)[0]  # noqa: E731
        out = [gradient_free.patch_random_search(fn, x[i:i + batch], y[i:i + batch], col.budget.patch,
                                                 queries=col.queries, generator=generator)
               for i in range(0, len(x), batch)]
        return torch.cat(out), None
    health = GradHealth()
    fn = defence.view(col.view, generator, col.eot)
    out = []
    for i in range(0, len(x), batch):
        out.append(attack(fn, x[i:i + batch], y[i:i + batch], col.budget, generator, health=health,
                          early_stop=col.early_stop, trace=curve.trace if curve is not None else None))
        if curve is not None:
            curve.flush()
        if len(x) > batch:
            log(f"      {col.name}: {min(i + batch, len(x))}/{len(x)} examples")
    return torch.cat(out), health.as_dict()


def evaluate(defence: Defence, x: torch.Tensor, y: torch.Tensor, columns: list, *, n_adaptive: int,
             draws: int, generator, batch: int = 250, adaptive_batch: int = 50, log=print,
             keep_adv: bool = False, given: Optional[dict] = None) -> dict:
    """Run every column against ``defence`` on (x, y) (see the module docstring). ``given``: {column name:
    (x_adv, gradient health dict)} computed elsewhere (a transfer attack shared by several defences), judged
    without re-attacking.
    Returns
    {"columns": {name: summary + health + seconds + describe}, "strongest": ..., "ok": {name: (k, m) bool},
    "n", "n_adaptive", "draws"} (and "x_adv" with ``keep_adv``)."""
    for c in columns:
        check_column(c, f"attack[{c.name}]")
    k = draws if defence.stochastic else 1
    ok, cols, advs = {}, {}, {}
    t = time.perf_counter()
    ok["clean"] = defence.correct(x, y, generator, k)
    cols["clean"] = {**summarize(ok["clean"]), "seconds": time.perf_counter() - t, "describe": "no attack",
                     "threat": "none", "adaptive": False, "view": "none", "health": None}
    log(f"    [{defence.name}] clean {100 * cols['clean']['accuracy']:.1f}% ({cols['clean']['seconds']:.0f} s)")
    for c in columns:
        m = n_adaptive if c.adaptive else len(x)
        if m == 0:
            continue
        t = time.perf_counter()
        curve = Curve() if c.curve and c.view not in GRADIENT_FREE else None
        if given and c.name in given:
            xa, health = given[c.name][0][:m], given[c.name][1]
        else:
            xa, health = _run(defence, c, x[:m], y[:m], generator, adaptive_batch if c.adaptive else batch, log,
                              curve)
        ok[c.name] = defence.correct(xa, y[:m], generator, k)
        if keep_adv:
            advs[c.name] = xa
        cols[c.name] = {**summarize(ok[c.name]), "seconds": time.perf_counter() - t, "describe": c.describe(),
                        "threat": c.threat, "adaptive": c.adaptive, "view": c.view, "health": health,
                        "label": c.label or c.name, "curve": curve.result() if curve is not None else None}
        zf = "" if not health or health["zero_fraction"] is None else \
            f", zero-gradient fraction {health['zero_fraction']:.4f}"
        log(f"    [{defence.name}] {c.name} (n={m}): {100 * cols[c.name]['accuracy']:.1f}%"
            f" (worst of {k}: {100 * cols[c.name]['worst_of_k']:.1f}%){zf} ({cols[c.name]['seconds']:.0f} s)")
    out = {"columns": cols, "strongest": strongest(ok, cols, len(x), n_adaptive), "ok": ok, "n": len(x),
           "n_adaptive": n_adaptive, "draws": k}
    if keep_adv:
        out["x_adv"] = advs
    return out


def _robust(ok: dict, names, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(robust in every draw of every column (m,), min over columns of the per-example draw mean (m,))."""
    worst = torch.ones(m, dtype=torch.bool)
    mean = torch.ones(m)
    for n in names:
        worst &= ok[n][:, :m].all(0)
        mean = torch.minimum(mean, ok[n][:, :m].float().mean(0))
    return worst, mean


def _strength(worst: torch.Tensor, mean: torch.Tensor, names) -> dict:
    m = len(worst)
    return {"n": m, "columns": list(names), "worst_of_k": float(worst.float().mean()) if m else float("nan"),
            "worst_of_k_ci": wilson(int(worst.sum()), m), "accuracy": float(mean.mean()) if m else float("nan"),
            "accuracy_ci": bootstrap_mean(mean.numpy()) if m else (float("nan"),) * 2}


def strongest(ok: dict, cols: dict, n: int, n_adaptive: int) -> dict:
    """Per-example strongest over columns: ``all`` (every column, on the adaptive subset, or on all n
    when there are no adaptive columns), ``non_adaptive`` (all n), and ``<threat>`` for each threat."""
    names = list(ok)
    non_adaptive = [c for c in names if not cols[c]["adaptive"]]
    has_adaptive = len(non_adaptive) < len(names)
    m_all = n_adaptive if has_adaptive else n
    out = {"all": _strength(*_robust(ok, names, m_all), names),
           "non_adaptive": _strength(*_robust(ok, non_adaptive, n), non_adaptive)}
    for threat in sorted({cols[c]["threat"] for c in names} - {"none"}):
        group = ["clean"] + [c for c in names if cols[c]["threat"] == threat]
        m = n_adaptive if any(cols[c]["adaptive"] for c in group) else n
        out[threat] = _strength(*_robust(ok, group, m), group)
    return out


def sanity_checks(result: dict, *, extra: Optional[list] = None) -> list:
    """[{check, passed, detail}] of the applicable checks (Carlini et al. 2019) on one defence's result:

    * per threat model, the adaptive attacks are at least as strong as the transfer attacks, per example
      (examples fooled by a transfer attack in some draw but by no adaptive attack, worst-of-k);
    * the gradient-free attack is no stronger than the gradient attacks, per example;
    * every gradient column's zero-gradient fraction is at most :data:`ZERO_FRACTION_LIMIT`.

    ``extra``: further checks computed by the study (eps sweep, more iterations), appended as given."""
    ok, cols = result["ok"], result["columns"]
    m = result["n_adaptive"]
    checks = []
    for threat in sorted({c["threat"] for c in cols.values()} - {"none"}):
        names = [n for n, c in cols.items() if c["threat"] == threat]
        transfer = [n for n in names if cols[n]["view"] == "transfer"]
        adaptive = [n for n in names if cols[n]["adaptive"] and cols[n]["view"] not in GRADIENT_FREE]
        free = [n for n in names if cols[n]["view"] in GRADIENT_FREE]
        if transfer and adaptive and m:
            t_rob, _ = _robust(ok, transfer, m)
            a_rob, _ = _robust(ok, adaptive, m)
            bad = int((a_rob & ~t_rob).sum())
            checks.append({"check": f"{threat}: adaptive at least as strong as transfer, per example",
                           "passed": bad <= VIOLATION_LIMIT * m,
                           "detail": f"{bad} of {m} examples fooled by transfer ({', '.join(transfer)}) but by no "
                                     f"adaptive attack ({', '.join(adaptive)})"})
        grad_cols = [n for n in names if cols[n]["view"] not in GRADIENT_FREE and cols[n]["adaptive"]]
        if free and grad_cols and m:
            g_rob, _ = _robust(ok, grad_cols, m)
            f_rob, _ = _robust(ok, free, m)
            bad = int((g_rob & ~f_rob).sum())
            checks.append({"check": f"{threat}: gradient-free attack no stronger than the gradient attacks",
                           "passed": bad <= VIOLATION_LIMIT * m,
                           "detail": f"{bad} of {m} examples fooled by {', '.join(free)} but by no gradient attack"})
    for n, c in cols.items():
        h = c.get("health")
        if h and h.get("zero_fraction") is not None:
            checks.append({"check": f"{n}: zero-gradient fraction near 0",
                           "passed": h["zero_fraction"] <= ZERO_FRACTION_LIMIT,
                           "detail": f"{h['zero_fraction']:.4f} of the input-gradient entries are exactly 0 "
                                     f"(limit {ZERO_FRACTION_LIMIT}); mean |grad|_2 {h['grad_norm']:.3g}"})
    return checks + list(extra or [])


def print_checks(checks: list, log=print, name: str = ""):
    """Print every check; failures loudly."""
    for c in checks:
        mark = "ok  " if c["passed"] else "FAIL"
        line = f"  [{mark}] {name + ': ' if name else ''}{c['check']}: {c['detail']}"
        log(line if c["passed"] else "!" * 3 + line)


def compact(result: dict) -> dict:
    """The JSON-able part of a result (without the per-example matrices and examples), plus the per-example
    worst-of-k robustness of each column as 0/1 lists (so a reader can recompute every figure)."""
    out = {k: v for k, v in result.items() if k not in ("ok", "x_adv")}
    out["per_example_robust"] = {n: o.all(0).int().tolist() for n, o in result["ok"].items()}
    return out


class Curve:
    """Convergence of one attack: the fraction of examples whose best iterate after i iterations fools
    fewer than half of the attack's own draws (its view of accuracy; the deployed defence judges the final
    iterate on fresh draws), summed over the batches the attack ran in."""

    def __init__(self):
        self._batch, self._total = {}, {}

    def trace(self, i, x_best, fooled):
        if fooled is not None:
            self._batch[i] = (int((fooled < 0.5).sum()), len(fooled))

    def flush(self):
        for i, (c, m) in self._batch.items():
            tc, tm = self._total.get(i, (0, 0))
            self._total[i] = (tc + c, tm + m)
        self._batch = {}

    def result(self) -> dict:
        """{iteration: accuracy}."""
        return {i: c / m for i, (c, m) in sorted(self._total.items()) if m}
