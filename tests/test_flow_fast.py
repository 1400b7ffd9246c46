"""The fast GLOW path (ct3dflow.flow.fast) and the eval-time LU weight cache, on the CPU.

The fast encoder must give the reference ``log_prob`` (≤ 1e-5 relative in float32, ≤ 1e-12 in float64)
and the same gradients, and the weight caches must never serve stale weights (optimizer steps,
load_state_dict, ``.data`` edits followed by ``eval()``). CUDA graphs and the GPU speed are checked by
``bench/gpu_flow.py`` on a GPU; here their wrappers must fall back cleanly on the CPU.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ct3dflow.flow import Glow3D, InvConv3dLU
from ct3dflow.flow.fast import (
    CudaGraphScorer,
    FastConfig,
    FastEncoder,
    GraphedTrainForward,
    conv3x3_cl,
    optimise,
    squeeze_cl,
    unwrap,
)
from ct3dflow.flow.squeeze import squeeze3d

torch.set_num_threads(2)


def _patches(n=3, size=8, seed=0, dtype=torch.float32):
    """Smooth, non-zero patches in the normalised range (lung-like mean −0.37)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, size, generator=g, dtype=torch.float64)
    x = F.avg_pool3d(x, 3, stride=1, padding=1)
    return (-0.37 + 0.05 * x / x.std()).to(dtype)


def _trained(dtype=torch.float64, levels=3, steps=2, width=8, size=8, train_steps=3, seed=0):
    """A small model moved away from its zero/identity initialisation by a few Adam steps."""
    torch.manual_seed(seed)
    model = Glow3D(levels=levels, steps=steps, width=width, patch_size=size).to(dtype)
    data = _patches(6, size, seed=seed, dtype=dtype)
    model.initialize(data)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(train_steps):
        opt.zero_grad()
        (-model(data).mean()).backward()
        opt.step()
    model.zero_grad()
    model.eval()
    return model, _patches(3, size, seed=seed + 1, dtype=dtype)


def _rel(a, b):
    return float(((a - b).abs() / b.abs()).max())


# ------------------------------------------------------------------------------------------ LU weight
def test_lu_weight_gather_is_bit_identical_to_matmul():
    torch.manual_seed(0)
    ic = InvConv3dLU(16)
    with torch.no_grad():
        ic.w_l.add_(0.1 * torch.randn(16, 16))
        ic.w_u.add_(0.1 * torch.randn(16, 16))
        lower = ic.w_l * ic.l_mask + ic.eye
        upper = ic.w_u * ic.l_mask.T + torch.diag(ic.sign_s * torch.exp(ic.log_s))
        assert torch.equal(ic.weight(), ic.w_p @ lower @ upper)


def test_lu_weight_cached_only_in_eval_without_grad():
    ic = InvConv3dLU(8)
    ic.eval()
    with torch.no_grad():
        w1 = ic.cached_weight()
        assert ic.cached_weight() is w1
    w_grad = ic.cached_weight()  # autograd on: never the cache
    assert w_grad is not w1 and w_grad.requires_grad
    ic.train()
    assert ic._w_cache is None
    with torch.no_grad():
        assert ic.cached_weight() is not w1  # training mode: not cached


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("opt_kind", ["adam-foreach", "adam-fused", "sgd"])
def test_cache_invalidated_after_optimizer_step(fast, opt_kind):
    model, x = _trained(torch.float32)
    if fast:
        model.fast = FastEncoder()
    model.eval()
    with torch.no_grad():
        before = model.log_prob(x)  # fills the caches
    if opt_kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    else:
        try:  # fused optimizers do not move the parameters' _version counters
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=opt_kind == "adam-foreach",
                                   fused=True if opt_kind == "adam-fused" else None)
        except RuntimeError as exc:  # pragma: no cover - fused Adam not built for this CPU
            pytest.skip(str(exc))
    loss = -model.log_prob(x).mean() / model.dim  # still eval mode: no train() call clears the cache
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = model.log_prob(x)
    fresh = Glow3D(**model.config())
    fresh.load_state_dict(model.state_dict())
    fresh.fast = model.fast
    fresh.eval()
    with torch.no_grad():
        expected = fresh.log_prob(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, expected)


def test_cache_follows_load_state_dict_and_data_edits():
    model, x = _trained(torch.float32, seed=1)
    other, _ = _trained(torch.float32, seed=2)  # different weights (and permutations)
    model.fast = other.fast = FastEncoder()
    model.eval()
    with torch.no_grad():
        model.log_prob(x)
        model.load_state_dict(other.state_dict())
        assert torch.equal(model.log_prob(x), other.log_prob(x))
        # a .data edit does not move the version counter; the documented rule is that eval()/train()
        # drops the caches
        for p in model.parameters():
            p.data.mul_(1.01)
        model.eval()
        fresh = Glow3D(**model.config())
        fresh.load_state_dict(model.state_dict())
        fresh.eval()
        assert _rel(model.log_prob(x), fresh.log_prob(x)) <= 1e-5


# ------------------------------------------------------------------------------------------ building blocks
def test_squeeze_cl_matches_squeeze3d():
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    ref = squeeze3d(x).permute(0, 2, 3, 4, 1)
    assert torch.equal(squeeze_cl(x.permute(0, 2, 3, 4, 1)), ref)


@pytest.mark.parametrize("cin,cout", [(4, 16), (16, 4), (3, 3), (8, 2)])
@pytest.mark.parametrize("impl", ["cudnn", "gemm"])
def test_conv3x3_cl_matches_conv3d_with_gradients(cin, cout, impl):
    torch.manual_seed(0)
    x = torch.randn(2, cin, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, cin, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True)
    ref = F.conv3d(x, w, b, padding=1)
    out = conv3x3_cl(x.permute(0, 2, 3, 4, 1), w, b, impl).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (x, w, b), g)
    grads = torch.autograd.grad(out, (x, w, b), g)
    for a, e in zip(grads, grads_ref):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_shift_operators_pass_gradcheck():
    from ct3dflow.flow.fast import _GatherTaps, _ScatterTaps

    x = torch.randn(1, 3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _GatherTaps.apply(v, 88), (x,))
    t = torch.randn(1, 3, 2, 3, 54, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _ScatterTaps.apply(v, 2, torch.float64), (t,))


# ------------------------------------------------------------------------------------------ whole model
@pytest.mark.parametrize("conv", ["cudnn", "gemm", "auto"])
def test_fast_log_prob_matches_reference_float64(conv):
    model, x = _trained(torch.float64)
    with torch.no_grad():
        ref_lp, ref_eps = model.log_prob(x), model.encode(x)
        model.fast = FastEncoder(FastConfig(conv=conv))
        lp, eps = model.log_prob(x), model.encode(x)
    assert _rel(lp, ref_lp) <= 1e-12
    torch.testing.assert_close(eps, ref_eps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.decode(eps), x, rtol=1e-9, atol=1e-9)  # decode is the reference inverse


@pytest.mark.parametrize("conv", ["cudnn", "gemm", "auto"])
def test_fast_log_prob_matches_reference_float32(conv):
    model, x = _trained(torch.float32, levels=3, steps=3, width=16, size=16)
    assert x.abs().min() > 0  # never on zeros
    with torch.no_grad():
        ref = model.log_prob(x)
        model.fast = FastEncoder(FastConfig(conv=conv))
        lp = model.log_prob(x)
        lp_again = model.log_prob(x)  # served from the folded-weight cache
    assert _rel(lp, ref) <= 1e-5
    assert torch.equal(lp, lp_again)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fast_gradients_and_step_match_reference(checkpointing):
    model, x = _trained(torch.float64)
    fast_model = copy.deepcopy(model)
    fast_model.fast = FastEncoder(FastConfig(conv="auto"))
    fast_model.gradient_checkpointing = checkpointing
    for m in (model, fast_model):
        m.train()
        m.zero_grad()
        (-m(x).mean() / m.dim).backward()
    g_max = max(float(p.grad.abs().max()) for p in model.parameters())
    for (name, a), b in zip(model.named_parameters(), fast_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12 * g_max, msg=name)
    for m in (model, fast_model):
        torch.optim.SGD(m.parameters(), lr=1e-4).step()
        m.eval()
    with torch.no_grad():
        assert _rel(fast_model.log_prob(x), model.log_prob(x)) <= 1e-12


def test_fast_path_under_bf16_autocast_keeps_logdet_float32():
    model, x = _trained(torch.float32, levels=2, steps=2, width=16, size=8)
    with torch.no_grad():
        ref = model.log_prob(x)
        model.fast = FastEncoder()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = model.log_prob(x)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    assert _rel(lp, ref) <= 1e-2


def test_uninitialised_model_initialises_through_reference_path():
    torch.manual_seed(0)
    model = Glow3D(levels=2, steps=1, width=8, patch_size=8)
    model.fast = FastEncoder()
    x = _patches(4, 8)
    model.train()
    model(x)  # training forward of an uninitialised model: ActNorm initialises (reference path)
    assert model.is_initialized()
    ref = Glow3D(levels=2, steps=1, width=8, patch_size=8)
    ref.load_state_dict(model.state_dict())
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert _rel(model.log_prob(x), ref.log_prob(x)) <= 1e-5


# ------------------------------------------------------------------------------------------ optimise()
def test_optimise_falls_back_cleanly_on_cpu():
    model, x = _trained(torch.float32)
    with torch.no_grad():
        ref = model.log_prob(x)
    for mode in ("score", "train"):
        out = optimise(model, "cpu", mode=mode)
        assert out is model and model.fast is None
    with torch.no_grad():
        assert torch.equal(model.log_prob(x), ref)
    with pytest.raises(ValueError):
        optimise(model, "cpu", mode="bogus")


def test_graph_wrappers_fall_back_on_cpu_and_unwrap():
    model, x = _trained(torch.float32)
    with torch.no_grad():
        ref = model.log_prob(x)
    scorer = optimise(model, "cpu", mode="score", compile=False, cuda_graphs=True, force_cpu=True)
    assert scorer is model and isinstance(model.fast, FastEncoder)  # no graphs off CUDA
    wrapped = CudaGraphScorer(model, batch_size=2)
    with torch.no_grad():
        assert _rel(wrapped.log_prob(x), ref) <= 1e-5
    assert wrapped.captures == 0 and unwrap(wrapped) is model
    train_fwd = GraphedTrainForward(model)
    assert unwrap(train_fwd) is model and getattr(train_fwd, "module", train_fwd) is model
    train_fwd.train()
    assert model.training
    lp = train_fwd(x)
    lp.mean().backward()
    assert train_fwd._graphed is None and all(p.grad is not None for p in model.parameters())


def test_scoring_accepts_the_scorer():
    import numpy as np

    from ct3dflow.detect.grid import window_grid
    from ct3dflow.detect.patch_map import patch_log_likelihoods

    model, _ = _trained(torch.float32)
    vol = np.asarray(_patches(1, 16, seed=5)[0, 0], dtype=np.float32)
    grid = window_grid(vol, np.ones_like(vol, dtype=bool), 8, 8)
    ref = patch_log_likelihoods(model, grid, batch_size=3)
    scorer = CudaGraphScorer(model, batch_size=3)
    model.fast = FastEncoder()
    got = patch_log_likelihoods(scorer, grid, batch_size=3)
    np.testing.assert_allclose(got.log_p, ref.log_p, rtol=1e-5)


def test_importing_the_flow_core_pulls_no_platform_dependencies():
    code = (
        "import sys, ct3dflow.flow, ct3dflow.flow.fast\n"
        "bad = [m for m in ('SimpleITK', 'ray', 'mlflow', 'pandas', 'scipy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_ct3dflow_makes_openmp_threads_wait_passively_unless_the_user_chose():
    """Spinning OpenMP threads hold the cores that a Ray job's other processes need (bench/omp_wait.py). The
    package sets it on import, before any of its modules imports torch (libgomp reads it when torch loads)."""
    code = "import os, sys, ct3dflow; assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_regional_compile_matches_eager_on_cpu(monkeypatch):
    """torch.compile of one flow step (regional compilation): Dynamo captures the step as one graph that both
    steps of the level share (no graph break, no recompilation per step), and AOTAutograd's functionalised
    graph gives eager's numbers. The platform compiles on CUDA only, where Inductor writes Triton kernels;
    Inductor's C++ code generator is a CPU path nothing here runs, and a cold compile with it cost this test
    ≈ 40 CPU-seconds on 2 cores (docs/BENCHMARKS.md), so the graph runs on the ``aot_eager`` backend here and
    `bench/gpu_flow.py --compile` compiles with Inductor on the GPU."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    model, x = _trained(torch.float32, levels=1, steps=2, width=8, size=8)
    with torch.no_grad():
        ref = model.log_prob(x)
    optimise(model, "cpu", mode="score", compile=True, cuda_graphs=False, force_cpu=True)
    with torch.no_grad():  # compiled at the first call
        lp = model.log_prob(x)
        again = model.log_prob(x)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for one level: a graph break or a recompile"
    assert counter.op_count > 10  # the step's convolutions and elementwise ops are in the graph
    assert _rel(lp, ref) <= 1e-5 and torch.equal(lp, again)


def test_scorer_buckets_short_batches():
    scorer = CudaGraphScorer(None, batch_size=128)
    assert [scorer.bucket(n) for n in (1, 8, 9, 17, 100, 128)] == [8, 8, 16, 32, 128, 128]
    assert CudaGraphScorer(None, batch_size=20).bucket(17) == 20
