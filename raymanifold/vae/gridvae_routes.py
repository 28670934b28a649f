"""The GridVAE 28x28 routes study (issue #28 item 6): can selection by the objective find the digits, per route?

A *route* is a config of the two-digit study (``two_digit_mnist``) that changes one thing within the paper's
method (dynamic binarisation, the aggregate-posterior KL over a queue, sigma0 = 1/16, ...). For every route and
seed four models are trained (:func:`side_config`):

* ``unsupervised``: the config as it is (no labels), as one restart of the study;
* ``continued``: the unsupervised model continued on the same objective (``model.init_from``) for half as many
  steps at the final KL weight and sigma0 (a fresh cosine learning-rate cycle);
* ``guided``: its guided twin (Sec. 4.2.2: dimension j's KL centre is digit j's label), the same schedule;
* ``reference``: the guided model continued exactly like ``continued``: the objective's own optimum next to the
  digit partition.

``continued`` and ``reference`` have the same budget and schedule and differ only in the labels of their first
part, so their objectives compare directly (an uncontinued restart against the reference would credit the
reference's extra steps to the digits). Each model is scored on the objective its last step minimised and on the
plain negative ELBO (:func:`raymanifold.vae.evaluation.score_split`), with the reconstruction / KL split, and by
the Hungarian-matched accuracies. Per route, the guided-reference gap (continued - reference, paired by seed;
> 0: the objective prefers the digits) gets a paired t-interval over seeds, with Holm-adjusted p-values over the
family of gaps read (the routes x {objective, ELBO}).

Trained models are recorded in a JSON *ledger* (``route/side/seed`` -> run URI, wall time, metrics) written after
every run, so the study can be run route by route (one process per CPU slot) and the report built from the ledgers.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

SIDES = ("unsupervised", "continued", "guided", "reference")
#: the side each continuation starts from
CONTINUES = {"continued": "unsupervised", "reference": "guided"}
#: label columns guiding the two latent dimensions of the guided side
GUIDED_LABELS = ("digit1", "digit2")
#: per-model metrics kept in the ledger and the report
KEYS = ("train_objective_nats", "train_objective_recon_nats", "train_objective_kl_nats", "objective_beta",
        "test_objective_nats", "train_elbo_nats", "train_elbo_recon_nats", "train_elbo_kl_nats", "test_elbo_nats",
        "cluster_accuracy", "dim1_accuracy", "dim2_accuracy", "per_dim_accuracy_min", "per_dim_accuracy_mean")
#: scored on the test split: 3,600 pairs (Wilson intervals of one model's accuracies use this n)
N_TEST = 3600
#: a model whose mean per-dimension accuracy is below chance (1/6: six digits per dimension) + this margin reads
#: no digit from z: its decoder ignores z (reconstruction at the z-free level); the report counts such models
COLLAPSE_MARGIN = 0.05
#: the continuations' peak learning rate as a fraction of the route's ``train.lr``. At 1 (the study's first
#: design) a continuation restarts AdamW with fresh moments at the peak rate, and within its first 100 steps the
#: decoder often stops reading z (reconstruction at the z-free level, accuracies at chance: docs/gridvae.md);
#: at 0.1 none of 22 continuations collapsed (docs/gridvae.md).
CONTINUE_LR_FACTOR = 0.1


class RoutesError(ValueError):
    """A route, seed list, side or ledger does not fit the study (reported as a usage error)."""


# ----------------------------------------------------------------------------- arguments
def parse_routes(items) -> dict:
    """``["bin=jobs/configs/x.yaml", ...]`` -> ``{"bin": "jobs/configs/x.yaml"}`` (names unique, non-empty)."""
    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        name = name.strip()
        if not sep or not name or not path or "/" in name:
            raise RoutesError(f"--route: expected NAME=CONFIG (NAME without '/'), got {it!r}")
        if name in out:
            raise RoutesError(f"--route: route name {name!r} given twice")
        out[name] = path
    return out


def parse_seeds(text: str) -> list:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RoutesError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise RoutesError(f"--seeds: need distinct non-negative integers, got {text!r}")
    return seeds


def parse_sides(text: str) -> list:
    sides = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise RoutesError(f"--sides: unknown {bad}; choose from {list(SIDES)}")
    for side, start in CONTINUES.items():
        if side in sides and start not in sides:
            raise RoutesError(f"--sides: {side!r} continues the {start!r} model; include {start!r} too")
    return [s for s in SIDES if s in sides]


def check_route_config(name: str, cfg):
    from raymanifold.vae.gridvae_study import check_two_digit

    if cfg.family != "gridvae":
        raise RoutesError(f"--route {name}: needs a gridvae config, got family {cfg.family!r}")
    check_two_digit(cfg)
    if cfg.model.guidance != "none" or cfg.model.init_from:
        raise RoutesError(f"--route {name}: the route config must be unsupervised and untrained (model.guidance none, "
                          "no model.init_from); the study derives the guided sides itself")


# ----------------------------------------------------------------------------- the three sides
def side_config(cfg, side: str, seed: int, start_uri=None, *, continue_lr_factor: float = CONTINUE_LR_FACTOR):
    """The config of one side for one seed (see the module doc); a continuation's peak learning rate is
    ``continue_lr_factor`` x the route's ``train.lr``."""
    from raymanifold.config import replace

    base = replace(cfg, [("train.seed", seed), ("name", f"{cfg.name}_seed{seed}")])
    if side == "unsupervised":
        return base
    if side == "guided":
        return replace(base, [("name", f"{cfg.name}_guided_seed{seed}"), ("model.guidance", "full"),
                              ("model.guided_labels", list(GUIDED_LABELS))])
    if side in CONTINUES:
        if not start_uri:
            raise RoutesError(f"{side}: needs the {CONTINUES[side]} model's URI")
        m = cfg.model
        return replace(base, [("name", f"{cfg.name}_{side}_seed{seed}"), ("model.init_from", start_uri),
                              ("train.steps", max(1, cfg.train.steps // 2)), ("model.beta_start", m.beta),
                              ("train.lr", cfg.train.lr * continue_lr_factor),
                              ("model.kl_warmup", 0), ("model.sigma0_start", 0.0), ("model.sigma0_anneal", 0)])
    raise RoutesError(f"--sides: unknown side {side!r}")


# ----------------------------------------------------------------------------- ledger
def load_ledgers(paths) -> dict:
    """Union of the ledgers that exist; on a repeated key the entry that knows more (a model, then metrics) wins,
    else the later file."""
    out = {}
    for p in paths:
        if Path(p).is_file():
            for k, e in json.loads(Path(p).read_text()).items():
                old = out.get(k, {})
                if (bool(e.get("model")), "metrics" in e) >= (bool(old.get("model")), "metrics" in old):
                    out[k] = e
    return out


def save_ledger(path, entries: dict, routes=None):
    """Write ``entries`` to ``path`` atomically. With ``routes``, only the entries of those routes are written from
    ``entries``, and what the file already holds for every other route is kept: one ledger can serve several
    invocations of the study, one route each (an earlier version rewrote the file with this invocation's routes
    only, dropping the others' entries)."""
    p = Path(path)
    if routes is not None:
        kept = json.loads(p.read_text()) if p.is_file() else {}
        entries = {**{k: e for k, e in kept.items() if k.split("/", 1)[0] not in routes},
                   **{k: e for k, e in entries.items() if k.split("/", 1)[0] in routes}}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True, default=float))
    os.replace(tmp, p)


def key(route: str, side: str, seed: int) -> str:
    return f"{route}/{side}/{seed}"


def training_signature(cfg) -> str:
    """What determines a run's weights: the resolved config without its name and experiment, with the
    aggregate-posterior fields (``kl_estimate``, ``kl_queue``) neutralised when every latent dimension is guided
    at every step (then the KL is Eq. 27 at the labels' centres whatever they say: the guided twin of a route that
    differs only in them is the same run). ``model.init_from`` is kept (a continuation depends on its start)."""
    from raymanifold.config import to_dict

    d = to_dict(cfg)
    d.pop("name", None), d.pop("experiment", None)
    m = d["model"]
    if m.get("guidance") == "full" and not m.get("guidance_steps"):
        m["kl_estimate"], m["kl_queue"] = "sample", 0
    return json.dumps(d, sort_keys=True, default=str)


def _signature(entry: dict) -> str:
    """An entry's training signature (recorded at training; for entries recorded without one, read from the
    config saved in its checkpoint, and remembered)."""
    if "signature" not in entry:
        from raymanifold.config import config_from_dict

        entry["signature"] = training_signature(config_from_dict(_saved_config(entry["model"])))
    return entry["signature"]


def _saved_config(uri: str) -> dict:
    """The config dict saved in the checkpoint of a ledger entry's run."""
    from raymanifold import checkpoint as ckpt

    return ckpt.load(ckpt.resolve(uri))["config"]


def fill_train_lr(ledger: dict) -> dict:
    """Record each trained run's peak learning rate (``train_lr``) in entries made before the ledger kept it, read
    from the run's checkpoint config; returns the ledger."""
    for e in ledger.values():
        if e.get("model") and e.get("train_lr") is None:
            e["train_lr"] = float(_saved_config(e["model"])["train"]["lr"])
    return ledger


def _sides(routes: dict, configs: dict, seeds, sides, continue_lr_factor: float = CONTINUE_LR_FACTOR):
    """Every run of the study in training order: yields ``(route, side, key, cfg, uris)`` per route x seed x side, where
    ``uris`` maps the sides of this route and seed done so far to their model URIs; the caller records
    ``uris[side]`` before the next step (a continued side's config starts from its start side's URI)."""
    for seed in seeds:
        for route in routes:
            uris = {}
            for side in sides:
                cfg = side_config(configs[route], side, seed, uris.get(CONTINUES.get(side)),
                                  continue_lr_factor=continue_lr_factor)
                yield route, side, key(route, side, seed), cfg, uris


def planned_runs(routes: dict, configs: dict, seeds, sides, ledger: dict,
                 continue_lr_factor: float = CONTINUE_LR_FACTOR) -> list:
    """``[(key, cfg), ...]``: the runs :func:`run_all` will train, in its order: every route x seed x side that the
    ledger lacks, less those whose :func:`training_signature` equals an earlier one (shared, not trained again).
    A continued side not yet trained starts from a placeholder ``pending:<key of its start>``."""
    plan, seen = [], {_signature(e): e["model"] for e in ledger.values() if e.get("model")}  # signature -> URI
    for _, side, k, cfg, uris in _sides(routes, configs, seeds, sides, continue_lr_factor):
        sig, entry = training_signature(cfg), ledger.get(k, {})
        if entry.get("model"):
            uris[side] = entry["model"]
        elif sig in seen:  # shared with an earlier run: a continuation starts from that run
            uris[side] = seen[sig]
        else:
            uris[side] = seen[sig] = f"pending:{k}"
            plan.append((k, cfg))
    return plan


def run_all(routes: dict, configs: dict, seeds, sides, ledger_path, ledger: dict, *, train, load,
            evaluate: bool = True, log=print, continue_lr_factor: float = CONTINUE_LR_FACTOR) -> dict:
    """Train (or reuse from ``ledger``) every route x seed x side, evaluate each once, record it in ``ledger``
    (saved to ``ledger_path`` after every step). Returns the ledger. A run whose :func:`training_signature` equals
    that of a run already in the ledger (e.g. another route's guided twin when the routes differ only in the
    aggregate-posterior KL, which a fully guided run never uses) is not trained again: its entry is shared."""
    from raymanifold.vae import gridvae_study as S
    from raymanifold.vae.evaluation import evaluate_model

    for route, side, k, cfg, uris in _sides(routes, configs, seeds, sides, continue_lr_factor):
        entry = ledger.get(k, {})
        sig = training_signature(cfg)
        same = next((k2 for k2, e in ledger.items() if e.get("model") and _signature(e) == sig), None)
        if not entry.get("model") and same:
            entry = {**ledger[same], "shared_with": same}
            ledger[k] = entry
            save_ledger(ledger_path, ledger, routes)
            log(f"[routes] {k}: the same training as {same} ({entry['model']}), shared")
        if entry.get("model"):
            model = None
        else:
            log(f"[routes] training {k}: {cfg.name} ({cfg.train.steps} steps)")
            model, cfg, info = train(cfg)
            entry = {"model": info["routes_model"], "train_wall_s": info["train_wall_s"], "config": routes[route],
                     "name": cfg.name, "signature": sig, "train_lr": cfg.train.lr}
            ledger[k] = entry
            save_ledger(ledger_path, ledger, routes)
        uris[side] = entry["model"]
        if evaluate and "metrics" not in entry:
            if model is None:
                model, cfg = load(entry["model"])
            t0 = time.perf_counter()
            m = evaluate_model(model, cfg, objectives=True)["metrics"]
            entry["metrics"] = {q: m.get(q, math.nan) for q in KEYS}
            entry["eval_wall_s"] = time.perf_counter() - t0
            ledger[k] = entry
            save_ledger(ledger_path, ledger, routes)
            log(f"[routes] {k}: " + S.summary_line(entry["metrics"], ("train_objective_nats", "train_elbo_nats",
                                                                     "cluster_accuracy",
                                                                     "per_dim_accuracy_min")))
    return ledger


# ----------------------------------------------------------------------------- statistics
def t_interval(values, confidence: float = 0.95) -> tuple:
    """(mean, lo, hi) of a Student t interval over the values (NaN bounds below two values)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return (math.nan, math.nan, math.nan)
    if len(v) < 2 or np.std(v) == 0:
        return (float(v.mean()), math.nan if len(v) < 2 else float(v.mean()),
                math.nan if len(v) < 2 else float(v.mean()))
    lo, hi = stats.t.interval(confidence, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    return (float(v.mean()), float(lo), float(hi))


def paired_test(a, b) -> dict:
    """Paired t on a - b over seeds: ``{"n", "mean", "lo", "hi", "p"}`` (95 % interval, two-sided p)."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    mean, lo, hi = t_interval(d)
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) >= 2 and np.std(d) > 0 else math.nan
    return {"n": int(len(d)), "mean": mean, "lo": lo, "hi": hi, "p": p, "per_seed": [float(x) for x in d]}


def welch(a, b) -> dict:
    """Welch's two-sample t interval for mean(a) - mean(b) (95 %): ``{"mean", "lo", "hi", "p"}``."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return {"mean": float(a.mean() - b.mean()), "lo": math.nan, "hi": math.nan, "p": math.nan}
    r = stats.ttest_ind(a, b, equal_var=False)
    ci = r.confidence_interval(0.95)
    return {"mean": float(a.mean() - b.mean()), "lo": float(ci.low), "hi": float(ci.high), "p": float(r.pvalue)}


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjusted p-values (family-wise error) for ``{name: p}``; NaNs are left out."""
    items = sorted(((p, k) for k, p in pvalues.items() if math.isfinite(p)))
    m, out, run = len(items), {}, 0.0
    for i, (p, k) in enumerate(items):
        run = max(run, min(1.0, (m - i) * p))
        out[k] = run
    return out


def collapsed(metrics: dict) -> bool:
    """True when the model reads no digit from z: mean per-dimension accuracy < 1/6 + :data:`COLLAPSE_MARGIN`."""
    return metrics.get("per_dim_accuracy_mean", math.nan) < 1.0 / 6.0 + COLLAPSE_MARGIN


def wilson(acc: float, n: int = N_TEST) -> tuple:
    from scipy.stats import binomtest

    k = int(round(acc * n))
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return (float(ci.low), float(ci.high))


def summarise(ledger: dict, routes, seeds, sides) -> dict:
    """Per route: per side the per-seed metrics with t-intervals; the paired guided-reference gaps; the model the
    objective selects among the unsupervised restarts (and among restarts + references); Holm over all gaps;
    and each route's change against the first route (Welch intervals)."""
    out = {"routes": {}, "seeds": list(seeds), "sides": list(sides)}
    pvals = {}
    for route in routes:
        r = {"sides": {}, "missing": []}
        for side in sides:
            rows = []
            for seed in seeds:
                e = ledger.get(key(route, side, seed))
                if not e or "metrics" not in e:
                    r["missing"].append(key(route, side, seed))
                    continue
                rows.append({"seed": seed, "model": e["model"], "train_wall_s": e.get("train_wall_s"),
                             "train_lr": e.get("train_lr"), **e["metrics"]})
            stats_ = {q: t_interval([row[q] for row in rows]) for q in KEYS}
            for row in rows:
                row["collapsed"] = bool(collapsed(row))
            r["sides"][side] = {"rows": rows, "mean_ci": stats_, "collapsed": sum(row["collapsed"] for row in rows)}
        if "continued" in r["sides"] and "reference" in r["sides"]:
            u = {row["seed"]: row for row in r["sides"]["continued"]["rows"]}
            g = {row["seed"]: row for row in r["sides"]["reference"]["rows"]}
            both = [s for s in seeds if s in u and s in g]
            r["gap"] = {}
            for q in ("train_objective_nats", "train_elbo_nats"):
                t = paired_test([u[s][q] for s in both], [g[s][q] for s in both])
                r["gap"][q] = t
                pvals[f"{route}:{q}"] = t["p"]
            pool = [("continued", s, u[s]) for s in u] + [("reference", s, g[s]) for s in g]
            if u:
                best = min(u.values(), key=lambda row: row["train_objective_nats"])
                r["selected"] = {"seed": best["seed"], "model": best["model"],
                                 **{q: best[q] for q in KEYS},
                                 "cluster_accuracy_wilson": wilson(best["cluster_accuracy"]),
                                 "per_dim_accuracy_min_wilson": wilson(best["per_dim_accuracy_min"])}
            if pool:
                side, seed, best = min(pool, key=lambda t: t[2]["train_objective_nats"])
                r["selected_from_pool"] = {"side": side, "seed": seed, "cluster_accuracy": best["cluster_accuracy"],
                                           "train_objective_nats": best["train_objective_nats"]}
        out["routes"][route] = r
    adj = holm(pvals)
    for name, p in adj.items():
        route, q = name.split(":")
        out["routes"][route]["gap"][q]["p_holm"] = p
    out["holm_family"] = sorted(pvals)
    first = list(routes)[0] if routes else None
    for route in list(routes)[1:]:
        ch = {}
        for side in SIDES:
            a = out["routes"][route]["sides"].get(side, {}).get("rows", [])
            b = out["routes"][first]["sides"].get(side, {}).get("rows", [])
            if len(a) >= 2 and len(b) >= 2:
                ch[side] = {q: welch([x[q] for x in a], [x[q] for x in b])
                            for q in ("cluster_accuracy", "per_dim_accuracy_min")}
        out["routes"][route]["change_vs_" + first] = ch
    out["baseline_route"] = first
    return out
