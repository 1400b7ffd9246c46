"""Contiguous against channels-last convolution weights on the CPU: a training step and scoring, per model.

    .venv/bin/python bench/cpu_layout.py [--threads 2] [--write-docs]

The models the platform trains and scores on CPUs: the demo's CT-3DFlow (L=3, K=4, width 32, 24³), the
detection recipe (L=3, K=8, width 64, 24³) and the demo's AE baseline (width 8, 16³), freshly initialised
(the speed does not depend on the weights). For each, in turn and twice, the seconds of one training step
(batch 16, Adam) and the milliseconds per window of no-grad ``log_prob`` (batch 32), with the weights in the
contiguous layout (the CPU path before 2026-12-06) and channels-last
(:func:`ct3dflow.models.channels_last_on_cpu`, what the trainer and the scorers do on a CPU since). Also the
largest relative difference of the log-likelihoods between the layouts. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from _machine import cpu_model, publish

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ct3dflow.baselines import ConvAE3D  # noqa: E402
from ct3dflow.flow import Glow3D  # noqa: E402
from ct3dflow.models import channels_last_on_cpu  # noqa: E402

SECTION = "## Convolution weight layout on the CPU (`bench/cpu_layout.py`)"


def patches(n: int, size: int) -> torch.Tensor:
    x = 0.05 * torch.randn(n, 1, size, size, size, generator=torch.Generator().manual_seed(n)) - 0.3
    return x.clamp(-0.5, 0.5)


def timed(fn, n: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def measure(model, size: int, train_steps: int, score_reps: int) -> tuple[float, float, torch.Tensor]:
    x_train, x_score = patches(16, size), patches(32, size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        (-model.log_prob(x_train).mean()).backward()
        opt.step()

    model.train()
    step_s = timed(step, train_steps)
    model.eval()
    with torch.no_grad():
        score_s = timed(lambda: model.log_prob(x_score), score_reps)
        return step_s, 1000 * score_s / len(x_score), model.log_prob(x_score)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--score-reps", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    models = {
        "CT-3DFlow, the demo's (L=3, K=4, width 32, 24³)": (lambda: Glow3D(3, 4, 32, patch_size=24), 24),
        "CT-3DFlow, the detection recipe (L=3, K=8, width 64, 24³)": (lambda: Glow3D(3, 8, 64, patch_size=24), 24),
        "AE baseline, the demo's (width 8, 16³)": (lambda: ConvAE3D(width=8, patch_size=16), 16)}
    rows = []
    for name, (build, size) in models.items():
        torch.manual_seed(0)
        base = build()
        if isinstance(base, Glow3D):
            base.initialize(patches(16, size))
        for rep in range(2):
            out = {}
            for layout in ("contiguous", "channels-last"):
                m = copy.deepcopy(base)
                if layout == "channels-last":
                    channels_last_on_cpu(m, "cpu")
                step_s, ms, lp = measure(m, size, a.train_steps, a.score_reps)
                out[layout] = lp
                diff = float(((lp - out["contiguous"]).abs() / out["contiguous"].abs().clamp_min(1e-6)).max())
                rows.append((name, layout, rep + 1, step_s, ms, diff))
                print(rows[-1], flush=True)
    lines = [SECTION, "", f"- date: {datetime.now().isoformat(timespec='seconds')}; CPU: {cpu_model()}, "
             f"{a.threads} torch threads; torch {torch.__version__}",
             f"- command: `python bench/cpu_layout.py {' '.join(sys.argv[1:])}`",
             "", "| model | weights | round | training step, batch 16 (s) | scoring (ms per window) | "
             "max relative difference of log p from contiguous |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {lay} | {r} | {s:.3f} | {ms:.2f} | {d:.1e} |" for n, lay, r, s, ms, d in rows]
    publish(SECTION, lines, a.write_docs)


if __name__ == "__main__":
    main()
