"""What the jagged attention kernels accept, without importing Triton: the pattern modules
of ``lower-attention`` check a match against these before anything is emitted, and
:mod:`fsc.kernels.jagged_attention` checks its arguments against the same numbers."""

from __future__ import annotations

import torch

MODES = ("hstu", "softmax")
MIN_HEAD_DIM = 16  # tl.dot needs K >= 16
MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["DTYPES", "MAX_HEAD_DIM", "MIN_HEAD_DIM", "MODES"]
