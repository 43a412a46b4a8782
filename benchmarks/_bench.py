"""Shared by the benchmark scripts: fixed glibc allocator settings, the process's peak resident set, the machine
description and the atomic JSON report."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

# glibc's defaults let large activations page-fault on every step (docs/performance.md), which would time the
# allocator rather than the model; these settings keep freed heap pages for reuse.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                 "MALLOC_TOP_PAD_": "1073741824"}


def use_fixed_allocator() -> None:
    """Re-exec this script with ALLOCATOR_ENV set, unless it already is (glibc reads them only at start-up)."""
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})


def vm_hwm_bytes() -> int:
    """Peak resident set of this process (VmHWM; it can be reset with /proc/self/clear_refs, ru_maxrss cannot)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info(threads: int) -> dict:
    """What a result was measured on (stored in every report)."""
    import torch

    from convbert.model.kernels import cpu_kernel_choices

    try:  # the HF port compared against, where a script compares with it
        from importlib.metadata import version

        transformers = version("transformers")
    except Exception:  # not installed
        transformers = None
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers,
            "threads": threads,
            "cpu_kernels": cpu_kernel_choices()}  # the CPU model and the kernels it picked (`convbert info --kernels`)


def write_report(path: str, report: dict, quiet: bool = False) -> None:
    """Write the JSON report atomically (temp file + rename), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
