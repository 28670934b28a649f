"""The attribute vs recognition manifold study (Sec. 4.3): the eight steps' functions against ground truth,
the attribute sets, the SupCon loss, bad input, the known-answer checks and one short end-to-end run."""
import json
import math

import numpy as np
import pytest
import torch

from raymanifold.recognition import attribute_kl as K
from raymanifold.recognition import attributes as AT
from raymanifold.cli import main
from raymanifold.recognition.losses import supcon_loss
from raymanifold.schema import ConfigError

SHAPES_STUDY = "jobs/configs/study/study_attribute_kl_shapes.yaml"
MNIST_STUDY = "jobs/configs/study/study_attribute_kl_mnist5k.yaml"
#: a small, fast version of the shapes recognition model (about 17 s of training in-process on one core). At
#: 16x16 and width 8 the smallest shapes are ~3 pixels, too few to learn the shape in 400 steps, so the short run
#: takes identity = (colour, scale); the full (shape, colour, scale) check is the study's (docs/recognition.md)
SMALL_SHAPES = ["data.n_train=3000", "data.n_test=800", "data.image_size=16", "model.width=8", "model.embed_dim=8",
                "train.steps=400", "train.batch_size=64", "train.checkpoint_every=1000", "model.eval_points=200",
                "model.identity=[colour,scale]"]


# ----------------------------------------------------------------------------- steps 4-8, pure functions
def test_bernoulli_kl_matches_torch_distributions():
    p = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.0])
    q = torch.tensor([0.25, 0.5, 0.2, 0.3, 0.4])
    want = torch.distributions.kl_divergence(torch.distributions.Bernoulli(probs=p),
                                             torch.distributions.Bernoulli(probs=q))
    np.testing.assert_allclose(K.bernoulli_kl(p.numpy().astype(float), q.numpy().astype(float)), want.double().numpy(),
                               rtol=1e-6, atol=1e-7)
    assert K.bernoulli_kl(0.3, 0.3) == 0.0 and math.isinf(K.bernoulli_kl(0.5, 0.0))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_nearest_neighbour_excludes_self_and_matches_brute_force(distance):
    from sklearn.neighbors import NearestNeighbors

    z = np.random.default_rng(0).normal(size=(300, 5))
    nn = K.nearest_neighbours(z, distance, chunk=64)
    metric = "cosine" if distance == "cosine" else "euclidean"
    _, idx = NearestNeighbors(n_neighbors=2, metric=metric).fit(z).kneighbors(z)
    assert (nn != np.arange(300)).all()
    np.testing.assert_array_equal(nn, idx[:, 1])
    # a duplicated point's neighbour is its copy (distance 0), never itself
    zz = np.concatenate([z, z[:1]])
    assert K.nearest_neighbours(zz, distance)[0] == 300 and K.nearest_neighbours(zz, distance)[300] == 0


def test_sharded_search_merges_to_the_full_search():
    z = np.random.default_rng(1).normal(size=(200, 4))
    ids = np.arange(200)
    full = K.nn_block(z, ids, z, ids)
    parts = [K.nn_block(z, ids, z[s:s + 70], ids[s:s + 70]) for s in (0, 70, 140)]
    merged = K.merge_nn(K.merge_nn(parts[0], parts[1]), parts[2])
    np.testing.assert_array_equal(merged[0], full[0])
    np.testing.assert_allclose(merged[1], full[1])
    # a block holding only the query itself yields no neighbour
    assert K.nn_block(z[:1], ids[:1], z[:1], ids[:1])[0][0] == -1


def test_attribute_table_by_hand():
    # 6 examples, one attribute; neighbours chosen by hand
    a = np.array([[1], [1], [0], [0], [0], [1]])
    nn = np.array([1, 0, 3, 2, 5, 4])          # neighbour attribute: 1, 1, 0, 0, 1, 0
    row = K.attribute_table(a, nn, ["a"], alpha=0.0)[0]
    assert row["p"] == pytest.approx(0.5)
    assert row["n_nn0"] == 3 and row["p_nn0"] == pytest.approx(1 / 3)   # a over {2, 3, 5} = 0, 0, 1
    assert row["n_nn1"] == 3 and row["p_nn1"] == pytest.approx(2 / 3)   # a over {0, 1, 4} = 1, 1, 0
    kl = (1 / 3) * math.log((1 / 3) / 0.5) + (2 / 3) * math.log((2 / 3) / 0.5)
    assert row["kl_nn0"] == pytest.approx(kl) and row["kl_nn1"] == pytest.approx(kl)
    assert row["mutual_information"] == pytest.approx(kl)
    assert row["agreement"] == pytest.approx(4 / 6)
    lap = K.attribute_table(a, nn, ["a"], alpha=1.0)[0]
    assert lap["p_nn0"] == pytest.approx((1 + 1) / (3 + 2)) and lap["p"] == pytest.approx(0.5)
    # without smoothing a perfectly tied attribute has an infinite reverse KL; smoothing keeps it finite
    tied = np.array([[1], [1], [0], [0]])
    assert math.isinf(K.attribute_table(tied, [1, 0, 3, 2], ["t"], 0.0)[0]["kl_nn0_reverse"])
    assert math.isfinite(K.attribute_table(tied, [1, 0, 3, 2], ["t"], 1.0)[0]["kl_nn0_reverse"])


def test_synthetic_manifold_ranks_identity_tied_attributes_first():
    """Ground truth: embeddings cluster by identity (40 identities); attributes that are functions of the
    identity must outrank attributes drawn independently of it, whatever their base rates."""
    rng = np.random.default_rng(3)
    n, ids = 4000, rng.integers(40, size=4000)
    centres = rng.normal(size=(40, 8)) * 3
    z = centres[ids] + rng.normal(size=(n, 8)) * 0.3
    tied = {"t_half": ids % 2, "t_quarter": (ids % 4 == 0), "t_most": (ids % 5 != 0)}
    free = {"f_half": rng.integers(2, size=n), "f_third": rng.random(n) < 0.3, "f_most": rng.random(n) < 0.8}
    names = list(tied) + list(free)
    A = np.stack([np.asarray(v, dtype=np.int64) for v in list(tied.values()) + list(free.values())], 1)
    out = K.study(z, A, names)
    ranked = [r["attribute"] for r in out["rows"]]
    assert K.ranks_above(out["rows"], list(tied)) is True, ranked
    for r in out["rows"]:
        if r["attribute"] in free:
            assert r["kl_nn0"] < 0.01 and r["mutual_information"] < 0.01
    # random embeddings carry no attribute: every KL is small and the check fails or ties by chance only
    noise = K.study(rng.normal(size=(n, 8)), A, names)
    assert max(r["kl_nn0"] for r in noise["rows"]) < 0.01
    assert [r["rank"] for r in out["rows"]] == list(range(1, 7))


# ----------------------------------------------------------------------------- uncertainty of the ranking
def _tied_colours(n=3000, seed=0):
    """Identity = one of 12 (colour x 3 others); red / green / blue / yellow are each 1/4 of the identities and
    perfectly shared by a neighbour of the same identity; 'half' is tied too; 'noise' is independent."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(12, size=n)
    z = np.eye(12)[ids] * 3 + rng.normal(size=(n, 12)) * 0.3
    colour = ids % 4
    A = np.stack([colour == 0, colour == 1, colour == 2, ids < 6, rng.random(n) < 0.5], 1).astype(np.int64)
    return z, A, ["red", "green", "blue", "half", "noise"]


def test_pair_stats_equal_the_table_and_the_cap():
    z, A, names = _tied_colours()
    nn = K.nearest_neighbours(z)
    for alpha in (0.0, 1.0):
        rows = K.attribute_table(A, nn, names, alpha)
        st = K.pair_stats(A, A[nn], alpha)
        for i, r in enumerate(rows):
            for key in ("kl_nn0", "mutual_information", "mi_normalized", "kl_nn0_fraction", "p", "p_nn0", "p_nn1"):
                assert st[key][i] == pytest.approx(r[key], rel=1e-9, abs=1e-12), (key, r["attribute"])
    # an attribute copied exactly by the neighbour (no smoothing) reaches the cap -log(1 - p): fraction 1, NMI 1
    rows = {r["attribute"]: r for r in K.attribute_table(A, nn, names, 0.0)}
    for c in ("red", "green", "blue", "half"):
        assert rows[c]["kl_nn0"] == pytest.approx(-math.log(1 - rows[c]["p"]), rel=1e-9)
        assert rows[c]["kl_nn0_fraction"] == pytest.approx(1.0) and rows[c]["mi_normalized"] == pytest.approx(1.0)
    assert rows["half"]["kl_nn0"] > 2 * rows["red"]["kl_nn0"]  # the base-rate bias the cap explains


def test_permutation_null_and_bootstrap_show_ties_as_ties():
    z, A, names = _tied_colours()
    nn = K.nearest_neighbours(z)
    null = K.permutation_null(A, nn, names, permutations=99, generator=np.random.default_rng(0))
    p = null["kl_nn0"]["p"]
    assert all(p[i] == pytest.approx(1 / 100) for i in range(4))  # tied: beyond every permutation
    assert p[4] > 0.05 and null["kl_nn0"]["observed"][4] < null["kl_nn0"]["null_q95"][4] * 3
    boot = K.bootstrap_ranks(A, nn, names, replicates=300, generator=np.random.default_rng(1))
    for key in ("kl_nn0", "mi_normalized"):
        ranking = K.ranking_with_ties(names, K.pair_stats(A, A[nn])[key], boot[key]["values"])
        group = {r["attribute"]: r["group"] for r in ranking}
        assert group["red"] == group["green"] == group["blue"]      # same base rate, same sharing: one tie group
        assert group["noise"] != group["red"] and ranking[-1]["attribute"] == "noise"
        lo, hi = boot[key]["rank_lo"], boot[key]["rank_hi"]
        assert all(lo[i] < hi[i] for i in range(3))                 # their bootstrap ranks overlap
    by_kl = K.ranking_with_ties(names, K.pair_stats(A, A[nn])["kl_nn0"], boot["kl_nn0"]["values"])
    assert by_kl[0]["attribute"] == "half" and by_kl[0]["rank_label"] == "1"   # KL_0's base-rate lift
    assert by_kl[1]["rank_label"] == "2-4"


def test_ranking_with_ties_by_hand():
    vals = np.array([[3.0, 2.9, 1.0], [2.9, 3.0, 1.1], [3.1, 2.8, 0.9], [3.0, 3.05, 1.0]])
    rows = K.ranking_with_ties(["a", "b", "c"], np.array([3.0, 2.9, 1.0]), vals)
    assert [(r["attribute"], r["rank_label"], r["group"]) for r in rows] == [("a", "1-2", 1), ("b", "1-2", 1),
                                                                             ("c", "3", 2)]
    with pytest.raises(ValueError, match="permutations"):
        K.permutation_null(np.zeros((4, 1), int), [1, 0, 3, 2], ["a"], permutations=0)
    with pytest.raises(ValueError, match="bootstrap"):
        K.bootstrap_ranks(np.zeros((4, 1), int), [1, 0, 3, 2], ["a"], replicates=1)


def test_check_binary_names_the_column():
    with pytest.raises(ValueError, match="column 'b' is not binary"):
        K.check_binary(np.array([[0, 2], [1, 0]]), ["a", "b"])
    with pytest.raises(ValueError, match="rank_by"):
        K.rank([], "kl")


# ----------------------------------------------------------------------------- attribute sets
def test_shapes_attributes_follow_the_factors():
    from raymanifold import data as rdata

    ds = rdata.load("shapes", "test", n=400, image_size=12)
    t = AT.compute("shapes", ds.x.numpy(), ds.y.numpy(), ds.info["label_names"])
    assert t.names == AT.SHAPES_ATTRIBUTES and t.values.shape == (400, 11)
    np.testing.assert_array_equal(t.values[:, :6], ds.y.numpy()[:, 6:])   # the data set's own six
    f = ds.y.numpy()
    np.testing.assert_array_equal(t.values[:, 8], f[:, 5] == 0)            # red
    assert t.tied(["shape", "colour", "scale"]) == ["large", "warm", "is_cross", "is_square", "is_triangle", "red",
                                                    "green", "blue"]
    assert set(AT.SHAPES_ATTRIBUTES) - set(t.tied(["shape", "colour", "scale"])) == {"left", "top", "tilted"}


def test_ink_statistics_on_drawn_strokes():
    img = np.zeros((3, 28, 28))
    img[0, 4:24, 12:14] = 1.0        # thin vertical bar, width 2
    img[1, 4:24, 11:16] = 1.0        # thick vertical bar, width 5
    for r in range(4, 24):           # a bar leaning right (top to the right), width 2
        c = 8 + (24 - r) // 2
        img[2, r, c:c + 2] = 1.0
    s = AT.ink_statistics(img)
    assert s["thickness"][0] == pytest.approx(2 * 40 / 40, rel=0.1)      # every pixel of a 2-wide bar is on the edge
    assert s["thickness"][1] > 2 * s["thickness"][0] * 0.9
    assert abs(s["slant"][0]) < 1e-9 and s["slant"][2] > 0.3
    assert s["width"][1] > s["width"][0]


def test_mnist_style_attributes_are_balanced_within_every_digit():
    from raymanifold import data as rdata

    ds = rdata.load("mnist5k", "test")
    t = AT.compute("mnist5k", ds.x.numpy(), ds.y.numpy(), ds.info["label_names"])
    d = ds.y.numpy()
    np.testing.assert_array_equal(t.values[:, 0], np.isin(d, [0, 6, 8, 9]))
    np.testing.assert_array_equal(t.values[:, 1], d % 2 == 0)
    for k in range(10):
        assert np.abs(t.values[d == k, 2:].mean(0) - 0.5).max() <= 0.02   # median split: half of each digit
    assert t.tied(["digit"]) == ["has_loop", "even"]


def test_mnist_known_answer_on_a_digit_manifold():
    """A recognition manifold that keeps only the digit (one-hot digit + noise, 95% of neighbours share it):
    has_loop and even must rank above thick, slanted and wide on the real digits."""
    from raymanifold import data as rdata

    ds = rdata.load("mnist5k", "test")
    d = ds.y.numpy()
    t = AT.compute("mnist5k", ds.x.numpy(), d, ds.info["label_names"])
    rng = np.random.default_rng(0)
    z = np.eye(10)[d] + rng.normal(size=(len(d), 10)) * 0.28
    out = K.study(z, t.values, t.names)
    assert np.mean(d[out["nn_index"]] == d) > 0.9
    assert K.ranks_above(out["rows"], t.tied(["digit"])) is True, [r["attribute"] for r in out["rows"]]


# ----------------------------------------------------------------------------- recognition loss
def test_supcon_loss_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(10, 4, generator=g), dim=1)
    keys = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4])[:, None]
    tau = 0.2
    got, anchors = supcon_loss(z, keys, tau)
    per = []
    for i in range(10):
        pos = [p for p in range(10) if p != i and keys[p] == keys[i]]
        if not pos:
            continue
        den = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(10) if a != i)
        per.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / den) for p in pos) / len(pos))
    assert anchors == 9 and float(got) == pytest.approx(sum(per) / len(per), rel=1e-5)


# ----------------------------------------------------------------------------- bad input
def _err(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_fails_before_any_work(capsys, tmp_path, tracking_uri):
    out = str(tmp_path / "rep")
    base = ["study", "attribute-kl", "--config", SHAPES_STUDY, "--no-ray", "--out", out]
    err = _err(capsys, base + ["--set", "study.attributes=columns", "--set", "study.columns=[shape]"])
    assert "study.columns: column 'shape' of 'shapes' is not binary (3 values)" in err
    err = _err(capsys, base + ["--set", "model.identity=[shape,colourr]"])
    assert "model.identity: unknown label column 'colourr'" in err and "'colour'" in err
    err = _err(capsys, base + ["--set", "data.name=digits", "--set", "model.identity=[]"])
    assert "data.name: 'digits' has no named label columns" in err
    err = _err(capsys, base + ["--set", "data.name=digits"])
    assert "data.name: 'digits' has no named label columns, so model.identity" in err
    err = _err(capsys, base + ["--set", "study.attributes=mnist5k"])
    assert "study.attributes: set 'mnist5k' applies to data ['mnist5k']" in err
    err = _err(capsys, base + ["--set", "study.distance=manhattan"])
    assert "study.distance" in err
    err = _err(capsys, base + ["--set", "study.bootstrap=1"])
    assert "study.bootstrap: need 0 (off) or at least 2 replicates" in err
    err = _err(capsys, base + ["--set", "study.permutations=-1"])
    assert "study.permutations" in err
    assert not (tmp_path / "rep").exists() and not (tmp_path / "mlflow.db").exists()
    with pytest.raises(ConfigError, match="model.views"):
        from raymanifold.config import load_config

        load_config("jobs/configs/train/recognition_shapes.yaml", ["model.identity=[]", "model.views=1"])


# ----------------------------------------------------------------------------- end to end
def test_shapes_study_end_to_end_known_answer(tmp_path, tracking_uri, capsys):
    """Train a small recognition manifold with identity = (colour, scale) in-process and run the study: the
    colour and scale attributes must rank above shape, position and rotation; report and MLflow runs written."""
    out = tmp_path / "rep"
    argv = ["study", "attribute-kl", "--config", SHAPES_STUDY, "--no-ray", "--threads", "1", "--out", str(out)]
    for s in SMALL_SHAPES:
        argv += ["--set", s]
    assert main(argv) == 0
    res = json.loads((out / "attribute_kl.json").read_text())
    assert res["tied_rank_above"] is True, [(r["attribute"], round(r["kl_nn0"], 3)) for r in res["rows"]]
    assert res["metrics"]["nn_identity_agreement"] > 0.5 and res["metrics"]["examples"] == 800
    assert {p.name for p in out.iterdir()} >= {"attribute_kl.md", "fig17a_probabilities.png", "fig17b_kl.png"}
    md = (out / "attribute_kl.md").read_text()
    assert "Known-answer check: **met**" in md and "KL_0 next to the normalised mutual information" in md
    unc = res["uncertainty"]
    assert set(unc) == {"kl_nn0", "mi_normalized"} and unc["kl_nn0"]["bootstrap"] == 1000
    assert {r["attribute"] for r in unc["mi_normalized"]["ranking"]} == {r["attribute"] for r in res["rows"]}
    from raymanifold import tracking

    df = tracking.search_runs("recognition", uri=tracking_uri)
    study = df[df["tags.mlflow.runName"] == "attribute_kl_shapes"]
    assert len(study) == 1 and study["status"].iloc[0] == "FINISHED"
    assert study["metrics.identity_tied_rank_above"].iloc[0] == 1.0
    trained = df[df["tags.mlflow.runName"] == "recognition_shapes"]
    assert len(trained) == 1 and trained["metrics.nn_identity_accuracy"].iloc[0] > 0.5


# ----------------------------------------------------------------------------- Ray Data path, CelebA layout
def _celeba_fixture(root, n=24, people=6):
    """CelebA's native layout (as tests/test_image_loaders.make_celeba) with ``n`` images of ``people`` persons:
    the first half train, the rest test."""
    from PIL import Image
    from test_image_loaders import ATTRS, make_celeba

    make_celeba(root, n=1)          # the five list files' formats
    base = root / "celeba"
    rng = np.random.default_rng(5)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, nm in enumerate(names):
        arr = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
        Image.fromarray(arr).save(base / "img_align_celeba" / nm, quality=90)
    attr = rng.choice([-1, 1], size=(n, 40))
    (base / "list_attr_celeba.txt").write_text("\n".join(
        [str(n), " ".join(ATTRS)] + [nm + " " + " ".join(f"{v:2d}" for v in row) for nm, row in zip(names, attr)]) + "\n")
    (base / "list_eval_partition.txt").write_text("".join(f"{nm} {0 if i < n // 2 else 2}\n" for i, nm in enumerate(names)))
    (base / "identity_CelebA.txt").write_text("".join(f"{nm} {1 + i % people}\n" for i, nm in enumerate(names)))
    (base / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{nm} 1 2 3 4\n" for nm in names))
    (base / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x "
        "rightmouth_y\n" + "".join(f"{nm} " + " ".join(["1"] * 10) + "\n" for nm in names))
    return names, (attr + 1) // 2


def test_celeba_identity_index_matches_the_loader(tmp_path):
    from raymanifold import data as rdata
    from raymanifold.data.celeba_identity import index

    _celeba_fixture(tmp_path)
    ds = rdata.load("celeba_identity", "test", root=str(tmp_path), image_size=16)
    idx = index(str(tmp_path), "test")
    names, card = rdata.label_columns("celeba_identity", str(tmp_path))
    assert names[-1] == "identity" and len(names) == 41 and card[:40] == (2,) * 40
    assert ds.x.shape == (12, 3, 16, 16) and ds.y.shape == (12, 41)
    np.testing.assert_array_equal(ds.y.numpy(), idx.y)
    assert set(idx.y[:, -1]) <= set(range(1, 7)) and set(np.unique(idx.y[:, :40])) <= {0, 1}


@pytest.mark.ray
def test_celeba_study_on_ray_data_matches_in_process(tmp_path, tracking_uri, capsys, local_ray):
    """The cluster configuration (on-disk CelebA, identity = the person, Ray Data embedding and search) on a
    native-format fixture: a 2-step model, the study file through the CLI on Ray Data, and the same steps in
    this process (same neighbours, same table)."""
    from raymanifold.config import load_config
    from raymanifold.training import train_inprocess

    _celeba_fixture(tmp_path)
    cfg = load_config("jobs/configs/cluster/recognition_celeba.yaml",
                      [f"data.root={tmp_path}", "data.image_size=16", "model.width=4", "model.embed_dim=4",
                       "train.steps=2", "train.batch_size=6", "model.eval_points=12"])
    train_inprocess(cfg, checkpoint_dir=tmp_path / "m")
    out = tmp_path / "rep"
    argv = ["study", "attribute-kl", "--config", "jobs/configs/cluster/study_attribute_kl_celeba.yaml",
            "--model", str(tmp_path / "m"), "--out", str(out), "--set", "study.batch_size=5", "--set", "study.actors=2"]
    assert main(argv) == 0
    rep = json.loads((out / "attribute_kl.json").read_text())
    assert rep["embedding"] == "Ray Data" and rep["metrics"]["ray_actors"] == 2 and rep["metrics"]["examples"] == 12
    assert len(rep["rows"]) == 40 and rep["identity"] == ["identity"]
    # the same steps in this process give the same neighbours and table
    from raymanifold.checkpoint import load_model
    from raymanifold.data.celeba_identity import index
    from raymanifold.recognition.embedding import embed_inprocess, model_bytes, nn_inprocess

    model, mcfg, _ = load_model(str(tmp_path / "m"))
    idx = index(str(tmp_path), "test")
    z = embed_inprocess(model_bytes(model, mcfg), paths=idx.paths, loader="raymanifold.data.celeba_identity:load_images",
                        image_size=16, batch_size=5)
    rows = K.rank(K.attribute_table(idx.y[:, :40], nn_inprocess(z), idx.label_names[:40], 1.0))
    for a, b in zip(rep["rows"], rows):
        assert a["attribute"] == b["attribute"] and a["kl_nn0"] == pytest.approx(b["kl_nn0"], abs=1e-9)
