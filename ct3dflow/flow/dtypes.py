"""The dtype the flow's bookkeeping runs in: float64 for a float64 model (the exactness tests), else float32.

Log-determinants, exp, log and the LU factors stay in it under mixed precision (DESIGN §4.6).
"""

import torch


def work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32
