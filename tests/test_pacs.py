"""Screening a PACS: a real Orthanc with its DICOMweb plugin (platform/orthanc.sh, on 127.0.0.1, started and
stopped here), seeded over STOW-RS; the screening job on the session's real Ray head; the DICOM SEG and SR it
stores back read over DICOMweb with highdicom and pydicom.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import raycli
import yaml
from chain import GLOW
from dicom_helpers import write_dicom_series as helper_series
from pydicom.uid import generate_uid

from ct3dflow.synthetic import make_phantom, write_dicom_series

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow, pytest.mark.pacs,
              pytest.mark.skipif(shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists(),
                                 reason="Orthanc not installed: apt-get install orthanc orthanc-dicomweb")]

ROOT = Path(__file__).resolve().parents[1]
LUNG1 = ROOT.parent / "shared" / "data" / "nsclc-lung1-001" / "image"
PORT = 8052
SECRETS = {"name": "PACS^SECRET^PERSON", "pid": "PACS-PID-90210", "birth": "19510203"}


def _orthanc(action: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "platform" / "orthanc.sh"), action], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def pacs(platform_env, tmp_path_factory):
    state = tmp_path_factory.mktemp("orthanc")
    env = {**platform_env, "CT3DFLOW_STATE": str(state), "ORTHANC_HTTP_PORT": str(PORT)}
    r = _orthanc("start", env)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        creds = state / f"orthanc-{PORT}" / "credentials.json"
        assert oct(creds.stat().st_mode & 0o777) == "0o600"
        yield {"url": f"http://127.0.0.1:{PORT}/dicom-web", "credentials": creds, "env": env,
               "storage": state / f"orthanc-{PORT}" / "storage"}
    finally:
        _orthanc("stop", env)


def _client(pacs):
    from ct3dflow.adapters.dicomweb import DicomWebSource

    src = DicomWebSource.from_config(f"dicomweb+{pacs['url']}", {"credentials_file": str(pacs["credentials"])})
    return src.client()


def _datasets(files, name=SECRETS["name"], pid=SECRETS["pid"]):
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, SECRETS["birth"]
        out.append(ds)
    return out


@pytest.fixture(scope="module")
def seeded(pacs, tmp_path_factory):
    """Six studies over STOW-RS: two normal phantoms, one abnormal (a large consolidation), LUNG1-001 (when
    ../shared/data holds it), an MR study and a study whose CT series holds only localizers."""
    d = tmp_path_factory.mktemp("seed")
    client = _client(pacs)
    studies = {}
    for name, seed, kind in (("normal-1", 701, None), ("normal-2", 702, None), ("consolidation", 703, "consolidation")):
        ph = make_phantom(seed, kind, size="small")
        files = write_dicom_series(ph, d / name)
        ds = _datasets(files)
        client.store_instances(ds)
        studies[name] = {"uid": str(ds[0].StudyInstanceUID), "phantom": ph, "kind": kind}
    if LUNG1.is_dir():
        ds = _datasets(sorted(LUNG1.glob("*.dcm")))
        client.store_instances(ds)
        studies["lung1"] = {"uid": str(ds[0].StudyInstanceUID), "kind": "tumour"}
    hu = make_phantom(704, size="small").hu.astype(np.float32)
    mr_uid = generate_uid()
    helper_series(hu[::4, ::2, ::2], d / "mr", spacing=(3.2, 3.2, 10.0), modality="MR", study_uid=mr_uid)
    client.store_instances(_datasets(sorted((d / "mr").glob("*.dcm"))))
    studies["mr"] = {"uid": mr_uid, "kind": "mr"}
    loc_uid = generate_uid()
    helper_series(hu[:3, ::2, ::2], d / "loc", spacing=(3.2, 3.2, 10.0), study_uid=loc_uid,
                  image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    client.store_instances(_datasets(sorted((d / "loc").glob("*.dcm"))))
    studies["localizer"] = {"uid": loc_uid, "kind": "localizer"}
    return studies


def _config(path: Path, work: Path, pacs, tracking_uri: str, credentials=None) -> Path:
    cfg = {"name": "pacs-test", "work_dir": str(work), "data": {"cache_dir": str(work / "cache")},
           "source": {"url": pacs["url"], "credentials_file": str(credentials or pacs["credentials"]),
                      "lookback_days": None},
           "ray": {"preprocess_workers": 1, "preprocess_cpus": 0.5, "scoring_actors": 1, "scoring_cpus": 0.5},
           "mlflow": {"tracking_uri": tracking_uri, "experiment": "ct3dflow-pacs-test", "registered_model": GLOW,
                      "system_metrics": False}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _screen(env, sid, config) -> tuple[str, str]:
    r = raycli.submit(env, sid, ["python", "jobs/screen.py", "--config", str(config), "--run-name", sid])
    status = raycli.job_status(env, sid)
    return status, r.stdout + r.stderr  # raycli.submit returns the job's logs


def _summary(logs: str) -> dict:
    m = re.findall(r"screen summary: (.*)", logs)
    assert m, logs[-3000:]
    return {k: float(v) if "." in v else int(v) for k, v in (kv.split("=") for kv in m[-1].split())}


def _results_series(client, study_uid):
    return [s for s in client.search_for_series(study_uid) if (s.get("0008103E") or {}).get("Value", [""])[0]
            .startswith("CT-3DFlow")]


@pytest.fixture(scope="module")
def screened(ray_head, mlflow_server, champion, pacs, seeded, tmp_path_factory):
    work = tmp_path_factory.mktemp("pacs-work")
    cfg = _config(work / "screen.yaml", work, pacs, mlflow_server)
    status, logs = _screen(ray_head, "test-pacs-1", cfg)
    assert status == "SUCCEEDED", logs[-6000:]
    return {"work": work, "cfg": cfg, "logs": logs, "results": pd.read_parquet(work / "results" / "results.parquet")}


def test_pacs_screening_writes_sr_and_seg_back(screened, seeded, pacs):
    """The SR says what results.parquet says; the SEG parses with highdicom, references the source series'
    SOP instances, lies on its grid and, for the abnormal phantom, overlaps its lesion; MR and localizer-only
    studies are error rows with their reasons."""
    import highdicom as hd

    from ct3dflow.adapters.dicomweb import study_id_of
    from ct3dflow.dicom_results import read_report

    res = screened["results"].set_index("study_id")
    client = _client(pacs)
    assert len(res) == len(seeded)
    assert re.search("no CT series.*MR", res.loc[study_id_of(seeded["mr"]["uid"]), "error"])
    assert "only localizer" in res.loc[study_id_of(seeded["localizer"]["uid"]), "error"]
    assert not (screened["work"] / "results" / "staging").exists() or not any(
        (screened["work"] / "results" / "staging").iterdir()), "staging folders left behind"
    for name in [n for n in seeded if seeded[n]["kind"] not in ("mr", "localizer")]:
        uid = seeded[name]["uid"]
        row = res.loc[study_id_of(uid)]
        assert row.status == "ok", (name, row.error)
        assert row.map_kind == "anatomy-density" and isinstance(row.sr_uid, str) and row.sr_uid
        series = _results_series(client, uid)
        assert len(series) == 1, f"{name}: {len(series)} result series"
        sr_uid = series[0]["0020000E"]["Value"][0]
        sr = client.retrieve_instance(uid, sr_uid, row.sr_uid)
        report = read_report(sr)
        assert report["finding"] == ("Abnormal" if row.predicted_abnormal else "Normal")
        assert report["abnormal_volume_cm3"] == pytest.approx(row.abnormal_volume_cm3)
        assert report["threshold_cm3"] == pytest.approx(row.threshold_cm3)
        assert report["map_kind"] == "anatomy-density"
        # the DICOM results carry the study's patient module, as the standard requires
        assert str(sr.PatientID) == SECRETS["pid"] and str(sr.StudyInstanceUID) == uid
        if not row.predicted_abnormal:
            assert not row.seg_uid and report["segment"] is None
            continue
        seg = hd.seg.Segmentation.from_dataset(client.retrieve_instance(uid, sr_uid, row.seg_uid))
        assert report["segment"] == (row.seg_uid, 1)
        source_series = {s["0020000E"]["Value"][0] for s in client.search_for_series(uid)
                         if (s.get("00080060") or {}).get("Value") == ["CT"] and s["0020000E"]["Value"][0] != sr_uid}
        refs = seg.get_source_image_uids()
        assert refs and {r[1] for r in refs} <= source_series
        src_meta = {m["00080018"]["Value"][0]: m for s in source_series
                    for m in client.retrieve_series_metadata(uid, s)}
        assert {r[2] for r in refs} <= set(src_meta), "the SEG references images that are not the source's"
        one = src_meta[refs[0][2]]
        assert list(map(float, seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing)) == \
            pytest.approx(list(map(float, one["00280030"]["Value"])))
        if name == "consolidation":  # the SEG overlaps the phantom's lesion on the source grid
            ph = seeded[name]["phantom"]
            z_of = {m["00080018"]["Value"][0]: int(m["00200013"]["Value"][0]) - 1 for m in src_meta.values()}
            mask = seg.get_pixels_by_source_instance([r[2] for r in refs], segment_numbers=[1])[..., 0]
            lesion = np.stack([ph.lesion_mask[z_of[r[2]]] for r in refs])
            assert (mask.astype(bool) & lesion).sum() > 0, "the abnormal region misses the lesion"


def test_a_new_study_is_screened_alone_and_nothing_is_stored_twice(screened, seeded, pacs, ray_head):
    """One more study arrives after the first run; the next run screens only it, stores its SR (and nothing
    else), and every study screened before keeps its one result series."""
    client = _client(pacs)

    def n_results():
        return sum(len(client.search_for_instances(s["uid"], r["0020000E"]["Value"][0]))
                   for s in seeded.values() for r in _results_series(client, s["uid"]))

    before = n_results()
    ph = make_phantom(705, "nodule", size="small")
    ds = _datasets(write_dicom_series(ph, screened["work"] / "late"))
    client.store_instances(ds)
    status, logs = _screen(ray_head, "test-pacs-2", screened["cfg"])
    assert status == "SUCCEEDED", logs[-6000:]
    s = _summary(logs)
    n_err = sum(1 for v in seeded.values() if v["kind"] in ("mr", "localizer"))
    assert (s["found"], s["scored"], s["skipped"], s["errors"]) == (len(seeded) + 1, 1, len(seeded) - n_err, n_err)
    assert n_results() == before  # nothing stored again into the studies screened before
    late = _results_series(client, str(ds[0].StudyInstanceUID))
    assert len(late) == 1 and client.search_for_instances(str(ds[0].StudyInstanceUID), late[0]["0020000E"]["Value"][0])


def test_privacy_of_the_pacs_path(screened, mlflow_server):
    """Results, parts, the watermark, the report, logs and MLflow hold no patient name, ID or birth date."""
    from mlflow.tracking import MlflowClient

    blobs = {"logs": screened["logs"]}
    for p in (screened["work"] / "results").rglob("*"):
        if p.is_file() and p.suffix in (".parquet", ".json", ".html"):
            blobs[str(p)] = p.read_bytes().decode("latin-1")
    run_id = json.loads((screened["work"] / "results" / "last_run.json").read_text())["mlflow_run_id"]
    run = MlflowClient(mlflow_server).get_run(run_id)
    blobs["mlflow"] = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert any("sources" in k for k in blobs) and any(k.endswith("results.parquet") for k in blobs)
    for where, text in blobs.items():
        for secret in SECRETS.values():
            assert secret not in text, f"{secret!r} leaked into {where}"


def _screen_process(config) -> subprocess.CompletedProcess:
    """The job's entrypoint as a plain process: a PACS that cannot be used stops it before Ray starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return subprocess.run([str(Path(os.sys.executable)), "jobs/screen.py", "--config", str(config)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_unreachable_or_unauthorised_pacs_fails_at_once_and_writes_nothing(mlflow_server, pacs, tmp_path):
    bad = tmp_path / "wrong.json"
    bad.write_text(json.dumps({"username": "ct3dflow", "password": "not-the-password"}))
    bad.chmod(0o600)
    work = tmp_path / "w1"
    r = _screen_process(_config(tmp_path / "a.yaml", work, pacs, mlflow_server, credentials=bad))
    assert r.returncode != 0 and "refused the credentials (HTTP 401)" in r.stderr, r.stderr[-3000:]
    assert not (work / "results").exists() and not (work / "cache").exists()
    r = _orthanc("stop", pacs["env"])  # the last test of the module: the PACS goes away
    assert r.returncode == 0, r.stderr
    work = tmp_path / "w2"
    r = _screen_process(_config(tmp_path / "b.yaml", work, pacs, mlflow_server))
    assert r.returncode != 0 and "cannot reach the PACS" in r.stderr, r.stderr[-3000:]
    assert not (work / "results").exists() and not (work / "cache").exists()
