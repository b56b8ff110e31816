"""The roofline a row is measured against: peak dense-matmul FLOP/s and copy bandwidth.

Where the numbers come from, in order:
1. ``--peak-tflops`` / ``--peak-gbps`` given on the command line;
2. an H200 in bf16/fp16: the ceilings measured on an H200 (bf16 dense matmul about 790 TFLOP/s,
   device copy about 4.3 TB/s; see docs/performance.md);
3. anything else (a CPU, another GPU, fp32 on an H200): measured once at startup on the machine
   that runs the sweep, a dense matmul in the sweep's dtype and a device-to-device copy, best of
   a few runs.
Every number carries its source, which the table and the JSON print next to it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .env import device_name
from .shapes import dtype_name

H200_BF16_TFLOPS = 790.0  # bf16 dense matmul, measured on an H200 (docs/performance.md)
H200_COPY_GBPS = 4300.0   # device-to-device copy, measured on an H200 (docs/performance.md)
H200_SOURCE = "measured on an H200"


@dataclass
class Roofline:
    peak_tflops: float
    peak_gbps: float
    tflops_source: str
    gbps_source: str

    def time_s(self, flops: float, nbytes: float) -> float:
        """The least time the roofline allows: compute-bound or memory-bound, whichever is longer."""
        return max(flops / (self.peak_tflops * 1e12), nbytes / (self.peak_gbps * 1e9))

    def bound(self, flops: float, nbytes: float) -> str:
        compute = flops / (self.peak_tflops * 1e12)
        memory = nbytes / (self.peak_gbps * 1e9)
        return "compute" if compute >= memory else "memory"

    def fraction(self, flops: float, nbytes: float, seconds: float) -> float:
        """Roofline time / measured time: 1.0 means at the roofline."""
        return self.time_s(flops, nbytes) / seconds

    def describe(self) -> str:
        return (f"{self.peak_tflops:.4g} TFLOP/s ({self.tflops_source}); "
                f"{self.peak_gbps:.4g} GB/s ({self.gbps_source})")

    def to_dict(self) -> dict:
        return asdict(self)


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def default_matmul_size(device: torch.device, quick: bool) -> int:
    if device.type == "cuda":
        return 4096 if quick else 8192
    return 1024 if quick else 2048


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: Optional[int] = None,
                          repeats: int = 3) -> float:
    """Dense ``n x n x n`` matmul in ``dtype``, best of ``repeats``: TFLOP/s."""
    n = n or default_matmul_size(device, quick=False)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    inner = 10 if device.type == "cuda" else 1
    seconds = _best_seconds(lambda: [torch.mm(a, b) for _ in range(inner)], device, repeats)
    return 2 * n ** 3 * inner / seconds / 1e12


def measure_copy_gbps(device: torch.device, nbytes: Optional[int] = None, repeats: int = 3) -> float:
    """``dst.copy_(src)`` of ``nbytes``, best of ``repeats``: GB/s counting the read and the write."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    inner = 10 if device.type == "cuda" else 1
    seconds = _best_seconds(lambda: [dst.copy_(src) for _ in range(inner)], device, repeats)
    return 2 * nbytes * inner / seconds / 1e9


def roofline_for(device: torch.device, dtype: torch.dtype, peak_tflops: Optional[float] = None,
                 peak_gbps: Optional[float] = None, quick: bool = False) -> Roofline:
    """The roofline for ``device`` and ``dtype``: given, the H200 ceilings, or measured on ``device``."""
    is_h200 = device.type == "cuda" and "H200" in device_name(device).upper()
    half = dtype in (torch.bfloat16, torch.float16)
    repeats = 2 if quick else 3
    if peak_tflops is not None:
        tflops, tsource = peak_tflops, "given by --peak-tflops"
    elif is_h200 and half:
        tflops, tsource = H200_BF16_TFLOPS, f"{H200_SOURCE}, bf16 dense matmul"
        if dtype == torch.float16:
            tsource += " (assumed the same for fp16)"
    else:
        size = default_matmul_size(device, quick)
        tflops = measure_matmul_tflops(device, dtype, n=size, repeats=repeats)
        tsource = (f"measured dense-matmul peak ({dtype_name(dtype)} {size}x{size}x{size}, "
                   f"best of {repeats})")
    if peak_gbps is not None:
        gbps, gsource = peak_gbps, "given by --peak-gbps"
    elif is_h200:
        gbps, gsource = H200_COPY_GBPS, f"{H200_SOURCE}, device copy"
    else:
        gbps = measure_copy_gbps(device, repeats=repeats)
        gsource = f"measured copy bandwidth (best of {repeats})"
    return Roofline(tflops, gbps, tsource, gbps_source=gsource)
