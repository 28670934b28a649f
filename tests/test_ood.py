"""The OOD benchmark (issue #27): metrics against known answers, the sets, every family's detector columns, the
derived scores' refusals, the tasks/actors rule, the study's checks before any work, its report (in-process) and
its atomicity, and (Ray) the column set through Ray Data equal to the in-process scorer."""
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raymanifold import checkpoint as ckpt
from raymanifold import scoring
from raymanifold.cli import main
from raymanifold.config import config_from_dict
from raymanifold.ood import detectors as D
from raymanifold.ood import metrics as M
from raymanifold.ood import sets as S
from raymanifold.recipes import get_recipe

TRAIN = {"steps": 2, "batch_size": 16, "checkpoint_every": 1000, "log_every": 1000, "device": "cpu"}
DATA = {"name": "mnist5k_0_4", "image_size": 28}
TINY = {
    "flow": {"family": "flow", "data": DATA,
             "model": {"levels": 2, "latent_down": 1, "hidden": 4, "latent_channels": 2, "flow_depth": 1,
                       "flow_hidden": 4, "volume": "none", "eval_examples": 4}},
    "glow": {"family": "glow", "data": DATA, "model": {"levels": 2, "depth": 1, "hidden": 4, "eval_examples": 4}},
    "glow_background": {"family": "glow", "data": {**DATA, "name": "mnist5k_0_4_mutated"},
                        "model": {"levels": 2, "depth": 1, "hidden": 4, "eval_examples": 4}},
    "ddpm": {"family": "diffusion", "data": {"name": "mnist5k_0_4"},
             "model": {"net": "unet", "T": 10, "image_size": 28, "channels": 4, "channel_mult": [1, 2],
                       "attention": False, "levels": 256, "eval_dt": 5, "eval_points": 4}},
    "gridvae": {"family": "gridvae", "data": {"name": "mnist5k_0_4"},
                "model": {"latent_dim": 2, "width": 4, "stem_stride": 2, "eval_points": 100}},
    "vae_classifier": {"family": "vae_classifier", "data": {"name": "mnist5k_0_4"},
                       "model": {"latent_dim": 2, "width": 4, "eval_points": 16}},
}


def _cfg(role):
    return config_from_dict({"name": f"t_{role}", **TINY[role], "train": TRAIN})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{role: checkpoint path} of untrained tiny models of every role (28x28, digits 0-4)."""
    d = tmp_path_factory.mktemp("ood_models")
    out = {}
    for i, role in enumerate(TINY):
        torch.manual_seed(i)
        cfg = _cfg(role)
        out[role] = str(ckpt.save(d / f"{role}.pt", get_recipe(cfg.family).build(cfg).eval(), cfg, 0))
    return out


# ----------------------------------------------------------------------------- metrics: known answers
def test_exact_gaussian_log_density_gets_the_analytic_auroc():
    """In N(0, 1), out N(0, s^2), detector = log N(x; 0, 1): AUROC = P(|Z1| < s |Z2|) = (2/pi) arctan(s)."""
    rng = np.random.default_rng(0)
    s, n = 2.0, 20_000
    logpdf = lambda x: -0.5 * x ** 2 - 0.5 * math.log(2 * math.pi)
    a, b = logpdf(rng.normal(0, 1, n)), logpdf(rng.normal(0, s, n))
    want = 2 / math.pi * math.atan(s)
    got = M.evaluate(a, b, resamples=500)
    se = math.sqrt(want * (1 - want) / n)  # a generous bound on the AUROC's standard error
    assert abs(got["auroc"] - want) < 4 * se
    lo, hi = got["auroc_ci"]
    assert lo < want < hi


def test_swapping_in_and_out_gives_one_minus_auroc():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1, 1, 300).round(1), rng.normal(0, 1, 200).round(1)  # rounded: ties included
    assert M.auroc(b, a) == pytest.approx(1 - M.auroc(a, b), abs=1e-12)
    st = M.ResampleStatistics(a, b)
    ia, ib = np.random.default_rng(2).integers(0, 300, (50, 300)), np.random.default_rng(3).integers(0, 200, (50, 200))
    swapped = M.ResampleStatistics(b, a)(ib, ia)
    np.testing.assert_allclose(swapped["auroc"], 1 - st(ia, ib)["auroc"], atol=1e-12)   # resample by resample
    ci_ab = M.bootstrap_intervals(a, b, resamples=2000, seed=3)["auroc"]
    ci_ba = M.bootstrap_intervals(b, a, resamples=2000, seed=3)["auroc"]   # other draws: equal up to resampling
    assert ci_ba == pytest.approx((1 - ci_ab[1], 1 - ci_ab[0]), abs=0.01)


def test_separable_scores_have_zero_fpr95_and_unit_auroc():
    a, b = np.linspace(5, 6, 100), np.linspace(0, 1, 80)
    got = M.evaluate(a, b, resamples=200)
    assert got["fpr95"] == 0.0 and got["fpr95_ci"] == (0.0, 0.0)
    assert got["auroc"] == 1.0 and got["aupr_in"] == pytest.approx(1.0) and got["aupr_out"] == pytest.approx(1.0)
    assert M.fpr_at_tpr(b, a) == 1.0   # swapped: every OOD example passes the threshold


def test_fpr95_counts_ood_at_the_threshold():
    """20 in-distribution scores 1..20: the threshold keeping 95% (19) is 2; OOD scores 2, 2, 0, 0 -> FPR 0.5."""
    a, b = np.arange(1, 21, dtype=float), np.array([2.0, 2.0, 0.0, 0.0])
    assert M.fpr_at_tpr(a, b) == 0.5
    assert M.ResampleStatistics(a, b)(np.arange(20)[None], np.arange(4)[None])["fpr95"][0] == 0.5


@pytest.mark.parametrize("seed", range(4))
def test_bootstrap_intervals_contain_the_full_sample_value(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.5 * seed, 1, 150 + 40 * seed).round(1)
    b = rng.normal(0, 1.5, 120)
    got = M.evaluate(a, b, resamples=500, seed=seed)
    for k in M.METRICS:
        lo, hi = got[f"{k}_ci"]
        assert lo <= got[k] <= hi, (k, got[k], lo, hi)


def test_resampled_statistics_equal_scikit_learn_with_ties():
    rng = np.random.default_rng(5)
    for trial in range(60):
        n, m = rng.integers(1, 30, 2)
        a = rng.integers(0, 5, n).astype(float) if trial % 2 else rng.normal(size=n)
        b = rng.integers(0, 5, m).astype(float) - 1 if trial % 2 else rng.normal(size=m)
        ia, ib = rng.integers(0, n, (3, n)), rng.integers(0, m, (3, m))
        got = M.ResampleStatistics(a, b)(ia, ib)
        for r in range(3):
            want = M.point_metrics(a[ia[r]], b[ib[r]])
            for k in M.METRICS:
                assert got[k][r] == pytest.approx(want[k], abs=1e-12), (trial, k)


def test_non_finite_scores_rank_lowest():
    assert M.auroc([0.0, 1.0], [-np.inf, np.nan]) == 1.0
    assert M.auroc([-np.inf], [0.0]) == 0.0


def test_typicality_flags_a_too_likely_set_that_log_density_prefers():
    """Nalisnick et al. (2019): in d = 100, inputs near the mode of N(0, I) have higher log p than typical
    samples (log p AUROC < 0.5), but their batches are atypical, which the typicality test sees."""
    rng = np.random.default_rng(0)
    d = 100
    logp = lambda x: -0.5 * (x ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    train, a, b = (logp(rng.normal(0, s, (500, d))) for s in (1.0, 1.0, 0.3))
    assert M.auroc(a, b) < 0.05
    h = -train.mean()
    ta, tb = M.typicality_scores(a, h, 5, seed=1), M.typicality_scores(b, h, 5, seed=2)
    assert len(ta) == 100 and M.auroc(ta, tb) > 0.99
    with pytest.raises(ValueError, match="batch"):
        M.typicality_scores(a, h, 0)


def test_threshold_at_fpr_rejects_that_fraction():
    a = np.arange(1000, dtype=float)
    t = M.threshold_at_fpr(a, 0.05)
    assert np.mean(a < t) == pytest.approx(0.05, abs=1e-3)


# ----------------------------------------------------------------------------- sets and detector columns
def test_complexity_of_a_constant_image_is_below_that_of_noise():
    x = torch.cat([S.constant(4, seed=0), S.noise(4, seed=0)])
    bits = D.png_bits(x)
    assert (bits[:4].max() < bits[4:].min()).item()
    assert (bits[4:] > 784 * 6).all()   # uniform 8-bit noise hardly compresses


def test_sets_are_28x28_on_the_8bit_grid_and_seeded():
    names = [s for s in S.OOD_SETS if s != "patch_attacked"]
    sets, notes = S.build_sets(names, n=40, n_reference=30, seed=0)
    assert set(sets) == {S.IN_SET, S.REFERENCE_SET, *names}
    for k, v in sets.items():
        assert tuple(v.shape[1:]) == (1, 28, 28) and float(v.min()) >= 0 and float(v.max()) <= 1, k
        assert torch.equal(v, torch.round(v * 255) / 255), k
    assert torch.allclose(sets["inverted"], S.quantise(1 - sets[S.IN_SET]))
    c = sets["constant"].flatten(1)
    assert (c.max(1).values == c.min(1).values).all()
    again, _ = S.build_sets(names, n=40, n_reference=30, seed=0)
    assert all(torch.equal(sets[k], again[k]) for k in sets)
    assert notes["blurred"]["blur_sigma"] == 1.5
    with pytest.raises(S.SetError, match="sets: unknown OOD set"):
        S.build_sets(["noise", "mnist_c"], n=10, n_reference=10)
    with pytest.raises(S.SetError, match="patch_attacked"):
        S.build_sets(["patch_attacked"], n=10, n_reference=10)


def test_digit_subsets_select_classes_and_refuse_bad_ones():
    from raymanifold import data as rdata
    from raymanifold.data.mnist5k_classes import select_classes

    lo, hi = rdata.load("mnist5k_0_4", "test"), rdata.load("mnist5k_5_9", "test")
    assert len(lo) == len(hi) == 500
    assert set(lo.y.tolist()) == {0, 1, 2, 3, 4} and set(hi.y.tolist()) == {5, 6, 7, 8, 9}
    assert rdata.label_columns("mnist5k_0_4") == (("digit",), (5,))
    full = rdata.load("mnist5k", "test")
    assert torch.equal(lo.x, full.x[full.y < 5])          # the same held-out digits, order kept
    with pytest.raises(rdata.DataError, match="classes"):
        select_classes(full, [3, 3])
    with pytest.raises(rdata.DataError, match=r"do not occur"):
        select_classes(lo, [7])


def test_patch_attacked_set_changes_only_the_patch(tiny):
    model, _, _ = ckpt.load_model(tiny["vae_classifier"])
    x = S.in_distribution(6)
    y = torch.arange(6) % 5
    out, info = S.patch_attacked(x, y, model.classify_logits, S.PatchAttack(iterations=2),
                                 torch.Generator().manual_seed(0))
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., 4:12, 6:22] = True
    assert torch.equal(out[~mask], x[~mask]) and not torch.equal(out, x)
    assert 0 <= info["attacked_accuracy"] <= 1


@pytest.mark.parametrize("role", sorted(TINY))
def test_every_family_scores_its_detector_columns(tiny, role):
    model, cfg, recipe = ckpt.load_model(tiny[role])
    x = S.in_distribution(5)
    cols = D.score_columns(model, x, cfg, generator=torch.Generator().manual_seed(0), dts=(1, 5))
    dets = D.column_detectors(role, cfg, (1, 5))
    for d in dets:
        assert d.column in cols and cols[d.column].shape == (5,) and torch.isfinite(cols[d.column]).all(), d.name
        assert any(k == s for _, s in d.passes for k in cols), d.name   # its timing column exists
    assert torch.equal(cols["log_prob"], cols[{"flow": "log_px_1", "glow": "log_px", "ddpm": "eq15_dt1",
                                               "gridvae": "elbo", "vae_classifier": "elbo",
                                               "glow_background": "log_px"}[role]])
    assert (cols["png_bits"] > 0).all()
    if role == "vae_classifier":
        assert ((cols["max_softmax"] >= 1 / 5 - 1e-6) & (cols["max_softmax"] <= 1)).all()


def test_servable_detectors_are_the_recipes_log_prob(tiny):
    """A detector with ``options`` must equal ``recipe.log_prob(**options)``: the web page's threshold is
    compared with that call."""
    for role in ("flow", "glow"):
        model, cfg, recipe = ckpt.load_model(tiny[role])
        x = S.in_distribution(4)
        cols = D.score_columns(model, x, cfg)
        for d in D.column_detectors(role, cfg):
            if d.options is not None:
                want = recipe.log_prob(model, x, cfg, **d.options).double()
                torch.testing.assert_close(cols[d.column], want, rtol=0, atol=1e-9)
    model, cfg, recipe = ckpt.load_model(tiny["ddpm"])
    x = S.in_distribution(3)
    g = torch.Generator().manual_seed(7)
    cols = D.score_columns(model, x, cfg, generator=g, dts=(5,))
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(7)))
    want = recipe.log_prob(model, x, cfg, dt=5, generator=D._sub_generator(seed, "dt5"))
    torch.testing.assert_close(cols["eq15_dt5"], want.double(), rtol=0, atol=1e-9)


def _tiny_flow_path(cfg):
    import tempfile

    return ckpt.save(Path(tempfile.mkdtemp()) / "flow.pt", get_recipe("flow").build(cfg).eval(), cfg, 0)


def test_derived_detectors_refuse_what_they_cannot_use():
    cfgs = {r: _cfg(r) for r in TINY}
    names = D.default_detector_names(cfgs, (1, 5))
    assert "ratio:glow.log_px" in names and "complexity:ddpm.eq15_dt1" in names and "typicality:gridvae.elbo" in names
    assert "complexity:ddpm.eq15_dt5" not in names and not any(n.startswith("glow_background") for n in names)
    dets = D.resolve(names, cfgs, (1, 5))
    assert D.roles_needed(dets) == set(TINY)
    assert D.role_options("flow", cfgs["flow"], dets) == {"flow_volume": True}
    few = D.resolve(["flow.log_pz_2", "typicality:ddpm.eq15_dt5"], cfgs, (1, 5))
    assert D.role_options("flow", cfgs["flow"], few) == {"flow_volume": False}   # no log p(x): no volume pass
    assert D.role_options("ddpm", cfgs["ddpm"], few) == {"dts": (5,)}
    model, cfg, _ = ckpt.load_model(str(_tiny_flow_path(cfgs["flow"])))
    cols = D.score_columns(model, S.in_distribution(2), cfg, flow_volume=False)
    assert "log_pz_2" in cols and "log_px_1" not in cols and "log_prob" not in cols and "sec_flow_volume" not in cols
    for bad, fragment in [("complexity:vae_classifier.max_softmax", "class probability"),
                          ("typicality:flow.log_pz_1", "latent density"),
                          ("complexity:flow.log_px_2", "density of a coarser image"),
                          ("ratio:ddpm.eq15_dt1", "background model"),
                          ("foo.bar", "names no model role"),
                          ("glow.log_pz", "not a detector of the glow model"),
                          ("median:glow.log_px", "unknown kind")]:
        with pytest.raises(D.DetectorError, match=fragment):
            D.resolve([bad], cfgs, (1, 5))
    with pytest.raises(D.DetectorError, match="not in the study"):
        D.resolve(["ddpm.eq15_dt1"], {"glow": cfgs["glow"]})
    with pytest.raises(ValueError, match="no OOD detectors"):
        D.score_columns(None, torch.zeros(1, 1, 28, 28), config_from_dict({"family": "recognition",
                                                                           "data": {"name": "shapes"}}))


# ----------------------------------------------------------------------------- scoring: column sets and the rule
def test_the_scorer_computes_a_column_set_and_prepare_checks_it(tiny):
    spec = scoring.DataSpec("dataset", "ood-test")
    ds = rdata_subset(12)
    with pytest.raises(Exception, match="has no log_prob"):
        scoring.prepare(tiny["gridvae"], spec, {}, dataset=ds)       # no log_prob without a column set
    prep = scoring.prepare(tiny["gridvae"], spec, {}, columns="ood", dataset=ds, time_rows=4)
    assert prep.columns == "ood" and prep.sec_per_row > 0
    with pytest.raises(Exception, match="--dt: family 'gridvae' column set 'ood' takes no 'dt'"):
        scoring.prepare(tiny["gridvae"], spec, {"dt": 5}, columns="ood", dataset=ds)
    with pytest.raises(Exception, match="--columns"):
        scoring.prepare(tiny["gridvae"], spec, {}, columns="nope", dataset=ds)
    prep = scoring.prepare(tiny["ddpm"], spec, {"dts": (2,)}, columns="ood", dataset=ds)
    sc = scoring.Scorer(prep.model_bytes, prep.source, prep.opts, seed=0, columns="ood")
    out = sc(scoring.dataset_rows(ds, 0, 12))
    assert np.array_equal(out["log_prob"], out["eq15_dt2"]) and "sec_eq15_dt2" in out
    again = sc(scoring.dataset_rows(ds, 0, 12))
    assert np.array_equal(out["eq15_dt2"], again["eq15_dt2"])          # a batch's noise is fixed by its first id


def rdata_subset(n):
    from raymanifold.data import ArrayDataset

    x = S.in_distribution(n)
    return ArrayDataset(x, torch.zeros(n, dtype=torch.int64), {"kind": "image"})


def test_compute_rule_picks_tasks_for_small_jobs_and_actors_for_large():
    from raymanifold.scoring.compute import CROSSOVER_WORK_S, choose_compute

    assert choose_compute(1000, 1e-4, 2)[0] == "tasks"
    assert choose_compute(10 ** 6, 2 * CROSSOVER_WORK_S / 1e6, 2)[0] == "actors"
    assert choose_compute(10, None, 2)[0] == "actors"
    pick, why = choose_compute(100, CROSSOVER_WORK_S / 200, 2)
    assert pick == "tasks" and "crossover" in why


# ----------------------------------------------------------------------------- the study
def test_study_refuses_bad_input_before_any_work(tiny, tmp_path, capsys):
    out = tmp_path / "rep"
    cases = [(["--sets", "noise,mnist_c"], "--sets: unknown OOD set(s) ['mnist_c']"),
             (["--model", f"ddpm={tiny['glow']}"], "--model ddpm: a glow model; role 'ddpm' needs a diffusion"),
             (["--model", "nope=x"], "unknown role 'nope'"),
             (["--set", "data.image_size=32"], "takes 1x32x32 inputs"),
             (["--detectors", "typicality:vae_classifier.max_softmax"], "--detectors:"),
             (["--n", "3"], "--n:"), (["--dts", "0"], "--dts:"),
             (["--model", f"ddpm={tiny['ddpm']}", "--dts", "1,20"], "--dts: step sizes [20] outside 1..T = 10")]
    for extra, fragment in cases:
        rc = main(["study", "ood", "--out", str(out), *extra])
        assert rc == 2, extra
        assert fragment in capsys.readouterr().err, extra
    assert not out.exists()


def test_study_input_shape_is_checked_for_given_models(tmp_path, capsys):
    cfg = config_from_dict({"name": "g16", "family": "glow", "data": {"name": "digits", "image_size": 16},
                            "model": {"levels": 2, "depth": 1, "hidden": 4}, "train": TRAIN})
    path = ckpt.save(tmp_path / "g16.pt", get_recipe("glow").build(cfg), cfg, 0)
    rc = main(["study", "ood", "--model", f"glow={path}", "--out", str(tmp_path / "r")])
    assert rc == 2 and "--model glow: the model takes 1x16x16 inputs" in capsys.readouterr().err


def _fake_score(tmp):
    """``score`` of study.run without Ray: the same Scorer over the same batches, written as Parquet."""
    import pyarrow as pa

    from raymanifold.distributed.scoring import ScoreResult

    def score(role, uri, dataset, opts, folder):
        spec = scoring.DataSpec("dataset", f"ood-sets:{role}")
        prep = scoring.prepare(uri, spec, opts, columns="ood", dataset=dataset)
        sc = scoring.Scorer(prep.model_bytes, prep.source, prep.opts, columns="ood")
        rows = [sc(scoring.dataset_rows(dataset, i, min(i + 64, len(dataset)))) for i in range(0, len(dataset), 64)]
        Path(folder).mkdir(parents=True)
        table = pa.table({k: np.concatenate([r[k] for r in rows]) for k in rows[0]})
        pq.write_table(table, Path(folder) / "scores-00000.parquet")
        return ScoreResult(str(folder), len(dataset), len(dataset), len(dataset), 0.1, 1, ["local"], "tasks", "test")
    return score


def test_study_in_process_writes_the_report_and_calibration(tiny, tmp_path):
    from raymanifold import runs
    from raymanifold.config import load_config
    from raymanifold.ood import report, study

    budget = study.OODBudget.from_dict({"sets": ("noise", "constant", "blurred", "patch_attacked"), "n": 40,
                                        "n_reference": 40, "dts": (2, 5), "typicality_batch": 4,
                                        "resamples": 200, "patch_iterations": 2})
    p = study.plan(budget, dict(tiny), [], load_config=lambda path, ov: load_config(path, ov), load_model=runs.load)
    assert p.roles == list(D.ROLES) and not [r for r in p.roles if r not in p.given]
    res = study.run(p, train=None, load_model=runs.load, score=_fake_score(tmp_path), out_dir=tmp_path,
                    say=lambda s: None)
    report.write(tmp_path, res)
    for f in ("ood.md", "ood.json", "calibration.json", "heatmap_auroc.png", "histograms.png", "sets.png"):
        assert (tmp_path / f).stat().st_size > 100, f
    import json

    cal = json.loads((tmp_path / "calibration.json").read_text())
    glow = cal["models"][tiny["glow"]]
    assert glow["detector"] == "glow.log_px" and glow["options"] == {"dequantize": "center"}
    assert glow["off_manifold_rate"][S.IN_SET] == pytest.approx(0.05, abs=0.03)
    assert cal["models"][tiny["gridvae"]]["detector"] is None   # GridVAE has no log_prob to serve
    md = (tmp_path / "ood.md").read_text()
    assert "typicality:ddpm.eq15_dt2" in md and "ratio:glow.log_px" in md and "## Cost" in md
    t = res["table"]["glow.log_px"]["noise"]
    assert t["auroc_ci"][0] <= t["auroc"] <= t["auroc_ci"][1]


def test_a_study_reuses_an_earlier_reports_scores_only_for_the_same_rows(tiny, tmp_path):
    """--scores-from: a role given with the same URI, whose rows were built alike, is read back instead of scored,
    with the same metrics; other rows are refused naming the option; a role whose columns are missing is scored."""
    from raymanifold import runs
    from raymanifold.config import load_config
    from raymanifold.ood import report, study

    def plan(**kw):
        raw = {"sets": ("noise", "blurred"), "n": 20, "n_reference": 20, "dts": (2, 5), "resamples": 100,
               "detectors": ("glow.log_px", "ratio:glow.log_px", "complexity:glow.log_px"), **kw}
        return study.plan(study.OODBudget.from_dict(raw), dict(tiny), [],
                          load_config=lambda path, ov: load_config(path, ov), load_model=runs.load)
    first = tmp_path / "first"
    p = plan()
    res1 = study.run(p, train=None, load_model=runs.load, score=_fake_score(tmp_path), out_dir=first,
                     say=lambda s: None)
    report.write(first, res1)
    reuse = study.reusable_scores(first, p)
    assert sorted(reuse) == ["glow", "glow_background"]

    def no_scoring(role, *a):
        raise AssertionError(f"{role} scored again")
    res2 = study.run(p, train=None, load_model=runs.load, score=no_scoring, out_dir=tmp_path / "second",
                     say=lambda s: None, reuse=reuse)
    assert res2["table"] == res1["table"] and res2["jobs"]["glow"]["reused_from"] == reuse["glow"]["folder"]
    with pytest.raises(study.StudyError, match=r"--scores-from: .* scored other rows \(n 20"):
        study.reusable_scores(first, plan(n=30))
    p3 = plan(detectors=("glow.log_px", "vae_classifier.max_softmax"))   # vae_classifier was not scored first
    assert sorted(study.reusable_scores(first, p3)) == ["glow"]


def test_no_ray_scores_in_this_process_with_the_ray_jobs_columns(tiny, tmp_path, tracking_uri):
    """--no-ray: the study scores with the same Scorer in the driver (no Ray Data job) and writes the report."""
    import json

    out = tmp_path / "rep"
    rc = main(["study", "ood", "--no-ray", "--model", f"glow={tiny['glow']}", "--detectors", "glow.log_px",
               "--sets", "noise,constant", "--n", "20", "--n-reference", "20", "--resamples", "100",
               "--batch-size", "7", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "ood.json").read_text())
    assert res["jobs"]["glow"]["compute"] == "in-process" and res["jobs"]["glow"]["rows"] == 80
    t = pq.read_table(out / "scores" / "glow").to_pydict()
    assert sorted(t["id"]) == list(range(80)) and np.isfinite(t["log_px"]).all() and "sec_glow" in t


def test_a_failing_study_leaves_no_report(tiny, tmp_path, monkeypatch, capsys, tracking_uri):
    import raymanifold.distributed.scoring as dscoring

    def boom(*a, **k):
        raise RuntimeError("scoring failed on purpose")
    monkeypatch.setattr(dscoring, "score_to_parquet", boom)
    out = tmp_path / "rep"
    with pytest.raises(RuntimeError, match="on purpose"):
        main(["study", "ood", "--model", f"glow={tiny['glow']}", "--detectors", "glow.log_px", "--sets", "noise",
              "--n", "20", "--n-reference", "20", "--resamples", "100", "--out", str(out)])
    assert not out.exists() and not list(tmp_path.glob(".rep*"))


# ----------------------------------------------------------------------------- Ray Data
@pytest.mark.ray
def test_column_set_through_ray_data_equals_the_inprocess_scorer(local_ray, tiny, tmp_path):
    """--columns ood on Ray Data (tasks and actors) gives the in-process scorer's columns row by row."""
    from raymanifold.distributed.scoring import score_to_parquet

    ds = rdata_subset(150)
    spec = scoring.DataSpec("dataset", "ood-test")
    prep = scoring.prepare(tiny["ddpm"], spec, {"dts": (5,)}, columns="ood", dataset=ds, time_rows=8)
    sc = scoring.Scorer(prep.model_bytes, prep.source, prep.opts, columns="ood")
    ref = np.concatenate([sc(scoring.dataset_rows(ds, i, min(i + 64, 150)))["eq15_dt5"] for i in range(0, 150, 64)])
    for compute in ("tasks", "actors", "auto"):
        res = score_to_parquet(prep, spec, str(tmp_path / compute), batch_size=64, compute=compute, actors=2)
        assert res.rows_out == res.unique_ids == 150 and res.compute in ("tasks", "actors")
        t = pq.read_table(tmp_path / compute).to_pandas().sort_values("id")
        np.testing.assert_allclose(t["eq15_dt5"].to_numpy(), ref, rtol=0, atol=1e-9)
        assert "sec_png" in t and (t["png_bits"] > 0).all()
    assert res.compute == "tasks" and "crossover" in res.compute_reason   # 150 tiny rows: a small job


# ----------------------------------------------------------------------------- the web page's model card
def test_card_uses_the_benchmarks_calibrated_detector_and_threshold(tiny, tmp_path):
    import json

    from serve.card import build_card
    from serve.settings import CardSettings

    limits = {"max_examples": 64, "max_body_bytes": 8_000_000, "max_samples": 64, "max_rounds": 64,
              "max_abs": 1000.0, "timeout_s": 60.0}
    model, cfg, recipe = ckpt.load_model(tiny["flow"])
    entry = {"role": "flow", "uri": tiny["flow"], "detector": "flow.log_pz_2", "label": "flow log p(z_2)",
             "options": {"level": 2, "quantity": "log_pz"}, "threshold": -123.5, "fpr_in": 0.05,
             "mean_auroc": 0.9, "best_detector": "flow.log_pz_2"}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"fpr_in": 0.05, "models": {tiny["flow"]: entry}}))
    card = build_card(model, cfg, recipe, uri=tiny["flow"], limits=limits,
                      settings=CardSettings(reference_examples=20, ood_calibration=str(path)))
    ref = card["reference"]
    assert ref["threshold"] == -123.5 and ref["threshold_quantile"] == 0.05
    assert ref["options"] == {"level": 2, "quantity": "log_pz"} and ref["calibration"]["detector"] == "flow.log_pz_2"
    from raymanifold import data as rdata

    xs = rdata.load_split(cfg.data, "train").x
    idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))[:20]
    want = recipe.log_prob(model, xs[idx], cfg, level=2, quantity="log_pz").double().numpy()
    assert ref["quantiles"]["0.5"] == pytest.approx(np.median(want), rel=1e-6)
    other = build_card(model, cfg, recipe, uri="runs:/not-in-the-benchmark", limits=limits,
                       settings=CardSettings(reference_examples=20, ood_calibration=str(path)))["reference"]
    assert "calibration" not in other and other["options"] == {}       # not benchmarked: the training quantile
    with pytest.raises(ValueError, match="card.ood_calibration"):
        build_card(model, cfg, recipe, uri=tiny["flow"], limits=limits,
                   settings=CardSettings(reference_examples=20, ood_calibration=str(tmp_path / "missing.json")))


def test_the_report_writes_a_serve_config_whose_cards_take_the_calibration(tiny, tmp_path):
    """`serve.yaml` of the report serves every model with a servable detector (GridVAE left out), each card pointed
    at the final calibration.json; it validates as Serve's app settings and its card takes the benchmark's threshold."""
    import json

    import yaml

    from raymanifold.ood import report
    from serve.card import build_card
    from serve.settings import parse_settings

    entry = {"role": "flow", "uri": tiny["flow"], "detector": "flow.log_pz_2", "label": "flow log p(z_2)",
             "options": {"level": 2, "quantity": "log_pz"}, "threshold": -123.5, "fpr_in": 0.05,
             "mean_auroc": 0.9, "best_detector": "flow.log_pz_2"}
    grid = {"role": "gridvae", "uri": "runs:/g", "detector": None, "best_detector": "gridvae.elbo"}
    tmp, final = tmp_path / ".ood.tmp-1", tmp_path / "ood"
    tmp.mkdir()
    (tmp / "calibration.json").write_text(json.dumps({"fpr_in": 0.05, "models": {tiny["flow"]: entry, "runs:/g": grid}}))
    path = report.write_serve_config(tmp, final, tracking_uri="sqlite:////x/mlflow.db")
    cfg = yaml.safe_load(path.read_text())
    args = cfg["applications"][0]["args"]
    settings = parse_settings(args)
    assert [m.name for m in settings.models] == ["flow"] and settings.models[0].uri == tiny["flow"]
    assert settings.models[0].card.ood_calibration == str(final.resolve() / "calibration.json")
    assert args["tracking_uri"] == "sqlite:////x/mlflow.db"
    tmp.rename(final)  # the report folder in place: the card reads the benchmark's threshold
    model, mcfg, recipe = ckpt.load_model(tiny["flow"])
    limits = {"max_examples": 64, "max_body_bytes": 8_000_000, "max_samples": 64, "max_rounds": 64,
              "max_abs": 1000.0, "timeout_s": 60.0}
    card = build_card(model, mcfg, recipe, uri=tiny["flow"], limits=limits,
                      settings=settings.models[0].card.model_copy(update={"reference_examples": 20}))
    assert card["reference"]["threshold"] == -123.5 and card["reference"]["calibration"]["detector"] == "flow.log_pz_2"
    with pytest.raises(ValueError, match="no model has a servable detector"):
        report.serve_config({"models": {"runs:/g": grid}}, "c.json")


def test_the_plan_lists_both_phases_of_the_flow():
    from raymanifold.commands import REPO_ROOT
    from raymanifold.config import load_config
    from raymanifold.ood import study

    flow = load_config(REPO_ROOT / "jobs/configs/train/ood_flow_mnist5k.yaml")
    glow = load_config(REPO_ROOT / "jobs/configs/train/ood_glow_mnist5k.yaml")
    plan = study.planned_trainings("flow", flow)
    assert [label for label, _ in plan] == ["flow phase 1", "flow phase 2"]
    assert plan[1][1].name == "ood_flow_mnist5k_phase2" and plan[1][1].model.phase == "flow"
    assert study.planned_trainings("glow", glow) == [("glow", glow)]
