"""Training the detection model in bf16 on a CPU: the step against float32, the gradient, the curve.

    .venv/bin/python bench/train_bf16.py [--steps 300] [--threads 2] [--write-docs]

``train.bf16: true`` runs the training step under ``torch.autocast("cpu", bfloat16)`` where the CPU has native
bf16 (AMX or AVX-512 BF16) and the coarsest level of the flow is at least 3³ (``ct3dflow.train.cpu_bf16_refusal``).
This measures, in one run on healthy patches of six small phantoms (the same batches for both precisions):

* the seconds per training step of the detection model (L=3, K=8, width 64, 24³, batch 16), fp32 and bf16;
* the gradient of one batch in bf16 against fp32 (cosine per parameter, worst one, and of the whole gradient)
  at three sizes: 24³/L=3 (coarsest 3³), 16³/L=2 (4³), 8³/L=2 (2³: the size the trainer refuses);
* with ``--steps N``: held-out bits/dim after N steps from the same initialisation, fp32 and bf16, and the
  wall time of each (the question is bits/dim per minute, not per step).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from _machine import cpu_model, publish

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## Training in bf16 on a CPU (`bench/train_bf16.py`)"


def healthy_patches(tmp: Path):
    """Volumes and strict masks of six healthy small phantoms (as the demo's training split)."""
    from ct3dflow.preprocess import preprocess_study
    from ct3dflow.synthetic import make_phantom, write_nifti

    vols, stricts = [], []
    for i in range(6):
        write_nifti(make_phantom(5100 + i, None), tmp / f"h{i}.nii.gz")
        s = preprocess_study(tmp / f"h{i}.nii.gz")
        vols.append(s.volume)
        stricts.append(s.strict)
    return vols, stricts


def gradient_agreement(vols, stricts, levels, steps, width, size):
    import torch

    from ct3dflow.train import TrainConfig, patch_batches_from_arrays

    cfg = TrainConfig(levels=levels, steps=steps, width=width, patch_size=size, batch_size=16)
    x = next(patch_batches_from_arrays(vols, stricts, cfg, seed=1))
    x = x + torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) / 1220
    torch.manual_seed(0)
    g = cfg.build_model()
    g.initialize(x)
    with torch.no_grad():  # off the identity initialisation, so that every coupling has a gradient
        for p in g.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    grads = []
    for bf16 in (False, True):
        g.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = -g.log_prob(x).float().mean()
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in g.named_parameters() if p.grad is not None})
    cos = {n: float(torch.nn.functional.cosine_similarity(grads[0][n].flatten(), grads[1][n].flatten(), dim=0))
           for n in grads[0] if grads[0][n].norm() > 0}
    worst = min(cos, key=cos.get)
    whole = float(torch.nn.functional.cosine_similarity(torch.cat([v.flatten() for v in grads[0].values()]),
                                                        torch.cat([v.flatten() for v in grads[1].values()]), dim=0))
    return {"size": size, "levels": levels, "coarsest": size // 2**levels, "worst_cos": cos[worst],
            "worst_param": worst, "whole_cos": whole}


def timed_training(vols, stricts, bf16: bool, steps: int, val):
    import torch

    from ct3dflow.train import FlowTrainer, TrainConfig, patch_batches_from_arrays

    cfg = TrainConfig(levels=3, steps=8, width=64, patch_size=24, batch_size=16, iterations=steps, lr=1e-3,
                      warmup_steps=100, bf16=bf16)
    torch.manual_seed(0)
    trainer = FlowTrainer(cfg.build_model(), cfg, "cpu")
    assert trainer.bf16 == bf16, "this CPU refuses bf16 training (see ct3dflow.train.cpu_bf16_refusal)"
    batches = patch_batches_from_arrays(vols, stricts, cfg, seed=0)
    trainer.initialise(next(batches))
    batch = [next(batches) for _ in range(min(steps, 8))]
    for b in batch[:2]:  # warm-up (oneDNN primitive caches)
        trainer.train_step(b)
    t = time.time()
    for b in batch[2:]:
        trainer.train_step(b)
    per_step = (time.time() - t) / max(1, len(batch) - 2)
    t = time.time()
    while trainer.step < steps:
        trainer.train_step(next(batches))
    return per_step, time.time() - t, trainer.validate(val)


def main() -> None:
    import torch

    from ct3dflow.flow.dtypes import bf16_available
    from ct3dflow.train import TrainConfig, patch_batches_from_arrays

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="also train N steps in each precision (curve)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    if not bf16_available("cpu"):
        sys.exit("this CPU has no native bf16 (AMX or AVX-512 BF16): the trainer keeps float32 here")
    torch.set_num_threads(a.threads)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "ct3dflow-bench-bf16"
    tmp.mkdir(exist_ok=True)
    vols, stricts = healthy_patches(tmp)
    val_cfg = TrainConfig(levels=3, steps=8, width=64, patch_size=24, batch_size=64)
    val = next(patch_batches_from_arrays(vols, stricts, val_cfg, seed=99))
    grads = [gradient_agreement(vols, stricts, *s) for s in ((3, 8, 64, 24), (2, 2, 16, 16), (2, 2, 8, 8))]
    runs = {bf16: timed_training(vols, stricts, bf16, max(a.steps, 8), val) for bf16 in (False, True)}
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    lines = [SECTION, "",
             f"- date: {datetime.now().isoformat(timespec='seconds')}; CPU: {cpu_model()}, {a.threads} torch threads "
             f"(AMX tiles: {'yes' if amx else 'no'}); torch {torch.__version__}",
             f"- command: `python bench/train_bf16.py {' '.join(sys.argv[1:])}`".replace("  ", " ").replace(" `", "`"),
             "- model: the detection model (L=3, K=8, width 64, 24³, batch 16, Adam 1e-3, 100 warm-up steps); "
             "healthy patches of six small phantoms; the same batches and initialisation for both precisions", "",
             "| precision | seconds per step | vs fp32 |" + (f" held-out bits/dim after {a.steps} steps | "
                                                          f"minutes for them |" if a.steps else ""),
             "|---|---|---|" + ("---|---|" if a.steps else "")]
    for bf16, (per_step, total, bpd) in runs.items():
        lines.append(f"| {'bf16 autocast' if bf16 else 'fp32'} | {per_step:.3f} | "
                     f"{runs[False][0] / per_step:.2f}× |" + (f" {bpd:.3f} | {total / 60:.1f} |" if a.steps else ""))
    lines += ["", "The gradient of one batch, bf16 against fp32 (perturbed initialisation):", "",
              "| patch | levels | coarsest level | worst parameter: cosine | whole gradient: cosine |",
              "|---|---|---|---|---|"]
    lines += [f"| {g['size']}³ | {g['levels']} | {g['coarsest']}³ | {g['worst_cos']:.4f} (`{g['worst_param']}`) | "
              f"{g['whole_cos']:.4f} |" for g in grads]
    publish(SECTION, lines, a.write_docs)


if __name__ == "__main__":
    main()
