"""A faster execution path for :class:`~ct3dflow.flow.glow.Glow3D` on a GPU (issue 7, ``docs/GPU.md``).

:func:`optimise` is the single entry point for training and scoring::

    glow = optimise(glow, device, mode="train")       # before DDP wraps the model
    scorer = optimise(glow, device, mode="score", batch_size=64, autocast_dtype=torch.bfloat16)
    scorer.log_prob(x)                                 # any batch size; the scorer pads to its own

On the CPU it returns the model unchanged (the only CPU-side gains are in the core and always on: the
LU weight cached in eval mode, the permutation as a gather, see :mod:`.invconv`). On CUDA it installs
:class:`FastEncoder` as ``glow.fast``. The fast encoder reads the *same parameters* (state dicts and
checkpoints are unchanged) and computes the same ``(ε, log-det)``, differently:

* **channels-last**: the main stream is a contiguous ``(B, D, H, W, C)`` tensor; 1×1×1 convolutions are
  plain GEMMs (``addmm``/``linear``), 3×3×3 convolutions see a channels-last view (cuDNN's NDHWC kernels,
  the fast ones for tf32/bf16 tensor cores);
* **ActNorm folded into the invertible 1×1×1 convolution**: ``W·((x + loc)·s) = (W·diag(s))·x + W·diag(s)·loc``
  — one GEMM with bias instead of three elementwise passes and a GEMM; the log-det is ``D·H·W·(Σ log s +
  Σ log|u|)``. In eval mode under ``no_grad`` the folded ``(W·diag(s), b)`` is cached (same rules as the
  LU cache);
* **tap GEMMs for convolutions with few channels** (``conv="gemm"``, or ``"auto"`` below
  ``gemm_max_channels``): level 1's coupling convolutions have 4 input / 8 output channels, which use
  tensor cores badly. A 3×3×3 convolution with few *input* channels becomes ``im2col`` (27 shifted
  copies of the small input, K = 27·C_in padded to a multiple of 8) + one GEMM; one with few *output*
  channels becomes one GEMM to ``27·C_out`` channels (N = 216 instead of 8) + a shift-and-sum. The two
  shift operators are each other's adjoint and have hand-written backward passes (no 27 full-size
  zero tensors in autograd);
* optional ``torch.compile`` of one flow step (*regional* compilation: the 64 steps of a level share one
  compiled graph, so compile time is ~4 graphs × {forward, backward, no-grad}, not a 10,000-node model);
* CUDA graphs: :class:`CudaGraphScorer` (no-grad ``log_prob`` at a fixed batch, partial batches padded)
  and :class:`GraphedTrainForward` (training forward + backward via ``torch.cuda.make_graphed_callables``;
  clipping and the optimizer stay eager). Both read the parameters in place, so optimizer steps and
  ``load_state_dict`` are followed without re-capture; a moved or replaced parameter triggers one.

Precision: log-determinants, the main stream, ActNorm and the 1×1×1 convolution stay in float32 (float64
for a float64 model) under bf16 autocast, as in the reference layers; only the coupling and split-prior
networks run in bf16, and the tap shift-and-sum accumulates in float32. In float32 (no TF32) the fast path
equals the reference up to float32 rounding (summation order): ≤ 1e-5 relative on ``log_prob``
(``tests/test_flow_fast.py``).

This module imports torch only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dtypes import work_dtype as _work_dtype
from .invconv import caching_allowed, weight_cache_key

_TAPS = [(a, b, c) for a in range(3) for b in range(3) for c in range(3)]
CONV_IMPLS = ("cudnn", "gemm", "auto")



def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


# ------------------------------------------------------------------------------------------ precision
@contextlib.contextmanager
def float32_precision(kind: str):
    """``kind`` = ``"ieee"`` (true float32) or ``"tf32"`` for CUDA float32 matmuls *and* convolutions.

    Note: PyTorch's default lets cuDNN convolutions use TF32 (``cudnn.conv.fp32_precision == "tf32"``)
    while matmuls do not; benchmarks must set both. Restores the previous settings on exit.
    """
    if kind not in ("ieee", "tf32"):
        raise ValueError(f"float32 precision must be 'ieee' or 'tf32', got {kind!r}")
    mm, cv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    old = (mm.fp32_precision, cv.fp32_precision)
    mm.fp32_precision, cv.fp32_precision = kind, kind
    try:
        yield
    finally:
        mm.fp32_precision, cv.fp32_precision = old


# -------------------------------------------------------------------------------------- shift operators
def _gather_taps(x: torch.Tensor, k_pad: int) -> torch.Tensor:
    """im2col, channels-last: ``(B,D,H,W,C)`` → ``(B,D,H,W,k_pad)`` with ``[..., t·C + c] = x[p + tap_t − 1, c]``
    (zero outside the volume, zero columns beyond ``27·C``)."""
    b, d, h, w, c = x.shape
    xp = F.pad(x, (0, 0, 1, 1, 1, 1, 1, 1))
    parts = [xp[:, i : i + d, j : j + h, k : k + w] for i, j, k in _TAPS]
    if k_pad > 27 * c:
        parts.append(x.new_zeros(b, d, h, w, k_pad - 27 * c))
    return torch.cat(parts, dim=-1)


def _scatter_taps(t: torch.Tensor, c: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Adjoint of :func:`_gather_taps`: ``out[q] = Σ_t t[q − tap_t + 1, t·C : (t+1)·C]``, summed in ``out_dtype``."""
    b, d, h, w, _ = t.shape
    tp = F.pad(t[..., : 27 * c], (0, 0, 1, 1, 1, 1, 1, 1))
    parts = [tp[:, 2 - i : 2 - i + d, 2 - j : 2 - j + h, 2 - k : 2 - k + w, n * c : (n + 1) * c]
             for n, (i, j, k) in enumerate(_TAPS)]
    return torch.stack(parts, dim=0).sum(dim=0, dtype=out_dtype)


class _GatherTaps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, k_pad: int) -> torch.Tensor:
        ctx.c = x.shape[-1]
        return _gather_taps(x, k_pad)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _scatter_taps(g, ctx.c, g.dtype), None


class _ScatterTaps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, c: int, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.k, ctx.in_dtype = t.shape[-1], t.dtype
        return _scatter_taps(t, c, out_dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _gather_taps(g.to(ctx.in_dtype), ctx.k), None, None


def conv3x3_cl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, impl: str = "cudnn"
) -> torch.Tensor:
    """``F.conv3d(·, weight, bias, padding=1)`` on a channels-last ``(B,D,H,W,C_in)`` tensor → ``(B,D,H,W,C_out)``.

    ``impl``: ``"cudnn"`` (``F.conv3d`` on a channels-last view) or ``"gemm"`` (im2col + GEMM when
    ``C_in ≤ C_out``, else GEMM to ``27·C_out`` + shift-and-sum). Under autocast the GEMMs run in the
    autocast dtype; the shift-and-sum accumulates in float32 and returns float32.
    """
    cout, cin = weight.shape[:2]
    if impl == "cudnn":
        y = F.conv3d(x.permute(0, 4, 1, 2, 3), weight, bias, padding=1)
        return y.permute(0, 2, 3, 4, 1)
    if impl != "gemm":
        raise ValueError(f"conv impl must be one of {CONV_IMPLS[:2]}, got {impl!r}")
    b, d, h, w, _ = x.shape
    cdt = _compute_dtype(x)
    if cin <= cout:  # im2col: 27 shifted copies of the small input, one GEMM with K = 27·C_in
        k = 27 * cin
        k_pad = -(-k // 8) * 8
        cols = _GatherTaps.apply(x.to(cdt), k_pad).reshape(-1, k_pad)
        wm = weight.permute(2, 3, 4, 1, 0).reshape(k, cout)
        if k_pad > k:
            wm = F.pad(wm, (0, 0, 0, k_pad - k))
        if bias is None:
            y = cols @ wm.to(cdt)
        else:
            y = torch.addmm(bias.to(cdt), cols, wm.to(cdt))
        return y.view(b, d, h, w, cout)
    # tap GEMM: one GEMM to 27·C_out channels (flipped taps), then the adjoint shift sums them
    wm = weight.flip(2, 3, 4).permute(1, 2, 3, 4, 0).reshape(cin, 27 * cout)
    t = (x.reshape(-1, cin).to(cdt) @ wm.to(cdt)).view(b, d, h, w, 27 * cout)
    out_dtype = torch.float32 if cdt in (torch.bfloat16, torch.float16) else cdt
    y = _ScatterTaps.apply(t, cout, out_dtype)
    return y if bias is None else y + bias.to(out_dtype)


# ----------------------------------------------------------------------------------------- the encoder
@dataclass(frozen=True)
class FastConfig:
    """Options of :class:`FastEncoder`.

    ``conv``: 3×3×3 convolutions as ``"cudnn"``, ``"gemm"`` or ``"auto"`` (gemm when the smaller of
    ``C_in``/``C_out`` is ≤ ``gemm_max_channels``: level 1's coupling and split convolutions at the
    default 8). ``compile``: False, or a ``torch.compile`` mode (``True``/``"default"``,
    ``"max-autotune-no-cudagraphs"``, ``"reduce-overhead"``) applied to one flow step (regional).
    ``cache_weights``: cache the folded ActNorm/LU weight in eval mode under ``no_grad``.
    """

    conv: str = "auto"
    gemm_max_channels: int = 8
    compile: bool | str = False
    cache_weights: bool = True

    def __post_init__(self):
        if self.conv not in CONV_IMPLS:
            raise ValueError(f"conv must be one of {CONV_IMPLS}, got {self.conv!r}")

    def impl_for(self, cin: int, cout: int) -> str:
        if self.conv != "auto":
            return self.conv
        return "gemm" if min(cin, cout) <= self.gemm_max_channels else "cudnn"


def squeeze_cl(x: torch.Tensor) -> torch.Tensor:
    """:func:`~ct3dflow.flow.squeeze.squeeze3d` in channels-last: channel ``c·8 + 4i + 2j + k`` as there."""
    b, d, h, w, c = x.shape
    if d % 2 or h % 2 or w % 2:
        raise ValueError(f"squeeze needs even spatial sizes, got {(d, h, w)}")
    x = x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, d // 2, h // 2, w // 2, c * 8)


def _folded_affine(step, dt: torch.dtype, use_cache: bool):
    """ActNorm + LU 1×1×1 conv as one affine map: ``(W·diag(s), W·diag(s)·loc, Σ log s + Σ log|u|)``."""
    an, ic = step.actnorm, step.invconv

    def build():
        with torch.autocast(device_type=an.loc.device.type, enabled=False):
            w = ic.weight(dt)
            ls = an.log_scale.to(dt).reshape(-1)
            ws = w * torch.exp(ls)  # W @ diag(s): column j scaled by s_j
            b = ws @ an.loc.to(dt).reshape(-1)
            return ws, b, ls.sum() + ic.log_s.to(dt).sum()

    if not (use_cache and caching_allowed(ic)):
        return build()
    key = weight_cache_key((*ic._lu_tensors(), an.loc, an.log_scale), dt)
    if key is None:
        return build()
    hit = ic._aux_cache.get("fold")
    if hit is None or hit[0] != key:
        hit = (key, build())
        ic._aux_cache["fold"] = hit
    return hit[1]


def _coupling_net_cl(net, x: torch.Tensor, cfg: FastConfig) -> torch.Tensor:
    width = net.conv2.weight.shape[0]
    h = F.relu(conv3x3_cl(x, net.conv1.weight, net.conv1.bias, cfg.impl_for(x.shape[-1], width)))
    h = F.relu(F.linear(h, net.conv2.weight.reshape(width, width), net.conv2.bias))
    return _zero_conv_cl(net.zero, h, cfg)


def _zero_conv_cl(zc, x: torch.Tensor, cfg: FastConfig) -> torch.Tensor:
    cout, cin = zc.conv.weight.shape[:2]
    h = conv3x3_cl(x, zc.conv.weight, zc.conv.bias, cfg.impl_for(cin, cout))
    return h * torch.exp(zc.logs * zc.logscale_factor).reshape(-1).to(h.dtype)


def step_cl(step, h: torch.Tensor, cfg: FastConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One :class:`~ct3dflow.flow.glow.FlowStep3d` on a channels-last ``(B,D,H,W,C)`` tensor → ``(y, logdet)``."""
    dt = _work_dtype(h)
    bsz, d, hh, w, c = h.shape
    n_spatial = d * hh * w
    ws, b, ld_vox = _folded_affine(step, dt, cfg.cache_weights)
    with _no_autocast(h):
        y = torch.addmm(b, h.reshape(-1, c).to(dt), ws.T).view(bsz, d, hh, w, c)
        logdet = (n_spatial * ld_vox).expand(bsz)
    cp = step.coupling
    x_a, x_b = y[..., : cp.n_a], y[..., cp.n_a :]
    hn = _coupling_net_cl(cp.net, x_a, cfg)
    with _no_autocast(h):
        hn = hn.to(dt)
        log_scale = F.logsigmoid(hn[..., 1::2] + 2.0)
        y_b = (x_b + hn[..., 0::2]) * torch.exp(log_scale)
        logdet = logdet + log_scale.flatten(1).sum(1)
        return torch.cat([x_a, y_b], dim=-1), logdet


def split_cl(split, h: torch.Tensor, cfg: FastConfig):
    """:class:`~ct3dflow.flow.squeeze.Split3d` in channels-last → ``(kept, eps, logdet)``."""
    dt = _work_dtype(h)
    kept, z = h[..., : split.n_keep], h[..., split.n_keep :]
    hp = _zero_conv_cl(split.prior, kept, cfg)
    with _no_autocast(h):
        hp = hp.to(dt)
        log_sd = hp[..., 1::2]
        eps = (z - hp[..., 0::2]) * torch.exp(-log_sd)
        return kept, eps, -log_sd.flatten(1).sum(1)


def prior_cl(prior, z: torch.Tensor):
    dt = _work_dtype(z)
    with _no_autocast(z):
        mean = prior.mean.to(dt).permute(0, 2, 3, 4, 1)
        log_sd = prior.log_sd.to(dt).permute(0, 2, 3, 4, 1)
        eps = (z - mean) * torch.exp(-log_sd)
        return eps, (-log_sd.sum()).expand(z.shape[0])


class FastEncoder:
    """``glow.fast``: ``(glow, x) -> (eps, logdet)`` equal to ``Glow3D._encode_reference`` (see module doc).

    A plain object (not an ``nn.Module``), so it adds nothing to the model's state dict.
    """

    def __init__(self, cfg: FastConfig | None = None):
        self.cfg = cfg or FastConfig()
        self._step = self._make_step_fn()

    def _make_step_fn(self):
        cfg = self.cfg

        def fn(step, h):
            return step_cl(step, h, cfg)

        if not cfg.compile:
            return fn
        mode = None if cfg.compile is True or cfg.compile == "default" else cfg.compile
        try:  # one graph per level × {train forward/backward, no-grad} × autocast state
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        except AttributeError:  # pragma: no cover - older torch
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        return torch.compile(fn, mode=mode, dynamic=False)

    def __call__(self, glow, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(glow._param_dtype())
        dt = _work_dtype(x)
        h = x.permute(0, 2, 3, 4, 1)
        logdet = torch.zeros(x.shape[0], dtype=dt, device=x.device)
        eps_parts = []
        use_ckpt = glow.gradient_checkpointing and glow.training and torch.is_grad_enabled()
        for i, block in enumerate(glow.blocks):
            h = squeeze_cl(h)
            for step in block:
                if use_ckpt:
                    h, ld = checkpoint(self._step, step, h, use_reentrant=False, preserve_rng_state=False)
                else:
                    h, ld = self._step(step, h)
                logdet = logdet + ld.to(dt)
            if i < glow.levels - 1:
                h, eps, ld = split_cl(glow.splits[i], h, self.cfg)
            else:
                eps, ld = prior_cl(glow.prior, h)
            eps_parts.append(eps.permute(0, 4, 1, 2, 3).flatten(1))
            logdet = logdet + ld.to(dt)
        return torch.cat(eps_parts, dim=1), logdet

    def __repr__(self) -> str:
        return f"FastEncoder({self.cfg})"


# ------------------------------------------------------------------------------------------ CUDA graphs
def _param_key(module: nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))


def _autocast_state(device_type: str = "cuda") -> tuple:
    on = torch.is_autocast_enabled(device_type)
    return (on, torch.get_autocast_dtype(device_type) if on else None)


class CudaGraphScorer:
    """``log_prob`` of any number of patches through CUDA graphs captured at fixed batch sizes.

    Use in eval mode under ``no_grad`` (as :func:`ct3dflow.scoring.patch_log_likelihoods` does). Inputs
    are cut into chunks of ``batch_size``; a shorter chunk runs in the graph of the next power of two
    (≥ 8, ≤ ``batch_size``), padded with copies of its last patch. At most ``max_graphs`` graphs are kept
    (least recently used dropped). ``autocast_dtype`` (e.g. ``torch.bfloat16``) is baked into the
    graphs; ``None`` takes the ambient autocast state. A graph is re-captured when the input dtype, the
    autocast state or a parameter's storage changes (in-place updates need no re-capture: the graph
    reads the parameters where they are). Training mode, autograd or a CPU input run the plain model.
    Has ``eval``/``train``/``training``/``log_prob``/``bits_per_dim``/``dim`` so it can stand in for the
    model in scoring code.
    """

    def __init__(self, glow, batch_size: int = 64, autocast_dtype: torch.dtype | None = None, warmup: int = 2,
                 max_graphs: int = 3):
        self.glow = glow
        self.batch_size = int(batch_size)
        self.autocast_dtype = autocast_dtype
        self.warmup = warmup
        self.max_graphs = max(1, int(max_graphs))
        self._graphs: dict[int, tuple] = {}  # bucket -> (key, graph, static_x, static_out), in LRU order
        self.captures = 0

    # --- model-like surface
    @property
    def training(self) -> bool:
        return self.glow.training

    @property
    def dim(self) -> int:
        return self.glow.dim

    def eval(self):
        self.glow.eval()
        return self

    def train(self, mode: bool = True):
        self.glow.train(mode)
        return self

    def release(self) -> None:
        """Free the captured graphs and their memory pools."""
        self._graphs = {}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def bucket(self, n: int) -> int:
        b = 8
        while b < n:
            b *= 2
        return min(b, self.batch_size) if n <= self.batch_size else self.batch_size

    def _capture(self, xb: torch.Tensor, key: tuple) -> tuple:
        torch.cuda.synchronize()
        static_x = xb.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad(), self._autocast():
            for _ in range(self.warmup):  # cuDNN autotuning, lazy init, compile: not inside the capture
                self.glow.log_prob(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), self._autocast(), torch.cuda.graph(graph):
            out = self.glow.log_prob(static_x)
        self.captures += 1
        return key, graph, static_x, out

    def _run(self, xb: torch.Tensor) -> torch.Tensor:
        n = len(xb)
        key = (tuple(xb.shape), xb.dtype, xb.device, _autocast_state(), _param_key(self.glow))
        entry = self._graphs.pop(n, None)
        if entry is None or entry[0] != key:
            entry = None  # drop the stale graph before capturing its replacement
            while len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            entry = self._capture(xb, key)
        self._graphs[n] = entry  # most recently used last
        _, graph, static_x, out = entry
        static_x.copy_(xb)
        graph.replay()
        return out

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self.glow.training or torch.is_grad_enabled() or x.device.type != "cuda" or len(x) == 0:
            with self._autocast():
                return self.glow.log_prob(x)
        x = x.to(self.glow._param_dtype())
        outs = []
        for s in range(0, len(x), self.batch_size):
            chunk = x[s : s + self.batch_size]
            n = len(chunk)
            b = self.bucket(n)
            if n < b:
                chunk = torch.cat([chunk, chunk[-1:].expand(b - n, *chunk.shape[1:])])
            outs.append(self._run(chunk)[:n].clone())
        return torch.cat(outs)

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        from .glow import nats_to_bits_per_dim

        return nats_to_bits_per_dim(self.log_prob(x), self.glow.dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)


class _LogProb(nn.Module):
    def __init__(self, glow, autocast_dtype):
        super().__init__()
        self.glow = glow
        self.autocast_dtype = autocast_dtype

    def forward(self, x):
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            return self.glow.log_prob(x)


class GraphedTrainForward(nn.Module):
    """``model(x) = glow.log_prob(x)`` whose training forward and backward replay CUDA graphs.

    Built lazily at the first training call (``torch.cuda.make_graphed_callables``, 3 warm-up
    iterations), for that input shape and autocast state; other shapes, eval mode or no-grad calls run
    the (fast) eager path. ``.module`` is the :class:`Glow3D`, so ``getattr(m, "module", m)`` unwraps it
    as for DDP. Not for DDP (use compile there) and not with gradient checkpointing.
    """

    def __init__(self, glow):
        super().__init__()
        self.module = glow
        self._graphed = None
        self._key = None
        self.failed: str | None = None

    def release(self) -> None:
        self._graphed = self._key = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        glow = self.module
        ac = _autocast_state()
        if not (glow.training and torch.is_grad_enabled() and x.is_cuda) or self.failed:
            return glow.log_prob(x)
        key = (tuple(x.shape), x.dtype, ac, _param_key(glow))
        if self._graphed is None or key != self._key:
            if self._graphed is not None and key[:3] != self._key[:3]:
                return glow.log_prob(x)  # one capture only (it holds the activations' memory)
            self.release()
            torch.cuda.synchronize()
            wrapper = _LogProb(glow, ac[1])
            try:  # the ambient autocast (cache on) is not allowed there; _LogProb sets its own, cache off
                with torch.autocast("cuda", enabled=False):
                    self._graphed = torch.cuda.make_graphed_callables(wrapper, (x.detach().clone(),))
            except Exception as exc:  # noqa: BLE001 - record and fall back to eager
                self.failed = f"{type(exc).__name__}: {exc}"
                return glow.log_prob(x)
            self._key = key
        return self._graphed(x)


# ------------------------------------------------------------------------------------------ entry point
def unwrap(model):
    """The :class:`Glow3D` inside DDP / :class:`GraphedTrainForward` / :class:`CudaGraphScorer` wrappers."""
    for _ in range(8):
        for name in ("module", "glow", "_orig_mod"):
            inner = getattr(model, name, None)
            if inner is not None and inner is not model:
                model = inner
                break
        else:
            return model
    return model


def optimise(
    model,
    device: torch.device | str | None = None,
    mode: str = "score",
    compile: bool | str = True,
    channels_last: bool = True,
    cuda_graphs: bool | None = None,
    conv: str = "auto",
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    force_cpu: bool = False,
):
    """Install the fast path on ``model`` (a :class:`Glow3D`, possibly DDP-wrapped) and return a model-like.

    * CPU (and not ``force_cpu``): returns ``model`` unchanged, with ``glow.fast = None``.
    * ``mode="score"``: eval mode; returns a :class:`CudaGraphScorer` at ``batch_size`` when
      ``cuda_graphs`` (default on CUDA), else the model.
    * ``mode="train"``: returns a :class:`GraphedTrainForward` when ``cuda_graphs`` (default: on CUDA,
      unless DDP-wrapped or ``gradient_checkpointing``), else the model (still on the fast path).
    * ``channels_last=False`` leaves ``glow.fast = None`` (the reference path; graphs/compile still apply
      only to the fast path, so this is the "eager" baseline plus CUDA graphs).

    ``compile`` (True or a ``torch.compile`` mode) compiles one flow step regionally; on CUDA only.
    ``force_cpu=True`` installs the fast encoder on the CPU too (tests; no graphs; compile as asked).
    Call it once, before wrapping in DDP; parameters and state dicts are untouched.
    """
    if mode not in ("score", "train"):
        raise ValueError(f"mode must be 'score' or 'train', got {mode!r}")
    glow = unwrap(model)
    dev = torch.device(device) if device is not None else next(glow.parameters()).device
    if dev.type != "cuda" and not force_cpu:
        glow.fast = None
        return model
    is_cuda = dev.type == "cuda"
    glow.fast = FastEncoder(FastConfig(conv=conv, compile=compile)) if channels_last else None
    if mode == "score":
        glow.eval()
        if cuda_graphs is None:
            cuda_graphs = is_cuda
        return CudaGraphScorer(glow, batch_size, autocast_dtype) if (cuda_graphs and is_cuda) else glow
    wrapped_ddp = model is not glow
    if cuda_graphs is None:
        cuda_graphs = is_cuda and not wrapped_ddp and not glow.gradient_checkpointing
    if cuda_graphs and is_cuda and not wrapped_ddp:
        return GraphedTrainForward(glow)
    return model


__all__ = [
    "CONV_IMPLS",
    "CudaGraphScorer",
    "FastConfig",
    "FastEncoder",
    "GraphedTrainForward",
    "conv3x3_cl",
    "float32_precision",
    "optimise",
    "squeeze_cl",
    "step_cl",
    "unwrap",
]
