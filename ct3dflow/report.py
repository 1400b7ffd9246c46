"""``report.html``: one self-contained page per screening run, for the person on duty in the morning.

A header (the model version, the operating point, when, and the counts: found, scored, skipped, flagged,
errors) and one table of every study: its status, abnormal volume, decision and, for an error, the
reason; each flagged study's preview is embedded as a thumbnail (a ``data:`` URI, so the page needs
nothing from the network and can be mailed or archived as one file). Flagged studies come first, then
errors, then the rest. No Ray, no MLflow here.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import pandas as pd

from .detect.operating_point import describe_rule

REPORT_FILE = "report.html"
THUMB_WIDTH = 360

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:24px;color:#1d2330}
h1{font-size:22px;margin:0 0 4px} .sub{color:#5b6577;margin:0 0 16px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0 20px}
.card{border:1px solid #d8dde6;border-radius:8px;padding:10px 16px;min-width:90px}
.card b{display:block;font-size:24px} .card span{color:#5b6577;font-size:13px}
.flagged b{color:#b3261e} .error b{color:#8a5a00}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{border-bottom:1px solid #e3e7ee;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f9;position:sticky;top:0}
tr.flagged td{background:#fdf1f0} tr.error td{background:#fff8e6}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;font-size:12px;font-weight:600}
.b-flag{background:#b3261e;color:#fff} .b-norm{background:#2e7d32;color:#fff} .b-err{background:#c77700;color:#fff}
.b-none{background:#9aa3b2;color:#fff} td.num{text-align:right;font-variant-numeric:tabular-nums}
img.thumb{width:THUMBpx;border:1px solid #ccd2dc;border-radius:4px;display:block}
.op{font-family:ui-monospace,Menlo,monospace;font-size:13px;background:#f3f5f9;padding:6px 8px;border-radius:4px}
td.path{overflow-wrap:anywhere;min-width:12em;font-size:12px;color:#5b6577}
""".replace("THUMB", str(THUMB_WIDTH))


def thumbnail_data_uri(png_path, width: int = THUMB_WIDTH) -> str | None:
    """The preview scaled to ``width`` pixels, as a ``data:image/png;base64,…`` URI (None when unreadable)."""
    from PIL import Image

    try:
        with Image.open(png_path) as im:
            im = im.convert("RGB")
            h = max(1, round(im.height * width / im.width))
            buf = io.BytesIO()
            im.resize((width, h), Image.LANCZOS).save(buf, format="PNG", optimize=True)
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _decision(r) -> tuple[str, str, str]:
    """(row class, badge html, sort key) of one result row."""
    if r.get("status") == "error":
        return "error", '<span class="badge b-err">error</span>', "1"
    pa = r.get("predicted_abnormal")
    if pa is None or pd.isna(pa):
        return "", '<span class="badge b-none">no decision</span>', "3"
    if bool(pa):
        return "flagged", '<span class="badge b-flag">ABNORMAL</span>', "0"
    return "", '<span class="badge b-norm">normal</span>', "2"


def _fmt(v, spec: str = ".1f") -> str:
    return "" if v is None or (isinstance(v, float) and pd.isna(v)) else format(float(v), spec)


def render_report(results: pd.DataFrame, summary: dict, base_dir=None) -> str:
    """The page as a string; ``base_dir`` makes the links to full previews relative (the results folder)."""
    e = html.escape
    rows = results.to_dict("records")
    keyed = sorted(((_decision(r), i, r) for i, r in enumerate(rows)), key=lambda t: (t[0][2], t[1]))
    body = []
    for (cls, badge, _), _, r in keyed:
        thumb = ""
        prev = r.get("preview_path")
        if cls == "flagged" and isinstance(prev, str) and prev:
            uri = thumbnail_data_uri(prev)
            link = os.path.relpath(prev, base_dir) if base_dir else prev
            thumb = (f'<a href="{e(link)}"><img class="thumb" alt="preview of {e(str(r["study_id"]))}" '
                     f'src="{uri}"></a>' if uri else '<em>preview unreadable</em>')
        body.append(
            f'<tr class="{cls}"><td>{e(str(r.get("study_id", "")))}</td><td>{badge}</td>'
            f'<td class="num">{_fmt(r.get("abnormal_volume_cm3"))}</td>'
            f'<td>{e(str(r.get("error") or ""))}</td><td>{thumb}</td>'
            f'<td class="path">{e(str(r.get("path") or ""))}</td></tr>')
    op = summary.get("operating_point")
    if op:
        params = ", ".join(f"{k} = {v:g}" for k, v in op.get("params", {}).items())
        rule_txt = describe_rule(op.get("threshold_rule", {}))
        op_txt = (f"{op.get('map')} map; {params}; T = {op.get('threshold_cm3'):.3g} cm³ ({rule_txt}); "
                  f"from the {summary.get('operating_point_source', '')}")
    else:
        op_txt = "none: studies were scored, not decided (run the tune job)"
    cards = [("found", "found", ""), ("scored", "scored now", ""), ("skipped", "already scored", ""),
             ("flagged", "flagged", "flagged"), ("errors", "errors", "error")]
    cards_html = "".join(f'<div class="card {c}"><b>{int(summary.get(k, 0))}</b><span>{label}</span></div>'
                         for k, label, c in cards)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>CT-3DFlow screening {e(str(summary.get("run_name", "")))}</title>
<style>{_CSS}</style></head><body>
<h1>CT-3DFlow screening report</h1>
<p class="sub">run {e(str(summary.get("run_name", "")))} · finished {e(str(summary.get("finished_at", "")))} ·
model <b>{e(str(summary.get("model_version", "")))}</b> · {e(str(summary.get("map_kind", "")))} map</p>
<div class="op">operating point: {e(op_txt)}</div>
<div class="cards">{cards_html}</div>
<table><thead><tr><th>study</th><th>decision</th><th>abnormal volume (cm³)</th><th>reason (errors)</th>
<th>preview (flagged)</th><th>input</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<p class="sub">Flagged: abnormal volume above T. A flag asks a radiologist to look; it is not a diagnosis.</p>
</body></html>
"""


def write_screening_report(results_dir, results: pd.DataFrame, summary: dict) -> Path:
    """Write ``report.html`` into ``results_dir`` (atomically); returns its path."""
    results_dir = Path(results_dir)
    path = results_dir / REPORT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_report(results, summary, base_dir=results_dir), encoding="utf-8")
    os.replace(tmp, path)
    return path
