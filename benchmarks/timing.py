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


def kernel_profile(fn, device, what, log, reps=3, top=18):
    """Kernel-time breakdown of fn() (after two warm-up calls), per call, through `log`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync(device)
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]  # kernels, not the ops above
    total = sum(e.self_device_time_total for e in events) / reps
    count = sum(e.count for e in events) / reps
    log(f"profile: {what}: {count:.0f} kernels, {total / 1e3:.3f} ms of kernel time per call")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        log(f"  {e.self_device_time_total / reps / 1e3:8.3f} ms  x{e.count // reps:4d}  {e.key[:110]}")
