"""The machine's own limits, measured in the run that compares against them: fp32 GEMM rate and copy bandwidth."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def timed(device: torch.device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def gemm_rate(device: torch.device = torch.device("cpu"), size: int = 2048, dtype=torch.float32) -> float:
    """FLOP/s of a square matmul (2·n³ FLOPs), best of 5: the rate a GEMM-bound step could reach at best. On an x86
    CPU the faster of torch's two GEMM libraries, MKL (matmul) and oneDNN (its linear op, which pytorch_npu.ops uses
    where MKL is not tuned)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    products = [lambda: a @ b]
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for product in products:
        product()  # warm up
        best = min(best, *(timed(device, product) for _ in range(5)))
    return 2 * size ** 3 / best


def copy_bandwidth(device: torch.device = torch.device("cpu"), megabytes: int = 1024) -> float:
    """Bytes per second moved by a large tensor copy (each byte read once and written once), best of 3."""
    source = torch.ones(megabytes * 2 ** 20 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm up (page faults)
    return 2 * source.numel() * 4 / min(timed(device, lambda: target.copy_(source)) for _ in range(3))
