"""ct3dflow.config: a job's relative paths land under $CT3DFLOW_WORK (a `ray job submit` runs in a temporary copy
of the working directory, which is deleted after the job)."""

from ct3dflow.config import load_config


def test_every_relative_path_of_a_job_resolves_against_the_work_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setenv("CT3DFLOW_WORK", str(work))
    monkeypatch.chdir(tmp_path)  # not the work folder: a path resolved against the current folder would show
    cfg = load_config(None, {"work_dir": "runs", "data": {"manifest": "a/m.parquet", "cache_dir": "c"},
                             "ray": {"storage_path": "ray_store"}})
    assert cfg.work_path == work / "runs"
    assert (cfg.manifest_path, cfg.cache_path) == (work / "a" / "m.parquet", work / "c")
    assert cfg.storage_path == work / "ray_store"
    assert load_config(None, {"work_dir": "runs"}).storage_path == work / "runs" / "ray_results"
    assert load_config(None, {"ray": {"storage_path": str(tmp_path / "abs")}}).storage_path == tmp_path / "abs"


def test_config_mistakes_fail_at_load_naming_the_file_or_the_setting(tmp_path):
    import pytest

    def bad(text: str, *overrides: str) -> str:
        p = tmp_path / "c.yaml"
        p.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError) as e:
            load_config(p, parse_overrides(list(overrides)))
        return str(e.value)

    from ct3dflow.config import parse_overrides

    assert str(tmp_path / "c.yaml") in bad("train: [1, 2\n") and "not valid YAML" in bad("train: [1, 2\n")
    assert "must be a mapping of sections" in bad("42\n")
    assert "section scoring in" in bad("scoring: anatomy\n") and "must be a mapping" in bad("scoring: anatomy\n")
    assert "section train in --set" in bad("", "train=5")
    assert "scoring.map is {'kind': 'voxel'}" in bad("scoring: {map: {kind: voxel}}\n")
    assert "scoring.precision is 'fp16'" in bad("", "scoring.precision=fp16")
    assert "unknown threshold rule 'f1'" in bad("", "tune.threshold_rule=f1")
    assert "tune.target_specificity: 0.9" in bad("", "tune.threshold_rule=specificity")
    assert "ray.num_workers expects a positive integer, got 'two'" in bad("", "ray.num_workers=two")
    assert "tune.reference_folds expects a positive integer" in bad("", "tune.reference_folds=0")
    # an empty section is an empty mapping, not an error
    (tmp_path / "ok.yaml").write_text("train:\nray:\ntune:\n", encoding="utf-8")
    cfg = load_config(tmp_path / "ok.yaml")
    assert cfg.ray["num_workers"] == 1 and cfg.tune["reference_folds"] == 4
