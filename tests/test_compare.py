"""``raymanifold compare``: against a real ``mlflow server`` process on loopback, and the sort/column
rules (:func:`choose_sort`, :func:`build_table`) on run tables shaped like ``mlflow.search_runs``."""
import csv
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from raymanifold.cli import main
from raymanifold.commands import UsageError
from raymanifold.commands.compare import MAX_METRICS, MAX_PARAMS, build_table, choose_sort, default_mode

MLFLOW = Path(sys.executable).with_name("mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, _mlflow_template):
    import shutil

    d = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(_mlflow_template, d / "mlflow.db")  # a migrated store: the server skips the migrations
    port = _free_port()
    log = open(d / "server.log", "w")
    # MLflow 3's server also starts a job runner (5 huey workers) by default; these tests run no server jobs
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--artifacts-destination", str(d / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(d / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)      # the server and its workers (own session)
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def runs(server):
    from raymanifold import tracking

    values = [(0.1, 0.71, 2.0), (0.3, 0.93, 1.1), (1.0, 0.55, 0.7), (3.0, 0.42, 3.0)]
    for sigma0, auroc, loss in values:
        with tracking.start_run("cmp", f"sigma{sigma0}", uri=server,
                                config={"model": {"sigma0": sigma0, "hidden": 32}}):
            tracking.log_metrics({"auroc": auroc, "loss": loss})
    return values


def _rows_md(path):
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.startswith("| ") and "rank" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_table_best_first_markdown_and_csv(server, runs, tmp_path, capsys):
    md = tmp_path / "t.md"
    assert main(["compare", "--experiment", "cmp", "--metric", "auroc", "--tracking-uri", server,
                 "--out", str(md)]) == 0
    rows = _rows_md(md)
    assert [r[1] for r in rows] == ["sigma0.3", "sigma0.1", "sigma1.0", "sigma3.0"]
    assert [float(r[5]) for r in rows] == sorted((v[1] for v in runs), reverse=True)
    header = next(ln for ln in md.read_text().splitlines() if "rank" in ln)
    assert "model.sigma0" in header and "model.hidden" not in header   # only params that differ
    assert "loss" in header
    out = tmp_path / "t.csv"
    assert main(["compare", "--experiment", "cmp", "--metric", "loss", "--tracking-uri", server,
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [float(r["loss"]) for r in rows] == sorted(v[2] for v in runs)        # loss: min first
    assert all(len(r["run_id"]) == 32 for r in rows)                             # CSV carries the run id
    capsys.readouterr()
    assert main(["compare", "--experiment", "cmp", "--metric", "loss", "--mode", "max",
                 "--tracking-uri", server]) == 0
    assert "sigma3.0" in capsys.readouterr().out.split("| 1 |")[1].splitlines()[0]


def test_filter_expression(server, runs, tmp_path):
    out = tmp_path / "f.csv"
    assert main(["compare", "--experiment", "cmp", "--metric", "auroc", "--filter", "metrics.auroc > 0.5",
                 "--tracking-uri", server, "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["run"] for r in rows) == ["sigma0.1", "sigma0.3", "sigma1.0"]
    assert main(["compare", "--experiment", "cmp", "--filter", "params.`model.sigma0` = '3.0'",
                 "--metric", "auroc", "--tracking-uri", server, "--out", str(out)]) == 0
    assert [r["run"] for r in csv.DictReader(out.open())] == ["sigma3.0"]


@pytest.mark.parametrize("extra, fragment", [
    (["--metric", "nope"], "--metric: no run has metric 'nope'"),
    (["--filter", "metrics.auroc >>> 1"], "MLflow search failed"),
    (["--out", "t.txt"], "--out: must end in .md or .csv"),
    (["--params", "model.colour"], "--params: unknown param 'model.colour'"),
])
def test_bad_input(server, runs, extra, fragment, capsys):
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", server] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err


def test_unknown_experiment(server, capsys):
    assert main(["compare", "--experiment", "nothing-here", "--tracking-uri", server]) == 2
    assert "no runs in experiment 'nothing-here'" in capsys.readouterr().err


def test_default_mode():
    assert default_mode("loss") == "min" and default_mode("test_nll_nats_dt10") == "min"
    assert default_mode("auroc_mean") == "max" and default_mode("cluster_acc") == "max"


def test_default_sort_without_a_family_is_newest_first(server, runs, capsys):
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", server]) == 0
    out = capsys.readouterr().out
    assert "sorted by start time (newest first; no family recorded)" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and "rank" not in ln]
    assert [ln.split("|")[2].strip() for ln in lines] == ["sigma3.0", "sigma1.0", "sigma0.3", "sigma0.1"]
    header = next(ln for ln in out.splitlines() if "rank" in ln)
    assert "run_id" not in header and "start (UTC)" in header and "family" in header


def test_family_primary_metric_sorts_by_default(server, tmp_path, capsys):
    """Training runs tagged family=diffusion sort by test_nll_nats_dt* (smaller first); a run of the
    same experiment without the metric (the demo's evaluation run) comes last."""
    from raymanifold import tracking

    for name, nll in (("a", 2.5), ("b", 1.5), ("c", 3.5)):
        with tracking.start_run("fam", name, uri=server, tags={"family": "diffusion"},
                                config={"family": "diffusion", "model": {"hidden": 32}}):
            tracking.log_metrics({"test_nll_nats_dt10": nll, "train_wall_s": 10.0, "final_step": 100,
                                  "log10p_s_curve_dt2": -nll})
    with tracking.start_run("fam", "eval", uri=server, config={"rounds": 3}):
        tracking.log_metrics({"log10p_s_curve_dt2": -9.0})
    out = tmp_path / "fam.csv"
    assert main(["compare", "--experiment", "fam", "--tracking-uri", server, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sorted by test_nll_nats_dt10 (min first; primary metric of family diffusion)" in text
    rows = list(csv.DictReader(out.open()))
    assert [r["run"] for r in rows] == ["b", "a", "c", "eval"]
    assert [r["family"] for r in rows] == ["diffusion"] * 3 + [""]
    assert "train_wall_s" in rows[0] and "final_step" not in rows[0]   # key metrics, no bookkeeping
    # --all-columns: every param and metric, and the run id
    assert main(["compare", "--experiment", "fam", "--tracking-uri", server, "--all-columns"]) == 0
    header = next(ln for ln in capsys.readouterr().out.splitlines() if "rank" in ln)
    for col in ("run_id", "final_step", "rounds", "model.hidden", "log10p_s_curve_dt2"):
        assert f" {col} " in header


# ----------------------------------------------------------------------------- rules, on synthetic tables
def _df(runs):
    """A table shaped like mlflow.search_runs: one dict per run (keys with their column prefixes)."""
    import pandas as pd

    rows = []
    for i, r in enumerate(runs):
        row = {"run_id": f"{i:032x}", "status": "FINISHED",
               "start_time": pd.Timestamp("2026-11-20 10:00", tz="UTC") + pd.Timedelta(minutes=i),
               "tags.mlflow.runName": f"run{i}"}
        row.update(r)
        rows.append(row)
    return pd.DataFrame(rows)


def test_sort_rules():
    # mixed families: start time, newest first
    df = _df([{"tags.family": "diffusion", "metrics.test_nll_nats_dt10": 1.0},
              {"tags.family": "gridvae", "metrics.test_loss_nats": 90.0}])
    s = choose_sort(df)
    assert s.metric is None and "2 families" in s.reason
    _, rows, _, _ = build_table(df)
    assert [r[1] for r in rows] == ["run1", "run0"]
    # one family, the family named by a param only; glow falls back to test_log_p_nats (max) without test_bpd
    df = _df([{"params.family": "glow", "metrics.test_log_p_nats": v} for v in (-3.0, -1.0, -2.0)])
    s = choose_sort(df)
    assert (s.metric, s.mode) == ("test_log_p_nats", "max")
    assert [r[1] for r in build_table(df)[1]] == ["run1", "run2", "run0"]
    # the family's metric not logged: start time
    assert choose_sort(_df([{"tags.family": "flow", "metrics.loss": 1.0}])).metric is None
    # runs of one sweep: the metric and mode the sweep declared (parent run params)
    df = _df([{"params.sweep.metric": "auroc_mean", "params.sweep.mode": "max"},
              {"tags.raymanifold.sweep": "s", "metrics.auroc_mean": 0.7, "metrics.nfe": 10.0},
              {"tags.raymanifold.sweep": "s", "metrics.auroc_mean": 0.9, "metrics.nfe": 100.0}])
    s = choose_sort(df)
    assert (s.metric, s.mode) == ("auroc_mean", "max")
    assert [r[1] for r in build_table(df)[1]] == ["run2", "run1", "run0"]
    # --metric / --mode win
    assert choose_sort(df, metric="nfe").mode == "max" and choose_sort(df, metric="nfe", mode="min").mode == "min"
    with pytest.raises(UsageError, match="--metric: no run has metric 'x'"):
        choose_sort(df, metric="x")


def test_ties_and_missing_values_newest_first():
    df = _df([{"tags.family": "gridvae", "metrics.test_loss_nats": 5.0},
              {"tags.family": "gridvae"},
              {"tags.family": "gridvae", "metrics.test_loss_nats": 5.0},
              {"tags.family": "gridvae", "metrics.test_loss_nats": 4.0},
              {"tags.family": "gridvae"}])
    assert [r[1] for r in build_table(df)[1]] == ["run3", "run2", "run0", "run4", "run1"]


def test_default_columns_are_few_and_readable():
    base = {f"params.train.p{k}": "same" for k in range(10)}
    runs = []
    for i in range(3):
        r = dict(base, **{"tags.family": "diffusion", "params.name": f"n{i}", "params.ray.storage_path": f"/s{i}",
                          "params.data.root": f"/r{i}", "metrics.test_nll_nats_dt10": float(i),
                          "metrics.final_step": 10.0 * i, "metrics.resumed_from_step": 0.0,
                          "metrics.test_bpd_dt10": 0.1 * i, "metrics.train_wall_s": 3.0})
        r.update({f"params.model.k{k}": str(i) for k in range(6)})       # six params that differ
        r.update({f"metrics.m{k}": 1.0 for k in range(8)})
        runs.append(r)
    headers, rows, sort, ids = build_table(_df(runs))
    assert headers[:6] == ["rank", "run", "family", "status", "start (UTC)", "test_nll_nats_dt10"]
    params = [h for h in headers if "." in h]
    assert params == [f"model.k{k}" for k in range(MAX_PARAMS)]                    # name/paths/same values left out
    metrics = headers[6 + len(params):]
    assert metrics[:2] == ["test_bpd_dt10", "train_wall_s"] and len(metrics) == MAX_METRICS  # key metrics first
    assert "final_step" not in headers and "run_id" not in headers
    assert rows[0][4] == "2026-11-20 10:00" and ids[0] == f"{0:032x}"
    # --params / --metrics choose the columns; unknown names fail with the known ones listed
    headers, _, _, _ = build_table(_df(runs), params=["name"], metrics=["final_step", "test_nll_nats_dt10"])
    assert headers[5:] == ["test_nll_nats_dt10", "name", "final_step"]
    with pytest.raises(UsageError, match="--metrics: unknown metric 'nope'"):
        build_table(_df(runs), metrics=["nope"])
    headers, rows, _, _ = build_table(_df(runs), all_columns=True)
    assert "run_id" in headers and "params.name" not in headers and "name" in headers and "final_step" in headers
    assert len(headers) == len(rows[0])


def test_every_family_declares_its_primary_metric():
    """The metrics compare ranks by are fields of each family's recipe (no second registry in compare)."""
    from raymanifold.recipes import FAMILIES, get_recipe

    for fam in FAMILIES:
        fm = get_recipe(fam).metrics
        assert fm is not None and fm.primary and all(mode in ("min", "max") for _, mode in fm.primary), fam
