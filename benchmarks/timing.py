"""Shared by the benchmark scripts: the time of one call, by CUDA events on a GPU; waiting for the device."""

import statistics
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


def host_ms(fn, reps=12, warm=2) -> float:
    """Median host milliseconds to issue fn() (CUDA: the queue drained before each call, so nothing waits)."""
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[warm:])


def host_profile(fn, what, log, reps=30, top=22):
    """The Python functions where issuing fn() spends its host time (cProfile, own time, the queue drained before
    each call so that no launch waits for room), through `log`. cProfile slows calls, so read the shares."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.enable()
        fn()
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    log(f"host profile: {what}, {reps} calls:\n" + "\n".join(
        line for line in text.getvalue().splitlines() if line.strip() and not line.startswith("   Ordered")))


def capture_graph(fn) -> "torch.cuda.CUDAGraph":
    """fn() captured in a CUDA graph, after one warm-up call on a side stream (compiles kernels, creates
    handles: none of it in the graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


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


def gpu_idle(fn, device, what, log, top=6):
    """Where the GPU waits inside one fn() call that starts on an idle device (after two warm-up calls): from
    its first kernel to its last, the busy time and the gaps between kernels (the largest named by the kernel
    that waited), through `log`. Gaps are launch latency: the host had not yet issued the work. (Profiled,
    so the host runs somewhat slower than without.)"""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    events = prof.events()
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    if not kernels:
        return log(f"gpu idle: {what}: no kernels")
    gaps, busy, end = [], 0.0, kernels[0].time_range.start
    for k in kernels:
        if k.time_range.start > end:
            gaps.append((k.time_range.start - end, k.name))
        busy += max(0.0, k.time_range.end - max(end, k.time_range.start))
        end = max(end, k.time_range.end)
    idle = sum(g for g, _ in gaps)
    log(f"gpu idle: {what}: {len(kernels)} kernels over {(end - kernels[0].time_range.start) / 1e3:.3f} ms: "
        f"busy {busy / 1e3:.3f}, idle {idle / 1e3:.3f} in {len(gaps)} gaps")
    for gap, name in sorted(gaps, reverse=True)[:top]:
        log(f"  {gap / 1e3:7.3f} ms before {name[:100]}")
