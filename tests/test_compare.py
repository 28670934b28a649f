"""``raymanifold compare`` against a real ``mlflow server`` process on loopback."""
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
from raymanifold.commands.compare import default_mode

MLFLOW = Path(sys.executable).with_name("mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--artifacts-destination", str(d / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
    assert [float(r[4]) for r in rows] == sorted((v[1] for v in runs), reverse=True)
    header = next(ln for ln in md.read_text().splitlines() if "rank" in ln)
    assert "model.sigma0" in header and "model.hidden" not in header   # only params that differ
    assert "loss" in header
    out = tmp_path / "t.csv"
    assert main(["compare", "--experiment", "cmp", "--metric", "loss", "--tracking-uri", server,
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [float(r["loss"]) for r in rows] == sorted(v[2] for v in runs)        # loss: min first
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
