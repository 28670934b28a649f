"""``raymanifold list``: what there is to run, and where.

    raymanifold list                  # every table below
    raymanifold list configs          # jobs/configs/{train,sweep,study,cluster}: kind, family, runs here or needs a cluster, what it does
    raymanifold list datasets         # data sets by name: points/images, shape, bundled or read from data.root
    raymanifold list families         # model families: what each models, its operations, configs, doc page
    raymanifold list experiments      # MLflow experiments of the tracking store, with run counts
    raymanifold list studies          # `raymanifold study <name>` commands

A config "needs a cluster" when its data set is read from disk (``data.root``; nothing is downloaded) or it asks
for GPUs (``ray.use_gpu: true``, ``ray.gpus_per_worker``); everything else runs on this machine as it is.
"""
from __future__ import annotations

from pathlib import Path

from raymanifold.commands import REPO_ROOT, UsageError

WHAT = ("configs", "datasets", "families", "experiments", "studies")
CONFIG_ROOT = REPO_ROOT / "jobs" / "configs"

#: family -> (what it models, doc page); `tests/test_listing.py` checks every family has a line
FAMILY_INFO = {
    "diffusion": ("DDPM: log p(x) by Eq. 15 with the large-step backward process (Def. 2.1), samplers with NFE",
                  "docs/diffusion.md"),
    "flow": ("hierarchical autoencoder + normalising flow (Fig. 1): per-level log p, sampling, super-resolution",
             "docs/flows.md"),
    "glow": ("multi-scale Glow: the flow baseline (bits/dim)", "docs/flows.md"),
    "gridvae": ("VAE with a grid mixture prior (Eqs. 24-27), unsupervised, guided or partially guided",
                "docs/gridvae.md"),
    "vae_classifier": ("VAE-classifier (Eq. 21) with ELBO purification (Eq. 22) against adversarial attacks",
                       "docs/adversarial.md"),
    "daed": ("a frozen DDPM + a one-step denoiser replacing its last steps (DAED)", "docs/adversarial.md"),
    "recognition": ("contrastive recognition manifold (SupCon / InfoNCE) for the attribute-KL study (Sec. 4.3)",
                    "docs/recognition.md"),
    "diffsiam": ("DiffSiam: SimSiam + a frozen DDPM + a compensating decoder (thesis 004)", "docs/diffsiam.md"),
}


def register(sub, study_sub):
    p = sub.add_parser("list", help="list configs, data sets, families, MLflow experiments or studies",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", default=None, choices=WHAT, help="one table (default: all)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store for `experiments` (default: "
                                                        "MLFLOW_TRACKING_URI, else <output root>/mlflow.db)")
    p.set_defaults(func=cmd_list, study_sub=study_sub)


# ----------------------------------------------------------------------------- tables
def table(headers, rows, width: int = 0) -> str:
    """Plain aligned columns; the last column is cut to ``width`` characters when given."""
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    if width:
        rows = [r[:-1] + [r[-1] if len(r[-1]) <= width else r[-1][:width - 3] + "..."] for r in rows]
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * x for x in w])] + [line(r) for r in rows])


def _first_comment(path: Path) -> str:
    """The header line of a config (``# <stem>: what it trains; how long here``) without the stem."""
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#"):
            s = s.lstrip("#").strip()
            return s[len(path.stem) + 2:] if s.startswith(f"{path.stem}: ") else s
        if s:
            return ""
    return ""


def _read(path: Path) -> dict:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return raw if isinstance(raw, dict) else {}


def config_kind(raw: dict) -> str:
    """``train`` (a run config), ``sweep`` (``kind:`` train/eval), ``study`` (a study file naming a ``config:``)."""
    if "kind" in raw:
        return "sweep"
    if "family" in raw:
        return "train"
    return "study"


def needs(raw: dict, seen=None) -> list[str]:
    """What a config needs beyond this machine: ``data on disk`` and/or ``GPU`` ([] = runs here); a sweep or study
    file needs what its base config needs."""
    from raymanifold import data as rdata
    from raymanifold.commands import find_config

    seen = set() if seen is None else seen
    kind = config_kind(raw)
    if kind != "train":
        ref = raw.get("base") or raw.get("config")
        if not ref or ref in seen:
            return []
        seen.add(ref)
        p = find_config(ref)
        return needs(_read(p), seen) if p.is_file() else []
    out = []
    name = (raw.get("data") or {}).get("name", "swiss_roll")
    try:
        if not rdata.describe(name)["bundled"]:
            out.append("data on disk")
    except rdata.DataError:
        out.append(f"unknown data set {name!r}")
    ray_ = {**(raw.get("train") or {}), **(raw.get("ray") or {})}  # old train.use_gpu spelling too
    if ray_.get("use_gpu") is True or float(ray_.get("gpus_per_worker") or 0) > 0:
        out.append("GPU")
    return out


def family_of(raw: dict, seen=None) -> str:
    from raymanifold.commands import find_config

    if config_kind(raw) == "train":
        return str(raw.get("family", ""))
    ref = raw.get("base") or raw.get("config")
    seen = set() if seen is None else seen
    if not ref or ref in seen:
        return ""
    seen.add(ref)
    p = find_config(ref)
    return family_of(_read(p), seen) if p.is_file() else ""


def config_rows(root: Path = CONFIG_ROOT) -> list[dict]:
    """One row per YAML file under ``root``: path (from the repository root), kind, family, where, what."""
    rows = []
    for p in sorted(root.rglob("*.yaml")):
        raw = _read(p)
        need = needs(raw)
        rel = p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p
        rows.append({"config": str(rel), "kind": config_kind(raw), "family": family_of(raw),
                     "where": "cluster: " + ", ".join(need) if need else "here", "what": _first_comment(p)})
    return rows


def list_configs() -> str:
    rows = config_rows()
    return table(["config", "kind", "family", "runs", "what"],
                 [[r["config"], r["kind"], r["family"], r["where"], r["what"]] for r in rows], width=150)


def list_datasets() -> str:
    from raymanifold import data as rdata

    rows = []
    for name in rdata.available():
        d = rdata.describe(name)
        try:
            shape = "x".join(map(str, rdata.shape_of(name)))
        except rdata.DataError:
            shape = "from data.image_size"
        rows.append([name, d["kind"], shape, "bundled" if d["bundled"] else "on disk (data.root)", d["doc"]])
    return table(["data set", "kind", "shape", "source", "what"], rows, width=80)


def list_families() -> str:
    from raymanifold.recipes import available_families, get_recipe

    counts: dict = {}
    for r in config_rows():
        counts[r["family"]] = counts.get(r["family"], 0) + (r["kind"] == "train")
    rows = []
    for fam in available_families():
        what, doc = FAMILY_INFO.get(fam, ("", ""))
        ops = ", ".join(get_recipe(fam).operations()) or "-"
        rows.append([fam, ops, counts.get(fam, 0), doc, what])
    return table(["family", "operations", "configs", "doc", "what it models"], rows)


def list_experiments(tracking_uri=None) -> str:
    import os

    from raymanifold import tracking

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_uri()
    exps = [e for e in tracking.experiment_counts(uri) if e["runs"] or e["experiment"] != "Default"]
    if not exps:
        return f"no experiments in {uri} yet (train something: `make demo`)"
    body = table(["experiment", "runs", "last run (UTC)"], [[e["experiment"], e["runs"], e["last_run"]] for e in exps])
    return f"{body}\n(store: {uri}; a table of one: raymanifold compare --experiment NAME)"


def list_studies(study_sub) -> str:
    helps = {a.dest: a.help for a in study_sub._choices_actions}
    return table(["study", "what"], [[f"raymanifold study {n}", helps.get(n, "")] for n in sorted(study_sub.choices)],
                 width=110)


def cmd_list(args) -> int:
    what = [args.what] if args.what else list(WHAT)
    out = []
    for w in what:
        if w == "configs":
            text = list_configs()
        elif w == "datasets":
            text = list_datasets()
        elif w == "families":
            text = list_families()
        elif w == "experiments":
            text = list_experiments(args.tracking_uri)
        elif w == "studies":
            text = list_studies(args.study_sub)
        else:  # argparse's choices already refuse it
            raise UsageError(f"what: {w!r} is not allowed; choose one of {list(WHAT)}")
        out.append(f"## {w}\n\n{text}" if len(what) > 1 else text)
    print("\n\n".join(out))
    return 0
