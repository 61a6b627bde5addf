"""Shared benchmark helpers: interleaved timing rounds, peak memory of one call, machine notes, tables.

Import from a benchmark script with `from _common import ...` (scripts run as `python benchmarks/x.py`,
so this folder is on sys.path).
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

# -- timing -------------------------------------------------------------------------------------------------
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_once(fn: Callable[[], Any], device: torch.device | str = "cpu", clock: str = "wall") -> float:
    """Seconds for one call of `fn` (synchronising an accelerator before and after).

    clock "wall": elapsed time. "cpu": this process's CPU time (all its threads), which on a shared
    machine leaves out the time other processes held the cores; use it with few torch threads (idle
    OpenMP workers spin and would be counted).
    """
    now = CLOCKS[clock]
    sync = _synchronizer(device)
    sync()
    start = now()
    fn()
    sync()
    return now() - start


def interleaved(
    variants: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 0,
    device: torch.device | str = "cpu",
    before: Callable[[str], Any] | None = None,
    clock: str = "wall",
    warm_each: bool = False,
) -> dict[str, list[float]]:
    """Run every variant once per round, rotating the order each round; seconds per call per variant.

    Interleaving makes slow drifts of a noisy machine hit all variants alike. `warmup` rounds are run
    and discarded. `before(name)` (untimed) runs before each timed call, e.g. to reset `.grad`. Round i
    of every variant is element i of its list, so lists can be compared pairwise (`paired_ratio`).
    warm_each: run each variant once, untimed, right before its timed call, so every variant is timed in
    its own steady state (as in a training loop) rather than with the caches the previous variant left:
    with weights bigger than the last-level cache, a variant that follows one sharing its weights is
    otherwise measurably faster than one that follows a variant with other weights.
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            if warm_each:
                if before is not None:
                    before(name)
                variants[name]()
            if before is not None:
                before(name)
            t = time_once(variants[name], device, clock)
            if i >= warmup:
                times[name].append(t)
    return times


def timing_args(ap: Any, rounds: int, warmup: int, quick: tuple[int, int] = (2, 1)) -> Any:
    """Add the usual flags (--rounds, --warmup, --threads, --clock, --quick) to an argparse parser; returns a
    `finish(args)` that applies --quick (`quick` = (rounds, warmup)) and the thread count."""
    ap.add_argument("--rounds", type=int, default=rounds, help=f"timed interleaved rounds (default {rounds})")
    ap.add_argument("--warmup", type=int, default=warmup, help=f"discarded rounds first (default {warmup})")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--quick", action="store_true", help=f"{quick[0]} rounds, {quick[1]} warmup: a smoke run")

    def finish(args: Any) -> Any:
        if args.quick:
            args.rounds, args.warmup = quick
        torch.set_num_threads(args.threads)
        return args

    return finish


def versus_peft(
    peft_step: Callable[[], Any],
    ours: Callable[[], Any],
    args: Any,
    before: Callable[[str], Any] | None = None,
) -> tuple[dict[str, list[float]], float, float]:
    """PEFT, PEFT again (A/A: the noise floor) and funcpeft, interleaved: (times, ratio, noise) with ratio the
    median per-round funcpeft / PEFT and noise |A/A ratio - 1|. `args`: from `timing_args`."""
    variants = {"PEFT": peft_step, "PEFT A/A": peft_step, "funcpeft": ours}
    device = getattr(args, "device", "cpu")  # an accelerator is synchronised around every timed call
    times = interleaved(variants, args.rounds, args.warmup, device=device, before=before, clock=args.clock)
    ratio = paired_ratio(times["funcpeft"], times["PEFT"])
    return times, ratio, abs(paired_ratio(times["PEFT A/A"], times["PEFT"]) - 1)


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def paired_ratio(ours: Sequence[float], ref: Sequence[float]) -> float:
    """Median over rounds of ours[i] / ref[i]: each pair ran back to back, so slow drifts cancel."""
    return statistics.median(o / r for o, r in zip(ours, ref, strict=True))


def paired_ratio_ci(
    ours: Sequence[float], ref: Sequence[float], level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Bootstrap confidence interval of `paired_ratio` (rounds resampled with replacement, fixed seed)."""
    ratios = [o / r for o, r in zip(ours, ref, strict=True)]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1.0 - level) / 2
    return meds[int(tail * (resamples - 1))], meds[int((1.0 - tail) * (resamples - 1))]


def spread(xs: Sequence[float]) -> float:
    """Interquartile range relative to the median (a noise indicator)."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


# -- memory -------------------------------------------------------------------------------------------------
def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by `fn` above what was allocated when it started (its result included).

    CUDA: `torch.cuda.max_memory_allocated` relative to the allocation at the start. CPU: torch's profiler
    with `profile_memory=True` records every CPU allocation and free made during the call (blocks that
    existed before are not counted, even when freed); the peak is the maximum running sum of those sizes,
    in time order. Deterministic, and counts tensor storage only (not Python objects or allocator slack).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.alloc_size))
    running = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        running += size
        peak = max(peak, running)
    return peak


def minor_faults(fn: Callable[[], Any]) -> int:
    """Minor page faults (fresh pages the OS had to map and zero) during one call of `fn`."""
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start


def steady_malloc() -> bool:
    """Stop glibc malloc from handing freed memory back to the OS between steps (True if it applied).

    By default glibc serves big blocks with mmap and trims the heap top on free, so a step may re-fault
    tens of MB of fresh zeroed pages (10k-25k minor faults, several ms per step on the benchmark Llama);
    which variant pays depends on the order in which small late tensors (e.g. returned gradients) are
    freed, not on the library. Raising M_MMAP_THRESHOLD to its 32 MiB cap and M_TRIM_THRESHOLD to 1 GiB
    keeps freed memory for reuse, as jemalloc/tcmalloc do: every variant then runs without page faults.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


# -- reporting ----------------------------------------------------------------------------------------------
def machine_note() -> str:
    """One line: load averages, cores, torch threads and versions (timings on a loaded machine are noisy)."""
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"load avg (1/5/15 min) {load} on {os.cpu_count()} cores; torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s); python {platform.python_version()}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def fmt_mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _synchronizer(device: torch.device | str) -> Callable[[], None]:
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
