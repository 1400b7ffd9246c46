"""The PACS of the PACS tests: a real Orthanc with its DICOMweb plugin (platform/orthanc.sh, on 127.0.0.1) and
the studies seeded into it over STOW-RS. conftest starts and seeds it in the background when the session
starts (``_pacs_in_background``), so test_pacs.py finds it ready, and stops it at the end of the session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from dicom_helpers import write_dicom_series as helper_series
from pydicom.uid import generate_uid

from ct3dflow.synthetic import make_phantom, write_dicom_series

ROOT = Path(__file__).resolve().parents[1]
LUNG1 = ROOT.parent / "shared" / "data" / "nsclc-lung1-001" / "image"
PORT = 8052
SECRETS = {"name": "PACS^SECRET^PERSON", "pid": "PACS-PID-90210", "birth": "19510203"}
INSTALLED = shutil.which("Orthanc") is not None or Path("/usr/sbin/Orthanc").exists()


def orthanc(action: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "platform" / "orthanc.sh"), action], env=env, capture_output=True,
                          text=True, timeout=120)


def start(platform_env: dict, state: Path) -> dict:
    """Start Orthanc with its state in ``state``; returns its URL, credentials file, environment and storage."""
    env = {**platform_env, "CT3DFLOW_STATE": str(state), "ORTHANC_HTTP_PORT": str(PORT)}
    r = orthanc("start", env)
    if r.returncode != 0:
        raise RuntimeError(f"could not start Orthanc:\n{r.stdout}\n{r.stderr}")
    creds = state / f"orthanc-{PORT}" / "credentials.json"
    return {"url": f"http://127.0.0.1:{PORT}/dicom-web", "credentials": creds, "env": env,
            "storage": state / f"orthanc-{PORT}" / "storage"}


def client(pacs: dict):
    from ct3dflow.adapters.dicomweb import DicomWebSource

    src = DicomWebSource.from_config(f"dicomweb+{pacs['url']}", {"credentials_file": str(pacs["credentials"])})
    return src.client()


def datasets(files, name=SECRETS["name"], pid=SECRETS["pid"]):
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, SECRETS["birth"]
        out.append(ds)
    return out


def seed(pacs: dict, d: Path) -> dict:
    """Six studies over STOW-RS: two normal phantoms, one abnormal (a large consolidation), LUNG1-001 (when
    ../shared/data holds it), an MR study and a study whose CT series holds only localizers."""
    c = client(pacs)
    studies = {}
    phantoms = (("normal-1", 701, None), ("normal-2", 702, None), ("consolidation", 703, "consolidation"))
    for name, seed_, kind in phantoms:
        ph = make_phantom(seed_, kind, size="small")
        ds = datasets(write_dicom_series(ph, d / name))
        c.store_instances(ds)
        studies[name] = {"uid": str(ds[0].StudyInstanceUID), "phantom": ph, "kind": kind}
    if LUNG1.is_dir():
        ds = datasets(sorted(LUNG1.glob("*.dcm")))
        c.store_instances(ds)
        studies["lung1"] = {"uid": str(ds[0].StudyInstanceUID), "kind": "tumour"}
    hu = make_phantom(704, size="small").hu.astype(np.float32)
    mr_uid = generate_uid()
    helper_series(hu[::4, ::2, ::2], d / "mr", spacing=(3.2, 3.2, 10.0), modality="MR", study_uid=mr_uid)
    c.store_instances(datasets(sorted((d / "mr").glob("*.dcm"))))
    studies["mr"] = {"uid": mr_uid, "kind": "mr"}
    loc_uid = generate_uid()
    helper_series(hu[:3, ::2, ::2], d / "loc", spacing=(3.2, 3.2, 10.0), study_uid=loc_uid,
                  image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    c.store_instances(datasets(sorted((d / "loc").glob("*.dcm"))))
    studies["localizer"] = {"uid": loc_uid, "kind": "localizer"}
    return studies
