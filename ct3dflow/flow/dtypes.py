"""The dtype the flow's bookkeeping runs in: float64 for a float64 model (the exactness tests), else float32;
and where bf16 autocast runs natively.

Log-determinants, exp, log and the LU factors stay in it under mixed precision (DESIGN §4.6).
"""

import torch


def work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def bf16_available(device="cpu") -> bool:
    """Whether bf16 runs natively: a CUDA GPU, or a CPU with AMX tiles or AVX-512 BF16 (else it is emulated,
    and slower than float32)."""
    if torch.device(device).type == "cuda":
        return True
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
