"""Scoring: specs fail fast; the input shape comes from the recipe (no data probe); the Ray-free scorer is
the recipe's log_prob; Ray scores equal the in-process loop row by row; every row is written exactly
once, also when a scoring actor dies mid-run; Parquet and image-folder inputs."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymanifold import data as rdata
from raymanifold.cli import main
from raymanifold.config import config_from_dict
from raymanifold import scoring
from raymanifold.distributed.scoring import score_to_parquet


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from raymanifold import checkpoint as ckpt
    from raymanifold.training import train_inprocess

    torch.manual_seed(0)
    cfg = config_from_dict({"family": "diffusion", "name": "tiny", "data": {"n_train": 2000},
                            "model": {"hidden": 32, "eval_points": 100},
                            "train": {"steps": 300, "batch_size": 256, "lr": 3e-3, "device": "cpu"}})
    model, _, _ = train_inprocess(cfg)
    return ckpt.save(tmp_path_factory.mktemp("model") / "checkpoint.pt", model, cfg, 300)


def _points_parquet(path: Path, n: int, *, with_id=True):
    x = rdata.load("moons", "test", n=n, seed=3).x.numpy()
    cols = {"x": pa.array(list(x.astype(np.float32)), type=pa.list_(pa.float32())),
            "label": pa.array(np.arange(n) % 3)}
    if with_id:
        cols["id"] = pa.array([f"row{i:05d}" for i in range(n)])
    pq.write_table(pa.table(cols), path, row_group_size=max(1, n // 3))
    return path


def _image_model_and_folder(tmp_path: Path, n: int):
    """An untrained 8x8 digits diffusion U-Net checkpoint and a folder of ``n`` digits as
    ``class0/`` / ``class1/`` PNGs; returns (checkpoint path, folder)."""
    from PIL import Image

    from raymanifold import checkpoint as ckpt
    from raymanifold.recipes import get_recipe

    cfg = config_from_dict({"family": "diffusion", "name": "img", "data": {"name": "digits", "image_size": 8},
                            "model": {"net": "unet", "T": 20, "schedule": "linear", "channels": 4,
                                      "channel_mult": [1], "attention": False, "image_size": 8, "eval_dt": 10},
                            "train": {"device": "cpu"}})
    torch.manual_seed(0)
    model_path = ckpt.save(tmp_path / "img.pt", get_recipe("diffusion").build(cfg), cfg, 0)
    x = rdata.load("digits", "test", image_size=8).x[:n]
    for i, img in enumerate(x):
        d = tmp_path / "folder" / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8), mode="L").save(d / f"{i}.png")
    return model_path, tmp_path / "folder"


@pytest.mark.parametrize("text, fragment", [
    ("nope", "'nope' is neither a file/folder nor a data set"),
    ("swiss_roll:val", "unknown split 'val'"),
    ("swiss_roll?n=0", "option n out of range"),
    ("swiss_roll?colour=red", "unknown option 'colour'"),
    ("missing/file.parquet", "does not exist"),
])
def test_bad_data_spec(text, fragment):
    with pytest.raises(rdata.DataError) as exc:
        scoring.parse_data_spec(text)
    assert fragment in str(exc.value)


def test_inputs_that_do_not_match_the_model_fail_before_ray(tiny_model, tmp_path):
    from PIL import Image

    # images for a 2-D point model
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    with pytest.raises(rdata.DataError, match="images in .* are 8x8 mode L .* but the model"):
        scoring.prepare(str(tiny_model), scoring.parse_data_spec(str(tmp_path / "imgs")), {})
    # Parquet without ids
    p = _points_parquet(tmp_path / "noid.parquet", 10, with_id=False)
    with pytest.raises(rdata.DataError, match=r"lacks column\(s\) \['id'\]"):
        scoring.prepare(str(tiny_model), scoring.parse_data_spec(str(p)), {})
    # a bundled set of another kind (digits images into a 2-D point model)
    with pytest.raises(rdata.DataError, match="does not match the model"):
        scoring.prepare(str(tiny_model), scoring.parse_data_spec("digits"), {})
    with pytest.raises(rdata.DataError, match="log_prob takes no 'colour'"):
        scoring.prepare(str(tiny_model), scoring.parse_data_spec("moons"), {"colour": 1})


def test_bad_model_uri_is_one_line_error(capsys, tmp_path, tracking_uri):
    assert main(["score", "--model", "runs:/nope", "--data", "moons", "--out", str(tmp_path / "o")]) == 2
    assert "MLflow run 'nope' not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_inprocess_scorer_equals_recipe_log_prob(tiny_model):
    """The Scorer is exactly recipe.log_prob on the rows it is given (same per-batch seed)."""
    from raymanifold.checkpoint import load_model
    from raymanifold.scoring import Scorer, dataset_rows, parse_data_spec, prepare
    import zlib

    spec = parse_data_spec("moons?n=300&seed=2")
    prep = prepare(str(tiny_model), spec, {"dt": 5})
    s = Scorer(prep.model_bytes, prep.source, prep.opts, seed=4)
    out = s(dataset_rows(prep.dataset, 100, 164))
    model, cfg, recipe = load_model(str(tiny_model))
    ds = rdata.load("moons", "test", n=300, seed=2)
    x = ds.x[100:164]
    g = torch.Generator().manual_seed(4 * 1_000_003 + zlib.crc32(b"100"))
    want = recipe.log_prob(model, x, cfg, dt=5, generator=g).numpy()
    np.testing.assert_allclose(out["log_prob"], want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(out["bits_per_dim"], -want / (2 * np.log(2)))
    assert list(out["id"]) == list(range(100, 164))
    assert ds.y is None and set(out["label"]) == {-1}               # an unlabelled set scores with label -1


def test_dataset_rows_carry_ids_labels_and_examples():
    from raymanifold.scoring import dataset_rows

    ds = rdata.load("digits", "test", n=50, seed=1)
    rows = dataset_rows(ds, 10, 30)
    assert rows["id"].tolist() == list(range(10, 30))
    assert rows["label"].tolist() == ds.y[10:30].tolist()
    np.testing.assert_array_equal(rows["x"], ds.x[10:30].numpy())
    assert rows["x"].dtype == np.float32 and rows["x"].shape == (20, 1, 8, 8)


def test_parquet_rows_of_the_wrong_size_fail_before_ray(tiny_model, tmp_path):
    n = 6
    x = np.zeros((n, 3), np.float32)
    pq.write_table(pa.table({"x": pa.array(list(x), type=pa.list_(pa.float32())),
                             "id": pa.array([str(i) for i in range(n)])}), tmp_path / "three.parquet")
    with pytest.raises(rdata.DataError, match=r"holds 3 values per row, the model takes 2 \(points\) = 2 values"):
        scoring.prepare(str(tiny_model), scoring.parse_data_spec(str(tmp_path / "three.parquet")), {})


def test_input_shape_comes_from_the_recipe_not_from_data(tiny_model, tmp_path, monkeypatch):
    """A Parquet input is checked against recipe.input_shape(cfg): the model's training set is never loaded."""
    p = _points_parquet(tmp_path / "pts.parquet", 30)

    def no_load(*a, **k):
        raise AssertionError("prepare loaded a data set to learn the model's input shape")

    monkeypatch.setattr(rdata, "load", no_load)
    prep = scoring.prepare(str(tiny_model), scoring.parse_data_spec(str(p)), {"dt": 10})
    assert prep.source["shape"] == [2] and prep.n_rows == 30 and prep.family == "diffusion"


def test_inprocess_parquet_scores_are_the_recipes_log_prob(tiny_model, tmp_path):
    """score_inprocess over a Parquet file: rows reshaped to input_shape, each batch seeded from its first id."""
    from raymanifold.checkpoint import load_model
    from raymanifold.scoring.scorer import batch_seed

    p = _points_parquet(tmp_path / "pts.parquet", 50)
    spec = scoring.parse_data_spec(str(p))
    prep = scoring.prepare(str(tiny_model), spec, {"dt": 10})
    got, secs = scoring.score_inprocess(prep, spec, batch_size=20, seed=3)
    model, cfg, recipe = load_model(str(tiny_model))
    x = torch.from_numpy(rdata.load("moons", "test", n=50, seed=3).x.numpy().astype(np.float32))
    want = []
    for b in pq.ParquetFile(p).iter_batches(batch_size=20, columns=["id"]):   # the same batch boundaries
        ids = b.column("id").to_pylist()
        lo = int(ids[0][3:])
        g = torch.Generator().manual_seed(batch_seed(3, ids[0]))
        want.append(recipe.log_prob(model, x[lo:lo + len(ids)], cfg, dt=10, generator=g).numpy())
    np.testing.assert_allclose(got, np.concatenate(want), rtol=0, atol=1e-9)
    assert got.shape == (50,) and secs > 0


def test_image_folder_in_process(tmp_path):
    """An image folder against an (untrained) 8x8 digits model: labels from <class>/ folders, ids = paths,
    images of another size fail before anything is scored."""
    from PIL import Image

    from raymanifold.scoring import Scorer

    model_path, folder = _image_model_and_folder(tmp_path, 6)
    spec = scoring.parse_data_spec(str(folder))
    prep = scoring.prepare(str(model_path), spec, {"dt": 10})
    assert prep.source["shape"] == [1, 8, 8] and prep.source["mode"] == "L" and prep.n_rows == 6
    imgs = np.stack([np.asarray(Image.open(f)) for f in spec.files])
    out = Scorer(prep.model_bytes, prep.source, prep.opts)({"path": np.asarray(spec.files), "image": imgs})
    assert sorted(set(out["label"])) == ["class0", "class1"] and list(out["id"]) == list(spec.files)
    assert np.isfinite(out["log_prob"]).all()
    np.testing.assert_allclose(out["bits_per_dim"], -out["log_prob"] / (64 * np.log(2)))
    lp, _ = scoring.score_inprocess(prep, spec, batch_size=4)
    assert lp.shape == (6,)
    big = tmp_path / "big" / "a"
    big.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(big / "0.png")
    with pytest.raises(rdata.DataError, match=r"are 16x16 mode L .* takes 1x8x8 \(C x H x W\)"):
        scoring.prepare(str(model_path), scoring.parse_data_spec(str(tmp_path / "big")), {"dt": 10})
    with pytest.raises(rdata.DataError, match=r"does not match the model \(diffusion\): its examples are 1x16x16"):
        scoring.prepare(str(model_path), scoring.parse_data_spec("digits?image_size=16"), {"dt": 10})


def test_summary_uses_the_shared_auroc_and_writes_a_histogram(tmp_path):
    from sklearn.metrics import roc_auc_score

    from raymanifold.analysis.metrics import auroc

    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 200)
    s = scoring.summarize(a, b)
    assert s["n"] == 300 and s["ood_n"] == 200 and abs(s["log_prob_mean"] - a.mean()) < 1e-12
    assert abs(s["auroc"] - roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[a, b])) < 1e-12
    a[:3] = [-np.inf, np.nan, np.inf]                      # one policy for non-finite scores: analysis.metrics
    assert scoring.summarize(a, b)["auroc"] == auroc(a, b)
    assert "auroc" not in scoring.summarize(a)
    scoring.plot_histogram(b, a[np.isfinite(a)], tmp_path / "h.png", labels=("x", "y"))
    assert (tmp_path / "h.png").stat().st_size > 1000
    (tmp_path / "scores").mkdir()
    pq.write_table(pa.table({"id": np.arange(200), "log_prob": b}), tmp_path / "scores" / "s.parquet")
    np.testing.assert_array_equal(scoring.read_scores(tmp_path / "scores"), b)


def test_the_ray_free_scoring_modules_do_not_import_ray():
    import subprocess
    import sys

    code = ("import sys, raymanifold.scoring, raymanifold.commands.score; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.ray
def test_ray_scores_match_inprocess_and_survive_a_killed_actor(local_ray, tiny_model, tmp_path, tracking_uri):
    """Through the CLI: an actor dies at its 2nd batch (fault injection); every row is still
    written exactly once and each score equals the plain in-process loop's."""
    out = tmp_path / "scores"
    rc = main(["score", "--model", str(tiny_model), "--data", "swiss_roll?n=1500", "--ood", "circle?n=700",
               "--out", str(out), "--dt", "10", "--batch-size", "128", "--fail-at-batch", "2", "--actors", "2",
               "--compute", "actors"])
    assert rc == 0
    assert (out / ".scores.fault").exists()           # the fault really fired
    t = pq.read_table(out / "scores").to_pandas()
    assert len(t) == 1500 and sorted(t["id"]) == list(range(1500))
    spec = scoring.parse_data_spec("swiss_roll?n=1500")
    prep = scoring.prepare(str(tiny_model), spec, {"dt": 10})
    ref, _ = scoring.score_inprocess(prep, spec, batch_size=128)
    got = t.sort_values("id")["log_prob"].to_numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_out"] == summary["unique_ids"] == 1500 and summary["ood_n"] == 700
    assert abs(summary["log_prob_mean"] - ref.mean()) < 1e-9
    from sklearn.metrics import roc_auc_score

    ood = pq.read_table(out / "ood_scores").column("log_prob").to_numpy()
    want = roc_auc_score(np.r_[np.ones(1500), np.zeros(700)], np.r_[got, ood])
    assert abs(summary["auroc"] - want) < 1e-12
    assert (out / "histogram.png").stat().st_size > 1000
    from raymanifold import tracking

    run = tracking.get_run(summary["mlflow_run_id"], tracking_uri)
    assert run.info.status == "FINISHED" and abs(run.data.metrics["auroc"] - want) < 1e-12


@pytest.mark.ray
def test_tasks_compute_matches_inprocess_survives_a_killed_worker_and_reuses_it(local_ray, tiny_model, tmp_path):
    """compute="tasks": Ray's pooled workers score (a worker dies at its 2nd batch, once): every row once,
    equal to the in-process loop; a second job on the same driver gives the same numbers."""
    from raymanifold.distributed import scoring as dscoring

    spec = scoring.parse_data_spec("swiss_roll?n=1200")
    prep = scoring.prepare(str(tiny_model), spec, {"dt": 10})
    ref, _ = scoring.score_inprocess(prep, spec, batch_size=128)
    for i, fail in enumerate((2, -1)):
        out = tmp_path / f"tasks{i}"
        res = score_to_parquet(prep, spec, str(out), batch_size=128, compute="tasks", fail_at_batch=fail, actors=2)
        assert res.rows_out == res.unique_ids == 1200
        got = pq.read_table(out).to_pandas().sort_values("id")["log_prob"].to_numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    assert (tmp_path / ".tasks0.fault").exists()  # the fault really fired
    with pytest.raises(ValueError, match="compute"):
        dscoring.score_to_parquet(prep, spec, str(tmp_path / "x"), compute="threads")


@pytest.mark.ray
def test_parquet_and_image_folder_inputs(local_ray, tmp_path):
    """Parquet (ids and labels pass through) and an image folder (<class>/ labels) with a digits model."""
    from raymanifold import checkpoint as ckpt

    model_path, folder = _image_model_and_folder(tmp_path, 20)
    spec = scoring.parse_data_spec(str(folder))
    prep = scoring.prepare(str(model_path), spec, {"dt": 10})
    res = score_to_parquet(prep, spec, str(tmp_path / "out_img"), batch_size=8)
    t = pq.read_table(tmp_path / "out_img").to_pandas()
    assert res.rows_out == res.unique_ids == 20 and len(t) == 20
    assert set(t["label"]) == {"class0", "class1"}
    assert all(Path(p).name == f"{Path(p).stem}.png" for p in t["id"])
    assert np.isfinite(t["log_prob"]).all() and (t["bits_per_dim"] > 0).all()

    pts = _points_parquet(tmp_path / "pts.parquet", 90)
    from raymanifold.training import train_inprocess

    pcfg = config_from_dict({"family": "diffusion", "name": "p", "data": {"n_train": 500},
                             "model": {"hidden": 16, "eval_points": 50}, "train": {"steps": 20, "batch_size": 64,
                                                                                  "device": "cpu"}})
    pm, _, _ = train_inprocess(pcfg)
    p_path = ckpt.save(tmp_path / "p.pt", pm, pcfg, 20)
    spec = scoring.parse_data_spec(str(pts))
    prep = scoring.prepare(str(p_path), spec, {"dt": 10})
    res = score_to_parquet(prep, spec, str(tmp_path / "out_pts"), batch_size=16)
    t = pq.read_table(tmp_path / "out_pts").to_pandas().sort_values("id")
    assert res.rows_out == res.unique_ids == 90
    assert list(t["id"]) == [f"row{i:05d}" for i in range(90)]
    assert list(t["label"]) == [i % 3 for i in range(90)]


def test_scoring_progress_line_states_rows_share_and_eta():
    """Long Ray Data scoring jobs print `[score] done/total rows (pct) on <compute>, elapsed, ETA` (mean rate so far)."""
    from raymanifold.distributed.scoring import progress_text

    line = progress_text(1200, 5000, 310.0, "actors")
    assert line.startswith("[score] 1,200/5,000 rows (24%) on actors, 310 s, ETA 16m")  # 3,800 rows at 3.87 rows/s
    assert "ETA" not in progress_text(0, 5000, 0.0, "tasks")                           # no rate yet: no ETA
