"""A product in a ctypes library gptcli built (int8_native.c's int8 and int4 ones): its C signature, and the call
with a per-thread work buffer that int8_native's and int4_native's classes share."""

from __future__ import annotations

import ctypes
import threading
from typing import Any


def bind_product(function: Any, matrix: type[ctypes.Structure]) -> Any:
    """A kernel's product, `(x, matrix, y, M, work, threads)`, typed for ctypes."""
    function.restype = None
    function.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(matrix),
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    return function


class NativeProduct:
    """A kernel's product in the loaded library: `mm(x, packed)` (x @ W^T, float32), packed by the subclass."""

    def __init__(self, function: Any) -> None:
        self._mm = function
        self._scratch = threading.local()  # a growing work buffer per calling thread

    def mm(self, x: Any, matrix: Any) -> Any:
        """x [..., in] (any float dtype) @ W^T -> float32 [..., out]; `matrix` a packed one (its `args`, sizes
        and `work_per_row`)."""
        import torch

        k, n = matrix.in_features, matrix.out_features
        rows = x if x.dim() == 2 else x.reshape(-1, k)  # (a reshape costs ~0.8 us: 0.1 ms a decode step)
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.to(torch.float32).contiguous()
        m = rows.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        work = self._work(m * matrix.work_per_row)
        self._mm(rows.data_ptr(), ctypes.byref(matrix.args), y.data_ptr(), m, work.data_ptr(), torch.get_num_threads())
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)

    def _work(self, size: int) -> Any:
        work = getattr(self._scratch, "buffer", None)
        if work is None or work.numel() < size:
            import torch

            work = self._scratch.buffer = torch.empty(max(size, 1 << 16), dtype=torch.uint8)
        return work
