"""Shared by the benchmark scripts: the time of one call, by CUDA events on a GPU; waiting for the device."""

import time

import torch


def sync(device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device) -> float:
    """Milliseconds of one fn() call: CUDA events on a GPU (device time, launches included), else wall time."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
