"""``raymanifold study ood``: which description of the manifold knows what it doesn't know (docs/ood.md).

One model per family on the mnist5k digits 0-4 at 28x28 (the hierarchical AE + flow, Glow, the DDPM, GridVAE and
the VAE-classifier; plus the Glow background model of the likelihood ratio), trained through the run service or
given (``--model ROLE=URI``); the held-out digits 0-4 against eight OOD sets (:mod:`raymanifold.ood.sets`); every
detector (:mod:`raymanifold.ood.detectors`) scored per example by ``raymanifold score``'s Ray Data pipeline
(:func:`raymanifold.distributed.scoring.score_to_parquet`, ``--columns ood``, tasks or actors chosen per job);
AUROC, FPR@95%TPR and AUPR with bootstrap intervals (:mod:`raymanifold.ood.metrics`), cost per detector, a
heat map and per-set histograms (:mod:`raymanifold.ood.report`), the calibrated threshold of each model's best
servable detector (``calibration.json``, read by the web page), logged to MLflow.

Self-contained so that it moves onto the one-study-shape ``Study`` object (issue #26) as one piece:
:class:`OODBudget` (validated settings), :func:`plan` (every check, before any work), :func:`run` (train/load,
build sets, score, evaluate) and :func:`raymanifold.ood.report.write`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from raymanifold.ood import detectors as D
from raymanifold.ood import metrics as M
from raymanifold.ood import sets as S
from raymanifold.schema import ConfigError, build_dataclass, param

#: role -> the config trained when no --model is given
CONFIGS = {"flow": "jobs/configs/train/ood_flow_mnist5k.yaml", "glow": "jobs/configs/train/ood_glow_mnist5k.yaml",
           "glow_background": "jobs/configs/train/ood_glow_background_mnist5k.yaml",
           "ddpm": "jobs/configs/train/ood_ddpm_mnist5k.yaml", "gridvae": "jobs/configs/train/ood_gridvae_mnist5k.yaml",
           "vae_classifier": "jobs/configs/train/ood_vae_classifier_mnist5k.yaml"}
INPUT_SHAPE = (1, 28, 28)
EXPERIMENT = "ood"


class StudyError(ValueError):
    """Bad input to the study (the message names the option)."""


@dataclass(frozen=True)
class OODBudget:
    """The study's settings (each validated; errors name ``ood.<field>``)."""
    sets: tuple[str, ...] = param(S.OOD_SETS, help="OOD sets (raymanifold.ood.sets.OOD_SETS)")
    detectors: tuple[str, ...] = param((), help="detectors (empty: every detector the models support)")
    n: int = param(500, lo=10, hi=100_000, help="examples per set (the held-out digits cap it at 500)")
    n_reference: int = param(500, lo=10, hi=2000, help="training digits of the typicality test's H_hat")
    dts: tuple[int, ...] = param(D.DEFAULT_DTS, help="DDPM Eq. 15 step sizes")
    typicality_batch: int = param(5, lo=1, hi=100, help="M, inputs per batch of the typicality test")
    resamples: int = param(2000, lo=100, hi=100_000, help="bootstrap resamples")
    confidence: float = param(0.95, lo=0.5, hi=0.999, help="interval level")
    fpr_in: float = param(0.05, lo=0.001, hi=0.5, help="in-distribution rejection rate of the calibrated threshold")
    blur_sigma: float = param(1.5, lo=0.0, lo_open=True, hi=10.0, help="Gaussian blur of set (g), pixels")
    patch_iterations: int = param(64, lo=1, hi=4096, help="patch-PGD iterations of set (h)")
    patch_step: float = param(8 / 255, lo=0.0, lo_open=True, hi=1.0, help="patch-PGD step of set (h)")
    batch_size: int = param(100, lo=1, hi=10_000, help="rows per scoring batch")
    seed: int = param(0, lo=0, help="seed of the sets, the scorers' noise and the bootstrap")

    def validate(self):
        try:
            S.check_names(self.sets, "ood.sets")
        except S.SetError as exc:
            raise ConfigError(str(exc)) from None
        if not self.dts or any(d < 1 for d in self.dts) or len(set(self.dts)) != len(self.dts):
            raise ConfigError(f"ood.dts: distinct step sizes >= 1, got {list(self.dts)}")

    def attack(self) -> S.PatchAttack:
        return S.PatchAttack(iterations=self.patch_iterations, step=self.patch_step)

    @classmethod
    def from_dict(cls, raw: dict) -> "OODBudget":
        return build_dataclass(cls, raw, "ood")


@dataclass
class Plan:
    """What :func:`plan` checked: the budget, the models (given or to train), the detectors and the roles used."""
    budget: OODBudget
    given: dict           # role -> uri
    configs: dict         # role -> ExperimentConfig (given: the checkpoint's; trained: the YAML's)
    detectors: list       # [Detector]
    roles: list           # roles whose models are used, in ROLES order


def _check_model(role: str, cfg, where: str):
    from raymanifold.recipes import input_spec

    want = D.ROLES[role]
    if cfg.family != want:
        raise StudyError(f"{where}: a {cfg.family} model; role {role!r} needs a {want} model")
    shape = tuple(input_spec(cfg).shape)
    if shape != INPUT_SHAPE:
        raise StudyError(f"{where}: the model takes {'x'.join(map(str, shape))} inputs; the benchmark's images are "
                         f"{'x'.join(map(str, INPUT_SHAPE))} (grey 28x28)")


def parse_models(pairs) -> dict:
    """``["ROLE=URI", ...]`` -> {role: uri}; StudyError naming ``--model`` for a bad pair or an unknown role."""
    out = {}
    for p in pairs or []:
        role, sep, uri = p.partition("=")
        if not sep or not role or not uri:
            raise StudyError(f"--model: expected ROLE=URI, got {p!r}; roles: {sorted(D.ROLES)}")
        if role not in D.ROLES:
            raise StudyError(f"--model: unknown role {role!r}; roles: {sorted(D.ROLES)}")
        if role in out:
            raise StudyError(f"--model: role {role!r} given twice")
        out[role] = uri
    return out


def plan(budget: OODBudget, given: dict, overrides: list, *, load_config: Callable, load_model: Callable) -> Plan:
    """Every check before any work: the given models (family, 28x28 input), the configs of the others (loaded
    with ``overrides``), the detectors against the models' families, and which roles are needed.
    ``load_config(path, overrides)`` and ``load_model(uri) -> (model, cfg, recipe)`` come from the caller."""
    configs = {}
    for role, uri in given.items():
        _, cfg, _ = load_model(uri)
        _check_model(role, cfg, f"--model {role}")
        configs[role] = cfg
    for role in D.ROLES:
        if role not in configs:
            cfg = load_config(CONFIGS[role], overrides)
            _check_model(role, cfg, f"{CONFIGS[role]} (role {role})")
            configs[role] = cfg
    try:
        names = list(budget.detectors) or D.default_detector_names(configs, budget.dts)
        dets = D.resolve(names, configs, budget.dts, budget.typicality_batch)
    except D.DetectorError as exc:
        msg = str(exc)
        raise StudyError(f"--{msg}" if msg.startswith(("detectors:", "dts:")) else msg) from None
    if any(d.kind == "typicality" for d in dets) and budget.typicality_batch > min(budget.n, 500) // 10:
        raise StudyError(f"--typicality-batch: M = {budget.typicality_batch} leaves fewer than 10 batches per set of "
                         f"{min(budget.n, 500)}; use M <= {min(budget.n, 500) // 10}")
    needed = D.roles_needed(dets)
    if "patch_attacked" in budget.sets:
        needed.add("vae_classifier")
    roles = [r for r in D.ROLES if r in needed]
    return Plan(budget, {r: u for r, u in given.items() if r in needed}, {r: configs[r] for r in roles}, dets, roles)


# ----------------------------------------------------------------------------- reusing an earlier study's scores
#: budget fields that decide the rows of a scoring job (which sets, in which order, built how)
ROW_FIELDS = ("sets", "n", "n_reference", "seed", "blur_sigma", "patch_iterations", "patch_step")


def needed_columns(role: str, detectors: list) -> set:
    """The Parquet columns of ``role``'s scoring job that ``detectors`` read (scores and ``sec_*`` timings)."""
    out = {c for d in detectors for r, c in d.passes if r == role}
    for d in detectors:
        for name in (d.name if d.column else None, d.base, d.extra.get("background")):
            if name and "." in name and ":" not in name and name.split(".", 1)[0] == role:
                out.add(name.split(".", 1)[1])
        if d.kind == "complexity" and d.role == role:
            out.add("png_bits")
    return out


def reusable_scores(folder, p: Plan) -> dict:
    """{role: {"folder", "job"}} of the scoring jobs of an earlier report folder (``--scores-from``) that this run
    reads instead of scoring again: roles given here with the same model URI, when the earlier study's rows were
    built alike (:data:`ROW_FIELDS`) and its Parquet has every column this run's detectors need. Raises
    StudyError naming ``--scores-from`` when the folder is not a study report or its rows differ."""
    import json

    import pyarrow.parquet as pq

    folder = Path(folder)
    try:
        old = json.loads((folder / "ood.json").read_text())
    except (OSError, ValueError) as exc:
        raise StudyError(f"--scores-from: {folder} holds no readable ood.json ({exc.__class__.__name__})") from None
    now = dataclasses.asdict(p.budget)
    was = old.get("budget", {})
    diff = [f for f in ROW_FIELDS if json.loads(json.dumps(now[f])) != was.get(f)]
    if diff:
        then = ", ".join(f"{f} {was.get(f)!r}" for f in diff)
        raise StudyError(f"--scores-from: {folder} scored other rows ({then}; this run: "
                         f"{', '.join(f'{f} {now[f]!r}' for f in diff)})")
    out = {}
    for role, uri in p.given.items():
        src = folder / "scores" / role
        if old.get("models", {}).get(role, {}).get("uri") != uri or not src.is_dir():
            continue
        have = set(pq.read_schema(next(iter(sorted(src.glob("*.parquet"))))).names)
        if needed_columns(role, p.detectors) <= have:
            out[role] = {"folder": str(src), "job": old.get("jobs", {}).get(role, {})}
    return out


def planned_trainings(role: str, cfg) -> list:
    """``[(label, cfg), ...]``: the trainings :func:`train_role` runs for ``role`` (the flow: phase 1, then phase 2
    from a pending phase-1 checkpoint), for the study's plan."""
    from raymanifold.config import replace

    if role != "flow":
        return [(role, cfg)]
    return [("flow phase 1", cfg), ("flow phase 2", replace(cfg, [f"name={cfg.name}_phase2", "model.phase=flow",
                                                                 "model.ae_checkpoint=pending"]))]


# ----------------------------------------------------------------------------- the run
def train_role(role: str, cfg, *, train: Callable, say: Callable) -> dict:
    """Train the model of ``role`` with ``train(cfg) -> RunHandle`` (the flow in its two phases: phase 2 is ``cfg``
    with ``model.phase=flow``, ``model.ae_checkpoint`` = phase 1's runs:/ URI, name ``<name>_phase2``);
    returns {"uri", "train_wall_s", "runs", "metrics", "end_to_end_s"}."""
    from raymanifold.config import replace

    t0 = time.perf_counter()
    handles = []
    if role == "flow":
        say(f"flow phase 1 (autoencoders): {cfg.name}, {cfg.train.steps} steps")
        handles.append(train(cfg))
        cfg = replace(cfg, [f"name={cfg.name}_phase2", "model.phase=flow",
                            f"model.ae_checkpoint={handles[0].model_uri}"])
        say(f"flow phase 2 (flows): {cfg.name}, {cfg.train.steps} steps")
    else:
        say(f"{role}: {cfg.name}, {cfg.train.steps} steps")
    handles.append(train(cfg))
    return {"uri": handles[-1].model_uri, "train_wall_s": round(sum(h.wall_s for h in handles), 1),
            "runs": [h.model_uri for h in handles], "metrics": handles[-1].metrics,
            "end_to_end_s": round(time.perf_counter() - t0, 1)}


def concat_sets(sets: dict):
    """All sets as one :class:`~raymanifold.data.ArrayDataset` (label = the set's index in ``sets``) and the
    names in order: one scoring job per model covers every set."""
    import torch

    from raymanifold.data import ArrayDataset

    names = list(sets)
    x = torch.cat([sets[k] for k in names])
    y = torch.cat([torch.full((len(sets[k]),), i, dtype=torch.int64) for i, k in enumerate(names)])
    return ArrayDataset(x, y, {"kind": "image", "shape": tuple(x.shape[1:]), "sets": names}), names


def read_role_scores(folder: str, names: list) -> dict:
    """{set: {column: array}} from a scoring job's Parquet (rows in id order)."""
    import pyarrow.parquet as pq

    t = pq.read_table(folder)
    order = np.argsort(t.column("id").to_numpy())
    cols = {c: np.asarray(t.column(c).to_numpy(zero_copy_only=False))[order] for c in t.column_names}
    label = cols["label"]
    return {name: {c: v[label == i] for c, v in cols.items()} for i, name in enumerate(names)}


def detector_scores(det, scores: dict, entropy_of: Callable, set_names: list, seed: int) -> dict:
    """{set: scores (higher = more in-distribution)} of detector ``det`` from the per-role column tables
    ``scores`` ({role: {set: {column: array}}}); typicality gives batch scores."""
    out = {}
    for s in set_names:
        if det.kind in ("density", "latent", "coarse", "classifier"):
            out[s] = scores[det.role][s][det.column]
            continue
        role, col = det.base.split(".", 1)
        base = scores[role][s][col]
        if det.kind == "ratio":
            bg_role, bg_col = det.extra["background"].split(".", 1)
            out[s] = base - scores[bg_role][s][bg_col]
        elif det.kind == "complexity":
            out[s] = base / math.log(2) + scores[role][s]["png_bits"]
        else:  # typicality
            out[s] = M.typicality_scores(base, entropy_of(role, col), det.batch,
                                         generator=np.random.default_rng([seed, zlib_crc(det.name + s)]))
    return out


def zlib_crc(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


def detector_cost(det, scores: dict) -> dict:
    """Seconds per example (mean over every scored row of its passes) and network evaluations of ``det``."""
    sec = 0.0
    for role, col in det.passes:
        vals = np.concatenate([t[col] for t in scores[role].values()])
        sec += float(np.mean(vals))
    return {"sec_per_example": sec, "nfe": det.nfe, "vjp": det.vjp,
            "batch": det.batch if det.kind == "typicality" else 1}


def evaluate_all(dets: list, scores: dict, budget: OODBudget, sets: list) -> tuple[dict, dict]:
    """({detector: {set: metrics}}, {detector: {set: scores}}) with the metrics of every OOD set against the
    in-distribution set."""
    def entropy_of(role, col):
        return float(-np.mean(scores[role][S.REFERENCE_SET][col]))

    table, all_scores = {}, {}
    for i, det in enumerate(dets):
        per_set = detector_scores(det, scores, entropy_of, [S.IN_SET] + sets, budget.seed)
        all_scores[det.name] = per_set
        table[det.name] = {s: M.evaluate(per_set[S.IN_SET], per_set[s], resamples=budget.resamples,
                                         confidence=budget.confidence, seed=budget.seed * 1000 + i)
                           for s in sets}
    return table, all_scores


def calibrate(dets: list, table: dict, all_scores: dict, configs: dict, uris: dict, budget: OODBudget) -> dict:
    """Per model role (but the background): the best *servable* per-example detector (one the served model computes
    through ``recipe.log_prob`` with options) by mean AUROC over the OOD sets, and its threshold at
    ``budget.fpr_in`` of the in-distribution scores (:func:`raymanifold.ood.metrics.threshold_at_fpr`)."""
    out = {}
    for role, cfg in configs.items():
        if role in D.BACKGROUND.values():
            continue
        mine = [d for d in dets if d.role == role and d.per_example and d.kind != "ratio"]
        if not mine:
            continue
        mean = {d.name: float(np.mean([v["auroc"] for v in table[d.name].values()])) for d in mine}
        best_any = max(mine, key=lambda d: mean[d.name])
        servable = [d for d in mine if d.options is not None and d.kind in ("density", "latent", "coarse")]
        entry = {"role": role, "family": cfg.family, "uri": uris[role],
                 "best_detector": best_any.name, "best_detector_mean_auroc": mean[best_any.name]}
        if servable:
            best = max(servable, key=lambda d: mean[d.name])
            thr = M.threshold_at_fpr(all_scores[best.name][S.IN_SET], budget.fpr_in)
            flagged = {s: float(np.mean(np.nan_to_num(v, nan=-np.inf) < thr))
                       for s, v in all_scores[best.name].items()}
            entry.update({"detector": best.name, "label": best.label, "options": best.options, "unit": best.unit,
                          "threshold": thr, "fpr_in": budget.fpr_in, "mean_auroc": mean[best.name],
                          "off_manifold_rate": flagged})
        else:
            entry["detector"] = None
            entry["reason"] = "no detector of this model is computed by its recipe's log_prob"
        out[role] = entry
    return out


def run(p: Plan, *, train: Callable, load_model: Callable, score: Callable, out_dir: Path,
        say: Callable = print, reuse: Optional[dict] = None) -> dict:
    """Train or load the models, build the sets, score every role on Ray Data (``score(role, uri, dataset,
    opts, folder) -> ScoreResult``), evaluate; writes Parquet scores under ``out_dir/scores``; returns the results.
    ``reuse`` ({role: {"folder", "job"}}, :func:`reusable_scores`): roles whose earlier scores are copied instead
    (their row counts per set are checked against the sets built here)."""
    import shutil

    import torch

    b = p.budget
    t_study = time.perf_counter()
    info, uris, trained = {}, dict(p.given), {}
    for role in p.roles:
        if role in uris:
            info[f"{role}_model"] = uris[role]
            continue
        trained[role] = train_role(role, p.configs[role], train=train, say=say)
        uris[role] = trained[role]["uri"]
        info[f"{role}_model"] = uris[role]
        info[f"{role}_train_wall_s"] = trained[role]["train_wall_s"]
    say(f"building sets: {S.IN_SET}, {S.REFERENCE_SET}, {', '.join(b.sets)} (n = {b.n})")
    t0 = time.perf_counter()
    classifier = None
    if "patch_attacked" in b.sets:
        clf, _, _ = load_model(uris["vae_classifier"])
        clf.eval()
        for q in clf.parameters():
            q.requires_grad_(False)
        classifier = clf.classify_logits
    sets, notes = S.build_sets(b.sets, n=b.n, n_reference=b.n_reference, seed=b.seed, blur_sigma=b.blur_sigma,
                               classifier=classifier, attack=b.attack())
    sets_wall = time.perf_counter() - t0
    dataset, names = concat_sets(sets)
    scores, jobs = {}, {}
    t_scoring = time.perf_counter()
    for role in p.roles:
        opts = D.role_options(role, p.configs[role], p.detectors)
        folder = out_dir / "scores" / role
        if reuse and role in reuse:
            say(f"{role}: reusing the scores of {reuse[role]['folder']}")
            shutil.copytree(reuse[role]["folder"], folder)
            scores[role] = read_role_scores(str(folder), names)
            bad = [k for k in names if len(scores[role][k]["id"]) != len(sets[k])]
            if bad:
                raise RuntimeError(f"--scores-from: {reuse[role]['folder']} has other row counts for {bad}")
            jobs[role] = {**reuse[role]["job"], "reused_from": reuse[role]["folder"]}
            continue
        say(f"scoring {role} ({p.configs[role].family}) on {len(dataset)} rows")
        t0 = time.perf_counter()
        res = score(role, uris[role], dataset, opts, folder)
        jobs[role] = {"wall_s": round(res.wall_s, 2), "job_s": round(time.perf_counter() - t0, 2),
                      "rows": res.rows_out, "compute": res.compute, "compute_reason": res.compute_reason,
                      "workers": res.actors, "nodes": len(res.nodes)}
        if not res.rows_out == res.unique_ids == res.rows_in:
            raise RuntimeError(f"scoring {role}: {res.rows_in} rows in, {res.rows_out} out, {res.unique_ids} unique")
        scores[role] = read_role_scores(str(folder), names)
    scoring_wall = time.perf_counter() - t_scoring
    if reuse:
        info["scoring_wall_s_reused"] = round(sum(float(jobs[r].get("job_s", jobs[r].get("wall_s", 0.0)))
                                                  for r in reuse if r in jobs), 1)
    t0 = time.perf_counter()
    table, all_scores = evaluate_all(p.detectors, scores, b, list(b.sets))
    costs = {d.name: detector_cost(d, scores) for d in p.detectors}
    calib = calibrate(p.detectors, table, all_scores, p.configs, uris, b)
    metrics_wall = time.perf_counter() - t0
    info.update({"sets_wall_s": round(sets_wall, 1), "scoring_wall_s": round(scoring_wall, 1),
                 "metrics_wall_s": round(metrics_wall, 1), "torch_threads": torch.get_num_threads()})
    info["study_wall_s"] = round(time.perf_counter() - t_study, 1)
    return {"budget": dataclasses.asdict(b), "info": info, "models": {r: {"uri": uris[r], "family": p.configs[r].family,
                                                                       "config": p.configs[r].name,
                                                                       **({k: v for k, v in trained[r].items()
                                                                           if k != "uri"} if r in trained else {})}
                                                                   for r in p.roles},
            "sets": {k: {"n": int(len(v)), "description": S.DESCRIPTIONS[k], **notes.get(k, {})}
                     for k, v in sets.items()},
            "detectors": [dataclasses.asdict(d) for d in p.detectors], "table": table, "costs": costs,
            "jobs": jobs, "calibration": calib, "scores": all_scores,
            "images": {k: v[np.linspace(0, len(v) - 1, 8).astype(int)].numpy() for k, v in sets.items()}}
