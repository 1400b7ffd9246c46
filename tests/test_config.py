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


def test_a_typo_in_a_setting_fails_with_the_setting_it_meant(tmp_path):
    import pytest

    from ct3dflow.config import parse_overrides

    for pair, says in [("ray.num_worker=4", "unknown setting ray.num_worker: did you mean ray.num_workers?"),
                       ("scoring.strde=6", "did you mean scoring.stride?"),
                       ("data.manfest=x.parquet", "did you mean data.manifest?"),
                       ("tune.anatomy-densty.tau_z=1", "did you mean tune.anatomy-density?")]:
        with pytest.raises(ValueError, match=says.replace("?", r"\?").replace(".", r"\.")):
            load_config(None, parse_overrides([pair]))
    load_config(None, parse_overrides(["tune.anatomy-density.tau_z={grid: [3, 4]}", "ray.scoring_actors=2"]))


def test_the_known_settings_cover_every_setting_the_code_reads():
    """KNOWN_KEYS against the code: every key read from a section (``cfg.ray.get("…")``, ``ray_cfg["…"]``,
    ``scoring.get("…")``, Ray Train's ``r.get("…")`` …) is known, so no working setting is refused."""
    import re
    from pathlib import Path

    from ct3dflow.config import KNOWN_KEYS

    root = Path(__file__).resolve().parents[1]
    pat = re.compile(r'\b(ray|scoring|tune|data|mlflow|source)(?:_cfg)?(?:\.get\(|\[)"(\w+)"')
    read: dict[str, set] = {}
    for f in [*(root / "ct3dflow").rglob("*.py"), *(root / "jobs").glob("*.py")]:
        text = f.read_text(encoding="utf-8")
        for section, key in pat.findall(text):
            read.setdefault(section, set()).add(key)
        if f.name == "ray_train.py":  # r = job_cfg.ray
            read["ray"] |= set(re.findall(r'\br(?:\.get\(|\[)"(\w+)"', text))
    assert {"num_workers", "use_gpu", "scoring_actors"} <= read["ray"] and "stride" in read["scoring"]  # it reads
    for section, keys in read.items():
        assert keys <= KNOWN_KEYS[section], (section, sorted(keys - KNOWN_KEYS[section]))
