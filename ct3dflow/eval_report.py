"""Pictures and tables of a test evaluation: ROC curve and confusion matrix (PNG, drawn with Pillow —
matplotlib is not a dependency), Table 1 rows and the per-pathology-kind breakdown in markdown.

No Ray and no MLflow here; :func:`ct3dflow.ray_jobs.evaluate_job` logs what these write.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# how Table 1 names the model kinds (the paper's rows)
DISPLAY_NAMES = {"glow3d": "CT-3DFlow", "ae": "AE"}


def display_name(kind: str, name: str | None = None, version: str | None = None) -> str:
    base = DISPLAY_NAMES.get(kind, kind)
    return f"{base} ({name} v{version})" if name and version else base


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def roc_png(roc: dict, path, auroc: float | None = None, operating: tuple[float, float] | None = None,
            title: str = "ROC (test)", size: int = 480) -> Path:
    """The ROC curve (``{"fpr", "tpr"}``) with the chance diagonal, AUROC in the legend and the chosen
    operating point (``(1 − specificity, sensitivity)``) as a dot."""
    m = 60  # margin for the axes' labels
    w = h = size
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = m, 52, w - 20, h - m

    def px(fx: float, fy: float) -> tuple[float, float]:
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    for t in np.linspace(0, 1, 6):  # grid and ticks
        d.line([px(t, 0), px(t, 1)], fill=(230, 230, 230))
        d.line([px(0, t), px(1, t)], fill=(230, 230, 230))
        d.text((px(t, 0)[0] - 8, y1 + 6), f"{t:.1f}", fill="black", font=_font(12))
        d.text((x0 - 30, px(0, t)[1] - 7), f"{t:.1f}", fill="black", font=_font(12))
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.line([px(0, 0), px(1, 1)], fill=(160, 160, 160), width=1)
    fpr, tpr = list(roc.get("fpr", [])), list(roc.get("tpr", []))
    if len(fpr) >= 2:
        d.line([px(a, b) for a, b in zip(fpr, tpr)], fill=(31, 119, 180), width=3)
    if operating is not None and all(np.isfinite(operating)):
        cx, cy = px(*operating)
        d.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], fill=(214, 39, 40), outline="black")
    d.text((x0, 6), title, fill="black", font=_font(16))
    label = "AUROC —" if auroc is None or not math.isfinite(auroc) else f"AUROC {auroc:.3f}"
    d.text((px(0.45, 0.1)[0], px(0.45, 0.1)[1]), label, fill=(31, 119, 180), font=_font(16))
    if operating is not None:
        lx, ly = px(0.45, 0.18)
        d.ellipse([lx, ly + 3, lx + 10, ly + 13], fill=(214, 39, 40), outline="black")
        d.text((lx + 16, ly), "operating point (T)", fill=(214, 39, 40), font=_font(13))
    d.text(((x0 + x1) / 2 - 70, h - 28), "1 - specificity (FPR)", fill="black", font=_font(13))
    d.text((x0 - 30, y0 - 20), "sensitivity (TPR)", fill="black", font=_font(13))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def confusion_png(metrics: dict, path, title: str = "Confusion matrix (test)", cell: int = 130) -> Path:
    """2×2 counts: rows the truth (normal, abnormal), columns the decision (normal, abnormal)."""
    tn, fp, fn, tp = (int(metrics.get(k, 0)) for k in ("tn", "fp", "fn", "tp"))
    left, top = 150, 80
    w, h = left + 2 * cell + 20, top + 2 * cell + 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black", font=_font(16))
    d.text((left + 10, 36), "predicted normal", fill="black", font=_font(12))
    d.text((left + cell + 6, 36), "predicted abnormal", fill="black", font=_font(12))
    total = max(tn + fp + fn + tp, 1)
    cells = [[("TN", tn), ("FP", fp)], [("FN", fn), ("TP", tp)]]
    for r, truth in enumerate(("normal", "abnormal")):
        d.text((10, top + r * cell + cell / 2 - 8), f"truly {truth}", fill="black", font=_font(13))
        for c in range(2):
            name, n = cells[r][c]
            good = r == c
            shade = int(255 - 150 * n / total)
            colour = (shade, 255, shade) if good else (255, shade, shade)
            box = [left + c * cell, top + r * cell, left + (c + 1) * cell, top + (r + 1) * cell]
            d.rectangle(box, fill=colour, outline="black")
            d.text((box[0] + cell / 2 - 18, box[1] + cell / 2 - 20), str(n), fill="black", font=_font(26))
            d.text((box[0] + 8, box[1] + 6), name, fill=(60, 60, 60), font=_font(12))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def per_kind_markdown(per_kind: dict) -> str:
    lines = ["| Pathology | n abnormal | AUROC vs. normals | Sensitivity | Median abnormal volume (cm³) |",
             "|---|---|---|---|---|"]
    for kind, k in sorted(per_kind.items()):
        def f(v):
            return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"

        lines.append(f"| {kind} | {k['n']} | {f(k['auroc'])} | {f(k['sensitivity'])} | "
                     f"{f(k['median_abnormal_volume_cm3'])} |")
    return "\n".join(lines) + "\n"
