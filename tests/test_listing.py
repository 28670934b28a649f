"""Discovery: `raymanifold list configs|datasets|families|experiments|studies`, and `compare` without --experiment."""
from pathlib import Path

import pytest
import yaml

from raymanifold.cli import main
from raymanifold.commands import REPO_ROOT
from raymanifold.commands import listing


def test_every_family_has_a_line():
    from raymanifold.recipes import available_families

    missing = [f for f in available_families() if f not in listing.FAMILY_INFO]
    assert not missing, f"add these families to raymanifold/commands/listing.py FAMILY_INFO: {missing}"
    for fam, (what, doc) in listing.FAMILY_INFO.items():
        assert what and (REPO_ROOT / doc).is_file(), fam


def test_needs_reads_data_and_gpu_from_the_config(tmp_path):
    assert listing.needs({"family": "diffusion", "data": {"name": "swiss_roll"}}) == []
    assert listing.needs({"family": "diffusion", "data": {"name": "celeba"}}) == ["data on disk"]
    assert listing.needs({"family": "diffusion", "data": {"name": "mnist5k"}, "ray": {"use_gpu": True}}) == ["GPU"]
    assert listing.needs({"family": "diffusion", "train": {"gpus_per_worker": 1}}) == ["GPU"]  # old spelling
    assert listing.needs({"family": "diffusion", "ray": {"use_gpu": "auto"}}) == []  # auto runs anywhere
    base = tmp_path / "b.yaml"
    base.write_text(yaml.safe_dump({"family": "gridvae", "data": {"name": "cifar10"}}))
    assert listing.needs({"kind": "train", "base": str(base)}) == ["data on disk"]  # a sweep needs its base's
    assert listing.family_of({"config": str(base)}) == "gridvae"


def test_list_configs_names_every_file_and_where_it_runs(capsys):
    assert main(["list", "configs"]) == 0
    out = capsys.readouterr().out
    files = sorted((REPO_ROOT / "jobs" / "configs").rglob("*.yaml"))
    assert files and all(str(p.relative_to(REPO_ROOT)) in out for p in files)
    rows = {Path(r["config"]).name: r for r in listing.config_rows()}
    assert rows["demo_swiss_roll.yaml"]["where"] == "here" and rows["demo_swiss_roll.yaml"]["kind"] == "train"
    assert rows["flow_celeba64.yaml"]["where"] == "cluster: data on disk, GPU"
    assert rows["sweep_diffusion_dt.yaml"]["kind"] == "sweep" and rows["sweep_diffusion_dt.yaml"]["family"] == "diffusion"
    assert rows["study_attribute_kl_celeba.yaml"]["kind"] == "study"
    assert rows["study_attribute_kl_celeba.yaml"]["where"].startswith("cluster")


def test_list_datasets_families_and_studies(capsys):
    from raymanifold import data as rdata
    from raymanifold.recipes import available_families

    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(lines) == set(rdata.available())
    assert "on disk (data.root)" in lines["celeba"] and "bundled" in lines["mnist5k"] and "1x28x28" in lines["mnist5k"]
    assert main(["list", "families"]) == 0
    out = capsys.readouterr().out
    assert all(f in out for f in available_families()) and "log_prob, sample" in out
    assert main(["list", "studies"]) == 0
    out = capsys.readouterr().out
    for study in ("table1", "gridvae-two-digit", "attribute-kl", "likelihood", "diffsiam-probes"):
        assert f"raymanifold study {study}" in out


def test_list_experiments_counts_runs_and_compare_lists_them(tmp_path, capsys, monkeypatch):
    from raymanifold import tracking

    missing = tmp_path / "none" / "mlflow.db"
    assert main(["list", "experiments", "--tracking-uri", f"sqlite:///{missing}"]) == 0
    assert "no experiments" in capsys.readouterr().out and not missing.exists()  # reading does not create a store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for exp, n in (("alpha", 3), ("beta", 1)):
        for i in range(n):
            with tracking.start_run(exp, f"r{i}", uri=uri):
                pass
    assert main(["list", "experiments", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:4]]
    assert [r[:2] for r in rows] == [["alpha", "3"], ["beta", "1"]]
    assert main(["compare", "--tracking-uri", uri]) == 0  # no --experiment: the same table
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["alpha", "3"]


def test_list_all_and_bad_choice(capsys, tmp_path):
    assert main(["list", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"]) == 0
    out = capsys.readouterr().out
    for section in listing.WHAT:
        assert f"## {section}" in out
    with pytest.raises(SystemExit):
        main(["list", "models"])


def test_config_folders_say_where_a_config_runs():
    """train/ runs here; cluster/ needs data on disk or a GPU; sweep/ and study/ hold what their names say."""
    for r in listing.config_rows():
        folder = Path(r["config"]).parts[2]
        assert folder in ("train", "sweep", "study", "cluster"), r["config"]
        assert (folder == "cluster") == (r["where"] != "here"), r
        assert r["kind"] == {"train": "train", "cluster": r["kind"], "sweep": "sweep", "study": "study"}[folder], r


def test_old_flat_config_paths_still_work_with_one_deprecation_line(capsys, monkeypatch):
    from raymanifold import commands
    from raymanifold import config as C

    monkeypatch.setattr(C, "_moved_warned", set())
    for _ in range(2):
        p = commands.find_config("jobs/configs/demo_swiss_roll.yaml")
        assert p == REPO_ROOT / "jobs" / "configs" / "train" / "demo_swiss_roll.yaml"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deprecated: jobs/configs/demo_swiss_roll.yaml moved to jobs/configs/train/demo_swiss_roll.yaml "
                   "(the old flat path still works)"]
    assert commands.find_config(str(REPO_ROOT / "jobs/configs/sweep_diffusion_dt.yaml")).parent.name == "sweep"
    assert commands.find_config("jobs/configs/nope.yaml") == Path("jobs/configs/nope.yaml")  # missing: as given
    assert main(["train", "--config", "jobs/configs/nope.yaml"]) == 2
    assert "config file 'jobs/configs/nope.yaml' does not exist" in capsys.readouterr().err
    # branches that call load_config / load_spec with the old path directly (not through find_config) work too
    assert C.load_config("jobs/configs/vae_classifier_mnist5k.yaml").name == "vae_classifier_mnist5k"
    from raymanifold.distributed.spec import load_spec

    assert load_spec("jobs/configs/sweep_diffusion_dt.yaml").name == "sweep_diffusion_dt"
    assert capsys.readouterr().err.count("deprecated: ") == 2


def test_run_configs_are_named_by_their_file_and_filed_under_their_family():
    """A run config's name is its file stem (checkpoints land in ray_results/<stem>) and its MLflow experiment is
    its family's (the demo's is its job's, `demo`; the OOD benchmark's models log to `ood`); every file starts with a one-line header naming itself."""
    for p in sorted((REPO_ROOT / "jobs" / "configs").rglob("*.yaml")):
        text = p.read_text()
        assert text.startswith(f"# {p.stem}: ") and "@" not in text.splitlines()[0], p
        raw = yaml.safe_load(text)
        if "family" not in raw:
            continue
        assert raw["name"] == p.stem, p
        # the demo's experiment is its job's; the OOD benchmark's models log to the study's experiment
        study = "demo" if p.stem == "demo_swiss_roll" else "ood" if p.stem.startswith("ood_") else None
        assert raw["experiment"] == (study or raw["family"]), p


def test_docs_index_links_every_page_and_the_readme_stays_short():
    index = (REPO_ROOT / "docs" / "index.md").read_text()
    pages = [p.relative_to(REPO_ROOT / "docs").as_posix() for p in (REPO_ROOT / "docs").rglob("*.md")]
    missing = [p for p in pages if p != "index.md" and f"({p})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 120 and "docs/getting-started.md" in readme and "docs/index.md" in readme
    for text in [readme, index, (REPO_ROOT / "docs" / "getting-started.md").read_text()]:
        assert "REFERENCE.md" not in text and "issue item" not in text
