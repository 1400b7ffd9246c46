"""The screening run's report.html (ct3dflow.report), looked at in headless Chromium like a person would."""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ct3dflow.detect.outputs import write_preview_png
from ct3dflow.report import render_report, write_screening_report

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _results(tmp: Path) -> tuple[pd.DataFrame, dict]:
    """Two flagged studies with real previews, a normal one, one without a decision and two errors."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (vol, flagged) in enumerate([(42.5, True), (7.25, True), (0.5, False), (None, None)]):
        d = tmp / "maps" / f"s{i}"
        preview = None
        if flagged is not None:
            ct = (rng.normal(-0.3, 0.05, (20, 40, 44))).astype(np.float32)
            atyp = -np.abs(rng.normal(0, 1, ct.shape)).astype(np.float32)
            ab = np.zeros(ct.shape, bool)
            if flagged:
                ab[8:12, 15:22, 10:18] = True
                atyp[ab] = -8.0
            preview = str(write_preview_png(ct, atyp, ab, d / "preview.png", title=f"s{i}", level=-4.0))
        rows.append({"study_id": f"s-{i:02d}", "path": f"/archive/study{i}", "status": "ok", "error": "",
                     "abnormal_volume_cm3": vol, "predicted_abnormal": flagged, "preview_path": preview})
    rows += [{"study_id": "d-err1", "path": "/archive/empty", "status": "error",
              "error": "folder /archive/empty is empty; remove it or copy the study's files into it"},
             {"study_id": "f-err2", "path": "/archive/trunc.nii", "status": "error",
              "error": "cannot read the pixels of trunc.nii: the file is truncated or corrupt"}]
    summary = {"run_name": "nightly-test", "finished_at": "2026-12-01T02:00:00+00:00", "model_version": "m/3",
               "map_kind": "voxel", "found": 6, "scored": 4, "skipped": 0, "flagged": 2, "errors": 2,
               "operating_point_source": "model version tag",
               "operating_point": {"map": "voxel", "params": {"sigma_vox": 2.0, "tau_z": 4.0, "v_min_cm3": 1.0},
                                   "threshold_cm3": 5.0, "threshold_rule": {"rule": "specificity", "target": 0.9}}}
    return pd.DataFrame(rows), summary


def test_report_is_self_contained_and_holds_every_study(tmp_path):
    results, summary = _results(tmp_path)
    page = write_screening_report(tmp_path, results, summary).read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the report must fetch nothing from the network"
    bodies = re.findall(r"<tr class=\"([a-z]*)\">", page)
    assert len(bodies) == len(results) and bodies[:2] == ["flagged", "flagged"] and bodies.count("error") == 2
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 2  # a thumbnail for each flagged study, none for the others
    for u in uris:
        im = Image.open(io.BytesIO(base64.b64decode(u)))
        assert im.format == "PNG" and im.width == 360
    for r in results.itertuples():
        assert r.study_id in page
    assert "truncated or corrupt" in page and "is empty" in page
    assert "T = 5 cm³" in page and "validation specificity ≥ 0.9" in page and "m/3" in page
    assert "ABNORMAL" in page and "no decision" in page
    # a study id with markup is shown, not interpreted
    bad = results.assign(study_id=results.study_id.where(results.index != 2, "<script>alert(1)</script>"))
    assert "<script>alert(1)</script>" not in render_report(bad, summary)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed: apt-get install -y chromium")
def test_report_in_headless_chromium_shows_rows_and_thumbnails(tmp_path):
    """What a person sees: every row (from the DOM Chromium built), and the flagged previews drawn as pictures
    (dark CT pixels and the red overlay in the screenshot where the thumbnails are; a broken image would be
    a small icon on a white page)."""
    results, summary = _results(tmp_path)
    report = write_screening_report(tmp_path, results, summary)
    url = report.resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'u1'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<tr class=") == len(results), dom[:2000]
    assert all(sid in dom for sid in results.study_id)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "screening_report.png"
    shot.unlink(missing_ok=True)
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'u2'}", "--window-size=1400,1400",
                    f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert shot.exists(), "Chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    dark = (r < 70) & (g < 70) & (b < 70)  # CT in a lung window: the page itself has no dark areas
    red = (r > 180) & (g < 90) & (b < 90)  # the atypicality overlay of the previews (and the ABNORMAL badges)
    assert dark.sum() > 20000, f"only {dark.sum()} dark pixels: the thumbnails are not drawn"
    assert red.sum() > 1500, f"only {red.sum()} red pixels: no overlay, no badges"
    # the dark pixels sit in the thumbnail column, two blocks for two flagged studies
    cols = np.nonzero(dark.sum(0) > 50)[0]
    rows = np.nonzero(dark.sum(1) > 50)[0]
    assert cols.size and (cols.max() - cols.min()) >= 300  # 360-pixel-wide thumbnails
    gaps = np.diff(rows)
    assert (gaps > 10).sum() >= 1, "the two thumbnails are not separate pictures"


def test_report_names_the_rule_that_chose_T(tmp_path):
    """Each threshold rule in words, as the CLI and the jobs' logs say it (a Youden point once read "best F1")."""
    results, summary = _results(tmp_path)
    for rule, words in (({"rule": "youden"}, "best Youden's J on validation"),
                        ({"rule": "best_f1"}, "best F1 on validation")):
        summary["operating_point"]["threshold_rule"] = rule
        (tmp_path / rule["rule"]).mkdir()
        page = write_screening_report(tmp_path / rule["rule"], results, summary).read_text(encoding="utf-8")
        assert html.escape(words) in page, words
