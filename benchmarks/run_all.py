"""Run the CPU benchmark suite, then render results/summary.md and results/summary.png.

Each benchmark runs in its own process (its own threads, memory peak and Ray cluster) with
a time limit, in this order: step cost + FLOPs, SD v1.5 FLOP count, k-NN build, input
pipeline + scaling (real prepare and run_train), ZeRO memory. About 10-15 minutes on an
idle 2-core machine; longer when the machine is busy. GPU figures need a GPU:
benchmarks/gpu_unet.py and benchmarks/faiss_gpu.py (not part of this suite).

    .venv/bin/python benchmarks/run_all.py            # the whole suite
    .venv/bin/python benchmarks/run_all.py --quick    # a few minutes: fewer repetitions, N = 10k only
    .venv/bin/python benchmarks/run_all.py --only step_cost knn_build
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from _common import BENCH, REPO, write_result

SUITE = {  # name -> (arguments, quick arguments, time limit in seconds)
    "step_cost": ([], ["--reps", "2"], 900),
    "sd15_flops": (["--count-only"], ["--count-only"], 300),
    "knn_build": (["--threads", "1"], ["--threads", "1", "--sizes", "10000", "--reps", "2"], 1200),
    "input_pipeline": ([], ["--epochs", "2", "--steps", "8"], 1500),
    "zero_memory": ([], [], 1500),
}
SCRIPT = {"sd15_flops": "gpu_unet.py"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=list(SUITE), default=list(SUITE))
    args = p.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t_all = time.time()
    done = []
    for name in args.only:
        full, quick, limit = SUITE[name]
        cmd = [sys.executable, str(BENCH / SCRIPT.get(name, f"{name}.py")), *(quick if args.quick else full)]
        print(f"\n=== {name}: {shlex.join(cmd[1:])} (limit {limit}s)", flush=True)
        load = os.getloadavg()[0]
        t0 = time.time()
        for attempt in (1, 2):
            try:
                rc = subprocess.run(cmd, cwd=REPO, env=env, timeout=limit, check=False).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit}s"
            # On a saturated machine a local Ray node can miss its 30 s start-up deadline:
            # one retry for a quick failure, never for a timeout.
            if status == "ok" or status.startswith("timed out") or time.time() - t0 > 180:
                break
            print(f"=== {name}: {status}; retrying once", flush=True)
        done.append({"name": name, "status": status, "seconds": round(time.time() - t0), "loadavg_start": round(load, 1)})
        print(f"=== {name}: {status} in {time.time() - t0:.0f}s", flush=True)
    command = ".venv/bin/python benchmarks/run_all.py" + (" --quick" if args.quick else "") + \
        ("" if args.only == list(SUITE) else " --only " + " ".join(args.only))
    write_result("run_all", {"command": command, "quick": args.quick, "benchmarks": done,
                             "total_s": time.time() - t_all})
    subprocess.run([sys.executable, str(BENCH / "render.py")], cwd=REPO, env=env, check=True)
    failed = [d["name"] for d in done if d["status"] != "ok"]
    print(f"\nsuite done in {(time.time() - t_all) / 60:.1f} min" + (f"; not ok: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
