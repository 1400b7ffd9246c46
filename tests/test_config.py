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
