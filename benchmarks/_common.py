"""Helpers shared by the benchmark scripts: interleaved timing, medians, JSON results.

The CPU this suite runs on is shared and noisy, so every comparison is measured side by
side in one process: the cases of one repetition run back to back (machine noise hits
them alike), repetitions are summarised by their median, and figures are reported as
ratios to a reference measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
WORK = BENCH / ".work"  # prepared shards, run dirs, MLflow db: git-ignored scratch

if str(REPO) not in sys.path:  # scripts run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))


def machine() -> dict:
    """What the numbers were measured on, including how busy the machine was."""
    import torch

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0], "python": platform.python_version(),
    }


def interleaved(cases: dict[str, Callable[[], None]], reps: int, warmup: int = 1,
                after: Callable[[], None] | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, process CPU seconds) per call of each case, ``reps`` times, the cases
    interleaved within a repetition.

    With one torch thread, CPU time is nearly immune to other processes time-slicing the
    core, so it is recorded next to wall time as a noise-robust cross-check. ``after`` runs
    outside the timed region after every call (e.g. ``zero_grad``)."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
            if after:
                after()
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if after:
                after()
    return wall, cpu


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def spread(values: list[float]) -> float:
    """Interquartile range over median: a unitless noise figure for one case."""
    if len(values) < 4:
        return (max(values) - min(values)) / statistics.median(values)
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / q[1]


def write_result(name: str, result: dict, out: str | Path | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` (or ``out``) with the machine description."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {path}", flush=True)
    return path


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_config(overrides: dict | None = None):
    """``benchmarks/bench.yaml`` with its relative paths made absolute, plus overrides."""
    from pogdiff_dist.config import load_config

    paths = {"prepare.out_dir": str(WORK / "prepared-bench"), "train.storage_path": str(WORK / "runs"),
             "tracking.tracking_uri": f"sqlite:///{WORK / 'mlflow.db'}"}
    return load_config(BENCH / "bench.yaml", {**paths, **(overrides or {})})
