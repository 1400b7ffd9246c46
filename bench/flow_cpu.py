"""CPU throughput of the 3D GLOW: training steps and scoring (no_grad log_prob), in patches/s.

Usage::

    .venv/bin/python bench/flow_cpu.py [--threads 2] [--no-paper] [--append docs/BENCHMARKS.md]

Measures the tiny test model (L=2, K=2, width 16) on 16³ and 32³ patches and the paper-sized model
(L=4, K=64, default width, 48³) with batch 1 and one or two iterations (the paper-sized training
step peaks at ≈ 9 GB of memory; it is skipped when less than 12 GiB is available). Imports only torch
and ct3dflow's torch-only core. Prints a markdown section and optionally appends it to a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import cpu_model  # noqa: E402

from ct3dflow.flow import DEFAULT_WIDTH  # noqa: E402
from ct3dflow.train import FlowTrainer, TrainConfig  # noqa: E402


def available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def patches(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, size, generator=g)
    x = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1)
    return (-0.37 + 0.05 * x / x.std()).float()


def bench_one(name, levels, steps, width, size, batch, train_iters, score_iters, do_train=True):
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = TrainConfig(levels=levels, steps=steps, width=width, patch_size=size, batch_size=batch,
                      warmup_steps=10, lr=1e-4)
    model = cfg.build_model()
    build_s = time.perf_counter() - t0
    data = patches(max(batch, 2), size, 0)
    trainer = FlowTrainer(model, cfg, "cpu")
    trainer.initialise(data[:batch])
    row = {"name": name, "batch": batch, "params": model.num_parameters(),
           "gflop": model.flops_per_patch() / 1e9, "build_s": build_s}
    x = data[:batch]
    model.eval()
    with torch.no_grad():
        if score_iters > 1:
            model.log_prob(x)  # warm-up
        t = time.perf_counter()
        for _ in range(score_iters):
            lp = model.log_prob(x)
        dt_s = time.perf_counter() - t
    row["score_ps"] = batch * score_iters / dt_s
    row["score_finite"] = bool(torch.isfinite(lp).all())
    row["train_ps"] = float("nan")
    row["grad_norm"] = float("nan")
    if do_train:
        if train_iters > 1:
            trainer.train_step(x)  # warm-up
        t = time.perf_counter()
        for _ in range(train_iters):
            out = trainer.train_step(x)
        dt_s = time.perf_counter() - t
        row["train_ps"] = batch * train_iters / dt_s
        row["grad_norm"] = out["grad_norm"]
    row["peak_rss_gib"] = peak_rss_gib()
    print(row, flush=True)
    return row


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-sized model")
    ap.add_argument("--paper-score-iters", type=int, default=2)
    ap.add_argument("--paper-train-iters", type=int, default=1)
    ap.add_argument("--append", type=Path, default=None, help="append the markdown section to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/flow_cpu.py", *(argv or sys.argv[1:])])

    rows = [
        bench_one("tiny L=2 K=2 w=16, 16³", 2, 2, 16, 16, 8, 10, 10),
        bench_one("tiny L=2 K=2 w=16, 32³", 2, 2, 16, 32, 8, 5, 5),
    ]
    notes = []
    if not args.no_paper:
        avail = available_gib()
        do_train = avail > 12
        if not do_train:
            notes.append(f"paper-sized training step skipped: only {avail:.1f} GiB memory available")
        rows.append(bench_one(f"paper L=4 K=64 w={DEFAULT_WIDTH}, 48³", 4, 64, DEFAULT_WIDTH, 48, 1,
                              args.paper_train_iters, args.paper_score_iters, do_train))

    lines = [
        "",
        "## 3D GLOW on CPU (`bench/flow_cpu.py`)",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()}, torch threads: {args.threads}; torch {torch.__version__}; "
        f"Python {platform.python_version()}",
        f"- command: `{command}`",
        "- train = one `FlowTrainer.train_step` (dequantise, forward, backward, clip, Adam), float32; "
        "score = `log_prob` under `no_grad`; synthetic smooth patches; the first iteration is a "
        "warm-up and not timed when more than one iteration runs; the paper-sized rows time 1–2 "
        "iterations only. GFLOP = forward FLOPs per patch (2 × conv MACs). Peak RSS is the process's "
        "running maximum.",
        *[f"- {n}" for n in notes],
        "",
        "| model | batch | params | GFLOP/patch (fwd) | build s | train patches/s | score patches/s "
        "| grad norm (last step) | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['params'] / 1e6:.2f} M | {r['gflop']:.2f} "
            f"| {r['build_s']:.1f} "
            f"| {r['train_ps']:.3g} | {r['score_ps']:.3g} | {r['grad_norm']:.3g} | {r['peak_rss_gib']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append is not None:
        path = args.append
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("# Benchmarks\n", encoding="utf-8")
        with path.open("a") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
