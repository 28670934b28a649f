"""The vae_classifier family around the maths: recipe operations, configs, the two-digit set, the sweep's
evaluator and Pareto front, and the scorer's extra columns (tiny models, no Ray)."""
import numpy as np
import pytest
import torch

from raymanifold import data as rdata
from raymanifold.analysis.metrics import pareto_front
from raymanifold.config import config_from_dict
from raymanifold.recipes import get_recipe
from raymanifold.schema import ConfigError

RAW = {"family": "vae_classifier", "name": "t_clf", "data": {"name": "mnist5k"},
       "model": {"latent_dim": 2, "width": 4, "eval_points": 16},
       "train": {"steps": 2, "batch_size": 16, "checkpoint_every": 1000, "log_every": 1000}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from raymanifold.training import train_inprocess

    cfg = config_from_dict(RAW)
    folder = tmp_path_factory.mktemp("clf")
    model, _, _ = train_inprocess(cfg, checkpoint_dir=folder)
    return model.eval(), cfg, folder


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.label_column: 1 is out of range"):
        config_from_dict({**RAW, "model": {**RAW["model"], "label_column": 1}})
    with pytest.raises(ConfigError, match="data.name: vae_classifier needs an image data set"):
        config_from_dict({**RAW, "data": {"name": "moons"}})
    with pytest.raises(ConfigError, match="model.lam: -1.0 is out of range"):
        config_from_dict({**RAW, "model": {**RAW["model"], "lam": -1.0}})
    cfg = config_from_dict({**RAW, "data": {"name": "mnist5k_pair"}})
    assert get_recipe("vae_classifier").input_shape(cfg) == (1, 28, 56)


def test_mnist5k_pair_is_two_real_digits_with_left_right_labels():
    pair = rdata.load("mnist5k_pair", "test")
    single = rdata.load("mnist5k", "test")
    assert pair.x.shape == (1000, 1, 28, 56) and pair.y.shape == (1000, 2)
    src = pair.info["source_index"]
    assert (src[:, 0] != src[:, 1]).all() and len(set(src[:, 0].tolist())) == 1000  # each digit once on the left
    row = {int(s): i for i, s in enumerate(single.info["source_index"])}
    for k in (0, 17, 999):
        left, right = row[int(src[k, 0])], row[int(src[k, 1])]
        assert torch.equal(pair.x[k, ..., :28], single.x[left]) and torch.equal(pair.x[k, ..., 28:], single.x[right])
        assert pair.y[k].tolist() == [int(single.y[left]), int(single.y[right])]
    train_src = set(rdata.load("mnist5k_pair", "train").info["source_index"].flatten().tolist())
    assert not train_src & set(src.flatten().tolist())  # no digit in both splits


def test_recipe_classify_purify_and_score_columns(trained):
    model, cfg, _ = trained
    r = get_recipe("vae_classifier")
    x = rdata.load("mnist5k", "test").x[::250]
    c = r.classify(model, x, cfg)
    assert c["label"].shape == (4,) and torch.allclose(c["probs"].sum(1), torch.ones(4))
    assert torch.equal(c["label"], model.classify_logits(x).argmax(1))
    out = r.purify(model, x, cfg, generator=torch.Generator().manual_seed(0), iterations=5, step=0.02)
    assert out["x"].shape == x.shape and out["x"].min() >= 0 and out["x"].max() <= 1
    assert torch.allclose(out["elbo_before"], model.elbo(x), rtol=1e-5)
    assert torch.equal(out["label"], model.classify_logits(out["x"]).argmax(1))
    for bad, field in [({"iterations": 0}, "iterations"), ({"step": -1.0}, "step"), ({"eps": -0.5}, "eps")]:
        with pytest.raises(ConfigError, match=f"^{field}: "):
            r.purify(model, x, cfg, generator=torch.Generator(), **bad)
    cols = r.score_columns(model, x, cfg, generator=torch.Generator().manual_seed(0))
    assert set(cols) == {"elbo", "label_pred", "purified_label", "elbo_purified", "changed"}
    assert torch.equal(cols["changed"], cols["label_pred"] != cols["purified_label"])
    assert r.cost_of(cfg, "purify", iterations=10, restarts=2) == {"nfe": 24}


def test_scorer_adds_the_family_columns(trained):
    from raymanifold.scoring import Scorer, dataset_rows

    model, cfg, folder = trained
    ds = rdata.load("mnist5k", "test")
    scorer = Scorer((folder / "checkpoint.pt").read_bytes(), {"kind": "dataset"}, {}, seed=0)
    out = scorer(dataset_rows(ds, 0, 6))
    assert {"log_prob", "elbo", "purified_label", "changed"} <= set(out)
    assert out["changed"].dtype == bool and out["elbo"].shape == (6,)
    np.testing.assert_array_equal(out["label_pred"], model.classify_logits(ds.x[:6]).argmax(1).numpy())


def test_sweep_evaluator_reports_every_metric(trained):
    from raymanifold.adversarial.evaluation import purification_budget

    model, cfg, _ = trained
    m = purification_budget(model, cfg, seed=0, iterations=2, n=6, attack_iterations=3, adaptive_n=2,
                            adaptive_iterations=2, eot=2)
    for k in ("clean_accuracy", "purified_clean_accuracy", "attacked_accuracy", "robust_accuracy",
              "adaptive_robust_accuracy", "zero_grad_fraction"):
        assert 0.0 <= m[k] <= 1.0
    assert m["adaptive_robust_lo"] <= m["adaptive_robust_accuracy"] <= m["adaptive_robust_hi"]
    assert m["adaptive_robust_accuracy"] <= m["purified_clean_accuracy"] + 1e-9
    assert m["attacked_accuracy"] <= m["clean_accuracy"] and m["n"] == 6
    with pytest.raises(ConfigError, match=r"params\.iterations"):
        purification_budget(model, cfg, seed=0, iterations=0, n=2)


def test_pareto_front_against_brute_force():
    pts = np.array([[0.9, 0.1], [0.5, 0.5], [0.4, 0.4], [0.1, 0.9], [0.5, 0.5], [0.2, np.nan]])
    assert pareto_front(pts, ["max", "max"]).tolist() == [True, True, False, True, True, False]
    assert pareto_front(pts[:5], ["min", "min"]).tolist() == [True, False, True, True, False]
    rng = np.random.default_rng(0)
    p = rng.integers(0, 4, size=(40, 3)).astype(float)
    mask = pareto_front(p, ["max", "min", "max"])
    q = p * np.array([1, -1, 1])
    brute = [not any((q[j] >= q[i]).all() and (q[j] > q[i]).any() for j in range(40)) for i in range(40)]
    assert mask.tolist() == brute
    with pytest.raises(ValueError, match="modes"):
        pareto_front(p, ["max", "up", "max"])


def test_sweep_spec_pareto_option():
    from raymanifold.distributed.spec import load_spec, parse_spec

    spec = load_spec("jobs/configs/sweep/sweep_purification.yaml")
    assert spec.pareto[0] == ("purified_clean_accuracy", "max") and spec.kind == "eval"
    base = {"kind": "eval", "name": "s", "metric": "m", "evaluator": "purification",
            "space": {"params.iterations": {"grid": [1, 2]}}}
    assert parse_spec(base).pareto == ()
    with pytest.raises(ConfigError, match="pareto: expected a mapping of at least two metrics"):
        parse_spec({**base, "pareto": {"a": "max"}})
    with pytest.raises(ConfigError, match="pareto.b: 'up' is not allowed"):
        parse_spec({**base, "pareto": {"a": "max", "b": "up"}})


def test_table1_command_refuses_bad_arguments_before_work(capsys):
    from raymanifold.cli import main

    assert main(["study", "table1", "--settings", "mnist5k,moon"]) == 2
    assert "--settings: unknown ['moon']" in capsys.readouterr().err
    assert main(["study", "table1", "--n", "0"]) == 2
    assert "--n: must be >= 1" in capsys.readouterr().err
    assert main(["study", "table1", "--purify-iterations", "0"]) == 2
    assert "--purify-iterations" in capsys.readouterr().err
