"""GPU benchmark of the 3D GLOW: eager vs optimised training step and scoring, fp32 / tf32 / bf16 (issue 7).

One run on a bare GPU box (torch + numpy; imports only ``ct3dflow.flow``, no SimpleITK/Ray/MLflow)::

    python bench/gpu_flow.py --widths 256 512 --out $OUT/gpu_flow.json > $OUT/gpu_flow.md

What it measures, in priority order (a time guard, ``--budget-s``, skips what does not fit and says so):

1. the chip's dense peak in the same run: an 8192³ matmul in fp32 (IEEE), tf32 and bf16;
2. a micro-benchmark of level-1/level-2 coupling networks: cuDNN NCDHW (eager) vs cuDNN channels-last vs
   tap GEMMs (``ct3dflow.flow.fast.conv3x3_cl``), forward+backward at batch 5 and no-grad at batch 64;
3. per width (paper model L=4, K=64, 48³; zero-initialised layers perturbed so every layer is exercised):
   correctness — optimised vs eager ``log_prob`` on the same random non-zero patches, per precision
   (fp32 must agree to 1e-5 relative, bf16 to 1e-2) — then per precision:
   training step at batch 5 (dequantise, forward, bits/dim loss, backward, clip, finite check, Adam) as
   the plain eager model (reference layers, foreach Adam, cuDNN heuristics) and optimised
   (``optimise(mode="train")``: channels-last fast path + CUDA graphs of forward/backward + fused Adam);
   scoring throughput (no-grad ``log_prob``) eager at batch 16 and 32 and optimised
   (``optimise(mode="score")``: fast path + one CUDA graph) at batch 64 and 128;
   for the widest model, the optimised step with gradient checkpointing (the memory option);
4. with ``--compile``: regional ``torch.compile`` of one flow step on top (width 256, bf16 — compile time
   is reported separately and is not in the step time).

FLOPs are the model's count (2 × conv MACs, ``Glow3D.flops_per_patch``), training = 3 × forward.
Achieved TFLOP/s and share of the measured peak of the same precision; peak memory is
``torch.cuda.max_memory_allocated`` per cell. Out-of-memory and capture errors are caught per cell and
recorded. The JSON is rewritten after every cell, so a run killed by a time limit keeps what it measured.

``python bench/gpu_flow.py --cpu-smoke`` runs the whole script on the CPU with tiny models (< 60 s):
it checks that the script works, not speed (no tf32, no CUDA graphs on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ct3dflow.flow import Glow3D, nats_to_bits_per_dim  # noqa: E402
from ct3dflow.flow.coupling import CouplingNet3d  # noqa: E402
from ct3dflow.flow.fast import conv3x3_cl, float32_precision, optimise  # noqa: E402

ISSUE_PEAK_H200 = {"tf32": 421.0, "bf16": 806.0}  # TFLOP/s, from issue 7 (dense, datasheet-like)
PRECISIONS = ("bf16", "tf32", "fp32")  # run order: the recommended precision first


# ------------------------------------------------------------------------------------------ plumbing
class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@contextlib.contextmanager
def precision(prec: str, dev: torch.device):
    """fp32: IEEE float32 matmuls and convolutions; tf32: TF32 both; bf16: autocast bf16, IEEE float32
    for what stays float32 (log-dets, main stream, 1×1×1 conv)."""
    fp32 = "tf32" if prec == "tf32" else "ieee"
    ctx = float32_precision(fp32) if dev.type == "cuda" else contextlib.nullcontext()
    with ctx:
        yield


def autocast(prec: str, dev: torch.device):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=prec == "bf16")


def timed(fn, dev: torch.device, iters: int, cap_s: float, warmup: int = 1) -> tuple[list[float], float]:
    """Warm-up calls (returned as seconds) then up to ``iters`` timed calls, stopping after ``cap_s``."""
    t = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(dev)
    warm_s = time.perf_counter() - t
    times: list[float] = []
    t_all = time.perf_counter()
    while len(times) < max(1, iters):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - t_all > cap_s:
            break
    return times, warm_s


def patches(n: int, size: int, dev: torch.device, seed: int = 0) -> torch.Tensor:
    """Smooth random patches in the normalised range (lung-like mean −0.37): never zeros."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, 1, size, size, size, generator=g).to(dev)
    x = F.avg_pool3d(x, 3, stride=1, padding=1)
    return (-0.37 + 0.05 * x / x.std()).clamp(-0.5, 0.5).float()


def perturb_zero_inits(glow: Glow3D, std: float, seed: int = 0) -> None:
    """Give the zero-initialised layers small random values, so that correctness covers every layer."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in glow.named_parameters():
            if name.endswith("zero.conv.weight") or name.endswith("prior.conv.weight"):
                p.copy_(std * torch.randn(p.shape, generator=g))
            elif name in ("prior.mean", "prior.log_sd") or name.endswith("zero.conv.bias"):
                p.copy_(0.01 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------ peak
def measure_peak(dev: torch.device, n: int, budget: Budget) -> dict:
    out = {}
    for prec in ("fp32", "tf32", "bf16"):
        if dev.type != "cuda" and prec == "tf32":
            continue
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        with precision(prec, dev):
            times, _ = timed(lambda a=a, b=b: a @ b, dev, iters=10, cap_s=3.0, warmup=3)
        out[prec] = 2 * n**3 / float(np.median(times)) / 1e12
        del a, b
    free(dev)
    return out


# ------------------------------------------------------------------------------------------ micro
def micro_coupling(dev: torch.device, width: int, size: int, budget: Budget, batches=(5, 64),
                   reserve_s: float = 30.0, iters: int = 10, warmup: int = 3) -> list[dict]:
    """Level-1 (8 ch, size/2) and level-2 (32 ch, size/4) coupling networks, three conv implementations."""
    rows = []
    torch.manual_seed(0)
    for level, (c, s) in enumerate([(8, size // 2), (32, size // 4)], start=1):
        n_a = c // 2
        net = CouplingNet3d(n_a, 2 * (c - n_a), width).to(dev)
        with torch.no_grad():
            net.zero.conv.weight.normal_(0, 1e-3)
        macs = (27 * n_a * width + width * width + 27 * width * 2 * (c - n_a)) * s**3
        for prec in ("bf16", "tf32"):
            if dev.type != "cuda" and prec == "tf32":
                continue
            for impl in ("eager-ncdhw", "cudnn-cl", "gemm"):
                for bsz, train in ((batches[0], True), (batches[1], False)):
                    if budget.left() < reserve_s:
                        return rows
                    row = {"level": level, "channels": c, "spatial": s, "width": width, "precision": prec,
                           "impl": impl, "batch": bsz, "mode": "fwd+bwd" if train else "no-grad fwd"}
                    try:
                        x = torch.randn(bsz, n_a, s, s, s, device=dev)  # post-ActNorm-like scale
                        xl = x.permute(0, 2, 3, 4, 1).contiguous()

                        def run(x=x, xl=xl, impl=impl, train=train, prec=prec, net=net):
                            with torch.set_grad_enabled(train), autocast(prec, dev):
                                if impl == "eager-ncdhw":
                                    h = net(x)
                                else:
                                    conv = "cudnn" if impl == "cudnn-cl" else "gemm"
                                    h = F.relu(conv3x3_cl(xl, net.conv1.weight, net.conv1.bias, conv))
                                    h = F.relu(F.linear(h, net.conv2.weight.reshape(width, width), net.conv2.bias))
                                    h = conv3x3_cl(h, net.zero.conv.weight, net.zero.conv.bias, conv)
                                if train:
                                    h.float().square().mean().backward()

                        with precision(prec, dev):
                            times, _ = timed(run, dev, iters=iters, cap_s=2.0, warmup=warmup)
                        t = float(np.median(times))
                        flops = 2 * macs * bsz * (3 if train else 1)
                        row.update(ms=1e3 * t, tflops=flops / t / 1e12)
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:300]
                    net.zero_grad(set_to_none=True)
                    rows.append(row)
        del net
        free(dev)
    return rows


# ------------------------------------------------------------------------------------------ cells
class Bench:
    def __init__(self, args, dev: torch.device):
        self.args = args
        self.dev = dev
        self.budget = Budget(args.budget_s)
        self.result = {"meta": {}, "peak_tflops": {}, "micro": [], "correctness": [], "train": [], "score": [],
                       "profile": [], "skipped": [], "errors": []}

    # --- output
    def save(self) -> None:
        self.result["meta"]["elapsed_s"] = round(self.budget.elapsed(), 1)
        if self.args.out:
            path = Path(self.args.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(self.result, indent=1, default=str), encoding="utf-8")
            tmp.replace(path)

    def log(self, msg: str) -> None:
        print(f"[{self.budget.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    def fits(self, what: str, need_s: float) -> bool:
        if self.budget.left() >= need_s:
            return True
        self.result["skipped"].append({"cell": what, "reason": f"time budget ({self.budget.left():.0f} s left, "
                                                               f"~{need_s:.0f} s needed)"})
        self.log(f"skip {what}: time budget")
        return False

    # --- model
    def build(self, width: int) -> Glow3D:
        a = self.args
        torch.manual_seed(0)
        t = time.perf_counter()
        with torch.device(self.dev):
            glow = Glow3D(levels=a.levels, steps=a.steps, width=width, patch_size=a.patch)
        perturb_zero_inits(glow, std=a.perturb_std)
        glow.initialize(patches(a.init_patches, a.patch, self.dev, seed=123))
        sync(self.dev)
        self.log(f"built width {width}: {glow.num_parameters() / 1e6:.1f} M params in {time.perf_counter() - t:.1f} s")
        return glow

    # --- correctness
    def correctness(self, glow: Glow3D, width: int) -> None:
        a, dev = self.args, self.dev
        x = patches(a.check_patches, a.patch, dev, seed=7)
        assert float(x.abs().min()) > 0
        glow.eval()
        glow.fast = None
        with torch.no_grad(), precision("fp32", dev):
            ref = glow.log_prob(x).double()
        eager = {}
        for prec in a.precisions:
            glow.fast = None
            with torch.no_grad(), precision(prec, dev), autocast(prec, dev):
                eager[prec] = glow.log_prob(x).double()
        for prec in a.precisions:
            row = {"width": width, "precision": prec, "patches": len(x)}
            try:
                for variant in ("fast", "fast+graph"):
                    with precision(prec, dev):
                        scorer = optimise(glow, dev, mode="score", compile=False, batch_size=len(x),
                                          cuda_graphs=variant == "fast+graph", force_cpu=True,
                                          autocast_dtype=torch.bfloat16 if prec == "bf16" else None)
                        with torch.no_grad(), autocast(prec, dev):
                            lp = scorer.log_prob(x).double()
                    rel_e = float(((lp - eager[prec]).abs() / eager[prec].abs()).max())
                    rel_r = float(((lp - ref).abs() / ref.abs()).max())
                    bpd = float((nats_to_bits_per_dim(lp, glow.dim) - nats_to_bits_per_dim(ref, glow.dim)).abs().max())
                    row[variant] = {"rel_vs_eager_same_precision": rel_e, "rel_vs_fp32_eager": rel_r,
                                    "abs_bits_per_dim_vs_fp32": bpd}
                    if hasattr(scorer, "release"):
                        scorer.release()
                    glow.fast = None
                row["eager_rel_vs_fp32"] = float(((eager[prec] - ref).abs() / ref.abs()).max())
                tol = {"fp32": 1e-5, "tf32": 1e-3, "bf16": 1e-2}[prec]
                row["tolerance"] = tol
                row["pass"] = all(row[v]["rel_vs_eager_same_precision"] <= tol for v in ("fast", "fast+graph"))
                row["log_p_ref_mean"] = float(ref.mean())
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                self.result["errors"].append({"cell": f"correctness w{width} {prec}", "trace": traceback.format_exc()})
            glow.fast = None
            self.result["correctness"].append(row)
            self.log(f"correctness w{width} {prec}: {row}")
        free(dev)
        self.save()

    # --- training
    def train_cell(self, glow: Glow3D, width: int, prec: str, variant: str, est_s: float) -> None:
        a, dev = self.args, self.dev
        name = f"train w{width} {prec} {variant}"
        if not self.fits(name, est_s):
            return
        row = {"width": width, "precision": prec, "variant": variant, "batch": a.train_batch}
        fwd = opt = None
        data = patches(a.train_batch, a.patch, dev, seed=11)
        free(dev)
        try:
            glow.train()
            glow.gradient_checkpointing = variant.endswith("ckpt")
            if variant == "eager":
                glow.fast = None
                torch.backends.cudnn.benchmark = False
                fwd = glow
                opt = torch.optim.Adam(glow.parameters(), lr=a.lr)
            else:
                torch.backends.cudnn.benchmark = dev.type == "cuda"
                compile_mode = "default" if "compile" in variant else False
                fwd = optimise(glow, dev, mode="train", compile=compile_mode, force_cpu=True,
                               cuda_graphs=None if not glow.gradient_checkpointing else False)
                opt = torch.optim.Adam(glow.parameters(), lr=a.lr, fused=dev.type == "cuda")
            params = list(glow.parameters())
            gen = torch.Generator(device=dev).manual_seed(0)
            state = {"skipped": 0}

            def step():
                x = data + (torch.rand(data.shape, generator=gen, device=dev) - 0.5) / 1220.0
                opt.zero_grad(set_to_none=True)
                with autocast(prec, dev):
                    lp = fwd(x)
                loss = nats_to_bits_per_dim(lp.float(), glow.dim).mean()
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, 50.0)
                ok = bool(torch.isfinite(loss.detach()) & torch.isfinite(gn))  # one sync, as FlowTrainer
                if ok:
                    opt.step()
                else:
                    state["skipped"] += 1
                    opt.zero_grad(set_to_none=True)

            warm = a.train_warmup + (1 if variant != "eager" else 0)  # capture (3 warm-ups inside), 1 replay
            with precision(prec, dev):
                times, warm_s = timed(step, dev, iters=a.iters, cap_s=a.cell_cap_s, warmup=warm)
            t = float(np.median(times))
            flops = 3 * glow.flops_per_patch() * a.train_batch
            row.update(s_per_step=t, step_times=times, warmup_s=warm_s, tflops=flops / t / 1e12,
                       peak_mem_gb=peak_gb(dev), skipped_steps=state["skipped"],
                       graphed=getattr(fwd, "_graphed", None) is not None,
                       graph_error=getattr(fwd, "failed", None))
            if "compile" in variant:
                row["compile_and_warmup_s"] = warm_s
        except Exception as exc:  # noqa: BLE001
            row["error"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:500]
            row["peak_mem_gb"] = peak_gb(dev)
            if not is_oom(exc):
                self.result["errors"].append({"cell": name, "trace": traceback.format_exc()})
        finally:
            if hasattr(fwd, "release"):
                fwd.release()
            fwd = opt = None
            glow.zero_grad(set_to_none=True)
            glow.fast = None
            glow.gradient_checkpointing = False
            torch.backends.cudnn.benchmark = False
            free(dev)
        self.result["train"].append(row)
        self.log(f"{name}: {_short(row)}")
        self.save()

    # --- scoring
    def score_cell(self, glow: Glow3D, width: int, prec: str, variant: str, batch: int, est_s: float) -> None:
        a, dev = self.args, self.dev
        name = f"score w{width} {prec} {variant} b{batch}"
        if not self.fits(name, est_s):
            return
        row = {"width": width, "precision": prec, "variant": variant, "batch": batch}
        scorer = None
        data = patches(batch, a.patch, dev, seed=13)
        free(dev)
        try:
            glow.eval()
            if variant == "eager":
                glow.fast = None
                torch.backends.cudnn.benchmark = False
                scorer = glow
            else:
                torch.backends.cudnn.benchmark = dev.type == "cuda"
                scorer = optimise(glow, dev, mode="score", compile="default" if "compile" in variant else False,
                                  batch_size=batch, force_cpu=True,
                                  autocast_dtype=torch.bfloat16 if prec == "bf16" else None)

            def run():
                with torch.no_grad(), autocast(prec, dev):
                    return scorer.log_prob(data)

            with precision(prec, dev):
                times, warm_s = timed(run, dev, iters=a.iters, cap_s=a.cell_cap_s, warmup=a.score_warmup)
                lp = run()
            t = float(np.median(times))
            row.update(s_per_batch=t, patches_per_s=batch / t, warmup_s=warm_s,
                       tflops=glow.flops_per_patch() * batch / t / 1e12, peak_mem_gb=peak_gb(dev),
                       finite=bool(torch.isfinite(lp).all()), graph_captures=getattr(scorer, "captures", None))
            if "compile" in variant:
                row["compile_and_warmup_s"] = warm_s
        except Exception as exc:  # noqa: BLE001
            row["error"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:500]
            row["peak_mem_gb"] = peak_gb(dev)
            if not is_oom(exc):
                self.result["errors"].append({"cell": name, "trace": traceback.format_exc()})
        finally:
            if hasattr(scorer, "release"):
                scorer.release()
            scorer = None
            glow.fast = None
            torch.backends.cudnn.benchmark = False
            free(dev)
        self.result["score"].append(row)
        self.log(f"{name}: {_short(row)}")
        self.save()

    # --- where the time goes: kernel count and GPU-busy share of one call
    def profile_cell(self, glow: Glow3D, width: int, prec: str, what: str, path: str, batch: int) -> None:
        a, dev = self.args, self.dev
        name = f"profile w{width} {prec} {what} {path} b{batch}"
        if dev.type != "cuda" or not self.fits(name, 20):
            return
        from torch.profiler import ProfilerActivity, profile

        row = {"width": width, "precision": prec, "what": what, "path": path, "batch": batch}
        x = patches(batch, a.patch, dev, seed=17)
        try:
            glow.fast = None
            if path == "fast":
                optimise(glow, dev, mode="score", compile=False, cuda_graphs=False)
            glow.train(what == "train")

            def call():
                with torch.set_grad_enabled(what == "train"), autocast(prec, dev):
                    lp = glow.log_prob(x)
                if what == "train":
                    lp.sum().backward()
                    glow.zero_grad(set_to_none=True)

            with precision(prec, dev):
                call()
                sync(dev)
                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    t = time.perf_counter()
                    call()
                    sync(dev)
                    wall = time.perf_counter() - t
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.device_time for e in kernels) / 1e6  # us -> s (sum over kernels; no overlap here)
            by_name: dict = {}
            for e in kernels:
                by_name[e.name[:90]] = by_name.get(e.name[:90], 0.0) + e.device_time / 1e6
            top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
            row.update(kernels=len(kernels), gpu_busy_s=busy, wall_s=wall, busy_share=busy / wall if wall else None,
                       top_kernels=[{"name": k, "s": v} for k, v in top])
        except Exception as exc:  # noqa: BLE001
            row["error"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:300]
        finally:
            glow.fast = None
            glow.zero_grad(set_to_none=True)
            free(dev)
        self.result["profile"].append(row)
        self.log(f"{name}: kernels={row.get('kernels')} busy={row.get('gpu_busy_s')} wall={row.get('wall_s')}")
        self.save()

    # --- the plan
    def run(self) -> dict:
        a, dev = self.args, self.dev
        meta = self.result["meta"]
        meta.update(date=dt.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                    python=platform.python_version(), device=str(dev), command=a.command,
                    config={k: v for k, v in vars(a).items() if k != "command"})
        if dev.type == "cuda":
            p = torch.cuda.get_device_properties(dev)
            meta.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 1e9, 1), capability=f"{p.major}.{p.minor}",
                        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), sms=p.multi_processor_count)
        self.log(f"device {meta.get('gpu', dev)}; budget {a.budget_s:.0f} s")
        self.result["peak_tflops"] = measure_peak(dev, a.peak_n, self.budget)
        self.log(f"peak TFLOP/s {self.result['peak_tflops']}")
        self.save()
        if not a.no_micro:
            self.result["micro"] = micro_coupling(dev, a.widths[0], a.patch, self.budget, a.micro_batches,
                                                  a.micro_reserve_s, a.micro_iters, a.micro_warmup)
            self.save()
        for wi, width in enumerate(a.widths):
            if not self.fits(f"width {width}", a.min_width_s):
                continue
            try:
                glow = self.build(width)
            except Exception as exc:  # noqa: BLE001
                self.result["errors"].append({"cell": f"build w{width}", "trace": traceback.format_exc()})
                self.log(f"build w{width} failed: {exc}")
                free(dev)
                continue
            meta.setdefault("models", {})[str(width)] = {
                "params": glow.num_parameters(), "gflop_per_patch_fwd": glow.flops_per_patch() / 1e9,
                "levels": a.levels, "steps": a.steps, "patch": a.patch}
            self.correctness(glow, width)
            if wi == 0 and not a.no_profile:
                pp = "bf16" if "bf16" in a.precisions else a.precisions[0]
                for what, b in (("score", a.eager_batches[0]), ("train", a.train_batch)):
                    for path in ("eager", "fast"):
                        self.profile_cell(glow, width, pp, what, path, b)
            scale = width / a.widths[0]
            last = wi == len(a.widths) - 1
            for prec in a.precisions:
                skip_fp32_train = prec == "fp32" and width >= 512 and a.quick
                slow = 2.0 if prec == "fp32" else 1.0
                for variant in ("eager", "opt"):
                    if skip_fp32_train:
                        self.result["skipped"].append({"cell": f"train w{width} fp32", "reason": "--quick"})
                        break
                    self.train_cell(glow, width, prec, variant, est_s=a.est_train_s * scale * slow)
                for b in a.eager_batches:
                    self.score_cell(glow, width, prec, "eager", b, est_s=a.est_score_s * scale * slow)
                for b in a.opt_batches:
                    self.score_cell(glow, width, prec, "opt", b, est_s=a.est_score_s * scale * slow)
                if last and prec == a.precisions[0]:  # the memory option (checkpointing) at the widest width
                    self.train_cell(glow, width, prec, "opt+ckpt", est_s=a.est_train_s * scale)
            if last and "fp32" in a.precisions[1:]:
                self.train_cell(glow, width, "fp32", "opt+ckpt", est_s=a.est_train_s * scale * 2)
            if a.compile and width == a.widths[0]:
                prec = "bf16" if "bf16" in a.precisions else a.precisions[0]
                self.score_cell(glow, width, prec, "opt+compile", a.opt_batches[-1], est_s=a.est_compile_s)
                self.train_cell(glow, width, prec, "opt+compile", est_s=a.est_compile_s * 1.5)
            del glow
            free(dev)
        meta["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.save()
        return self.result


def _short(row: dict) -> str:
    keys = ("s_per_step", "patches_per_s", "tflops", "peak_mem_gb", "error", "graphed", "graph_error")
    return ", ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row[k]}"
                     for k in keys if row.get(k) is not None)


# ------------------------------------------------------------------------------------------ report
def markdown(res: dict) -> str:
    meta, peak = res["meta"], res["peak_tflops"]
    lines = ["", "## 3D GLOW on GPU (`bench/gpu_flow.py`)", ""]
    lines.append(f"- date: {meta.get('date')}; device: {meta.get('gpu', meta.get('device'))} "
                 f"(capability {meta.get('capability', '-')}, {meta.get('gpu_mem_gb', '-')} GB); "
                 f"torch {meta.get('torch')}, CUDA {meta.get('cuda', '-')}, cuDNN {meta.get('cudnn', '-')}")
    lines.append(f"- command: `{meta.get('command')}`; wall time {meta.get('elapsed_s')} s")
    if meta.get("device") == "cpu":
        lines.append("- **CPU smoke run: tiny model, no tf32, no CUDA graphs; the timings and ratios below only show "
                     "that the script works and mean nothing about GPU speed**")
    peaks = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in peak.items())
    lines.append(f"- measured dense peak ({meta.get('config', {}).get('peak_n')}³ matmul): {peaks} (issue 7's H200 "
                 f"reference: tf32 {ISSUE_PEAK_H200['tf32']:.0f}, bf16 {ISSUE_PEAK_H200['bf16']:.0f})")
    for w, m in meta.get("models", {}).items():
        lines.append(f"- width {w} (L={m['levels']}, K={m['steps']}): {m['params'] / 1e6:.4g} M parameters, "
                     f"{m['gflop_per_patch_fwd']:.4g} GFLOP per {m['patch']}³ patch forward (training counted as 3×)")
    lines.append("- eager = reference layers, NCDHW, foreach Adam, cuDNN heuristics; opt = `optimise()`: "
                 "channels-last fast path (ActNorm folded into the 1×1×1 conv, tap GEMMs for level 1) + "
                 "CUDA graphs (+ fused Adam for training); fp32 = IEEE float32 (no TF32 in matmuls or convs)")

    def pct(row, prec):
        p = peak.get(prec)
        return f"{100 * row['tflops'] / p:.1f} %" if p and row.get("tflops") else "-"

    def fmt(v, f="{:.3g}"):
        return f.format(v) if isinstance(v, (int, float)) and v is not None and not math.isnan(v) else "-"

    lines += ["", "### Training step (batch per GPU as shown)", "",
              "| width | precision | variant | batch | s/step | × eager | TFLOP/s | % of peak | peak mem GB | notes |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    eager_t = {(r["width"], r["precision"]): r.get("s_per_step") for r in res["train"] if r["variant"] == "eager"}
    for r in res["train"]:
        base = eager_t.get((r["width"], r["precision"]))
        sp = base / r["s_per_step"] if base and r.get("s_per_step") else None
        note = r.get("error") or ("" if r.get("graphed") or r["variant"] == "eager" else "no CUDA graph")
        if r.get("graph_error"):
            note += f" graph: {r['graph_error'][:80]}"
        if r.get("compile_and_warmup_s"):
            note += f" compile+warm-up {r['compile_and_warmup_s']:.0f} s"
        lines.append(f"| {r['width']} | {r['precision']} | {r['variant']} | {r['batch']} | {fmt(r.get('s_per_step'))} "
                     f"| {fmt(sp, '{:.2f}')} | {fmt(r.get('tflops'), '{:.3g}')} | {pct(r, r['precision'])} "
                     f"| {fmt(r.get('peak_mem_gb'), '{:.1f}')} | {note} |")
    lines += ["", "### Scoring (no-grad `log_prob`)", "",
              "| width | precision | variant | batch | patches/s | × eager best | TFLOP/s | % of peak "
              "| peak mem GB | notes |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    eager_best: dict = {}
    for r in res["score"]:
        if r["variant"] == "eager" and r.get("patches_per_s"):
            k = (r["width"], r["precision"])
            eager_best[k] = max(eager_best.get(k, 0.0), r["patches_per_s"])
    for r in res["score"]:
        base = eager_best.get((r["width"], r["precision"]))
        sp = r["patches_per_s"] / base if base and r.get("patches_per_s") else None
        note = r.get("error") or ""
        if r.get("compile_and_warmup_s"):
            note += f" compile+warm-up {r['compile_and_warmup_s']:.0f} s"
        lines.append(f"| {r['width']} | {r['precision']} | {r['variant']} | {r['batch']} "
                     f"| {fmt(r.get('patches_per_s'))} | {fmt(sp, '{:.2f}')} | {fmt(r.get('tflops'), '{:.3g}')} "
                     f"| {pct(r, r['precision'])} | {fmt(r.get('peak_mem_gb'), '{:.1f}')} | {note} |")
    lines += ["", "### Correctness: optimised vs eager `log_prob`, same random non-zero patches", "",
              "| width | precision | fast vs eager (same precision) | fast+graph vs eager | fast vs fp32 eager "
              "| eager vs fp32 eager | max Δ bits/dim vs fp32 | tolerance | pass |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["correctness"]:
        if "error" in r:
            lines.append(f"| {r['width']} | {r['precision']} | error: {r['error'][:100]} | | | | | | no |")
            continue
        lines.append(f"| {r['width']} | {r['precision']} | {r['fast']['rel_vs_eager_same_precision']:.2e} "
                     f"| {r['fast+graph']['rel_vs_eager_same_precision']:.2e} | {r['fast']['rel_vs_fp32_eager']:.2e} "
                     f"| {r['eager_rel_vs_fp32']:.2e} | {r['fast']['abs_bits_per_dim_vs_fp32']:.2e} "
                     f"| {r['tolerance']:g} | {'yes' if r['pass'] else 'NO'} |")
    if res["micro"]:
        lines += ["", "### Coupling network micro-benchmark (level 1: 4→w→w→8 channels at (S/2)³; level 2: "
                  "16→w→w→32 at (S/4)³; w = first width)", "",
                  "| level | precision | impl | batch | mode | ms | TFLOP/s |", "|---|---|---|---|---|---|---|"]
        for r in res["micro"]:
            err = " " + r["error"] if "error" in r else ""
            lines.append(f"| {r['level']} | {r['precision']} | {r['impl']} | {r['batch']} | {r['mode']} "
                         f"| {fmt(r.get('ms'))} | {fmt(r.get('tflops'), '{:.3g}')}{err} |")
    if res.get("profile"):
        lines += ["", "### Where the time goes (one call under the profiler, no CUDA graph)", "",
                  "| width | precision | call | path | batch | CUDA kernels | GPU busy s | wall s | busy share "
                  "| top kernels (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["profile"]:
            top = "; ".join(f"{k['name'][:40]} {k['s']:.3f}" for k in r.get("top_kernels", [])[:3])
            lines.append(f"| {r['width']} | {r['precision']} | {r['what']} | {r['path']} | {r['batch']} "
                         f"| {r.get('kernels', '-')} | {fmt(r.get('gpu_busy_s'))} | {fmt(r.get('wall_s'))} "
                         f"| {fmt(r.get('busy_share'), '{:.0%}')} | {r.get('error') or top} |")
    lines += ["", "### Acceptance (issue 7)", ""]
    for r in res["train"]:
        if r["variant"] == "opt" and r.get("s_per_step") and eager_t.get((r["width"], r["precision"])):
            sp = eager_t[(r["width"], r["precision"])] / r["s_per_step"]
            lines.append(f"- training w{r['width']} {r['precision']}: {sp:.2f}× eager (target ≥ 5×) "
                         f"{'✓' if sp >= 5 else '✗'}")
    best_opt: dict = {}
    for r in res["score"]:
        if r["variant"] == "opt" and r.get("patches_per_s"):
            k = (r["width"], r["precision"])
            best_opt[k] = max(best_opt.get(k, 0.0), r["patches_per_s"])
    for k, v in best_opt.items():
        if k in eager_best:
            sp = v / eager_best[k]
            ok = "✓" if sp >= 4 else "✗"
            lines.append(f"- scoring w{k[0]} {k[1]}: {sp:.2f}× eager's best batch (target ≥ 4×) {ok}")
    for r in res["train"]:
        if r["variant"] == "opt+ckpt" and r.get("peak_mem_gb"):
            lines.append(f"- memory option: w{r['width']} {r['precision']} batch {r['batch']} with checkpointing peaks "
                         f"at {r['peak_mem_gb']:.1f} GB (target ≤ 40 GB) {'✓' if r['peak_mem_gb'] <= 40 else '✗'}")
    if res["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{s['cell']} ({s['reason']})" for s in res["skipped"])]
    if res["errors"]:
        lines += ["", "Errors: " + "; ".join(e["cell"] for e in res["errors"]) + " (tracebacks in the JSON)"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--out", type=str, default=None, help="JSON results (rewritten after every cell)")
    ap.add_argument("--md", type=str, default=None, help="also write the markdown here")
    ap.add_argument("--quick", action="store_true", help="2 timed iterations, fewer batches, no fp32 training at 512")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU: checks the script runs")
    ap.add_argument("--compile", action="store_true", help="add regional torch.compile cells (width[0], bf16)")
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--no-profile", action="store_true", help="skip the kernel-count/GPU-busy profile cells")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cells after this (s)")
    ap.add_argument("--cell-cap-s", type=float, default=6.0, help="max timed seconds per cell")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--train-batch", type=int, default=5)
    ap.add_argument("--eager-batches", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--opt-batches", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args(argv)
    args.command = "python " + " ".join(shlex.quote(x) for x in ["bench/gpu_flow.py", *(argv or sys.argv[1:])])
    args.levels, args.steps, args.patch = 4, 64, 48
    args.peak_n, args.lr, args.perturb_std = 8192, 1e-6, 3e-3
    args.train_warmup, args.score_warmup = 1, 1
    args.check_patches, args.init_patches = 4, 16
    args.micro_batches, args.micro_reserve_s, args.min_width_s = (5, 64), 300.0, 30.0
    args.micro_iters, args.micro_warmup = 10, 3
    # rough cell costs on an H100 at width[0] (scaled by width and 2× for fp32), for the time guard
    args.est_train_s, args.est_score_s, args.est_compile_s = 15.0, 10.0, 150.0
    if args.quick:
        args.iters = 2
        args.eager_batches = args.eager_batches[:1]
        args.opt_batches = args.opt_batches[-1:]
        args.no_micro = args.no_profile = True
    if args.cpu_smoke:
        torch.set_num_threads(2)
        args.levels, args.steps, args.patch = 2, 2, 8
        args.widths = [w for w in args.widths if w <= 32] or [8]
        args.precisions = [p for p in args.precisions if p != "tf32"]
        args.peak_n, args.iters, args.train_batch = 256, 2, 2
        args.eager_batches, args.opt_batches = [2], [4]
        args.check_patches, args.init_patches = 2, 4
        args.micro_batches, args.micro_reserve_s, args.min_width_s = (1, 2), 40.0, 3.0
        args.micro_iters, args.micro_warmup, args.iters = 1, 1, 1
        args.est_train_s = args.est_score_s = 1.0
        args.budget_s = min(args.budget_s, 50.0)
        args.cell_cap_s = 1.0
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.cpu_smoke:
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        print("no CUDA device: use --cpu-smoke to check the script on the CPU", file=sys.stderr)
        raise SystemExit(2)
    bench = Bench(args, dev)
    res = bench.run()
    text = markdown(res)
    print(text, flush=True)
    if args.md:
        Path(args.md).write_text(text, encoding="utf-8")
    return res


if __name__ == "__main__":
    main()
