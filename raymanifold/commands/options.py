"""One grammar for the flags that studies share (docs/architecture.md, "Adding a study").

Every study command registers its shared flags with :func:`add_options` and reads them back with
:func:`parse_options`, so that each flag means the same thing on every command that has it:

``--model ROLE=URI`` (repeatable; a single-role command also takes a bare URI), ``--no-ray``, ``--threads``
(default 1; 0 = torch's default), ``--num-cpus``, ``--address``, ``--tracking-uri``, ``--set``, ``--fresh``,
``--out``, ``--seed`` and ``--dry-run``. Old spellings (``--model-linf URI``, ``--inprocess`` ...) keep working for
one release: they are hidden from ``--help`` and print one ``deprecated:`` line on stderr, as the config migration
does (:func:`raymanifold.config.moved_config`).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Mapping, Optional

from raymanifold.commands import UsageError

_ROLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

HELP = {
    "no_ray": "train in this process (raymanifold.training) instead of on Ray Train; still tracked in MLflow",
    "threads": "torch threads of this process for the study's own computations (0 = all cores, as torch chooses); "
               "training uses the config's ray.cpus_per_worker",
    "num_cpus": "CPUs of an embedded Ray (0 = all of the machine); sets ray.num_cpus of every config trained here",
    "address": "Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray); sets ray.address of every "
               "config trained here",
    "tracking_uri": "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<output root>/mlflow.db)",
    "set": "override a value of the configs this command trains, e.g. --set train.steps=100 (repeatable)",
    "fresh": "discard earlier checkpoints of the runs this command trains instead of resuming them (a resume is "
             "refused when the config changed: raymanifold.resume)",
    "dry_run": "print what would be trained (each config, its steps, backend) and exit before any work",
    "seed": "seed of the study's own random draws (test subsets, attacks, noise; training uses train.seed)",
}


@dataclass(frozen=True)
class Role:
    """A model a study uses: the families it accepts and the config trained when no ``--model ROLE=URI`` is given
    (None: the role must be given)."""
    family: object                      # str or tuple of str
    config: Optional[str] = None
    help: str = ""

    @property
    def families(self) -> tuple:
        return (self.family,) if isinstance(self.family, str) else tuple(self.family)


@dataclass(frozen=True)
class Deprecated:
    """An old flag: ``--model-linf URI`` -> ``--model adv_training_linf=URI`` (``role``), or an old spelling of a
    shared flag (``--inprocess`` -> ``--no-ray``: ``new``); ``dead``: accepted, has no effect."""
    flag: str
    role: Optional[str] = None
    new: Optional[str] = None
    dead: bool = False
    switch: bool = False                # a flag without a value (--inprocess)


@dataclass(frozen=True)
class StudyOptions:
    """The parsed shared flags; nothing else reads ``args`` for them."""
    models: Mapping[str, str] = field(default_factory=dict)   # role -> URI (path, folder, runs:/<id>, models:/...)
    backend: str = "ray"                                        # "local" with --no-ray
    threads: int = 1
    num_cpus: int = 0
    address: Optional[str] = None
    tracking_uri: Optional[str] = None
    sets: tuple = ()                    # --set items + ray.address / ray.num_cpus from the flags above
    fresh: bool = False
    out: Optional[str] = None
    seed: int = 0
    dry_run: bool = False

    @property
    def no_ray(self) -> bool:
        return self.backend == "local"

    @property
    def where(self) -> str:
        return "in-process" if self.no_ray else "Ray Train"


def roles_help(roles: Mapping[str, Role], bare: bool) -> str:
    parts = []
    for name, r in roles.items():
        default = f"default: train {r.config}" if r.config else "must be given"
        parts.append(f"{name} ({'/'.join(r.families)}; {default}{'; ' + r.help if r.help else ''})")
    return ("a trained model for a role, ROLE=URI (checkpoint path/folder or runs:/<id>; repeatable)"
            + (" or a bare URI" if bare else "") + ". Roles: " + ", ".join(parts))


def add_options(p, *, roles: Optional[Mapping[str, Role]] = None, out: Optional[str] = None, trains: bool = True,
                fresh: bool = True, no_ray: bool = True, seed: bool = True, sets: bool = True, ray: bool = True,
                threads: int = 1, dry_run: Optional[bool] = None, bare: Optional[bool] = None,
                deprecated: tuple = (), set_help: Optional[str] = None, model_required: bool = False) -> None:
    """Register the shared flags on sub-parser ``p``. ``trains``: the command trains models (``--set``,
    ``--no-ray``, ``--fresh``, ``--dry-run``, ``--num-cpus``); ``ray``: it uses Ray (``--address``)."""
    if roles:
        bare = len(roles) == 1 if bare is None else bare
        p.add_argument("--model", action="append", default=[], metavar="ROLE=URI" if not bare else "[ROLE=]URI",
                       required=model_required, help=roles_help(roles, bare))
    if trains and sets:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help or HELP["set"])
    if trains and no_ray:
        p.add_argument("--no-ray", action="store_true", help=HELP["no_ray"])
    if trains and fresh:
        p.add_argument("--fresh", action="store_true", help=HELP["fresh"])
    if trains and (dry_run is None or dry_run):
        p.add_argument("--dry-run", action="store_true", help=HELP["dry_run"])
    p.add_argument("--threads", type=int, default=threads, help=HELP["threads"])
    if trains and ray:
        p.add_argument("--num-cpus", type=int, default=0, help=HELP["num_cpus"])
    if ray:
        p.add_argument("--address", default=None, help=HELP["address"])
    p.add_argument("--tracking-uri", default=None, help=HELP["tracking_uri"])
    if seed:
        p.add_argument("--seed", type=int, default=0, help=HELP["seed"])
    if out is not None:
        p.add_argument("--out", default=out, help="report folder (written complete or not at all)")
    for d in deprecated:
        if d.switch:
            kw = {"action": "store_true"}
        elif d.flag == "--set":
            kw = {"action": "append", "default": []}
        else:
            kw = {"default": None}
        p.add_argument(d.flag, dest=_dest(d.flag), help=argparse.SUPPRESS, **kw)


def _dest(flag: str) -> str:
    return "deprecated_" + flag.lstrip("-").replace("-", "_")


def _say(text: str) -> None:
    print(f"deprecated: {text} (the old spelling works until the next release)", file=sys.stderr, flush=True)


def parse_models(items, roles: Mapping[str, Role], *, bare: Optional[bool] = None,
                 bare_role: Optional[str] = None) -> dict:
    """``["ddpm=runs:/ab", "runs:/cd"]`` -> ``{"ddpm": "runs:/ab", <the only role>: "runs:/cd"}``; a UsageError
    names the flag, the role given and the roles allowed."""
    out = {}
    bare = (len(roles) == 1) if bare is None else bare
    for item in items or []:
        name, sep, uri = str(item).partition("=")
        if sep and _ROLE.match(name) and not os.path.exists(item):
            if name not in roles:
                raise UsageError(f"--model {item}: unknown role {name!r}; roles: {list(roles)}")
            if not uri:
                raise UsageError(f"--model {item}: expected ROLE=URI, the URI is empty")
        elif bare or bare_role:
            name, uri = (bare_role or next(iter(roles))), str(item)
            if bare_role and len(roles) > 1 and not bare:
                _say(f"--model URI is now --model {bare_role}=URI")
        else:
            raise UsageError(f"--model {item}: expected ROLE=URI with ROLE in {list(roles)}")
        if name in out and out[name] != uri:
            raise UsageError(f"--model {name}: given twice ({out[name]}, {uri})")
        out[name] = uri
    return out


def parse_options(args, *, roles: Optional[Mapping[str, Role]] = None, deprecated: tuple = (),
                  bare_role: Optional[str] = None, bare: Optional[bool] = None) -> StudyOptions:
    """Read the shared flags of ``args`` (registered by :func:`add_options`), map the old spellings (one
    ``deprecated:`` line each) and check them, before any work. Sets the torch threads and exports
    ``--tracking-uri`` for child processes. A bare ``--model URI`` names ``bare_role`` (the only role by default);
    with several roles it is the old spelling (one deprecation line) unless ``bare``."""
    items = list(getattr(args, "model", None) or [])
    if isinstance(getattr(args, "model", None), str):
        items = [args.model]
    models = parse_models(items, roles or {}, bare=bare, bare_role=bare_role) if roles else {}
    no_ray = bool(getattr(args, "no_ray", False))
    for d in deprecated:
        value = getattr(args, _dest(d.flag), None)
        if value in (None, False, []):
            continue
        if d.dead:
            _say(f"{d.flag} has no effect on this command and is no longer listed")
        elif d.role:
            _say(f"{d.flag} URI is now --model {d.role}=URI")
            if d.role in models and models[d.role] != value:
                raise UsageError(f"--model {d.role}: given twice ({models[d.role]}, {d.flag} {value})")
            models[d.role] = value
        elif d.new == "--no-ray":
            _say(f"{d.flag} is now --no-ray")
            no_ray = True
    threads = getattr(args, "threads", 1)
    threads = 0 if threads is None else threads
    if threads < 0:
        raise UsageError(f"--threads: must be >= 0, got {threads}")
    num_cpus = getattr(args, "num_cpus", 0) or 0
    if num_cpus < 0:
        raise UsageError(f"--num-cpus: must be >= 0, got {num_cpus}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    tracking_uri = getattr(args, "tracking_uri", None)
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    sets = list(getattr(args, "set", None) or [])
    address = getattr(args, "address", None)
    if address:
        sets.append(f"ray.address={address}")
    if num_cpus:
        sets.append(f"ray.num_cpus={num_cpus}")
    return StudyOptions(models=models, backend="local" if no_ray else "ray", threads=threads, num_cpus=num_cpus,
                        address=address, tracking_uri=tracking_uri, sets=tuple(sets),
                        fresh=bool(getattr(args, "fresh", False)), out=getattr(args, "out", None),
                        seed=getattr(args, "seed", 0) or 0, dry_run=bool(getattr(args, "dry_run", False)))
