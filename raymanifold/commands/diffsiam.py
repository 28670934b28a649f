"""``raymanifold study diffsiam-probes`` and ``raymanifold study diffsiam-edits`` (thesis 004, Ch. 4).

Argument parsing only. ``diffsiam-probes`` trains every arm (variant or control) for every seed from one
config through the run service (Ray Train + MLflow; in-process with ``--no-ray``) and probes the encoders'
backbone features and z (:func:`raymanifold.ssl.study.probes_study`). ``diffsiam-edits`` runs Algorithms 2-3
on a trained model (:func:`raymanifold.ssl.edits_study.edits_study`). Reports go to ``reports/<name>/`` (atomically) and to an MLflow
run in experiment ``diffsiam``.
"""
from __future__ import annotations

import contextlib

from raymanifold.commands import UsageError, find_config
from raymanifold.commands.options import Deprecated, Role, add_options, parse_options

PROBE_ROLES = {"ddpm": Role("diffusion", "the config's model.ddpm", help="the frozen DDPM of every arm")}
PROBE_OLD = (Deprecated("--ddpm", role="ddpm"),)

EDIT_ROLES = {"diffsiam": Role("diffsiam", help="the trained DiffSiam model edited")}
#: the edits study trains nothing and runs in this process: these flags never had an effect
EDIT_OLD = (Deprecated("--no-ray", dead=True, switch=True), Deprecated("--set", dead=True),
            Deprecated("--address", dead=True))


def register(sub, study_sub):
    p = study_sub.add_parser("diffsiam-probes", help="SimSiam vs DiffSiam arms and controls at equal budget: linear "
                                                     "and few-shot probes of backbone features and z over seeds "
                                                     "(Tables 4.1-4.2 in miniature)")
    p.add_argument("--config", default="jobs/configs/train/diffsiam_shapes.yaml")
    p.add_argument("--arms", "--variants", dest="arms", default="simsiam,hierarchical,simsiam+fullz,hierarchical+additive",
                   help="comma-separated arms: simsiam, hierarchical, sequential, detach, pdae, simsiam+fullz "
                        "(hierarchical with segments 1), hierarchical+spread (k_stride = --spread-stride); suffixes "
                        "+additive / +modulation set the decoder conditioning of that arm, +sgd the published "
                        "SimSiam optimiser recipe (SGD 0.9, lr 0.05 x batch / 256, wd 1e-4, cosine)")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6", help="training seeds (comma-separated; default 7 seeds)")
    # defaults: the quick setting (docs/diffsiam.md gives its wall time); the reported tables state their budget
    p.add_argument("--steps", type=int, default=60,
                   help="training steps of every run (default 60, a quick check; docs/diffsiam.md states the "
                        "budget of each reported table)")
    p.add_argument("--episodes", type=int, default=100, help="few-shot episodes per set, shot and seed (default 100)")
    p.add_argument("--n-eval", type=int, default=1000, help="examples per probe set (default 1000)")
    p.add_argument("--spread-stride", type=int, default=50, help="k_stride of the hierarchical+spread arm (default 50)")
    p.add_argument("--grad-batches", type=int, default=8, help="training batches of the per-term gradient-norm "
                                                                "diagnostic at the end of each run (default 8)")
    add_options(p, roles=PROBE_ROLES, bare=False, out="reports/diffsiam_probes", fresh=False, seed=False,
                deprecated=PROBE_OLD)
    p.set_defaults(func=cmd_probes)

    p = study_sub.add_parser("diffsiam-edits", help="counterfactuals per segment group (Alg. 2) and attribute "
                                                    "manipulation (Alg. 3) on shapes, judged by a factor classifier")
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--dt", type=int, default=50, help="DDIM step (T/dt network passes per inversion or decode)")
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--d-sparse", type=int, default=8, help="non-zero weights of each attribute direction")
    add_options(p, roles=EDIT_ROLES, out="reports/diffsiam_edits", trains=False, ray=False, seed=False,
                model_required=True, deprecated=EDIT_OLD)
    p.set_defaults(func=cmd_edits)


@contextlib.contextmanager
def _usage():
    from raymanifold.ssl.study import StudyError

    try:
        yield
    except (StudyError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not out or any(v < 0 for v in out):
        raise UsageError(f"{what}: expected non-negative integers, got {text!r}")
    return out


def cmd_probes(args) -> int:
    from raymanifold import runs
    from raymanifold.commands.study import Study
    from raymanifold.config import load_config, to_dict
    from raymanifold.ssl import study as S
    from raymanifold.ssl import study_report

    opts = parse_options(args, roles=PROBE_ROLES, deprecated=PROBE_OLD)
    seeds = _ints(args.seeds, "--seeds")
    arms = [v.strip() for v in args.arms.split(",") if v.strip()]
    for name, val in (("--steps", args.steps), ("--episodes", args.episodes), ("--n-eval", args.n_eval),
                      ("--spread-stride", args.spread_stride), ("--grad-batches", args.grad_batches)):
        if val is not None and val < 1:
            raise UsageError(f"{name}: must be >= 1, got {val}")
    sets = list(opts.sets)
    base = load_config(find_config(args.config), [*sets, "model.variant=simsiam", "model.ddpm="])
    ddpm = opts.models.get("ddpm") or load_config(find_config(args.config), sets).model.ddpm or None
    st = Study("diffsiam-probes", "diffsiam", "diffsiam", opts, stages=2)
    with _usage():
        cfgs = S.arm_configs(base, arms, seeds, args.steps, ddpm, args.spread_stride)
        st.plan([(f"{a} seed {s}", c) for (a, s), c in cfgs.items()])
    st.stage(f"training and probing {len(arms)} arms x {len(seeds)} seeds "
             f"({args.steps or base.train.steps} steps each, {opts.where})")
    with _usage():
        res = S.probes_study(base, train=st.trainer("arms", fresh=True), load=runs.load, arms=arms,
                             seeds=seeds, steps=args.steps, ddpm=ddpm, episodes=args.episodes, n_eval=args.n_eval,
                             spread_stride=args.spread_stride, grad_batches=args.grad_batches)
    # the report's models: the frozen DDPM (ddpm_model) and every arm x seed run (arms_runs, loadable URIs)
    res["info"] = {**({"ddpm_model": ddpm} if ddpm else {}), **{k: v for k, v in st.info.items() if k.startswith("arms_")}}
    st.stage(f"writing {args.out}")
    st.finish(args.out, lambda d: study_report.write_probes(d, res), study_report.probes_metrics(res),
              config={"base": to_dict(base), "seeds": seeds, "arms": arms}, params=False)
    print(study_report.probes_markdown(res))
    return 0


def cmd_edits(args) -> int:
    from raymanifold.commands.study import Study
    from raymanifold.config import to_dict
    from raymanifold.ssl import edits_study as E
    from raymanifold.ssl import study_report

    opts = parse_options(args, roles=EDIT_ROLES, deprecated=EDIT_OLD)
    for name, val in (("--pairs", args.pairs), ("--dt", args.dt), ("--d-sparse", args.d_sparse)):
        if val < 1:
            raise UsageError(f"{name}: must be >= 1, got {val}")
    st = Study("diffsiam-edits", "diffsiam", "diffsiam", opts, stages=2)
    uri = st.given("diffsiam")
    st.stage(f"loading {uri}; counterfactuals and manipulation")
    with _usage():
        model, cfg, recipe = st.load("diffsiam", uri, family="diffsiam", stage=False)
        res = E.edits_study(model, cfg, pairs=args.pairs, dt=args.dt, d_sparse=args.d_sparse,
                            classifier_steps=args.classifier_steps)
    st.stage(f"writing {args.out}")
    res["info"] = {"diffsiam_model": uri}
    st.finish(args.out, lambda d: study_report.write_edits(d, res), study_report.edits_metrics(res),
              config={"diffsiam_model": uri, "config": to_dict(cfg)}, params=False)
    print(study_report.edits_markdown(res))
    return 0
